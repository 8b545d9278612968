"""The torch-free catalogue of plug-in options (ant_ray/plugin_options.py) against the classes it describes: the same
names, the same options, the same rules; and the command answers `--help` and `validate` without importing torch."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from ant_ray.config import ConfigError, load_config
from ant_ray.diffusion.weightings import LOSS_WEIGHTINGS, build_weighting
from ant_ray.mtl import MTL_METHODS, build_mtl_method
from ant_ray.plugin_options import (LOSS_WEIGHTING_OPTIONS, MTL_METHOD_OPTIONS, check_mtl_options,
                                    check_weighting_options)

ROOT = Path(__file__).resolve().parent.parent


def _options_with_defaults(cls, skip: tuple[str, ...]) -> dict:
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def test_the_catalogue_lists_every_registered_method_with_the_options_of_its_constructor():
    assert sorted(MTL_METHOD_OPTIONS) == MTL_METHODS.names()
    assert sorted(LOSS_WEIGHTING_OPTIONS) == LOSS_WEIGHTINGS.names()
    for name in MTL_METHODS.names():
        defaults = _options_with_defaults(MTL_METHODS.get(name), ("self", "num_tasks"))
        assert sorted(defaults) == sorted(MTL_METHOD_OPTIONS[name]), name
        assert check_mtl_options(name, defaults) == defaults, f"{name}'s defaults break its own rules"
    for name in LOSS_WEIGHTINGS.names():
        defaults = _options_with_defaults(LOSS_WEIGHTINGS.get(name), ("self",))
        assert sorted(defaults) == sorted(LOSS_WEIGHTING_OPTIONS[name]), name
        assert check_weighting_options(name, defaults) == defaults


BAD_MTL = [("cagrad", {"c": -0.1}, "c must be >= 0"), ("cagrad", {"rescale": 3}, "rescale must be one of"),
           ("nash_mtl", {"update_every": 0}, "update_every must be an integer >= 1"),
           ("pcgrad", {"seed": -1}, "seed must be an integer >= 0"),
           ("uw_pcgrad", {"reduction": "max"}, "reduction must be one of"),
           ("rlw", {"seed": 1.5}, "seed must be an integer"),
           ("gradnorm", {"alpha": "1"}, "alpha must be a number"),
           ("imtl_g", {"alpha": 1.0}, r"unknown option\(s\) \['alpha'\] for MTL method 'imtl_g'; accepted: none"),
           ("mgda", {}, "unknown MTL method 'mgda'; choose one of: cagrad")]


@pytest.mark.parametrize("name,options,message", BAD_MTL)
def test_a_bad_mtl_option_fails_the_same_way_in_the_config_and_in_the_class(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_mtl_method(name, 3, options)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [f"ant.method={name}", f"ant.method_options={options}"])
    assert "ant" in str(error.value)


BAD_WEIGHTING = [("min-snr", {"gamma": 0.0}, "gamma must be > 0"), ("p2", {"k": -1.0}, "k must be > 0"),
                 ("p2", {"gamma": -0.5}, "gamma must be >= 0"),
                 ("snr+1", {"gamma": 5.0}, r"unknown option\(s\) \['gamma'\] for loss weighting 'snr\+1'"),
                 ("min_snr", {}, "unknown loss weighting 'min_snr'; choose one of: min-snr")]


@pytest.mark.parametrize("name,options,message", BAD_WEIGHTING)
def test_a_bad_weighting_option_fails_the_same_way_in_the_config_and_in_the_class(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_weighting(name, **options)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [f"finetune.weighting.name={name}", f"finetune.weighting.options={options}"])
    assert "finetune.weighting" in str(error.value)


def test_help_and_validate_do_not_import_torch_ray_or_mlflow():
    """`ant-ray --help` and `ant-ray validate` must answer in well under two seconds (issue 11); torch alone takes
    about four to import here. Every shipped config validates so."""
    configs = sorted(str(p) for p in (ROOT / "search_spaces").glob("*.yaml"))
    code = ("import sys, contextlib, io\n"
            "from ant_ray.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    for path in {configs!r}:\n"
            "        assert main(['validate', path]) == 0, path\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'diffusers', 'scipy') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", f"validate imports {done.stdout.strip()}"

"""The options of each MTL method, loss weighting and model family, and the rules that check them, without importing
torch.

A config is validated on load, before Ray or torch start, and `ant-ray validate` answers in well under two seconds;
so the config checks method names and options here instead of building the torch objects. The classes check their
own arguments with these same rules (`MTLMethod._checked`, the weightings' constructors), and
tests/test_plugin_options.py checks that every registered class takes exactly the options listed here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Callable

import numpy as np


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


Check = Callable[[str, Any], Any]  # (option name, value) -> the checked value, or ValueError
_SEED = partial(check_positive_int, minimum=0)
_REDUCTION = partial(check_choice, choices=("sum", "mean"))

# name -> {option: check}. Defaults live in the classes' signatures.
MTL_METHOD_OPTIONS: dict[str, dict[str, Check]] = {
    "ls": {"reduction": _REDUCTION},
    "rlw": {"seed": _SEED},
    "uw": {"init_logvar": check_float},
    "pcgrad": {"seed": _SEED, "reduction": _REDUCTION},
    "nash_mtl": {"update_every": check_positive_int, "max_norm": partial(check_float, minimum=0.0)},
    "gradnorm": {"alpha": partial(check_float, minimum=0.0)},
    "imtl_g": {},
    "cagrad": {"c": partial(check_float, minimum=0.0), "rescale": partial(check_choice, choices=(0, 1, 2))},
    "uw_pcgrad": {"init_logvar": check_float, "seed": _SEED, "reduction": _REDUCTION},
}

LOSS_WEIGHTING_OPTIONS: dict[str, dict[str, Check]] = {
    "uniform": {},
    "snr+1": {},
    "truncated-snr": {},
    "min-snr": {"gamma": partial(check_float, minimum=0.0, strict=True)},
    "p2": {"k": partial(check_float, minimum=0.0, strict=True), "gamma": partial(check_float, minimum=0.0)},
}


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


# Model families (ant_ray/diffusion/families/): the options a config may set on top of a preset. num_classes = 0 is
# an unconditional model; learn_sigma doubles the output channels (IDDPM's learned variance).
_FAMILY_COMMON: dict[str, Check] = {"num_classes": partial(check_positive_int, minimum=0),
                                    "learn_sigma": check_bool}
MODEL_FAMILY_OPTIONS: dict[str, dict[str, Check]] = {
    "unet": dict(_FAMILY_COMMON),
    "dit": {**_FAMILY_COMMON, "patch_size": check_positive_int, "depth": check_positive_int,
            "width": check_positive_int, "heads": check_positive_int},
}


def _check(family: str, catalogue: dict[str, dict[str, Check]], name: str, options: Mapping[str, Any],
           prefix: str = "") -> dict[str, Any]:
    if name not in catalogue:
        raise ValueError(f"unknown {family} {name!r}; choose one of: {', '.join(sorted(catalogue))}")
    accepted = catalogue[name]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {family} {name!r}; accepted: {sorted(accepted) or 'none'}")
    return {key: accepted[key](prefix + key, value) for key, value in options.items()}


def check_mtl_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options of MTL method `name`, checked (ValueError naming the option and the rule)."""
    return _check("MTL method", MTL_METHOD_OPTIONS, name, options or {})


def check_weighting_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options of loss weighting `name`, checked (ValueError naming the option and the rule)."""
    return _check("loss weighting", LOSS_WEIGHTING_OPTIONS, name, options or {}, prefix="weighting.")


def check_family_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options of model family `name`, checked (ValueError naming the option and the rule)."""
    return _check("model family", MODEL_FAMILY_OPTIONS, name, options or {}, prefix="model.")

"""YAML under `search_spaces/` + `--set key=value` overrides -> a validated PipelineConfig, or one ConfigError that
names the field (or the file's line) and how to fix it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ant_ray.config.pipeline import PipelineConfig
from ant_ray.config.sections import ConfigError


def _parse_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{key.strip()}: the value {text!r} given with --set is not valid YAML ({problem}); quote "
                          f"it, e.g. --set '{key.strip()}=\"{text}\"'") from None


_DISTRIBUTION_FIELDS = {"type", "low", "high", "step", "log", "choices"}


def _split_key(key: str) -> list[str]:
    """'a.b.c' -> ['a', 'b', 'c'], except that a search space's keys are dotted field names themselves:
    'search.ant.space.ant.k' -> ['search', 'ant', 'space', 'ant.k'], and '...space.ant.k.high' sets the
    distribution's `high`."""
    parts = key.strip().split(".")
    if len(parts) > 3 and parts[0] == "search" and parts[2] == "space":
        field, rest = parts[3:], []
        if len(field) > 1 and field[-1] in _DISTRIBUTION_FIELDS:
            field, rest = field[:-1], field[-1:]
        return parts[:3] + [".".join(field)] + rest
    return parts


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, creating sections as needed."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set pretrain.steps=200)")
        key, value = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"--set {item!r}: the key is empty or has an empty part; write a dotted field name, "
                              "e.g. --set pretrain.steps=200")
        node = raw
        parts = _split_key(key)
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = _parse_value(key, value)
    return raw


def _field_name(loc: tuple) -> str:
    # Dict keys that contain dots (a search space's field names) are shown in brackets: search.ant.space[ant.k].low
    name = ""
    for part in loc:
        part = str(part)
        name += f"[{part}]" if "." in part else (f".{part}" if name else part)
    return name or "(top level)"


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        # A discriminated union adds the tag to the location (search.ant.space[ant.k].int.low): drop it.
        loc = tuple(p for i, p in enumerate(e["loc"])
                    if not (p in ("int", "float", "categorical") and i > 0 and "." in str(e["loc"][i - 1])))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against search_spaces/README.md"
        elif e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            msg = "a distribution needs type: int, float or categorical (e.g. {type: int, low: 2, high: 6})"
        # Cross-section checks (loc empty) already name their fields in the message.
        lines.append(f"  {_field_name(loc)}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = " (YAML indents with spaces, never tabs)" if "\t" in path.read_text() else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}{hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level (key: value lines)")
    return raw


def config_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "the given config") -> PipelineConfig:
    """Validate a config given as a (nested) dict, after overrides."""
    raw = apply_overrides(dict(raw), list(overrides or []))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                **updates: Any) -> PipelineConfig:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config {path} is a folder; pass a YAML file (the shipped ones are in search_spaces/), "
                              "or continue a search in that folder with --resume")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (the shipped ones are in search_spaces/)")
        raw = _read_yaml(path)
        source = str(path)
    raw = apply_overrides(raw, list(overrides or []))
    raw.update(updates)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None

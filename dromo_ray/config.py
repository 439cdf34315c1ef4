"""YAML <-> :class:`ExperimentConfig`. The YAML uses the dataclass field names, nested by section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dromo_ray.core.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    flatten,
    to_dict,
)

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "parse_overrides", "config_from_dict",
           "flatten", "to_dict", "dump_config", "read_yaml"]


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["agent.alpha=0.5", "agent.hidden_dims=[64,64]"]`` -> {"agent.alpha": 0.5, ...} (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply ``--set`` overrides, validate. Errors name the file and the key."""
    data = dict(base or {})
    source = ""
    if path is not None:
        data = apply_overrides(data, flatten(read_yaml(path))) if data else read_yaml(path)
        source = str(path)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = apply_overrides(data, ov)
    return config_from_dict(data, source=source)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

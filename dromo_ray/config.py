"""Config files: YAML <-> :class:`~dromo_ray.core.config.ExperimentConfig` (the file layer only).

The typed config itself -- the dataclasses, their validation, the strict construction from nested dicts -- is
:mod:`dromo_ray.core.config`; errors are :class:`dromo_ray.errors.ConfigError`. This module reads and writes
the YAML files of ``tune_configs/``, which use the dataclass field names nested by section.

A file may name the file it builds on::

    base: ../algos/dromo.yaml    # relative to this file (or absolute); chains of any depth
    data: {dataset: hopper-medium-v2, env: hopper}
    rollout: {horizon: 5}        # overrides the base's rollout.horizon; its other rollout keys stay

The base is composed first (its own ``base:`` included), then the file's sections override it key by key: a
mapping merges into the base's mapping, a list or a scalar replaces the base's value, and a ``*_resources``
mapping (a set of custom Ray resources) replaces the base's whole, exactly as ``--set`` and a sweep's inline
sections override (:func:`dromo_ray.core.config.flatten` + :func:`dromo_ray.core.config.apply_overrides`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dromo_ray.core.config import ExperimentConfig, apply_overrides, config_from_dict, flatten, to_dict
from dromo_ray.core.files import write_text_atomic
from dromo_ray.errors import ConfigError

__all__ = ["read_yaml", "compose_yaml", "parse_overrides", "load_config", "dump_config"]

BASE_KEY = "base"
"""The top-level key of a config file that names the file it builds on."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML file as a mapping (``base:`` not followed; see :func:`compose_yaml`)."""
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


def compose_yaml(path: str | Path) -> dict[str, Any]:
    """The nested dict a config file says, its ``base:`` chain composed (not validated; no ``base`` key left).

    A missing base file, a ``base:`` that is not a path string, and a chain that comes back to a file already in
    it are :class:`ConfigError` naming the file and the key ``base``.
    """
    return _compose(Path(path), ())


def _compose(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    data = read_yaml(p)
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{p}: {BASE_KEY}: expected the path of a config file, got {base!r}")
    base_path = p.parent / Path(base).expanduser()
    if not base_path.is_file():
        raise ConfigError(f"{p}: {BASE_KEY}: {base_path}: no such config file")
    seen = (*chain, p.resolve())
    if base_path.resolve() in seen:
        cycle = " -> ".join(str(s) for s in (*seen, base_path.resolve()))
        raise ConfigError(f"{p}: {BASE_KEY}: {base} closes a cycle ({cycle})")
    composed = _compose(base_path, seen)
    try:
        return apply_overrides(composed, flatten(data))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e} (in its base {base_path})") from None


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


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Compose a config file (its ``base:`` chain), apply ``--set`` overrides, validate.

    ``path`` None starts from the defaults. ``overrides`` are ``KEY=VALUE`` strings (values read as YAML) or a
    dict of dotted keys. Errors are :class:`ConfigError` naming the file and the key.
    """
    data = compose_yaml(path) if path is not None else {}
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = apply_overrides(data, ov)
    return config_from_dict(data, source=str(path) if path is not None else "")


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the whole config (every field, no ``base:``) as YAML, atomically: a reader sees the old file or this
    one, never a part."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

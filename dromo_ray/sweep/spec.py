"""The sweep, resolved: every trial's train config composed and validated before Ray starts (edge layer).

:func:`load_sweep` reads the file (its schema: :mod:`dromo_ray.sweep.schema`), composes the config of each
*cell* -- an arm (or the single ``base:``) on a dataset (or on its own dataset) -- and checks the search against
every cell: an unknown key, a malformed distribution, a value that makes an invalid config, a missing dataset
(unless ``check_datasets=False``) raises one :class:`ConfigError` naming the file and the key.

A cell's config is, in this order: its base file; then, without ``arms:``, the config sections written inline in
the sweep file, or, with ``arms:``, the arm's ``set:`` and the sweep's ``common:`` (which may not name the same
key); then the ``datasets:`` entry (``data.dataset``, ``data.env``). A trial's config is its cell's plus the values
the search drew for it and its seed. The trial's Tune config names its cell by ``arm`` and ``dataset`` (the
dataset's tag, :func:`dromo_ray.tracking.dataset_tag`), so Tune's grid crosses them like any searched key.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dromo_ray.config import compose_yaml, read_yaml
from dromo_ray.core.config import ExperimentConfig, apply_overrides, config_from_dict, flatten, to_dict
from dromo_ray.errors import ConfigError
from dromo_ray.sweep.schema import (
    NAME_PATTERN,
    AshaScheduler,
    Distribution,
    FifoScheduler,
    Resources,
    Searcher,
    SweepFile,
    config_error,
)
from dromo_ray.tracking import dataset_tag

ARM_KEY = "arm"
"""The key of a trial's Tune config that names its arm (absent without ``arms:``)."""
DATASET_KEY = "dataset"
"""The key of a trial's Tune config that names its ``datasets:`` entry, by its tag."""
ENV_PLACEHOLDER = "{env}"
"""In a base path: the env of each ``datasets:`` entry (``../tasks/dromo_{env}.yaml``)."""
NOT_SEARCHABLE = ("seed", "out_dir", "tracking.")
"""Keys fixed for the whole sweep (the seed has ``seeds:``); an arm's ``set:`` may not name them either."""
MAX_COMBINATIONS = 512
"""Validate every combination of the search's candidate values up to this many; each key alone beyond it."""

Cell = tuple[str, str]
"""(arm name, dataset tag); "" where the sweep has no arms or no ``datasets:``."""


@dataclass
class SweepSpec:
    path: Path
    name: str
    cells: dict[Cell, dict[str, Any]]
    """Each cell's config as a nested dict; validated, paths made absolute. Arms first, then datasets, in order."""
    search: dict[str, Distribution]
    seeds: list[int]
    metric: str
    mode: str
    arms: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    """The tags of the ``datasets:`` entries, in order."""
    num_samples: int = 1
    max_concurrent_trials: int = 0
    max_failures: int = 0
    scheduler: dict[str, Any] | None = None
    searcher: dict[str, Any] = field(default_factory=lambda: {"type": "basic"})
    driver_cpus: float = 0.1
    strategy: str = "PACK"
    storage_path: Path = Path("dromo_runs/sweeps")

    @property
    def config(self) -> dict[str, Any]:
        """The base config of a sweep without arms or datasets (else the first cell's)."""
        return next(iter(self.cells.values()))

    @property
    def experiment_dir(self) -> Path:
        return self.storage_path / self.name

    @property
    def tracking_experiment(self) -> str:
        return self.config_obj().tracking.experiment

    def trial_keys(self) -> list[str]:
        """The keys of a trial's Tune config that tell trials apart, besides the seed (the tables' columns)."""
        return [*([ARM_KEY] if self.arms else []), *([DATASET_KEY] if self.datasets else []), *self.search]

    def config_obj(self, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        """The config of a trial whose Tune config is ``overrides`` (without ``arm``/``dataset``: the first)."""
        return config_from_dict(compose_trial(self.cells, overrides or {}))

    def param_space(self) -> dict[str, Any]:
        from ray import tune

        space: dict[str, Any] = {}
        if self.arms:
            space[ARM_KEY] = tune.grid_search(list(self.arms))
        if self.datasets:
            space[DATASET_KEY] = tune.grid_search(list(self.datasets))
        space.update({k: d.to_tune() for k, d in self.search.items()})
        space["seed"] = tune.grid_search(list(self.seeds))
        return space

    def expected_trials(self) -> int | None:
        """Trials the basic searcher generates (None for other searchers)."""
        if self.searcher.get("type", "basic") != "basic":
            return None
        grid = math.prod(len(d.values) for d in self.search.values() if d.kind == "grid")
        return self.num_samples * grid * len(self.seeds) * max(1, len(self.arms)) * max(1, len(self.datasets))

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a sweep and its ``--resume``."""
        fp: dict[str, Any] = {"name": self.name}
        if self.arms or self.datasets:
            fp["cells"] = {"/".join(x for x in c if x): jsonable(cfg) for c, cfg in self.cells.items()}
        else:
            fp["config"] = jsonable(self.config)
        fp.update({"search": {k: d.describe() for k, d in self.search.items()}, "seeds": list(self.seeds),
                   "metric": self.metric, "mode": self.mode, "num_samples": self.num_samples,
                   "scheduler": jsonable(self.scheduler), "searcher": jsonable(self.searcher)})
        return fp


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def compose_trial(cells: dict[Cell, dict[str, Any]], trial_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config as a nested dict: its cell's (named by ``arm``/``dataset``) plus its other keys."""
    ov = dict(trial_config)
    first = next(iter(cells))
    cell = (str(ov.pop(ARM_KEY, first[0])), str(ov.pop(DATASET_KEY, first[1])))
    return apply_overrides(cells[cell], ov)


def load_sweep(path: str | Path, *, check_datasets: bool = True) -> SweepSpec:
    """Read and validate a whole sweep file; every problem is a :class:`ConfigError` naming file and key.

    ``check_datasets=False`` checks everything but the datasets' existence (dataset values stay as written): a
    sweep file can be validated on a machine that does not hold its data.
    """
    p = Path(path)
    try:
        return _load_sweep(p, check_datasets)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None


def _load_sweep(p: Path, check_datasets: bool) -> SweepSpec:
    try:
        f = SweepFile.model_validate(read_yaml(p))
    except ValidationError as e:
        raise config_error(e) from None
    cells = _compose_cells(f, p.parent, check_datasets)
    search = _check_search(f, cells, p.parent, check_datasets)
    first = config_from_dict(next(iter(cells.values())))
    name = f.name if f.name is not None else p.stem
    if not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(f"name: {name!r} must be a non-empty name of letters, digits, '_', '.', '-'")
    res = f.resources or Resources()
    spec = SweepSpec(
        path=p.resolve(), name=name, cells=cells, search=search,
        seeds=list(f.seeds) if f.seeds is not None else [first.seed], metric=f.metric, mode=f.mode,
        arms=list(f.arms or {}), datasets=[dataset_tag(d.dataset) for d in f.datasets or []],
        num_samples=f.num_samples, max_concurrent_trials=f.max_concurrent_trials, max_failures=f.max_failures,
        scheduler=_scheduler(f.scheduler, first), searcher=_searcher(f, search), driver_cpus=float(res.driver_cpus),
        strategy=res.strategy,
        storage_path=(Path(f.storage_path).expanduser().resolve() if f.storage_path
                      else Path(first.out_dir) / "sweeps"),
    )
    _check_combinations(spec)
    return spec


# ---------------------------------------------------------------------------------------------------------
# Cells: each arm (or the base) on each dataset.


def _read_config_file(path: Path) -> dict[str, Any]:
    """A train config file as a nested dict (not validated), its own base: chain composed. The one place a sweep
    reads a base."""
    return compose_yaml(path)


def _compose_cells(f: SweepFile, sweep_dir: Path, check_datasets: bool) -> dict[Cell, dict[str, Any]]:
    if f.seeds is not None and ("seed" in f.config_sections or "seed" in (f.common or {})):
        raise ConfigError("seeds: give either a config `seed` or `seeds`, not both")
    if f.arms is None:
        if f.common is not None:
            raise ConfigError("common: only with arms: (without arms, write the settings as config sections)")
        # one unnamed arm: the base and the inline sections
        arms: dict[str, tuple[str, str | None, dict[str, Any]]] = {"": ("base", f.base, flatten(f.config_sections))}
    else:
        if f.base is not None:
            raise ConfigError("base: with arms:, each arm names its own base (arms.<name>.base)")
        if f.config_sections:
            k = next(iter(f.config_sections))
            raise ConfigError(f"{k}: with arms:, settings for every arm go under common: as dotted keys "
                              "(e.g. train.total_steps: 25000)")
        common = dict(f.common or {})
        for key in common:
            _check_key(f"common.{key}", key, allow_fixed=True, datasets=f.datasets is not None)
        arms = {}
        for name, arm in f.arms.items():
            for key in arm.set:
                where = f"arms.{name}.set.{key}"
                _check_key(where, key, allow_fixed=False, datasets=f.datasets is not None)
                if key in common:
                    raise ConfigError(f"{where}: also under common: (common: is the same for every arm)")
            arms[name] = (f"arms.{name}.base", arm.base, {**arm.set, **common})

    cells: dict[Cell, dict[str, Any]] = {}
    for arm, (base_key, base, overrides) in arms.items():
        for i, entry in enumerate(f.datasets or [None]):
            where = ((f"arms.{arm}" if arm else "") + (f" on datasets[{i}]" if entry is not None else "")).strip()
            data: dict[str, Any] = {}
            if base is not None:
                if ENV_PLACEHOLDER in base and entry is None:
                    raise ConfigError(f"{base_key}: {ENV_PLACEHOLDER} needs datasets: (each entry's env)")
                base_path = sweep_dir / Path(base.replace(ENV_PLACEHOLDER, entry.env if entry else "")).expanduser()
                try:
                    data = _read_config_file(base_path)
                except ConfigError as e:
                    raise ConfigError(f"{base_key}: {e}") from None
                try:
                    config_from_dict(data)
                except ConfigError as e:
                    if not str(e).startswith("data.dataset"):  # a base may leave the dataset to the sweep
                        raise ConfigError(f"base {base_path}: {e}") from None
            if entry is not None:
                overrides = {**overrides, "data.dataset": entry.dataset, "data.env": entry.env}
            try:
                cfg = config_from_dict(apply_overrides(data, overrides))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}" if where else str(e)) from None
            config = to_dict(cfg)
            config["out_dir"] = str(Path(cfg.out_dir).expanduser().resolve())
            if cfg.dynamics.cache_dir:  # one absolute place for every trial, whatever directory a trial runs in
                config["dynamics"]["cache_dir"] = str(Path(cfg.dynamics.cache_dir).expanduser().resolve())
            if check_datasets:
                key = f"datasets[{i}].dataset" if entry is not None else (f"{where}: data.dataset" if where
                                                                           else "data.dataset")
                config["data"]["dataset"] = resolve_dataset(cfg.data.dataset, sweep_dir, key)
            cells[(arm, dataset_tag(entry.dataset) if entry is not None else "")] = config
    _check_one_home(cells)
    if f.datasets is not None:
        tags = [dataset_tag(d.dataset) for d in f.datasets]
        for i, t in enumerate(tags):
            if tags.index(t) != i:
                raise ConfigError(f"datasets[{i}].dataset: {t!r} is already datasets[{tags.index(t)}]")
    return cells


def _check_key(where: str, key: str, *, allow_fixed: bool, datasets: bool) -> None:
    """A dotted key of ``common:`` or an arm's ``set:`` must name one config field that the sweep leaves open."""
    try:
        field_type(key)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if key == "seed":
        raise ConfigError(f"{where}: the seed is the sweep's (use `seeds:`)")
    if not allow_fixed and (key == "out_dir" or key.startswith("tracking.")):
        raise ConfigError(f"{where}: fixed for the whole sweep (set it under common:)")
    if datasets and key in ("data.dataset", "data.env"):
        raise ConfigError(f"{where}: the sweep's datasets: set it for every trial")


def _check_one_home(cells: dict[Cell, dict[str, Any]]) -> None:
    """One sweep logs to one MLflow experiment and store, under one out_dir: every cell must agree."""
    (arm0, _), c0 = next(iter(cells.items()))
    for (arm, _), c in cells.items():
        for section, key in (("tracking", "experiment"), ("tracking", "tracking_uri"), (None, "out_dir")):
            v, v0 = (c[section][key], c0[section][key]) if section else (c[key], c0[key])
            if v != v0:
                dotted = f"{section}.{key}" if section else key
                raise ConfigError(f"arms.{arm}: {dotted} {v!r} differs from arms.{arm0}'s {v0!r} (one sweep, one "
                                  "MLflow experiment and store: set it under common:)")


def resolve_dataset(spec: str, sweep_dir: Path, key: str) -> str:
    """Absolute path for a local file (trials run in other working directories); a ConfigError naming ``key`` when
    nothing exists. The rule itself is the data layer's (:func:`dromo_ray.data.load.resolve_dataset`)."""
    from dromo_ray.data.load import resolve_dataset as resolve
    from dromo_ray.errors import DatasetError

    try:
        return resolve(spec, sweep_dir)
    except DatasetError as e:
        raise ConfigError(f"{key}: {e.problem}") from None


# ---------------------------------------------------------------------------------------------------------
# The search, checked against every cell.


def field_type(dotted: str) -> Any:
    """The annotated type of a config field (``agent.alpha`` -> float); ConfigError for unknown keys."""
    cls: Any = ExperimentConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            prefix = ".".join(parts[:i])
            raise ConfigError(f"unknown config key {dotted!r} ({prefix + ': ' if prefix else ''}known: "
                              f"{', '.join(names)})")
        tp = hints[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section")
            cls = tp
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(f"{dotted} is a section; name one of its fields")
        else:
            return tp
    raise AssertionError  # pragma: no cover


def _numeric_kind(tp: Any) -> str:
    args = set(typing.get_args(tp)) - {type(None)} or {tp}
    if args <= {float}:
        return "float"
    if args <= {int}:
        return "int"
    return "other"


def _check_search(f: SweepFile, cells: dict[Cell, dict[str, Any]], sweep_dir: Path,
                  check_datasets: bool) -> dict[str, Distribution]:
    out: dict[str, Distribution] = {}
    for key, dist in (f.search or {}).items():
        k = f"search.{key}"
        if key == "seed" or key in NOT_SEARCHABLE or any(key.startswith(n) for n in NOT_SEARCHABLE
                                                         if n.endswith(".")):
            hint = "use `seeds:`" if key == "seed" else "it is fixed for the whole sweep"
            raise ConfigError(f"{k}: cannot be searched ({hint})")
        if f.datasets is not None and key in ("data.dataset", "data.env"):
            raise ConfigError(f"{k}: the sweep's datasets: already cross every trial")
        try:
            tp = field_type(key)
        except ConfigError as e:
            raise ConfigError(f"{k}: {e}") from None
        num = _numeric_kind(tp)
        if dist.kind == "randint" and num == "other":
            raise ConfigError(f"{k}.randint: {key} is not a number field")
        if dist.kind in ("uniform", "loguniform") and num != "float":
            raise ConfigError(f"{k}.{dist.kind}: {key} is not a float field (use randint or choice)")
        if dist.kind == "randint" and dist.values[1] - dist.values[0] < 1:
            raise ConfigError(f"{k}.randint: [low, high) is empty")
        if key == "data.dataset" and check_datasets:
            dist = dist.model_copy(update={dist.kind: tuple(resolve_dataset(str(v), sweep_dir, f"{k}.{dist.kind}")
                                                           for v in dist.values)})
        for v in dist.candidates():
            for cell, config in cells.items():
                try:
                    config_from_dict(apply_overrides(config, {key: list(v) if isinstance(v, tuple) else v}))
                except ConfigError as e:
                    at = f" (arms.{cell[0]})" if cell[0] else ""
                    raise ConfigError(f"{k}: value {v!r} is invalid{at}: {e}") from None
        out[key] = dist
    return out


def _check_combinations(spec: SweepSpec) -> None:
    """Every combination of candidate values must make a valid config (e.g. num_elites <= ensemble_size)."""
    keys = list(spec.search)
    if not keys:
        return
    cands = [spec.search[k].candidates() for k in keys]
    if math.prod(len(c) for c in cands) > MAX_COMBINATIONS:
        return
    for config in spec.cells.values():
        for combo in itertools.product(*cands):
            ov = {k: list(v) if isinstance(v, tuple) else v for k, v in zip(keys, combo, strict=True)}
            try:
                config_from_dict(apply_overrides(config, ov))
            except ConfigError as e:
                shown = ", ".join(f"{k}={v!r}" for k, v in ov.items())
                raise ConfigError(f"search: the combination {shown} is invalid: {e}") from None


def _scheduler(s: AshaScheduler | FifoScheduler | None, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The scheduler with its defaults from the (first cell's) config."""
    if s is None:
        return None
    if isinstance(s, FifoScheduler):
        return {"type": "fifo"}
    out = {"type": "asha", "time_attr": s.time_attr,
           "max_t": s.max_t if s.max_t is not None else cfg.train.total_steps,
           "grace_period": s.grace_period if s.grace_period is not None else cfg.train.eval_interval,
           "reduction_factor": s.reduction_factor, "brackets": s.brackets}
    if out["grace_period"] > out["max_t"]:
        raise ConfigError("scheduler.grace_period: must be <= scheduler.max_t")
    return out


def _searcher(f: SweepFile, search: dict[str, Distribution]) -> dict[str, Any]:
    s: Searcher | None = f.searcher
    if s is None:
        return {"type": "basic"}
    if s.type in ("basic", "random", "grid"):
        return {"type": "basic", "seed": s.seed}
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("searcher.type: optuna is not installed (pip install optuna)")
    grid = [k for k, d in search.items() if d.kind == "grid"]
    if grid:
        raise ConfigError(f"search.{grid[0]}: grid is only for the basic searcher (use choice with optuna)")
    if f.arms is not None or f.datasets is not None:
        raise ConfigError("searcher.type: arms: and datasets: are grids, which only the basic searcher runs")
    return {"type": "optuna", "seed": s.seed}

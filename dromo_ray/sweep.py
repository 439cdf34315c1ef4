"""``dromo-ray sweep SWEEP.yaml``: Ray Tune over the runtime; every trial is one MLflow run (edge layer).

A sweep file is a train config (the same sections and field names, or a ``base:`` config path that inline
sections override) plus the keys of the search::

    name: tiny                           # Tune experiment name: <storage_path>/<name>; default: the file's stem
    base: ../tasks/tiny_hopper_dromo.yaml  # a train config, relative to this file (optional)
    tracking: {experiment: sweep_tiny}   # any config section, overriding the base
    search:                              # dotted config keys -> one distribution each
      agent.algorithm: {grid: [dromo, combo]}
      agent.alpha: {loguniform: [0.1, 10.0]}   # also: choice [..], uniform [lo, hi], randint [lo, hi)
    seeds: [0, 1]                        # a grid over ``seed``: every point of the search runs every seed
    metric: final/normalized_score       # what the ranking (and a scheduler or searcher) uses
    mode: max
    num_samples: 1                       # repeats of the grid (samples of the non-grid distributions)
    max_concurrent_trials: 0             # 0: as many as the resources allow
    max_failures: 0                      # Tune retries of a failed trial (from its last checkpoint)
    scheduler: {type: asha, grace_period: 50000, reduction_factor: 3}    # optional; time_attr: step
    searcher: {type: basic, seed: 0}     # optional; basic (grid + random) or optuna (when installed)
    resources: {driver_cpus: 0.1, strategy: PACK}
    storage_path: dromo_runs/sweeps      # default: <out_dir>/sweeps

Everything is validated before Ray starts a trial: an unknown key, a malformed distribution, a value that
makes an invalid config, a missing dataset, or a trial that cannot fit the cluster (more CPUs or GPUs than it
has, a custom resource it lacks) raises :class:`ConfigError` naming the key.

Resources per trial are a placement group derived from the config's ``runtime`` section (Tune captures the
runtime's actors into it; see :func:`trial_bundles`): bundle 0 for the trial driver (``resources.driver_cpus``);
a learner bundle (``runtime.learner_cpus``, one GPU when the cluster has one and ``device`` is not ``cpu``,
``runtime.learner_resources``); one bundle per rollout worker (with ``runtime.rollout_worker_resources``) and per
evaluator. Ray puts each actor in whichever bundle has room, so the bundles are sized to work in any order: each
carries the replay actor's 0.01 CPU as slack, and workers and evaluators share one size, the larger of
``runtime.rollout_worker_cpus`` and ``runtime.evaluator_cpus``. The dynamics trainers and the behaviour fitter
run first and reuse those bundles; extra bundles cover any shortfall.

MLflow: one parent run per sweep (tag ``sweep.role=parent``); each trial is one run under it
(``mlflow.parentRunId``) created by the trial before :func:`dromo_ray.train.train` runs, with the tags,
params and metrics of a single ``train`` plus ``sweep.*`` tags. Its id is kept in the trial's run directory,
in every Tune checkpoint and as the tag ``sweep.trial_id``, so a retried or resumed trial writes to the same
run: ``--resume`` (``Tuner.restore``) never reruns finished trials, continues unfinished ones from their last
checkpoint (the ``train(resume=...)`` path) and leaves exactly one run per trial. Ray's MLflowLoggerCallback
is not used: it opens a new run on restore.

Output: a progress table every ``$DROMO_SWEEP_PRINT_S`` seconds (15) and a line per finished trial, then a
ranking of the variants (mean ± std of the metric over seeds; only trials that finished count) and the trials;
``--json`` prints that summary as JSON on stdout and the progress on stderr. Exit status: 0, 1 when a trial
failed, 130 when interrupted, 2 for an invalid sweep file.

Test hook: ``DROMO_SWEEP_INTERRUPT_AFTER="trials=N[,checkpoints=K]"`` sends this process SIGINT -- exactly
what Ctrl-C does -- once N trials have completed and K more checkpoints have been reported after that.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from dromo_ray.config import compose_yaml, read_yaml
from dromo_ray.core.config import (
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    flatten,
    to_dict,
)
from dromo_ray.errors import ConfigError
from dromo_ray.runtime.cluster import REPLAY_CPUS, Cluster, check_fits, fmt_resources, learner_gpus, start_ray

SWEEP_KEYS = ("name", "base", "search", "seeds", "metric", "mode", "num_samples", "max_concurrent_trials",
              "max_failures", "scheduler", "searcher", "resources", "storage_path")
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
METRIC_NAMESPACES = ("train/", "dynamics/", "eval/", "perf/", "rollout/", "replay/", "final/", "behavior/")
NOT_SEARCHABLE = ("seed", "out_dir", "tracking.")
META_FILE = "dromo_sweep.json"
TRIAL_META = "dromo_trial.json"
COMPLETE_KEY = "sweep/complete"
INTERRUPTED_REASON = "sweep interrupted; dromo-ray sweep --resume continues this run"
MAX_COMBINATIONS = 512
"""Validate every combination of the search's candidate values up to this many; each key alone beyond it."""


# ---------------------------------------------------------------------------------------------------------
# The sweep file.


@dataclass(frozen=True)
class Distribution:
    """One search dimension: ``grid``/``choice`` over values, or ``uniform``/``loguniform``/``randint`` [lo, hi]."""

    kind: str
    values: tuple[Any, ...]

    def to_tune(self) -> Any:
        v = [list(x) if isinstance(x, tuple) else x for x in self.values]
        if self.kind == "grid":
            return tune.grid_search(v)
        if self.kind == "choice":
            return tune.choice(v)
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def candidates(self) -> list[Any]:
        """Values that validation builds a config with: every listed value, or the ends of a range."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


@dataclass
class SweepSpec:
    path: Path
    name: str
    config: dict[str, Any]
    """The base config (base file + inline sections) as a nested dict; validated, paths made absolute."""
    search: dict[str, Distribution]
    seeds: list[int]
    metric: str
    mode: str
    num_samples: int = 1
    max_concurrent_trials: int = 0
    max_failures: int = 0
    scheduler: dict[str, Any] | None = None
    searcher: dict[str, Any] = field(default_factory=lambda: {"type": "basic"})
    driver_cpus: float = 0.1
    strategy: str = "PACK"
    storage_path: Path = Path("dromo_runs/sweeps")

    @property
    def experiment_dir(self) -> Path:
        return self.storage_path / self.name

    @property
    def tracking_experiment(self) -> str:
        return self.config_obj().tracking.experiment

    def config_obj(self, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        return config_from_dict(apply_overrides(self.config, overrides or {}))

    def param_space(self) -> dict[str, Any]:
        space = {k: d.to_tune() for k, d in self.search.items()}
        space["seed"] = tune.grid_search(list(self.seeds))
        return space

    def expected_trials(self) -> int | None:
        """Trials the basic searcher generates (None for other searchers)."""
        if self.searcher.get("type", "basic") != "basic":
            return None
        grid = math.prod(len(d.values) for d in self.search.values() if d.kind == "grid")
        return self.num_samples * grid * len(self.seeds)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a sweep and its ``--resume``."""
        return {"name": self.name, "config": _jsonable(self.config),
                "search": {k: d.describe() for k, d in self.search.items()}, "seeds": list(self.seeds),
                "metric": self.metric, "mode": self.mode, "num_samples": self.num_samples,
                "scheduler": _jsonable(self.scheduler), "searcher": _jsonable(self.searcher)}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a whole sweep file; every problem is a :class:`ConfigError` naming file and key."""
    p = Path(path)
    try:
        return _load_sweep(p)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None


def _load_sweep(p: Path) -> SweepSpec:
    raw = read_yaml(p)
    unknown = [k for k in raw if k not in SWEEP_KEYS and k not in CONFIG_KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (sweep keys: {', '.join(SWEEP_KEYS)}; "
                          f"config sections: {', '.join(CONFIG_KEYS)})")
    inline = {k: v for k, v in raw.items() if k in CONFIG_KEYS}

    data: dict[str, Any] = {}
    if raw.get("base") is not None:
        if not isinstance(raw["base"], str):
            raise ConfigError(f"base: expected a config file path, got {raw['base']!r}")
        base_path = (p.parent / raw["base"]) if not Path(raw["base"]).is_absolute() else Path(raw["base"])
        data = compose_yaml(base_path)  # the base's own base: chain composed
        try:
            config_from_dict(data)
        except ConfigError as e:
            if not str(e).startswith("data.dataset"):  # a base may leave the dataset to the sweep
                raise ConfigError(f"base {base_path}: {e}") from None
    if inline:
        data = apply_overrides(data, {k: v for k, v in flatten(inline).items()}) if data else inline
    if "seed" in inline and "seeds" in raw:
        raise ConfigError("seeds: give either a config `seed` or `seeds`, not both")
    cfg = config_from_dict(data)  # names the key of any bad inline value
    config = to_dict(cfg)
    config["out_dir"] = str(Path(cfg.out_dir).expanduser().resolve())
    config["data"]["dataset"] = _resolve_dataset(cfg.data.dataset, p.parent, "data.dataset")

    search = _parse_search(raw.get("search"), config, p.parent)
    seeds = _parse_seeds(raw.get("seeds"), cfg.seed)
    metric = raw.get("metric", "final/normalized_score")
    if not isinstance(metric, str) or not metric.startswith(METRIC_NAMESPACES):
        raise ConfigError(f"metric: {metric!r} is not a reported metric (namespaces: "
                          f"{', '.join(METRIC_NAMESPACES)}); e.g. final/normalized_score")
    mode = raw.get("mode", "max")
    if mode not in ("min", "max"):
        raise ConfigError(f"mode: {mode!r} is not one of min, max")
    name = raw.get("name", p.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"name: {name!r} must be a non-empty name of letters, digits, '_', '.', '-'")
    spec = SweepSpec(path=p.resolve(), name=name, config=config, search=search, seeds=seeds, metric=metric,
                     mode=mode)
    spec.num_samples = _int_key(raw, "num_samples", 1, minimum=1)
    spec.max_concurrent_trials = _int_key(raw, "max_concurrent_trials", 0, minimum=0)
    spec.max_failures = _int_key(raw, "max_failures", 0, minimum=-1)
    spec.scheduler = _parse_scheduler(raw.get("scheduler"), cfg)
    spec.searcher = _parse_searcher(raw.get("searcher"), search)
    res = raw.get("resources") or {}
    if not isinstance(res, dict):
        raise ConfigError(f"resources: expected a mapping, got {res!r}")
    for k in res:
        if k not in ("driver_cpus", "strategy"):
            raise ConfigError(f"resources.{k}: unknown key (driver_cpus, strategy; the actors' resources come "
                              "from the config's runtime section)")
    spec.driver_cpus = float(res.get("driver_cpus", 0.1)) if _is_number(res.get("driver_cpus", 0.1)) else -1.0
    if not spec.driver_cpus > 0:
        raise ConfigError(f"resources.driver_cpus: must be a number > 0, got {res.get('driver_cpus')!r}")
    spec.strategy = res.get("strategy", "PACK")
    if spec.strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ConfigError(f"resources.strategy: {spec.strategy!r} is not one of PACK, SPREAD, STRICT_PACK, "
                          "STRICT_SPREAD")
    storage = raw.get("storage_path")
    if storage is not None and not isinstance(storage, str):
        raise ConfigError(f"storage_path: expected a path, got {storage!r}")
    spec.storage_path = (Path(storage).expanduser().resolve() if storage
                         else Path(config["out_dir"]) / "sweeps")
    _check_combinations(spec)
    return spec


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_key(raw: dict[str, Any], key: str, default: int, minimum: int) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {v!r}")
    return v


def _resolve_dataset(spec: str, sweep_dir: Path, key: str) -> str:
    """Absolute path for a local file (trials run in other working directories); error when nothing exists."""
    from dromo_ray.data.load import d4rl_dataset_dir, d4rl_filenames

    if spec.startswith("minari:"):
        return spec
    looks_like_path = "/" in spec or os.sep in spec or spec.endswith((".hdf5", ".h5")) or spec.startswith(".")
    for cand in (Path(spec).expanduser(), sweep_dir / spec):
        if cand.exists():
            return str(cand.resolve())
    if not looks_like_path:
        root = d4rl_dataset_dir()
        if any((root / f).exists() for f in d4rl_filenames(spec)):
            return spec
        raise ConfigError(f"{key}: no D4RL dataset {spec!r} in {root} (nothing is downloaded; place the file "
                          "there or set $D4RL_DATASET_DIR)")
    raise ConfigError(f"{key}: no such dataset file {spec!r}")


def _field_type(dotted: str) -> Any:
    """The annotated type of a config field (``agent.alpha`` -> float); ConfigError for unknown keys."""
    import dataclasses

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
        else:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{dotted} is a section; search one of its fields")
            return tp
    raise AssertionError  # pragma: no cover


def _numeric_kind(tp: Any) -> str:
    args = set(typing.get_args(tp)) - {type(None)} or {tp}
    if args <= {float}:
        return "float"
    if args <= {int}:
        return "int"
    return "other"


def _parse_search(raw: Any, config: dict[str, Any], sweep_dir: Path) -> dict[str, Distribution]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"search: expected a mapping of dotted config keys to distributions, got {raw!r}")
    out: dict[str, Distribution] = {}
    for key, spec in raw.items():
        k = f"search.{key}"
        if not isinstance(key, str):
            raise ConfigError(f"{k}: keys must be dotted config names like agent.alpha")
        if key == "seed" or any(key == n or key.startswith(n) for n in NOT_SEARCHABLE if n.endswith(".")) \
                or key in NOT_SEARCHABLE:
            hint = "use `seeds:`" if key == "seed" else "it is fixed for the whole sweep"
            raise ConfigError(f"{k}: cannot be searched ({hint})")
        try:
            tp = _field_type(key)
        except ConfigError as e:
            raise ConfigError(f"{k}: {e}") from None
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{k}: expected one distribution, e.g. {{grid: [a, b]}} "
                              f"({', '.join(DISTRIBUTIONS)}), got {spec!r}")
        (kind, values), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{k}: unknown distribution {kind!r} (one of {', '.join(DISTRIBUTIONS)})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{k}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("grid", "choice"):
            vals = tuple(tuple(v) if isinstance(v, list) else v for v in values)
            if key == "data.dataset":
                vals = tuple(_resolve_dataset(str(v), sweep_dir, f"{k}.{kind}") for v in vals)
            dist = Distribution(kind, vals)
        else:
            if len(values) != 2 or not all(_is_number(v) for v in values):
                raise ConfigError(f"{k}.{kind}: expected [low, high] numbers, got {values!r}")
            lo, hi = values
            if not lo < hi:
                raise ConfigError(f"{k}.{kind}: low must be < high, got {values!r}")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"{k}.loguniform: bounds must be > 0, got {values!r}")
            num = _numeric_kind(tp)
            if kind == "randint":
                if not all(isinstance(v, int) for v in values):
                    raise ConfigError(f"{k}.randint: bounds must be integers, got {values!r}")
                if num == "other":
                    raise ConfigError(f"{k}.randint: {key} is not a number field")
                if hi - lo < 1:
                    raise ConfigError(f"{k}.randint: [low, high) is empty")
            elif num != "float":
                raise ConfigError(f"{k}.{kind}: {key} is not a float field (use randint or choice)")
            dist = Distribution(kind, (lo, hi))
        for v in dist.candidates():
            try:
                config_from_dict(apply_overrides(config, {key: list(v) if isinstance(v, tuple) else v}))
            except ConfigError as e:
                raise ConfigError(f"{k}: value {v!r} is invalid: {e}") from None
        out[key] = dist
    return out


def _parse_seeds(raw: Any, default: int) -> list[int]:
    if raw is None:
        return [default]
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw)):
        raise ConfigError(f"seeds: expected a non-empty list of integers >= 0, got {raw!r}")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"seeds: repeated seed in {raw!r}")
    return list(raw)


def _parse_scheduler(raw: Any, cfg: ExperimentConfig) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "type" not in raw:
        raise ConfigError(f"scheduler: expected a mapping with a type (asha, fifo), got {raw!r}")
    kind = raw["type"]
    if kind == "fifo":
        if set(raw) != {"type"}:
            raise ConfigError(f"scheduler.{sorted(set(raw) - {'type'})[0]}: unknown key for the fifo scheduler")
        return {"type": "fifo"}
    if kind != "asha":
        raise ConfigError(f"scheduler.type: {kind!r} is not one of asha, fifo")
    allowed = {"type", "time_attr", "max_t", "grace_period", "reduction_factor", "brackets"}
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"scheduler.{k}: unknown key (ASHA takes {', '.join(sorted(allowed - {'type'}))})")
    out = {"type": "asha", "time_attr": raw.get("time_attr", "step"), "max_t": raw.get("max_t", cfg.train.total_steps),
           "grace_period": raw.get("grace_period", cfg.train.eval_interval),
           "reduction_factor": raw.get("reduction_factor", 3), "brackets": raw.get("brackets", 1)}
    if out["time_attr"] not in ("step", "training_iteration", "time_total_s"):
        raise ConfigError(f"scheduler.time_attr: {out['time_attr']!r} is not one of step, training_iteration, "
                          "time_total_s")
    for k in ("max_t", "grace_period", "brackets"):
        if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] < 1:
            raise ConfigError(f"scheduler.{k}: expected an integer >= 1, got {out[k]!r}")
    if out["grace_period"] > out["max_t"]:
        raise ConfigError("scheduler.grace_period: must be <= scheduler.max_t")
    if not _is_number(out["reduction_factor"]) or out["reduction_factor"] <= 1:
        raise ConfigError(f"scheduler.reduction_factor: must be a number > 1, got {out['reduction_factor']!r}")
    return out


def _parse_searcher(raw: Any, search: dict[str, Distribution]) -> dict[str, Any]:
    if raw is None:
        return {"type": "basic"}
    if not isinstance(raw, dict) or "type" not in raw:
        raise ConfigError(f"searcher: expected a mapping with a type (basic, optuna), got {raw!r}")
    kind = {"random": "basic", "grid": "basic"}.get(raw["type"], raw["type"])
    allowed = {"type", "seed"}
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"searcher.{k}: unknown key (type, seed)")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"searcher.seed: expected an integer, got {seed!r}")
    if kind == "basic":
        return {"type": "basic", "seed": seed}
    if kind != "optuna":
        raise ConfigError(f"searcher.type: {raw['type']!r} is not one of basic, random, optuna")
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("searcher.type: optuna is not installed (pip install optuna)")
    grid = [k for k, d in search.items() if d.kind == "grid"]
    if grid:
        raise ConfigError(f"search.{grid[0]}: grid is only for the basic searcher (use choice with optuna)")
    return {"type": "optuna", "seed": seed}


def _check_combinations(spec: SweepSpec) -> None:
    """Every combination of candidate values must make a valid config (e.g. num_elites <= ensemble_size)."""
    keys = list(spec.search)
    if not keys:
        return
    cands = [spec.search[k].candidates() for k in keys]
    if math.prod(len(c) for c in cands) > MAX_COMBINATIONS:
        return
    for combo in itertools.product(*cands):
        ov = {k: list(v) if isinstance(v, tuple) else v for k, v in zip(keys, combo, strict=True)}
        try:
            config_from_dict(apply_overrides(spec.config, ov))
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in ov.items())
            raise ConfigError(f"search: the combination {shown} is invalid: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Resources: one placement group per trial, derived from the runtime section.


def trial_bundles(cfg: ExperimentConfig, driver_cpus: float, cluster_gpus: float) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: driver, learner, rollout workers, evaluators[, extra].

    Ray places each actor of the trial (Tune captures them into the group) in *some* bundle with room, in no
    order we control, and bundles fragment: a 0.01-CPU replay actor in a 0.25-CPU evaluator bundle leaves the
    evaluator nowhere to go. So every bundle gets the replay's 0.01 CPU as slack, and the bundles that several
    kinds of actor can land in have one size, the largest of those kinds: with as many such bundles as actors,
    each new actor still finds an untouched bundle that fits it, whatever the order. The learner bundle has the
    learner's own size when only the learner fits in it (it holds the GPU or ``runtime.learner_resources``) or when
    the learner is the largest actor (it is created first, after the replay). When rollout workers are steered by
    custom resources and the learner is not, the learner may take a worker bundle: one more is reserved.
    """
    rt = cfg.runtime
    g = learner_gpus(cfg, cluster_gpus)
    pinned = g > 0 or bool(rt.learner_resources)
    other = max(rt.rollout_worker_cpus, rt.evaluator_cpus if rt.num_evaluators else 0.0)
    learner: dict[str, float] = {"CPU": (rt.learner_cpus if pinned else max(rt.learner_cpus, other)) + REPLAY_CPUS,
                                 **rt.learner_resources}
    if g > 0:
        learner["GPU"] = g
    bundles = [{"CPU": driver_cpus}, learner]
    workers = rt.num_rollout_workers + (1 if rt.rollout_worker_resources and not pinned else 0)
    bundles += [{"CPU": other + REPLAY_CPUS, **rt.rollout_worker_resources} for _ in range(workers)]
    bundles += [{"CPU": other + REPLAY_CPUS} for _ in range(rt.num_evaluators)]
    # Alg. 1 line 1 runs before any of those actors exists: k trainers (+ the behaviour fitter for DROMO), all of
    # one size, fit into the same bundles; what does not fit gets bundles of its own.
    k = cfg.dynamics.num_trainers + (1 if cfg.agent.needs_behavior_policy() else 0)
    t = rt.dynamics_trainer_cpus
    fits = sum(int((b["CPU"] + 1e-9) // t) for b in bundles[1:])
    bundles += [{"CPU": t} for _ in range(max(0, k - fits))]
    return [{key: round(float(v), 4) for key, v in b.items()} for b in bundles]


def placement_group_factory(config: dict[str, Any], *, base: dict[str, Any], driver_cpus: float,
                            cluster_gpus: float, strategy: str) -> Any:
    """``tune.with_resources`` callback: the trial's bundles from its own (searched) config."""

    cfg = config_from_dict(apply_overrides(base, dict(config)))
    return tune.PlacementGroupFactory(trial_bundles(cfg, driver_cpus, cluster_gpus), strategy=strategy)


def _worst_case_config(spec: SweepSpec) -> ExperimentConfig:
    """The config with every searched runtime/resource key at its largest candidate."""
    ov: dict[str, Any] = {}
    for k, d in spec.search.items():
        if not (k.startswith(("runtime.", "dynamics.num_trainers", "agent.algorithm", "agent.alpha")) or k == "device"):
            continue
        cands = d.candidates()
        if all(isinstance(c, dict) for c in cands):
            merged: dict[str, float] = {}
            for c in cands:
                for rk, rv in c.items():
                    merged[rk] = max(merged.get(rk, 0.0), float(rv))
            ov[k] = merged
        elif k == "agent.algorithm":
            ov[k] = "dromo" if "dromo" in cands else cands[0]
        elif k == "device":
            ov[k] = "cuda" if "cuda" in cands else ("auto" if "auto" in cands else "cpu")
        elif all(_is_number(c) for c in cands):
            ov[k] = max(cands)
    return spec.config_obj(ov)


def check_resources(spec: SweepSpec, cluster: Cluster) -> list[dict[str, float]]:
    """ConfigError naming the key when one trial cannot fit the cluster; returns the worst-case bundles."""
    cfg = _worst_case_config(spec)
    rt = cfg.runtime
    bundles = trial_bundles(cfg, spec.driver_cpus, cluster.total.get("GPU", 0.0))
    check_fits(cfg, cluster, bundles, driver_cpus=spec.driver_cpus, what="one trial",
               layout=f"bundles: driver, learner, {rt.num_rollout_workers} rollout workers, {rt.num_evaluators} "
               "evaluators[, extra]")
    return bundles


# ---------------------------------------------------------------------------------------------------------
# The trial: one train() run, reporting to Tune and to its own MLflow run.


@dataclass
class TrialContext:
    """What every trial needs from the driver (picklable; handed over by ``tune.with_parameters``)."""

    base: dict[str, Any]
    sweep_name: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    metric: str
    search_keys: list[str]
    runs_root: str | None


def variant_label(trial_config: dict[str, Any]) -> str:
    """The searched values that define a variant: everything but seed, algorithm and dataset."""
    parts = []
    for k in sorted(trial_config):
        if k in ("seed", "agent.algorithm", "data.dataset", "data.env"):
            continue
        v = trial_config[k]
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def _env_key(cfg: ExperimentConfig) -> str:
    if cfg.data.env:
        return cfg.data.env
    from dromo_ray.data.load import load_dataset

    return load_dataset(cfg.data.dataset, allow_unbounded_actions=cfg.data.allow_unbounded_actions).env_id


def find_trial_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`sweep.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=10,
    )
    return runs[0].info.run_id if runs else None


class TrialStopped(KeyboardInterrupt):
    """Tune stopped this trial (the sweep was interrupted, or a scheduler stopped it early).

    ``tune.report`` signals a stop with ``SystemExit(0)``, which ``train()`` would record as a FAILED run; as a
    KeyboardInterrupt it records the run as KILLED, the status of a stopped run. The trainable turns it back into
    ``SystemExit(0)`` for Tune once ``train()`` has closed the run.
    """


STOP_REASON_PREFIXES = ("TrialStopped", "stopped early", INTERRUPTED_REASON)


class _TuneReporter:
    """train()'s extra reporter: forwards metrics (and checkpoints) to Tune.

    Every result carries ``step`` plus the latest ``eval/normalized_score``, the running protocol score
    ``final/normalized_score`` (mean of the last N evaluations so far) and the sweep metric, so that Tune's
    strict metric check, schedulers and the progress table always find them (NaN before the first one).
    """

    def __init__(self, metric: str, last_n: int, run_id: str, trial_id: str) -> None:
        self.metric, self.last_n, self.run_id, self.trial_id = metric, last_n, run_id, trial_id
        self.carry: dict[str, float] = {metric: math.nan, "eval/normalized_score": math.nan,
                                        "final/normalized_score": math.nan}
        self.evals: list[float] = []

    def __call__(self, metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None:
        if "eval/normalized_score" in metrics:
            self.evals.append(float(metrics["eval/normalized_score"]))
            last = self.evals[-self.last_n:]
            self.carry["final/normalized_score"] = float(sum(last) / len(last))
        for k in self.carry:
            if k in metrics:
                self.carry[k] = float(metrics[k])
        result = {**metrics, **self.carry, "step": int(step)}
        if self.metric == "final/normalized_score":
            result[self.metric] = self.carry["final/normalized_score"]
        try:
            if checkpoint is None:
                tune.report(result)
                return
            with tempfile.TemporaryDirectory(prefix="dromo_tune_ckpt_") as staging:
                _stage_checkpoint(Path(checkpoint), Path(staging), {"mlflow_run_id": self.run_id, "step": int(step),
                                                                    "trial_id": self.trial_id, "evals": self.evals})
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(staging))
        except SystemExit:
            raise TrialStopped(f"Tune stopped this trial at step {step} (sweep interrupted, or stopped early by "
                               "the scheduler)") from None


def _stage_checkpoint(src: Path, dst: Path, meta: dict[str, Any]) -> None:
    """Hard-link (copy across filesystems) the runtime checkpoint's files and add the trial's metadata."""
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    (dst / TRIAL_META).write_text(json.dumps(meta))


def sweep_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: the train() of a single run, in its own MLflow run under the sweep's parent."""
    from mlflow.tracking import MlflowClient

    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.tracking import run_tags
    from dromo_ray.train import train

    set_torch_threads(1)
    cfg = config_from_dict(apply_overrides(ctx.base, dict(config)))
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    run_dir = Path(ctx.runs_root) / trial_id if ctx.runs_root else Path.cwd() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)

    checkpoint = tune.get_checkpoint()
    meta: dict[str, Any] = {}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            f = Path(d) / TRIAL_META
            meta = json.loads(f.read_text()) if f.exists() else {}
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    exp = client.get_experiment_by_name(ctx.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(ctx.experiment)
    id_file = run_dir / "mlflow_run_id"
    run_id = (meta.get("mlflow_run_id") or (id_file.read_text().strip() if id_file.exists() else None)
              or find_trial_run(client, exp_id, ctx.parent_run_id, trial_id))
    if run_id is None:
        env_key = _env_key(cfg)
        tags = {**run_tags(cfg, env_key), "mlflow.parentRunId": ctx.parent_run_id, "sweep.role": "trial",
                "sweep.name": ctx.sweep_name, "sweep.trial_id": trial_id, "sweep.trial_name": trial_name,
                "sweep.variant": variant_label(config)}
        run = client.create_run(exp_id, tags=tags, run_name=f"{cfg.agent.algorithm}-{env_key}-s{cfg.seed}-{trial_id}")
        run_id = run.info.run_id
    id_file.write_text(run_id)
    previous = client.get_run(run_id).data.tags.get("failure_reason")
    if previous is not None:  # a retried or resumed trial: the run goes on, the old reason moves aside
        if not previous.startswith(STOP_REASON_PREFIXES):
            client.set_tag(run_id, "sweep.previous_failure", previous)
        client.delete_tag(run_id, "failure_reason")

    reporter = _TuneReporter(ctx.metric, cfg.train.final_score_last_n, run_id, trial_id)
    reporter.evals = list(meta.get("evals", []))
    resume_dir = None
    if checkpoint is not None and meta:
        client.set_tag(run_id, "sweep.resumed_from_step", str(meta.get("step", "")))
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as d:
        if d is not None and (Path(d) / "state.pt").exists():
            resume_dir = str(d)
        try:
            summary = train(cfg, tracking_uri=ctx.tracking_uri, resume=resume_dir, progress=False,
                            extra_reporter=reporter, parent_run_id=ctx.parent_run_id, run_dir=run_dir,
                            mlflow_run_id=run_id)
        except TrialStopped:
            raise SystemExit(0) from None
    final = {**reporter.carry, "final/normalized_score": summary.final_normalized_score,
             "final/return": summary.final_return, "step": summary.steps, COMPLETE_KEY: 1.0}
    if ctx.metric not in ("final/normalized_score", "final/return"):
        final[ctx.metric] = reporter.carry.get(ctx.metric, math.nan)
    tune.report(final)


# ---------------------------------------------------------------------------------------------------------
# Driver-side callbacks: progress table, MLflow status of trials, the interrupt test hook.


@dataclass
class _Options:
    out: Any
    print_interval_s: float
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    search_keys: list[str]
    metric: str
    total_steps: int
    interrupt: dict[str, int] | None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    """trial id -> what the progress table and the final summary show (config, status, last result)."""


_LIVE: dict[str, _Options] = {}
"""Options of the sweeps running in this process, keyed by experiment dir. Tune pickles callbacks into the
experiment state and ``Tuner.restore`` brings the old objects back; they keep only this key (and the class is
module-level so that pickling refers to it instead of copying it with a snapshot of this dict)."""


class SweepCallback(tune.Callback):
    """Progress table, MLflow status of trials that Tune ends, and the interrupt test hook."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._reset()

    def _reset(self) -> None:
        self.completed = 0
        self.checkpoints_after = 0
        self.fired = False
        self.last_print = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.key = state["key"]
        self._reset()

    @property
    def opts(self) -> _Options | None:
        return _LIVE.get(self.key)

    def setup(self, **info: Any) -> None:
        self._reset()

    def _record(self, trials: list) -> None:
        opts = self.opts
        if opts is None:
            return
        for t in trials:
            res = t.last_result or {}
            row = opts.rows.setdefault(t.trial_id, {"trial": t.trial_id, "step": 0, "eval": math.nan,
                                                    "score": math.nan})
            row["config"] = dict(t.config)
            row["status"] = t.status
            if "step" in res:
                row["step"] = res["step"]
                row["eval"] = res.get("eval/normalized_score", row["eval"])
                row["score"] = res.get(opts.metric, row["score"])

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        opts = self.opts
        if opts is None:
            return
        self._record(trials)
        now = time.monotonic()
        if now - self.last_print >= opts.print_interval_s:
            self.last_print = now
            print_progress(list(opts.rows.values()), opts, file=opts.out)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._record(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed += 1
        opts = self.opts
        if opts is not None:
            self._record([trial])
            opts.rows[trial.trial_id]["completed"] = True  # finished, or stopped by a scheduler; not interrupted
            _finish_trial_run(opts, trial.trial_id, error=None)
            r = opts.rows[trial.trial_id]
            print(f"trial {trial.trial_id} done: step {r['step']}, {opts.metric} {_fmt(r['score'])}",
                  file=opts.out, flush=True)
        self._maybe_interrupt()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        opts = self.opts
        if opts is not None:
            self._record([trial])
            _finish_trial_run(opts, trial.trial_id, error=_trial_error(trial))
            print(f"trial {trial.trial_id} failed: {_trial_error(trial)}", file=opts.out, flush=True)

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        opts = self.opts
        if opts is not None and opts.interrupt and self.completed >= opts.interrupt.get("trials", 0):
            self.checkpoints_after += 1
        self._maybe_interrupt()

    def _maybe_interrupt(self) -> None:
        """The test hook: SIGINT to this process, exactly what Ctrl-C sends."""
        opts = self.opts
        if opts is None or not opts.interrupt or self.fired:
            return
        if (self.completed >= opts.interrupt.get("trials", 0)
                and self.checkpoints_after >= opts.interrupt.get("checkpoints", 0)):
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


def _trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        text = []
    last = next((ln for ln in reversed(text) if ln.strip()), "")
    return (last or "unknown error")[:500]


def _finish_trial_run(opts: _Options, trial_id: str, error: str | None) -> None:
    """The MLflow status of a trial that Tune ended without train() finishing it.

    error: the trial failed; a run still RUNNING (its process died) becomes FAILED. No error: a scheduler stopped
    it; the run becomes KILLED, tagged ``sweep.stopped_early``. Tune asks the trial to stop by raising SystemExit
    in it, which train() records as FAILED, possibly after this ran: ``run`` calls this again after ``fit``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=opts.tracking_uri)
    run_id = find_trial_run(client, opts.experiment_id, opts.parent_run_id, trial_id)
    if run_id is None:
        return
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        return
    if error is not None:
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "failure_reason", error)
            client.set_terminated(run_id, status="FAILED")
        return
    step = opts.rows.get(trial_id, {}).get("step", "?")
    client.set_tag(run_id, "sweep.stopped_early", "true")
    client.set_tag(run_id, "failure_reason", f"stopped early by the scheduler at step {step}")
    if run.info.status != "KILLED":
        client.set_terminated(run_id, status="KILLED")


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.2f}" if isinstance(x, float)
                                                                              else str(x))


def print_progress(rows: list[dict[str, Any]], opts: _Options, file: Any = None) -> None:
    keys = [k for k in opts.search_keys]
    header = ["trial", "status", *keys, "seed", "step", "eval score", opts.metric]
    table = [header]
    for r in sorted(rows, key=lambda r: r["trial"]):
        cfg = r["config"]
        table.append([r["trial"], r["status"], *[_fmt(cfg.get(k)) for k in keys], _fmt(cfg.get("seed")),
                      f"{r['step']}/{opts.total_steps}", _fmt(r["eval"]), _fmt(r["score"])])
    print(_render(table, title=time.strftime("%H:%M:%S") + " sweep progress"), file=file, flush=True)


def _render(table: list[list[str]], title: str = "") -> str:
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    lines = [title] if title else []
    for j, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_interrupt(value: str | None) -> dict[str, int] | None:
    if not value:
        return None
    out: dict[str, int] = {}
    for part in value.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("trials", "checkpoints") or not v.strip().isdigit():
            raise ConfigError(f"DROMO_SWEEP_INTERRUPT_AFTER: expected trials=N[,checkpoints=K], got {value!r}")
        out[k.strip()] = int(v)
    return out


# ---------------------------------------------------------------------------------------------------------
# The command.


@dataclass
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    status: str
    """finished, stopped (by a scheduler), error or interrupted"""
    metric: float
    step: int
    mlflow_run_id: str | None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["metric"] = None if math.isnan(self.metric) else self.metric
        return d


def rank(outcomes: list[TrialOutcome], mode: str) -> list[dict[str, Any]]:
    """Variants (everything but the seed) ranked by the mean metric over their seeds."""
    import numpy as np

    groups: dict[tuple[str, str], list[TrialOutcome]] = {}
    for o in outcomes:
        cfg = {k: v for k, v in o.config.items() if k != "seed"}
        algo = str(o.config.get("agent.algorithm", o.config.get("_algorithm", "")))
        groups.setdefault((algo, variant_label(cfg)), []).append(o)
    rows = []
    for (algo, variant), members in groups.items():
        vals = [o.metric for o in members if o.status == "finished" and not math.isnan(o.metric)]
        rows.append({"algorithm": algo, "variant": variant,
                     "seeds": sorted(int(o.config.get("seed", 0)) for o in members),
                     "n_finished": len(vals), "mean": float(np.mean(vals)) if vals else None,
                     "std": float(np.std(vals)) if vals else None})
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (r["mean"] is None, sign * (r["mean"] if r["mean"] is not None else 0.0)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def artifact_location(tracking_uri: str) -> str | None:
    """For an embedded sqlite store, artifacts go next to the database (MLflow's default is ./mlruns of whatever
    directory the process runs in); a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _create_parent(client: Any, spec: SweepSpec, experiment_id: str) -> str:
    tags = {"sweep.role": "parent", "sweep.name": spec.name, "sweep.file": str(spec.path),
            "sweep.experiment_dir": str(spec.experiment_dir)}
    run = client.create_run(experiment_id, tags=tags, run_name=f"sweep-{spec.name}")
    from mlflow.entities import Param

    params = [Param(f"search.{k}", d.describe()[:6000]) for k, d in spec.search.items()]
    params += [Param("sweep.seeds", str(spec.seeds)), Param("sweep.metric", spec.metric),
               Param("sweep.mode", spec.mode), Param("sweep.num_samples", str(spec.num_samples)),
               Param("sweep.scheduler", json.dumps(spec.scheduler)), Param("sweep.searcher", json.dumps(spec.searcher))]
    client.log_batch(run.info.run_id, params=params)
    client.log_artifact(run.info.run_id, str(spec.path), "sweep")
    return run.info.run_id


def _make_tuner(spec: SweepSpec, ctx: TrialContext, cluster_gpus: float, callback: Any, restore: bool) -> Any:
    trainable = tune.with_parameters(sweep_trainable, ctx=ctx)
    pgf = functools.partial(placement_group_factory, base=spec.config, driver_cpus=spec.driver_cpus,
                            cluster_gpus=cluster_gpus, strategy=spec.strategy)
    trainable = tune.with_resources(trainable, pgf)
    if restore:
        return tune.Tuner.restore(str(spec.experiment_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    scheduler = None
    if spec.scheduler and spec.scheduler["type"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        # max_t + 1: ASHA stops a trial the moment it reaches max_t, which would cut off the final checkpoint and
        # the final score of a trial that reaches train.total_steps; ASHA is only meant to stop trials earlier.
        scheduler = ASHAScheduler(time_attr=s["time_attr"], max_t=s["max_t"] + 1, grace_period=s["grace_period"],
                                  reduction_factor=s["reduction_factor"], brackets=s["brackets"])
    if spec.searcher["type"] == "optuna":  # pragma: no cover - optional dependency
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.searcher.get("seed"))
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.searcher.get("seed"),
                                           max_concurrent=spec.max_concurrent_trials)
    tune_config = tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
                                  num_samples=spec.num_samples,
                                  max_concurrent_trials=(spec.max_concurrent_trials or None)
                                  if spec.searcher["type"] != "basic" else None,
                                  trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)
    run_config = tune.RunConfig(
        name=spec.name, storage_path=str(spec.storage_path), verbose=0, callbacks=[callback],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
    )
    return tune.Tuner(trainable, param_space=spec.param_space(), tune_config=tune_config, run_config=run_config)


def _trial_name(trial: Any) -> str:
    return str(trial.trial_id)


def _collect(spec: SweepSpec, result_grid: Any, rows: dict[str, dict[str, Any]], client: Any, experiment_id: str,
             parent_run_id: str, base_algorithm: str) -> list[TrialOutcome]:
    from ray.tune.utils import flatten_dict

    outcomes = []
    for res in result_grid:
        metrics = flatten_dict(dict(res.metrics or {}), delimiter="/")
        trial_id = str(metrics.get("trial_id") or Path(res.path).name)
        # a trial that never reported has no result files: its config comes from the Trial the callback saw
        config = dict(rows.get(trial_id, {}).get("config") or res.config or {})
        config.setdefault("agent.algorithm", base_algorithm)
        run_id = find_trial_run(client, experiment_id, parent_run_id, trial_id)
        run = client.get_run(run_id) if run_id else None
        if res.error is not None:
            status, err = "error", str(res.error).strip().splitlines()[-1][:500] if str(res.error).strip() else "error"
        elif metrics.get(COMPLETE_KEY) == 1.0:
            status, err = "finished", ""
        elif rows.get(trial_id, {}).get("completed") or (run is not None
                                                          and run.data.tags.get("sweep.stopped_early") == "true"):
            status, err = "stopped", ""
        else:
            status, err = "interrupted", ""
        value = metrics.get(spec.metric, math.nan)
        outcomes.append(TrialOutcome(trial_id, config, status, float(value) if _is_number(value) else math.nan,
                                     int(metrics.get("step", 0) or 0), run_id, err))
    return outcomes


def run(args: argparse.Namespace) -> int:
    from dromo_ray.core.threads import set_torch_threads

    set_torch_threads(1)
    # Tune's legacy output engine honours verbose=0 (the new one prints a banner regardless); our callback prints
    # the progress table. Snapshot warnings are noise for runs that checkpoint every few seconds.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    spec = load_sweep(args.sweep)
    interrupt = _parse_interrupt(os.environ.get("DROMO_SWEEP_INTERRUPT_AFTER"))
    exp_dir = spec.experiment_dir
    meta_path = exp_dir / META_FILE
    as_json = bool(getattr(args, "json", False))
    out = sys.stderr if as_json else sys.stdout

    if args.resume:
        if not meta_path.exists() or not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(f"--resume: no interrupted sweep {spec.name!r} at {exp_dir}")
        meta = json.loads(meta_path.read_text())
        old, new = meta["fingerprint"], _jsonable(spec.fingerprint())
        if old != new:
            key = _first_difference(old, new)
            raise ConfigError(f"{key}: the sweep file changed since the interrupted run; --resume continues the "
                              f"original sweep (restore the file, or start a new sweep under another name)")
        if args.tracking_uri and args.tracking_uri != meta["tracking_uri"]:
            raise ConfigError(f"--tracking-uri: the sweep was started with {meta['tracking_uri']}")
        tracking_uri, parent_run_id = meta["tracking_uri"], meta["parent_run_id"]
    else:
        if meta_path.exists() or (exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir))):
            raise ConfigError(f"name: a sweep {spec.name!r} already exists at {exp_dir}; pass --resume to continue "
                              "it, or choose another name/storage_path")
        from dromo_ray.tracking import default_tracking_uri

        cfg0 = spec.config_obj()
        tracking_uri = args.tracking_uri or cfg0.tracking.tracking_uri or default_tracking_uri(cfg0.out_dir)
        parent_run_id = ""

    started = start_ray()
    try:
        cluster = Cluster.from_ray()
        bundles = check_resources(spec, cluster)

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(spec.tracking_experiment)
        experiment_id = exp.experiment_id if exp else client.create_experiment(
            spec.tracking_experiment, artifact_location=artifact_location(tracking_uri))
        if not parent_run_id:
            parent_run_id = _create_parent(client, spec, experiment_id)
            exp_dir.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps({"fingerprint": _jsonable(spec.fingerprint()),
                                             "tracking_uri": tracking_uri, "parent_run_id": parent_run_id,
                                             "experiment": spec.tracking_experiment}, indent=2))
        else:
            client.update_run(parent_run_id, status="RUNNING")

        cfg0 = spec.config_obj()
        ctx = TrialContext(base=spec.config, sweep_name=spec.name, parent_run_id=parent_run_id,
                           tracking_uri=tracking_uri, experiment=spec.tracking_experiment, metric=spec.metric,
                           search_keys=list(spec.search), runs_root=str(exp_dir / "runs"))
        key = str(exp_dir)
        opts = _LIVE[key] = _Options(out=out, print_interval_s=float(os.environ.get("DROMO_SWEEP_PRINT_S", 15)),
                              tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
                              search_keys=list(spec.search), metric=spec.metric,
                              total_steps=cfg0.train.total_steps, interrupt=interrupt)
        print(f"sweep {spec.name}: {spec.expected_trials() or '?'} trials, each {len(bundles)} bundles "
              f"({sum(b.get('CPU', 0) for b in bundles):g} CPU, {sum(b.get('GPU', 0) for b in bundles):g} GPU) "
              f"on {fmt_resources(cluster.total)}; {'resuming' if args.resume else 'starting'} in {exp_dir}",
              file=out, flush=True)
        print(f"mlflow: {tracking_uri}  experiment {spec.tracking_experiment!r}  parent run {parent_run_id}",
              file=out, flush=True)
        callback = SweepCallback(key)
        tuner = _make_tuner(spec, ctx, cluster.total.get("GPU", 0.0), callback, restore=bool(args.resume))
        try:
            # Tune's own output stays off stdout, which carries the table or the JSON report only.
            with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                result_grid = tuner.fit()
        except BaseException:  # e.g. a second Ctrl-C: Tune's state is saved, --resume still works
            client.set_terminated(parent_run_id, status="KILLED")
            raise
        finally:
            _LIVE.pop(key, None)

        outcomes = _collect(spec, result_grid, opts.rows, client, experiment_id, parent_run_id,
                            cfg0.agent.algorithm)
        expected = spec.expected_trials()
        interrupted = (any(o.status == "interrupted" for o in outcomes)
                       or (expected is not None and len(outcomes) < expected))
        for o in outcomes:
            if o.status == "stopped":  # again, now that the trial processes are gone (see _finish_trial_run)
                _finish_trial_run(opts, o.trial_id, error=None)
            # Stopping a trial kills its process (the run stays RUNNING) or raises SystemExit in train() (which
            # marks it FAILED): either way the run is KILLED until --resume continues it.
            if o.status == "interrupted" and o.mlflow_run_id:
                if client.get_run(o.mlflow_run_id).info.status != "FINISHED":
                    client.set_tag(o.mlflow_run_id, "failure_reason", INTERRUPTED_REASON)
                    client.set_terminated(o.mlflow_run_id, status="KILLED")
        errors = [o for o in outcomes if o.status == "error"]
        status = "KILLED" if interrupted else ("FAILED" if errors else "FINISHED")
        ranking = rank(outcomes, spec.mode)
        client.set_tag(parent_run_id, "sweep.trials", str(len(outcomes)))
        client.set_terminated(parent_run_id, status=status)
    finally:
        if started:
            import ray

            ray.shutdown()

    report = {"sweep": spec.name, "experiment_dir": str(exp_dir), "tracking_uri": tracking_uri,
              "experiment": spec.tracking_experiment, "parent_run_id": parent_run_id, "metric": spec.metric,
              "mode": spec.mode, "status": status.lower(), "trials": [o.to_dict() for o in outcomes],
              "ranking": ranking}
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_final(report, spec)
    if interrupted:
        print(f"dromo-ray sweep: interrupted; continue with: dromo-ray sweep {args.sweep} --resume", file=sys.stderr)
        return 130
    return 1 if errors else 0


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    return prefix or "sweep"


def print_final(report: dict[str, Any], spec: SweepSpec) -> None:
    keys = list(spec.search)
    table = [["rank", "algorithm", "variant", "seeds", "finished", f"{spec.metric} mean ± std"]]
    for r in report["ranking"]:
        score = "-" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
        table.append([str(r["rank"]), r["algorithm"], r["variant"] or "-", ",".join(map(str, r["seeds"])),
                      str(r["n_finished"]), score])
    print(_render(table, title=f"\nsweep {report['sweep']}: {report['status']} ({spec.mode} {spec.metric})"))
    trials = [["trial", "status", *keys, "seed", "step", spec.metric, "mlflow run"]]
    for t in report["trials"]:
        trials.append([t["trial_id"], t["status"], *[_fmt(t["config"].get(k)) for k in keys],
                       _fmt(t["config"].get("seed")), str(t["step"]),
                       _fmt(t["metric"] if t["metric"] is not None else math.nan), str(t["mlflow_run_id"] or "-")])
    print(_render(trials, title="\ntrials"))
    for t in report["trials"]:
        if t["error"]:
            print(f"  {t['trial_id']}: {t['error']}")
    print(f"\nmlflow: {report['tracking_uri']}  experiment {report['experiment']!r}  parent run "
          f"{report['parent_run_id']}")
    print(f"report: dromo-ray report --experiment {report['experiment']} --tracking-uri {report['tracking_uri']}")


__all__ = ["load_sweep", "check_resources", "trial_bundles", "Cluster", "SweepSpec", "Distribution", "run",
           "sweep_trainable", "rank"]

"""Running a sweep: the Tuner, its results, the ranking, and :func:`run_sweep`, the whole command (edge layer).

MLflow: one parent run per sweep (tag ``sweep.role=parent``); each trial is one run under it. ``resume=True``
(``Tuner.restore``) never reruns finished trials, continues unfinished ones from their last checkpoint (the
``train(resume=...)`` path) and leaves exactly one run per trial. Ray's MLflowLoggerCallback is not used: it opens
a new run on restore.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ray import tune

from dromo_ray.errors import ConfigError
from dromo_ray.runtime.cluster import Cluster, fmt_resources
from dromo_ray.runtime.resources import start_ray
from dromo_ray.sweep.callback import _LIVE, SweepCallback, _Options, finish_trial_run, parse_interrupt
from dromo_ray.sweep.resources import check_resources, resources_factory
from dromo_ray.sweep.schema import is_number
from dromo_ray.sweep.spec import ARM_KEY, DATASET_KEY, SweepSpec, jsonable, load_sweep
from dromo_ray.sweep.trial import COMPLETE_KEY, INTERRUPTED_REASON, TrialContext, searched_label, sweep_trainable

META_FILE = "dromo_sweep.json"
"""Beside Tune's state in the experiment directory: the sweep's fingerprint, tracking URI and parent run."""


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
    """Variants (everything but the seed) ranked by the mean metric over their seeds, per dataset.

    A variant is (algorithm, arm, dataset, searched values); only finished trials count. Datasets keep the order
    in which their first trial appears; ranks restart at 1 on each.
    """
    import numpy as np

    groups: dict[tuple[str, str, str, str], list[TrialOutcome]] = {}
    for o in outcomes:
        algo = str(o.config.get("agent.algorithm", o.config.get("_algorithm", "")))
        key = (algo, str(o.config.get(ARM_KEY, "")), str(o.config.get(DATASET_KEY, "")), searched_label(o.config))
        groups.setdefault(key, []).append(o)
    rows = []
    for (algo, arm, dataset, variant), members in groups.items():
        vals = [o.metric for o in members if o.status == "finished" and not math.isnan(o.metric)]
        rows.append({"algorithm": algo, "arm": arm or None, "dataset": dataset or None, "variant": variant,
                     "seeds": sorted(int(o.config.get("seed", 0)) for o in members),
                     "n_finished": len(vals), "mean": float(np.mean(vals)) if vals else None,
                     "std": float(np.std(vals)) if vals else None})
    order = {d: i for i, d in enumerate(dict.fromkeys(r["dataset"] for r in rows))}
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (order[r["dataset"]], r["mean"] is None,
                             sign * (r["mean"] if r["mean"] is not None else 0.0)))
    for i, r in enumerate(rows):
        r["rank"] = 1 if i == 0 or rows[i - 1]["dataset"] != r["dataset"] else rows[i - 1]["rank"] + 1
    return rows


def make_tuner(spec: SweepSpec, ctx: TrialContext, cluster_gpus: float, callback: Any, restore: bool) -> Any:
    trainable = tune.with_resources(tune.with_parameters(sweep_trainable, ctx=ctx),
                                    resources_factory(spec, cluster_gpus))
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


def collect(spec: SweepSpec, result_grid: Any, rows: dict[str, dict[str, Any]], client: Any, experiment_id: str,
            parent_run_id: str) -> list[TrialOutcome]:
    from ray.tune.utils import flatten_dict

    from dromo_ray.tracking import find_trial_run

    outcomes = []
    for res in result_grid:
        metrics = flatten_dict(dict(res.metrics or {}), delimiter="/")
        trial_id = str(metrics.get("trial_id") or Path(res.path).name)
        # a trial that never reported has no result files: its config comes from the Trial the callback saw
        config = dict(rows.get(trial_id, {}).get("config") or res.config or {})
        config.setdefault("agent.algorithm", spec.config_obj(config).agent.algorithm)
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
        outcomes.append(TrialOutcome(trial_id, config, status, float(value) if is_number(value) else math.nan,
                                     int(metrics.get("step", 0) or 0), run_id, err))
    return outcomes


@dataclass
class SweepResult:
    """What a sweep ended with (``to_dict()``: the ``--json`` report)."""

    sweep: str
    experiment_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    metric: str
    mode: str
    status: str
    """finished, failed (a trial failed) or killed (interrupted: ``resume=True`` continues it)."""
    trials: list[TrialOutcome]
    ranking: list[dict[str, Any]]
    trial_keys: list[str] = field(default_factory=list)
    """The trial-config keys that tell trials apart (the tables' columns)."""

    @property
    def interrupted(self) -> bool:
        return self.status == "killed"

    @property
    def failed(self) -> bool:
        return any(t.status == "error" for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "experiment_dir": self.experiment_dir, "tracking_uri": self.tracking_uri,
                "experiment": self.experiment, "parent_run_id": self.parent_run_id, "metric": self.metric,
                "mode": self.mode, "status": self.status, "trials": [o.to_dict() for o in self.trials],
                "ranking": self.ranking}


def _parent_params(spec: SweepSpec) -> dict[str, str]:
    params = {f"search.{k}": d.describe() for k, d in spec.search.items()}
    if spec.arms:
        params["sweep.arms"] = ", ".join(spec.arms)
    if spec.datasets:
        params["sweep.datasets"] = ", ".join(spec.datasets)
    params.update({"sweep.seeds": str(spec.seeds), "sweep.metric": spec.metric, "sweep.mode": spec.mode,
                   "sweep.num_samples": str(spec.num_samples), "sweep.scheduler": json.dumps(spec.scheduler),
                   "sweep.searcher": json.dumps(spec.searcher)})
    return params


def run_sweep(sweep: str | Path, *, tracking_uri: str | None = None, resume: bool = False,
              progress: TextIO | None = None) -> SweepResult:
    """Validate the sweep file, check that a trial fits the cluster, run (or continue) the sweep, rank it.

    ``progress`` receives the header, the progress table every ``$DROMO_SWEEP_PRINT_S`` seconds (15) and a line
    per finished trial (default: stdout); when it is not stdout, Tune's own output goes there too. Everything
    that rejects the sweep -- the file, a trial that cannot fit, ``resume`` without an interrupted sweep of that
    name, a new sweep whose name exists -- is a :class:`ConfigError` raised before any trial starts.
    """
    from dromo_ray.core.threads import set_torch_threads

    out = progress or sys.stdout
    set_torch_threads(1)
    # Tune's legacy output engine honours verbose=0 (the new one prints a banner regardless); our callback prints
    # the progress table. Snapshot warnings are noise for runs that checkpoint every few seconds.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Trials run in their own directories: a relative dataset directory must not depend on where they stand.
    if os.environ.get("D4RL_DATASET_DIR"):
        os.environ["D4RL_DATASET_DIR"] = str(Path(os.environ["D4RL_DATASET_DIR"]).expanduser().resolve())
    spec = load_sweep(sweep)
    interrupt = parse_interrupt(os.environ.get("DROMO_SWEEP_INTERRUPT_AFTER"))
    exp_dir = spec.experiment_dir
    meta_path = exp_dir / META_FILE

    from dromo_ray.tracking import create_parent_run, experiment_id, mark_killed, resolve_tracking_uri

    if resume:
        if not meta_path.exists() or not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(f"--resume: no interrupted sweep {spec.name!r} at {exp_dir}")
        meta = json.loads(meta_path.read_text())
        old, new = meta["fingerprint"], jsonable(spec.fingerprint())
        if old != new:
            key = _first_difference(old, new)
            raise ConfigError(f"{key}: the sweep file changed since the interrupted run; --resume continues the "
                              f"original sweep (restore the file, or start a new sweep under another name)")
        if tracking_uri and tracking_uri != meta["tracking_uri"]:
            raise ConfigError(f"--tracking-uri: the sweep was started with {meta['tracking_uri']}")
        tracking_uri, parent_run_id = meta["tracking_uri"], meta["parent_run_id"]
    else:
        if meta_path.exists() or (exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir))):
            raise ConfigError(f"name: a sweep {spec.name!r} already exists at {exp_dir}; pass --resume to continue "
                              "it, or choose another name/storage_path")
        tracking_uri = resolve_tracking_uri(spec.config_obj(), tracking_uri, create=True)
        parent_run_id = ""

    cfg0 = spec.config_obj()
    started = start_ray()
    try:
        cluster = Cluster.from_ray()
        bundles = check_resources(spec, cluster)

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp_id = experiment_id(client, spec.tracking_experiment, tracking_uri)
        if not parent_run_id:
            tags = {"sweep.role": "parent", "sweep.name": spec.name, "sweep.file": str(spec.path),
                    "sweep.experiment_dir": str(exp_dir)}
            parent_run_id = create_parent_run(client, exp_id, f"sweep-{spec.name}", tags, _parent_params(spec),
                                              spec.path)
            exp_dir.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps({"fingerprint": jsonable(spec.fingerprint()),
                                             "tracking_uri": tracking_uri, "parent_run_id": parent_run_id,
                                             "experiment": spec.tracking_experiment}, indent=2))
        else:
            client.update_run(parent_run_id, status="RUNNING")

        keys = spec.trial_keys()
        ctx = TrialContext(cells=spec.cells, sweep_name=spec.name, parent_run_id=parent_run_id,
                           tracking_uri=tracking_uri, experiment=spec.tracking_experiment, metric=spec.metric,
                           search_keys=list(spec.search), runs_root=str(exp_dir / "runs"))
        key = str(exp_dir)
        opts = _LIVE[key] = _Options(out=out, print_interval_s=float(os.environ.get("DROMO_SWEEP_PRINT_S", 15)),
                                     tracking_uri=tracking_uri, experiment_id=exp_id, parent_run_id=parent_run_id,
                                     search_keys=keys, metric=spec.metric, total_steps=cfg0.train.total_steps,
                                     interrupt=interrupt)
        print(f"sweep {spec.name}: {spec.expected_trials() or '?'} trials, each {len(bundles)} bundles "
              f"({sum(b.get('CPU', 0) for b in bundles):g} CPU, {sum(b.get('GPU', 0) for b in bundles):g} GPU) "
              f"on {fmt_resources(cluster.total)}; {'resuming' if resume else 'starting'} in {exp_dir}",
              file=out, flush=True)
        print(f"mlflow: {tracking_uri}  experiment {spec.tracking_experiment!r}  parent run {parent_run_id}",
              file=out, flush=True)
        tuner = make_tuner(spec, ctx, cluster.total.get("GPU", 0.0), SweepCallback(key), restore=resume)
        try:
            # Tune's own output follows the progress (off stdout when stdout carries a JSON report).
            with contextlib.redirect_stdout(out) if out is not sys.stdout else contextlib.nullcontext():
                result_grid = tuner.fit()
        except BaseException:  # e.g. a second Ctrl-C: Tune's state is saved, --resume still works
            client.set_terminated(parent_run_id, status="KILLED")
            raise
        finally:
            _LIVE.pop(key, None)

        outcomes = collect(spec, result_grid, opts.rows, client, exp_id, parent_run_id)
        expected = spec.expected_trials()
        interrupted = (any(o.status == "interrupted" for o in outcomes)
                       or (expected is not None and len(outcomes) < expected))
        for o in outcomes:
            if o.status == "stopped":  # again, now that the trial processes are gone (see end_trial_run)
                finish_trial_run(opts, o.trial_id, error=None)
            # Stopping a trial kills its process (the run stays RUNNING) or raises SystemExit in train() (which
            # marks it FAILED): either way the run is KILLED until --resume continues it.
            if o.status == "interrupted" and o.mlflow_run_id:
                mark_killed(client, o.mlflow_run_id, INTERRUPTED_REASON)
        errors = [o for o in outcomes if o.status == "error"]
        status = "KILLED" if interrupted else ("FAILED" if errors else "FINISHED")
        client.set_tag(parent_run_id, "sweep.trials", str(len(outcomes)))
        client.set_terminated(parent_run_id, status=status)
    finally:
        if started:
            import ray

            ray.shutdown()

    return SweepResult(sweep=spec.name, experiment_dir=str(exp_dir), tracking_uri=tracking_uri,
                       experiment=spec.tracking_experiment, parent_run_id=parent_run_id, metric=spec.metric,
                       mode=spec.mode, status=status.lower(), trials=outcomes, ranking=rank(outcomes, spec.mode),
                       trial_keys=keys)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    return prefix or "sweep"

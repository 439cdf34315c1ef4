"""The trial: one ``train()`` run, reporting to Tune and to its own MLflow run under the sweep's parent (edge layer).

The run is created by the trial before :func:`dromo_ray.train.train` runs, with the tags, params and metrics of a
single ``train`` plus ``sweep.*`` tags. Its id is kept in the trial's run directory, in every Tune checkpoint and
as the tag ``sweep.trial_id``, so a retried or resumed trial writes to the same run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from dromo_ray.core.config import ExperimentConfig, config_from_dict
from dromo_ray.core.scores import final_score
from dromo_ray.sweep.spec import ARM_KEY, DATASET_KEY, Cell, compose_trial

TRIAL_META = "dromo_trial.json"
"""The trial's own state in each Tune checkpoint: ``mlflow_run_id``, ``step``, ``trial_id``, ``evals``."""
COMPLETE_KEY = "sweep/complete"
INTERRUPTED_REASON = "sweep interrupted; dromo-ray sweep --resume continues this run"


@dataclass
class TrialContext:
    """What every trial needs from the driver (picklable; handed over by ``tune.with_parameters``)."""

    cells: dict[Cell, dict[str, Any]]
    """Each cell's config (:class:`dromo_ray.sweep.spec.SweepSpec`); a trial's Tune config picks one."""
    sweep_name: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    metric: str
    search_keys: list[str]
    runs_root: str | None


def searched_label(trial_config: dict[str, Any]) -> str:
    """The searched values of a trial: everything but its seed, algorithm, dataset and arm."""
    parts = []
    for k in sorted(trial_config):
        if k in ("seed", "agent.algorithm", "data.dataset", "data.env", ARM_KEY, DATASET_KEY):
            continue
        v = trial_config[k]
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def variant_label(trial_config: dict[str, Any]) -> str:
    """What defines a variant (the ``sweep.variant`` tag, by which ``dromo-ray report`` groups runs): the arm,
    then the searched values."""
    arm = trial_config.get(ARM_KEY)
    return ", ".join(x for x in (f"{ARM_KEY}={arm}" if arm else "", searched_label(trial_config)) if x)


def _env_key(cfg: ExperimentConfig) -> str:
    if cfg.data.env:
        return cfg.data.env
    from dromo_ray.data.load import load_dataset

    return load_dataset(cfg.data.dataset, allow_unbounded_actions=cfg.data.allow_unbounded_actions).env_id


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
    ``final/normalized_score`` (:func:`dromo_ray.core.scores.final_score` of the evaluations so far) and the sweep
    metric, so that Tune's strict metric check, schedulers and the progress table always find them (NaN before the
    first one).
    """

    def __init__(self, metric: str, last_n: int, run_id: str, trial_id: str) -> None:
        self.metric, self.last_n, self.run_id, self.trial_id = metric, last_n, run_id, trial_id
        self.carry: dict[str, float] = {metric: math.nan, "eval/normalized_score": math.nan,
                                        "final/normalized_score": math.nan}
        self.evals: list[float] = []
        """The normalized score of every evaluation so far (kept in the trial's checkpoints)."""

    def __call__(self, metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None:
        if "eval/normalized_score" in metrics:
            self.evals.append(float(metrics["eval/normalized_score"]))
            # only the score is carried across checkpoints; final_score's return is not used here
            evals = [{"eval/normalized_score": s, "eval/return_mean": math.nan} for s in self.evals]
            self.carry["final/normalized_score"] = final_score(evals, self.last_n)[0]
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
    """Hard-link (copy across filesystems) the runtime checkpoint's files -- a directory, or one file such as
    RLlib CQL's final policy -- and add the trial's metadata."""
    for f in (src.iterdir() if src.is_dir() else [src]):
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
    from dromo_ray.tracking import experiment_id, find_trial_run, open_trial_run, run_tags
    from dromo_ray.train import train

    set_torch_threads(1)
    cfg = config_from_dict(compose_trial(ctx.cells, dict(config)))
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
    exp_id = experiment_id(client, ctx.experiment, ctx.tracking_uri)
    id_file = run_dir / "mlflow_run_id"
    known = (meta.get("mlflow_run_id") or (id_file.read_text().strip() if id_file.exists() else None)
             or find_trial_run(client, exp_id, ctx.parent_run_id, trial_id))
    if known is None:  # the tags of a new run (the dataset may have to be opened to name its environment)
        env_key = _env_key(cfg)
        tags = {**run_tags(cfg, env_key), "sweep.role": "trial", "sweep.name": ctx.sweep_name,
                "sweep.trial_name": trial_name, "sweep.variant": variant_label(config)}
        if config.get(ARM_KEY):
            tags["sweep.arm"] = str(config[ARM_KEY])
        run_name = f"{cfg.agent.algorithm}-{env_key}-s{cfg.seed}-{trial_id}"
    else:
        tags, run_name = {}, ""
    run_id = open_trial_run(client, exp_id, ctx.parent_run_id, trial_id, known_run_id=known, tags=tags,
                            run_name=run_name, stop_reasons=STOP_REASON_PREFIXES)
    id_file.write_text(run_id)

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

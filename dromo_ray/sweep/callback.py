"""The sweep driver's view: Tune callback, progress table, final tables, the interrupt test hook (edge layer).

Every table is :func:`dromo_ray.ui.table`. The callback also sets the MLflow status of trials that Tune ends
without ``train()`` finishing them (:func:`dromo_ray.tracking.end_trial_run`).

Test hook: ``DROMO_SWEEP_INTERRUPT_AFTER="trials=N[,checkpoints=K]"`` sends this process SIGINT -- exactly what
Ctrl-C does -- once N trials have completed and K more checkpoints have been reported after that.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from dromo_ray.errors import ConfigError
from dromo_ray.ui import fmt, table


@dataclass
class _Options:
    out: Any
    print_interval_s: float
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    search_keys: list[str]
    """The trial-config keys shown as columns (arm, dataset and the searched keys)."""
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
            row = opts.rows.setdefault(t.trial_id, {"trial": t.trial_id, "step": 0, "eval": float("nan"),
                                                    "score": float("nan")})
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
            finish_trial_run(opts, trial.trial_id, error=None)
            r = opts.rows[trial.trial_id]
            print(f"trial {trial.trial_id} done: step {r['step']}, {opts.metric} {fmt(r['score'])}",
                  file=opts.out, flush=True)
        self._maybe_interrupt()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        opts = self.opts
        if opts is not None:
            self._record([trial])
            finish_trial_run(opts, trial.trial_id, error=_trial_error(trial))
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


def finish_trial_run(opts: _Options, trial_id: str, error: str | None) -> None:
    """:func:`dromo_ray.tracking.end_trial_run` for a trial of this sweep."""
    from mlflow.tracking import MlflowClient

    from dromo_ray.tracking import end_trial_run

    end_trial_run(MlflowClient(tracking_uri=opts.tracking_uri), opts.experiment_id, opts.parent_run_id, trial_id,
                  error=error, step=opts.rows.get(trial_id, {}).get("step", "?"))


def parse_interrupt(value: str | None) -> dict[str, int] | None:
    """``DROMO_SWEEP_INTERRUPT_AFTER`` -> {"trials": N, "checkpoints": K} (None when unset)."""
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
# Tables.


def print_progress(rows: list[dict[str, Any]], opts: _Options, file: Any = None) -> None:
    keys = list(opts.search_keys)
    body = []
    for r in sorted(rows, key=lambda r: r["trial"]):
        cfg = r["config"]
        body.append([r["trial"], r["status"], *[fmt(cfg.get(k)) for k in keys], fmt(cfg.get("seed")),
                     f"{r['step']}/{opts.total_steps}", fmt(r["eval"]), fmt(r["score"])])
    print(table(["trial", "status", *keys, "seed", "step", "eval score", opts.metric], body,
                title=time.strftime("%H:%M:%S") + " sweep progress"), file=file, flush=True)


def print_final(report: dict[str, Any], keys: list[str]) -> None:
    """The ranking (per dataset when the sweep crosses datasets), the trials, and where MLflow holds them."""
    metric = report["metric"]
    arms = any(r.get("arm") for r in report["ranking"])
    datasets = any(r.get("dataset") for r in report["ranking"])
    ranking = []
    for r in report["ranking"]:
        score = "-" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
        ranking.append([str(r["rank"]), r["algorithm"], *([r["arm"]] if arms else []),
                        *([r["dataset"]] if datasets else []), r["variant"] or "-", ",".join(map(str, r["seeds"])),
                        str(r["n_finished"]), score])
    header = ["rank", "algorithm", *(["arm"] if arms else []), *(["dataset"] if datasets else []), "variant",
              "seeds", "finished", f"{metric} mean ± std"]
    print(table(header, ranking, title=f"\nsweep {report['sweep']}: {report['status']} ({report['mode']} {metric})"))
    trials = []
    for t in report["trials"]:
        trials.append([t["trial_id"], t["status"], *[fmt(t["config"].get(k)) for k in keys],
                       fmt(t["config"].get("seed")), str(t["step"]), fmt(t["metric"]),
                       str(t["mlflow_run_id"] or "-")])
    print(table(["trial", "status", *keys, "seed", "step", metric, "mlflow run"], trials, title="\ntrials"))
    for t in report["trials"]:
        if t["error"]:
            print(f"  {t['trial_id']}: {t['error']}")
    print(f"\nmlflow: {report['tracking_uri']}  experiment {report['experiment']!r}  parent run "
          f"{report['parent_run_id']}")
    print(f"report: dromo-ray report --experiment {report['experiment']} --tracking-uri {report['tracking_uri']}")

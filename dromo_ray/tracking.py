"""Tracking behind a small protocol, with an MLflow implementation (edge layer).

MLflow defaults to an embedded sqlite store under the run's ``out_dir`` (MLflow 3's file store is in
maintenance mode); ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` point at a shared server instead.
Params are the flattened config, metrics are namespaced (``train/``, ``dynamics/``, ``eval/``, ``perf/``),
tags name algorithm, dataset and seed so the MLflow UI can group and compare runs.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from dromo_ray.core.config import ExperimentConfig, flatten, to_dict
from dromo_ray.core.messages import plain_message
from dromo_ray.errors import TrackingError

MAX_PARAM_LEN = 6000


class Tracker(Protocol):
    run_id: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def end(self, status: str = "FINISHED", reason: str = "") -> None: ...


SQLITE_MAGIC = b"SQLite format 3\x00"
SERVER_TIMEOUT_S = 3.0


def default_tracking_uri(out_dir: str | Path, create: bool = True) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(out_dir).resolve() / "mlflow.db"
    if create:
        db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def check_tracking_store(tracking_uri: str, *, must_exist: bool = False) -> None:
    """Fail fast, with one line naming the URI, on a store that cannot work; changes nothing.

    sqlite: an existing file must be an SQLite database (an empty file is one MLflow can initialise); with
    ``must_exist`` (a reader such as ``report``) a missing one is an error instead of a new empty store.
    http(s): one quick request to the server's ``/health`` (MLflow's client retries for minutes otherwise).
    """
    db = sqlite_path(tracking_uri)
    if db is not None:
        if db.is_dir():
            raise TrackingError(f"tracking uri {tracking_uri}: {db} is a directory, not an SQLite database")
        if db.exists():
            try:
                with db.open("rb") as f:
                    head = f.read(len(SQLITE_MAGIC))
            except OSError as e:
                raise TrackingError(f"tracking uri {tracking_uri}: cannot read {db} ({e.strerror or e})") from None
            if head and head != SQLITE_MAGIC:
                raise TrackingError(f"tracking uri {tracking_uri}: {db} is not an SQLite database")
        elif must_exist:
            raise TrackingError(f"tracking uri {tracking_uri}: no MLflow store at {db}")
        return
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=SERVER_TIMEOUT_S):  # noqa: S310 - the user's own URI
                pass
        except urllib.error.HTTPError:
            return  # something answers (a proxy or an older server without /health): MLflow will say more
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise TrackingError(f"tracking uri {tracking_uri}: no MLflow server answers ({reason})") from None


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of an embedded sqlite store live beside the database (MLflow's default is ./mlruns of whatever
    directory the process runs in); a server decides for itself."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (artifacts per :func:`artifact_location`) when it does not exist."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifact_location(
        tracking_uri))


def resolve_tracking_uri(cfg: ExperimentConfig, cli_uri: str | None = None, *, create: bool = False) -> str:
    """The store of a run or a sweep: ``--tracking-uri``, else ``tracking.tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else an embedded sqlite store in ``out_dir`` (whose directory ``create`` makes;
    ``train`` creates out_dir itself when it writes the run)."""
    return cli_uri or cfg.tracking.tracking_uri or default_tracking_uri(cfg.out_dir, create=create)


def dataset_tag(dataset: str) -> str:
    """The ``dataset`` tag of a run: a file's stem, or the name as given (a D4RL name, ``minari:<id>``)."""
    return Path(dataset).stem if dataset.endswith(".hdf5") else dataset


def run_tags(cfg: ExperimentConfig, env_key: str) -> dict[str, str]:
    from dromo_ray.core.envs import get_env_spec

    return {
        "algorithm": cfg.agent.algorithm,
        "dataset": dataset_tag(cfg.data.dataset),
        "env": env_key,
        # The MDP evaluations run in (walker2d: the v2-v4 foot friction, see EnvSpec.xml_file).
        "env_model": get_env_spec(env_key).model,
        "seed": str(cfg.seed),
    }


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in flatten(to_dict(cfg)).items()}


class MlflowTracker:
    """One MLflow run, driven through ``MlflowClient`` (no global fluent state, safe inside Tune trials)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str = "", tags: dict[str, str] | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None) -> None:
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id(self.client, experiment, tracking_uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name or None)
            self.run_id = run.info.run_id
        self._ended = False

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def end(self, status: str = "FINISHED", reason: str = "") -> None:
        if self._ended:
            return
        if reason:
            self.set_tags({"failure_reason": plain_message(reason)[:5000]})
        elif status == "FINISHED" and "failure_reason" in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, "failure_reason")  # a resumed run that finished did not fail
        self.client.set_terminated(self.run_id, status=status)
        self._ended = True


# ---------------------------------------------------------------------------------------------------------
# Sweeps (dromo_ray/sweep/): one parent run per sweep (tag ``sweep.role=parent``), one run per trial under it
# (``mlflow.parentRunId``, ``sweep.trial_id``), so that a retried or resumed trial writes to the same run.


def create_parent_run(client: Any, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str],
                      artifact: str | Path) -> str:
    """A sweep's parent run with its tags and params; ``artifact`` (the sweep file) is logged under ``sweep/``."""
    from mlflow.entities import Param

    run = client.create_run(experiment, tags=tags, run_name=run_name)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(artifact), "sweep")
    return run.info.run_id


def find_trial_run(client: Any, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The run of Tune trial ``trial_id`` under the sweep's parent, if it has one."""
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`sweep.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=10,
    )
    return runs[0].info.run_id if runs else None


def open_trial_run(client: Any, experiment: str, parent_run_id: str, trial_id: str, *, known_run_id: str | None,
                   tags: dict[str, str], run_name: str, stop_reasons: tuple[str, ...]) -> str:
    """The run a trial writes to: the one it already has (``known_run_id``, else the one tagged with its id), or a
    new one under the parent. A ``failure_reason`` left by an earlier attempt is removed (the run goes on); unless
    it starts with one of ``stop_reasons`` (the trial was only stopped) it is kept as ``sweep.previous_failure``."""
    run_id = known_run_id or find_trial_run(client, experiment, parent_run_id, trial_id)
    if run_id is None:
        run = client.create_run(experiment, tags={**tags, "mlflow.parentRunId": parent_run_id,
                                                  "sweep.trial_id": trial_id}, run_name=run_name)
        return run.info.run_id
    previous = client.get_run(run_id).data.tags.get("failure_reason")
    if previous is not None:
        if not previous.startswith(stop_reasons):
            client.set_tag(run_id, "sweep.previous_failure", previous)
        client.delete_tag(run_id, "failure_reason")
    return run_id


def set_tag_racing(client: Any, run_id: str, key: str, value: str) -> None:
    """``client.set_tag`` from the sweep's driver while the trial's own process may write the same tag.

    The tag is set from both sides when a sweep stops (the trial's tracker records why its run ended, the driver
    marks it KILLED), and MLflow's SQL store inserts a new tag row without a lock: the second insert fails on the
    (key, run) unique constraint (seen in the interrupted-sweep test on 2026-12-03; it had passed in the same
    sitting's first full run). When the row exists the set is an update, so the driver sets it once more; the
    driver's value is the one that stays."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_tag(run_id, key, value)
    except MlflowException:
        time.sleep(0.2)
        client.set_tag(run_id, key, value)


def end_trial_run(client: Any, experiment: str, parent_run_id: str, trial_id: str, *, error: str | None,
                  step: Any) -> None:
    """The MLflow status of a trial that Tune ended without ``train()`` finishing its run.

    error: the trial failed; a run still RUNNING (its process died) becomes FAILED. No error: a scheduler stopped
    it at ``step``; the run becomes KILLED, tagged ``sweep.stopped_early``. Tune asks a trial to stop by raising
    SystemExit in it, which ``train()`` records as FAILED, possibly after this ran: the sweep calls this again
    once Tune is done.
    """
    run_id = find_trial_run(client, experiment, parent_run_id, trial_id)
    if run_id is None:
        return
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        return
    if error is not None:
        if run.info.status == "RUNNING":
            set_tag_racing(client, run_id, "failure_reason", error)
            client.set_terminated(run_id, status="FAILED")
        return
    set_tag_racing(client, run_id, "sweep.stopped_early", "true")
    set_tag_racing(client, run_id, "failure_reason", f"stopped early by the scheduler at step {step}")
    if run.info.status != "KILLED":
        client.set_terminated(run_id, status="KILLED")


def mark_killed(client: Any, run_id: str, reason: str) -> None:
    """An unfinished run (a trial interrupted with its sweep) becomes KILLED with ``reason``; a finished one stays."""
    if client.get_run(run_id).info.status != "FINISHED":
        set_tag_racing(client, run_id, "failure_reason", reason)
        client.set_terminated(run_id, status="KILLED")


def learning_curve_png(history: list[tuple[int, dict[str, float]]], path: str | Path, title: str = "") -> Path | None:
    """Plot eval/normalized_score (and train/critic_loss when present) against learner steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = [(s, m["eval/normalized_score"]) for s, m in history if "eval/normalized_score" in m]
    loss = [(s, m["train/critic_loss"]) for s, m in history if "train/critic_loss" in m]
    if not score and not loss:
        return None
    fig, axes = plt.subplots(1, 2 if loss else 1, figsize=(10 if loss else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    if score:
        ax.plot(*zip(*score, strict=True), marker="o")
    ax.set_xlabel("learner updates")
    ax.set_ylabel("D4RL normalized score")
    ax.set_title(title or "evaluation")
    ax.grid(alpha=0.3)
    if loss:
        ax2 = axes[0][1]
        ax2.plot(*zip(*loss, strict=True))
        ax2.set_xlabel("learner updates")
        ax2.set_ylabel("critic loss")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

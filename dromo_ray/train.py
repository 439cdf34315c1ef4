"""``dromo-ray train`` and ``dromo-ray evaluate``: config -> Ray runtime -> MLflow (edge layer)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dromo_ray.config import dump_config, load_config
from dromo_ray.core.config import ExperimentConfig
from dromo_ray.tracking import (
    MlflowTracker,
    config_params,
    learning_curve_png,
    resolve_tracking_uri,
    run_tags,
)


@dataclass
class TrainSummary:
    steps: int
    wall_s: float
    final_normalized_score: float
    final_return: float
    num_evaluations: int
    mlflow_run_id: str
    tracking_uri: str
    run_dir: str
    checkpoint: str
    algorithm: str
    dataset: str
    learner_device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _run_name(cfg: ExperimentConfig, env_key: str) -> str:
    return cfg.tracking.run_name or f"{cfg.agent.algorithm}-{env_key}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: ExperimentConfig, *, tracking_uri: str | None = None, resume: str | None = None,
          progress: bool = True, extra_reporter: Any = None, parent_run_id: str | None = None,
          run_dir: str | Path | None = None, mlflow_run_id: str | None = None) -> TrainSummary:
    """One tracked run. ``extra_reporter`` (e.g. Tune's) receives every report after MLflow."""
    import ray

    from dromo_ray.data.dataset import load_dataset
    from dromo_ray.runtime.checkpoint import resolve_checkpoint
    from dromo_ray.runtime.driver import RunFailed, run_experiment

    dataset = load_dataset(cfg.data.dataset, cfg.data.env or None)
    env_key = cfg.data.env or dataset.env_id
    uri = resolve_tracking_uri(cfg, tracking_uri)
    if resume:
        ckpt_file = resolve_checkpoint(resume)
        run_dir = Path(run_dir) if run_dir else ckpt_file.parent.parent.parent
        id_file = run_dir / "mlflow_run_id"
        mlflow_run_id = mlflow_run_id or (id_file.read_text().strip() if id_file.exists() else None)
    else:
        run_dir = Path(run_dir) if run_dir else Path(cfg.out_dir) / _run_name(cfg, env_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")

    tracker = MlflowTracker(uri, cfg.tracking.experiment, run_name=run_dir.name, tags=run_tags(cfg, env_key),
                            run_id=mlflow_run_id, parent_run_id=parent_run_id)
    (run_dir / "mlflow_run_id").write_text(tracker.run_id)
    tracker.log_params(config_params(cfg))
    history: list[tuple[int, dict[str, float]]] = []
    info: dict[str, Any] = {}

    def report(metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None:
        if metrics:
            tracker.log_metrics(metrics, step)
            history.append((step, dict(metrics)))
        if extra_reporter is not None:
            extra_reporter(metrics, step, checkpoint)

    started_ray = not ray.is_initialized()
    try:
        if cfg.agent.algorithm == "cql_rllib":  # model-free CQL (RLlib) in the same comparison
            from dromo_ray.behavior.cql_rllib import run_cql_rllib

            result = run_cql_rllib(cfg, dataset, run_dir, reporter=report, resume=resume, progress=progress,
                                   on_start=info.update)
        else:
            result = run_experiment(cfg, dataset, run_dir, reporter=report, resume=resume, progress=progress,
                                    on_start=info.update)
    except RunFailed as e:
        tracker.end("FAILED", str(e))
        raise
    except BaseException as e:
        # Ctrl-C and Tune stopping a trial (SystemExit from tune.report) are kills, not failures.
        killed = isinstance(e, (KeyboardInterrupt, SystemExit))
        tracker.end("KILLED" if killed else "FAILED", f"{type(e).__name__}: {e}")
        raise
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()

    tracker.set_tags({"learner_device": str(info.get("learner_device", "cpu")),
                      "learner_gpus": str(info.get("learner_gpus", 0))})
    tracker.log_metrics({"final/normalized_score": result.final_score, "final/return": result.final_return,
                         "perf/total_wall_s": result.wall_s}, result.steps)
    tracker.log_artifact(run_dir / "config.yaml")
    png = learning_curve_png(history, run_dir / "learning_curve.png", title=run_dir.name)
    if png is not None:
        tracker.log_artifact(png)
    if result.checkpoint is not None:
        tracker.log_artifact(result.checkpoint, artifact_path="checkpoint")
    tracker.end("FINISHED")
    return TrainSummary(
        steps=result.steps, wall_s=round(result.wall_s, 2), final_normalized_score=result.final_score,
        final_return=result.final_return, num_evaluations=len(result.evaluations), mlflow_run_id=tracker.run_id,
        tracking_uri=uri, run_dir=str(run_dir), checkpoint=str(result.checkpoint or ""),
        algorithm=cfg.agent.algorithm, dataset=cfg.data.dataset,
        learner_device=str(info.get("learner_device", "cpu")),
    )


def print_summary(summary: TrainSummary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    print(f"done: {summary.algorithm} on {summary.dataset}: {summary.steps} updates in {summary.wall_s:.1f}s "
          f"on {summary.learner_device}")
    print(f"  final normalized score (mean of last evaluations): {summary.final_normalized_score:.2f}"
          f"  (return {summary.final_return:.1f}, {summary.num_evaluations} evaluations)")
    print(f"  checkpoint:    {summary.checkpoint}")
    print(f"  mlflow run id: {summary.mlflow_run_id}")
    print(f"  tracking uri:  {summary.tracking_uri}")


def run(args: argparse.Namespace) -> int:
    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.runtime.driver import RunFailed

    set_torch_threads(1)
    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg, tracking_uri=args.tracking_uri, resume=args.resume, progress=not args.json)
    except RunFailed as e:
        print(f"dromo-ray train: run failed: {e}", flush=True)
        return 1
    print_summary(summary, args.json)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.data.gym_env import evaluate_policy
    from dromo_ray.runtime.driver import load_policy_from_checkpoint

    set_torch_threads(1)
    actor, env_key, _ = load_policy_from_checkpoint(args.checkpoint)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        return actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    res = evaluate_policy(act, env_key, episodes=args.episodes, seed=args.seed)
    out = {"env": env_key, "episodes": args.episodes, "return_mean": float(res.mean_return),
           "return_std": float(np.std(res.returns)), "normalized_score": float(res.mean_normalized),
           "episode_length_mean": float(np.mean(res.lengths))}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{env_key}: return {out['return_mean']:.1f} ± {out['return_std']:.1f} over {args.episodes} episodes, "
              f"normalized score {out['normalized_score']:.2f}")
    return 0

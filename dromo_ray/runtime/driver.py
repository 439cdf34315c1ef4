"""One run of Algorithm 1 on Ray actors (DESIGN.md "One DROMO run on Ray"): the public entry of the runtime.

1. D is put in the object store once; every actor reads the same zero-copy arrays.
2. Dynamics trainers fit the ensemble's members in parallel (line 1); a behaviour fitter fits pi^beta
   (:func:`~dromo_ray.runtime.pipeline.train_dynamics_stage`).
3. Rollout workers roll the target policy through the elite ensemble (line 4) into the replay actor.
4. The learner samples d_f batches and runs the algorithm's update (lines 5-7).
5. Evaluators run the current policy in the real environment.
6. The loop reports metrics through a callback and writes checkpoints that resume the run
   (:class:`~dromo_ray.runtime.loop.LearnerLoop`).

Nothing here imports MLflow or Tune: the edges pass a :class:`Reporter`. The names the edges import from here
(``RunFailed``, ``RunResult``, ``Reporter``, ``check_compatible``, ...) stay importable from this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray

from dromo_ray.core.config import ExperimentConfig
from dromo_ray.core.learner import set_numpy_rng_state
from dromo_ray.core.scores import final_score
from dromo_ray.runtime.checkpoint import check_compatible, load_checkpoint, load_policy_from_checkpoint
from dromo_ray.runtime.loop import LearnerLoop, Reporter, RunFailed, RunResult, null_reporter
from dromo_ray.runtime.pipeline import (
    build_density_state,
    start_stage2,
    train_dynamics_stage,
    with_entropy_reference,
)
from dromo_ray.runtime.resources import RoleResources, cluster_gpus, ray_session

__all__ = ["Reporter", "RunFailed", "RunResult", "build_density_state", "check_compatible",
           "load_policy_from_checkpoint", "run_experiment", "train_dynamics_stage", "with_entropy_reference"]


def run_experiment(cfg: ExperimentConfig, dataset: Any, run_dir: str | Path, *,
                   reporter: Reporter | None = None, resume: str | Path | dict[str, Any] | None = None,
                   progress: bool = True, on_start: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run Algorithm 1 end to end; returns a :class:`RunResult` or raises :class:`RunFailed`.

    ``resume``: a checkpoint path, or a checkpoint already loaded (and checked) by the caller. ``on_start``
    receives the learner's device and GPUs and the actor handles once stage 2 stands. Ray: the one this process
    is connected to, else ``$RAY_ADDRESS``, else a local loopback-only instance (shut down on return).
    """
    reporter = reporter or null_reporter
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with ray_session():
        return _run(cfg, dataset, run_dir, reporter, resume, progress, on_start)


def _run(cfg: ExperimentConfig, dataset: Any, run_dir: Path, reporter: Reporter,
         resume: str | Path | dict[str, Any] | None, progress: bool,
         on_start: Callable[[dict[str, Any]], None] | None) -> RunResult:
    env_key = cfg.data.env or dataset.env_id
    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    dataset_ref = ray.put(dataset)
    roles = RoleResources.from_config(cfg, cluster_gpus())

    ckpt = resume if isinstance(resume, dict) else (load_checkpoint(resume) if resume else None)
    if ckpt is not None:
        check_compatible(cfg, ckpt)
        set_numpy_rng_state(rng, ckpt["driver"]["rng"])
        stage = {"dynamics": ckpt["dynamics"], "behavior": ckpt.get("behavior"), "metrics": {}}
        density_state = ckpt.get("density")
    else:
        stage = train_dynamics_stage(cfg, dataset_ref, dataset, env_key, rng, roles)
        density_state = build_density_state(cfg, dataset)
    cfg = with_entropy_reference(cfg, stage, dataset, env_key)
    if ckpt is None:
        reporter(stage["metrics"], 0)

    actors, policies = start_stage2(cfg, env_key, dataset_ref, stage, density_state, roles, resume=ckpt)
    if on_start is not None:
        on_start({"learner_device": ray.get(actors.learner.device_name.remote()), **actors.handles()})
    loop = LearnerLoop(cfg, env_key, run_dir, actors, stage, density_state, rng, reporter=reporter,
                       progress=progress, t_start=t_start, resume=ckpt)
    try:
        steps = loop.run(policies["target"])
    finally:
        actors.teardown(pending=loop.published)  # let the last publish land (no retried calls on killed actors)

    score, ret = final_score(loop.evals, cfg.train.final_score_last_n)
    return RunResult(steps, time.perf_counter() - t_start, score, ret, loop.evals, loop.last_checkpoint,
                     stage["metrics"])

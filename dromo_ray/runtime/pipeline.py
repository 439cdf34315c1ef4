"""The actors of one run of Algorithm 1, built in two stages and torn down together (runtime layer).

Stage 1 (Alg. 1 line 1): :func:`train_dynamics_stage` fits the ensemble's members on parallel
:class:`~dromo_ray.runtime.actors.DynamicsActor` s and, when the agent samples pi^f, pi^beta on a
:class:`~dromo_ray.runtime.actors.BehaviorFitActor` beside them; the actors are gone when it returns.
Stage 2 (lines 2-8): :func:`start_stage2` builds the replay actor, the learner, the rollout workers and the
evaluators (:class:`RunActors`), each with the resources of its role
(:class:`~dromo_ray.runtime.resources.RoleResources`, the numbers ``cluster.check_fits`` checks), and
:meth:`RunActors.teardown` ends them. The learner loop that drives stage 2 is :mod:`dromo_ray.runtime.loop`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from dromo_ray.core.config import ExperimentConfig
from dromo_ray.core.envs import get_env_spec
from dromo_ray.runtime import dynamics_cache
from dromo_ray.runtime.actors import (
    BehaviorFitActor,
    DynamicsActor,
    EvaluatorActor,
    LearnerActor,
    ReplayActor,
    RolloutActor,
    behavior_hidden,
    dataset_arrays,
    dynamics_from_state,
    learner_needs_dynamics,
    penalty_kind,
)
from dromo_ray.runtime.resources import RoleResources


def split_members(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` holders, the first ones taking one more when it does not divide."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def behavior_steps(num_rows: int) -> int:
    """pi^beta's gradient steps: about 20 epochs of D at batch 256, between 500 and 20k steps."""
    return int(min(20_000, max(500, 20 * num_rows // 256)))


# ---- stage 1 ----------------------------------------------------------------------------------------------
def train_dynamics_stage(cfg: ExperimentConfig, dataset_ref: Any, dataset: Any, env_key: str,
                         rng: np.random.Generator, roles: RoleResources | None = None) -> dict[str, Any]:
    """Alg. 1 line 1 on parallel actors, plus pi^beta (when the agent needs it) in parallel.

    Returns ``{"dynamics": merged ensemble state (CPU tensors), "behavior": pi^beta state or None,
    "metrics": {"dynamics/...", "behavior/...": float}}``.
    """
    from dromo_ray.core import dynamics
    from dromo_ray.core.calibration import recalibrate

    roles = roles or RoleResources.from_config(cfg, 0.0)
    spec = get_env_spec(env_key)
    n = len(dataset)
    train_idx, holdout_idx = dynamics.holdout_split(n, cfg.dynamics, rng)
    dynamics_class = roles.dynamics.actor_class(DynamicsActor)
    parts = split_members(cfg.dynamics.ensemble_size, cfg.dynamics.num_trainers)
    arrays = dataset_arrays(dataset)
    cache_dir = cfg.dynamics.cache_dir
    key = dynamics_cache.cache_key(cfg, env_key, arrays, holdout_idx) if cache_dir else ""
    hit = dynamics_cache.load_cached(cache_dir, key) if cache_dir else None
    t0 = time.perf_counter()
    trainers, fits = [], []
    if hit is None:
        trainers = [dynamics_class.remote(spec.obs_dim, spec.act_dim, cfg.dynamics, k, cfg.seed * 7919 + i,
                                          cfg.runtime.torch_threads) for i, k in enumerate(parts)]
        fits = [t.fit.remote(dataset_ref, train_idx, holdout_idx) for t in trainers]
    behavior_ref = None
    if cfg.agent.needs_behavior_policy():
        fitter = roles.behavior_fit.actor_class(BehaviorFitActor).remote(cfg.runtime.torch_threads)
        behavior_ref = fitter.fit.remote(dataset_ref, behavior_hidden(cfg.agent), behavior_steps(n), cfg.seed)
    if hit is not None:
        model = dynamics_from_state(hit["state"], spec.obs_dim, spec.act_dim, cfg.dynamics)
        metrics: dict[str, float] = {**hit["metrics"], "dynamics/cached": 1.0,
                                     "dynamics/load_s": time.perf_counter() - t0}
    else:
        results = ray.get(fits)
        models = [dynamics_from_state(r["state"], spec.obs_dim, spec.act_dim, cfg.dynamics) for r in results]
        losses = [np.asarray(r["holdout_losses"]) for r in results]
        model = dynamics.merge_ensembles(models, losses, cfg.dynamics.num_elites)
        metrics = {"dynamics/train_s": time.perf_counter() - t0}
        all_losses = np.concatenate(losses)
        metrics["dynamics/holdout_mse"] = float(all_losses.mean())
        metrics["dynamics/holdout_mse_elites"] = float(np.sort(all_losses)[: cfg.dynamics.num_elites].mean())
        metrics["dynamics/epochs"] = float(np.mean([r["metrics"].get("dynamics/epochs", 0) for r in results]))
        metrics["dynamics/train_rows_per_s"] = float(sum(r["metrics"].get("dynamics/train_rows_per_s", 0)
                                                         for r in results))
        if cache_dir:  # before appendix A's calibration touches var_scale (recomputed below on a hit too)
            dynamics_cache.store(cache_dir, key, model.state_dict(), [h.tolist() for h in losses], metrics)
            metrics["dynamics/cached"] = 0.0
    inputs, targets = dynamics.make_inputs_targets(arrays.obs, arrays.act, arrays.next_obs, arrays.rew)
    # Appendix A: calibration error of the elite mixture on holdout, before/after a per-dim variance scale.
    cal = recalibrate(model, inputs[holdout_idx], targets[holdout_idx])
    if not cfg.dynamics.recalibrate:
        model.var_scale.fill_(1.0)
        cal = {"dynamics/calibration_error_before": cal["dynamics/calibration_error_before"]}
    metrics.update({k: float(v) for k, v in cal.items()})
    out: dict[str, Any] = {"dynamics": {k: v.cpu() for k, v in model.state_dict().items()}, "metrics": metrics,
                           "behavior": None}
    if behavior_ref is not None:
        b = ray.get(behavior_ref)
        out["behavior"] = b["state"]
        metrics.update({f"behavior/{k}": float(v) for k, v in b["metrics"].items()
                        if isinstance(v, (int, float))})
    for t in trainers:
        ray.kill(t)
    return out


def with_entropy_reference(cfg: ExperimentConfig, stage: dict[str, Any], dataset: Any,
                           env_key: str) -> ExperimentConfig:
    """The ``entropy`` penalty's H_ref and delta (appendix B) from D under the trained ensemble, once, before any
    rollout; a copy of ``cfg`` with them filled in (values the config gives are kept). A resumed run recomputes
    them from the checkpoint's ensemble and the same rows, so they come out the same."""
    agent = cfg.agent
    if penalty_kind(agent) != "entropy" or None not in (agent.mopo_entropy_ref, agent.mopo_target_entropy):
        return cfg
    from dromo_ray.core.model_env import entropy_reference

    spec = get_env_spec(env_key)
    model = dynamics_from_state(stage["dynamics"], spec.obs_dim, spec.act_dim, cfg.dynamics)
    ref = entropy_reference(model, dataset.observations, dataset.actions, agent.mopo_entropy_quantile,
                            generator=torch.Generator().manual_seed(cfg.seed + 5), entropy_ref=agent.mopo_entropy_ref)
    target = ref.target if agent.mopo_target_entropy is None else agent.mopo_target_entropy
    stage["metrics"].update({"dynamics/entropy_ref": ref.entropy_ref, "dynamics/entropy_target": target})
    new_agent = dataclasses.replace(agent, mopo_entropy_ref=ref.entropy_ref, mopo_target_entropy=target)
    return dataclasses.replace(cfg, agent=new_agent)


def build_density_state(cfg: ExperimentConfig, dataset: Any) -> dict[str, Any] | None:
    """The state-density estimate beside Eq. 13's variance term, built from D once; None when the agent has no
    such term (the same rule as pi^beta: ``agent.needs_behavior_policy()``)."""
    if not cfg.agent.needs_behavior_policy():
        return None
    from dromo_ray.core.density import make_density

    gen = torch.Generator().manual_seed(cfg.seed + 3)
    density = make_density(cfg.agent, np.asarray(dataset.observations, dtype=np.float32), generator=gen)
    return density.state_dict()


# ---- stage 2 ----------------------------------------------------------------------------------------------
@dataclass
class RunActors:
    """The handles of stage 2 and the object-store refs they were built from (held for the whole run, so that a
    restarted rollout worker finds its inputs)."""

    learner: Any
    replay: Any
    workers: list[Any]
    evaluators: list[Any]
    learner_gpus: float
    dataset_ref: Any
    dynamics_ref: Any

    def handles(self) -> dict[str, Any]:
        """What ``run_experiment``'s ``on_start`` callback receives besides the learner's device."""
        return {"learner_gpus": self.learner_gpus, "learner": self.learner, "replay": self.replay,
                "workers": self.workers, "evaluators": self.evaluators}

    def teardown(self, pending: list[Any] | None = None) -> None:
        """Kill every actor of stage 2 (no restarts), after ``pending`` calls have landed (10 s at most): no call
        is retried on a killed actor."""
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=10)
        for h in [*self.workers, *self.evaluators, self.learner, self.replay]:
            ray.kill(h, no_restart=True)


def start_stage2(cfg: ExperimentConfig, env_key: str, dataset_ref: Any, stage: dict[str, Any],
                 density_state: dict[str, Any] | None, roles: RoleResources,
                 resume: dict[str, Any] | None = None) -> tuple[RunActors, dict[str, Any]]:
    """Build the replay actor, the learner (restored from ``resume``'s ``learner`` and ``replay`` state when
    given), the rollout workers and the evaluators. Returns the actors and the learner's first policy states
    ``{"target": ..., "current": ...}``."""
    spec = get_env_spec(env_key)
    rt = cfg.runtime
    replay_name = f"dromo_ray.replay.{uuid.uuid4().hex[:12]}"  # the workers find it by name (see RolloutActor)
    replay = roles.replay.actor_class(ReplayActor).options(name=replay_name).remote(
        cfg.rollout.model_buffer_size, spec.obs_dim, spec.act_dim, cfg.seed + 1)
    gpus = roles.learner.num_gpus
    dynamics_ref = ray.put(stage["dynamics"])
    learner = roles.learner.actor_class(LearnerActor).remote(
        cfg, env_key, dataset_ref, replay, stage["behavior"], density_state, gpus,
        dynamics_ref if learner_needs_dynamics(cfg) else None)
    if resume is not None:
        ray.get([learner.load_state_dict.remote(resume["learner"]), replay.load_state_dict.remote(resume["replay"])])
    policies = ray.get(learner.policy_states.remote())
    rollout_class = roles.rollout.actor_class(RolloutActor)
    # The large inputs reach the (restartable) workers through the replay actor, which holds their refs for the
    # whole run: no constructor argument of a restartable actor is an object-store ref (Ray prints an error line
    # for each such actor otherwise), and a restarted worker fetches them again.
    inputs = {"dynamics": dynamics_ref, "dataset": dataset_ref, "policy": ray.put(policies["target"])}
    ray.get(replay.hold_worker_inputs.remote(inputs))
    workers = [rollout_class.remote(i, env_key, None, replay_name, agent=cfg.agent, dynamics=cfg.dynamics,
                                    rollout=cfg.rollout, seed=cfg.seed, torch_threads=rt.torch_threads)
               for i in range(rt.num_rollout_workers)
               if cfg.rollout.mode == "workers"]  # rollout.mode learner: the learner rolls out itself
    evaluator_class = roles.evaluator.actor_class(EvaluatorActor)
    evaluators = [evaluator_class.remote(env_key, cfg.agent.hidden_dims, cfg.train.max_episode_steps)
                  for _ in range(rt.num_evaluators)]
    actors = RunActors(learner, replay, workers, evaluators, gpus, dataset_ref, dynamics_ref)
    return actors, policies

"""``dromo-ray bench pipeline``: the learner fed by live actors versus the learner alone, and rollout scaling.

Three measurements on a local Ray instance, with the real actor classes of :mod:`dromo_ray.runtime.actors`:

1. learner alone: the replay actor is pre-filled, no rollout worker runs; updates/s and the fraction of
   learner time spent waiting for model chunks;
2. learner fed: the same learner while N rollout workers roll the target policy continuously and push into
   the replay actor (asynchronous mode); updates/s and wait fraction;
3. rollout throughput: 1..N workers rolling K start states each round in parallel; transitions/s.

Dynamics weights are freshly initialised (throughput does not depend on training), the dataset is collected
with the real Hopper-v5 environment (random policy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import ray
import torch

from dromo_ray.bench.common import check_at_least, emit


def _setup(algo: str, steps: int) -> tuple[Any, Any]:
    from dromo_ray.core.config import config_from_dict
    from dromo_ray.data.gym_env import collect_transitions

    dataset = collect_transitions("hopper", "random", 5000, seed=0, progress=False)
    cfg = config_from_dict({
        "seed": 0, "device": "auto", "out_dir": tempfile.mkdtemp(prefix="dromo_bench_"),
        "data": {"dataset": "bench", "env": "hopper"},
        "agent": {"algorithm": algo, "batch_size": 256, "num_actions": 10},
        "rollout": {"horizon": 5, "batch_size": 10_000, "interval": 250, "model_buffer_size": 1_000_000},
        "runtime": {"synchronous": False, "num_rollout_workers": 2, "rollout_worker_cpus": 0.5,
                    "learner_cpus": 0.9, "weight_sync_interval": 50, "replay_chunk_batches": 32},
        "train": {"total_steps": steps},
    })
    return cfg, dataset


def _initial_dynamics(cfg: Any, dataset: Any) -> dict[str, torch.Tensor]:
    from dromo_ray.core import dynamics
    from dromo_ray.runtime.actors import dataset_arrays

    a = dataset_arrays(dataset)
    inputs, targets = dynamics.make_inputs_targets(a.obs, a.act, a.next_obs, a.rew)
    model = dynamics.EnsembleDynamics(a.obs.shape[1], a.act.shape[1], cfg.dynamics,
                                      generator=torch.Generator().manual_seed(0))
    model.set_normalizer(dynamics.normalizer_stats(inputs, targets))
    return {k: v.clone() for k, v in model.state_dict().items()}


def run(args: argparse.Namespace) -> int:
    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.runtime.resources import ray_session

    check_at_least("--steps", args.steps, 1)
    set_torch_threads(1)
    algo = getattr(args, "algo", "dromo")
    cfg, dataset = _setup(algo, args.steps)
    with ray_session():
        result = _measure(cfg, dataset, args.steps)
    emit(result, args.json, f"bench pipeline ({algo}, batch 256, K={cfg.rollout.batch_size}, H={cfg.rollout.horizon})")
    return 0


def _measure(cfg: Any, dataset: Any, steps: int) -> dict[str, Any]:
    from dromo_ray.core.nets import TanhGaussianActor
    from dromo_ray.runtime.actors import LearnerActor, ReplayActor, RolloutActor, behavior_hidden
    from dromo_ray.runtime.pipeline import build_density_state
    from dromo_ray.runtime.resources import RoleResources

    spec_obs, spec_act = dataset.observations.shape[1], dataset.actions.shape[1]
    data_ref = ray.put(dataset)
    dyn_ref = ray.put(_initial_dynamics(cfg, dataset))
    behavior = None
    if cfg.agent.needs_behavior_policy():
        behavior = TanhGaussianActor(spec_obs, spec_act, behavior_hidden(cfg.agent)).state_dict()
    rt = cfg.runtime
    roles = RoleResources.from_config(cfg, 0.0)  # the learner on CPU: the bench compares against itself
    replay = roles.replay.actor_class(ReplayActor).remote(cfg.rollout.model_buffer_size, spec_obs, spec_act, 1)
    learner = roles.learner.actor_class(LearnerActor).remote(
        cfg, "hopper", data_ref, replay, behavior, build_density_state(cfg, dataset), 0.0,
        dyn_ref if cfg.agent.needs_dynamics() else None)
    policy = ray.get(learner.policy_states.remote())["target"]
    rollout_class = roles.rollout.actor_class(RolloutActor)
    max_workers = rt.num_rollout_workers
    inputs = {"dynamics": dyn_ref, "dataset": data_ref, "policy": ray.put(policy)}
    workers = [rollout_class.remote(i, "hopper", inputs, replay, agent=cfg.agent, dynamics=cfg.dynamics,
                                    rollout=cfg.rollout, seed=cfg.seed, torch_threads=rt.torch_threads)
               for i in range(max_workers)]
    out: dict[str, Any] = {"learner_device": ray.get(learner.device_name.remote())}

    # 3. rollout throughput against the number of workers (also fills D_model for 1. and 2.)
    k = cfg.rollout.batch_size
    for n in range(1, max_workers + 1):
        share = k // n
        ray.get([w.ping.remote() for w in workers])
        t0 = time.perf_counter()
        outs = ray.get([w.rollout.remote(share) for w in workers[:n]])
        dt = time.perf_counter() - t0
        total = sum(b.size for b, _ in outs)
        ray.get([replay.add.remote(b) for b, _ in outs])
        out[f"rollout_transitions_per_s_{n}_workers"] = total / dt

    # 1. learner alone on the pre-filled buffer
    ray.get(learner.train.remote(20))  # warm-up
    alone = ray.get(learner.train.remote(steps))["metrics"]
    out["learner_alone_updates_per_s"] = alone["perf/learner_updates_per_s"]
    out["learner_alone_wait_fraction"] = alone["perf/learner_wait_fraction"]

    # 2. learner fed by live rollout workers (asynchronous: they owe one round per 50 updates)
    starts = max(1, k // max_workers // 5)
    for w in workers:
        w.set_policy.remote(policy, 0, steps // rt.weight_sync_interval + 1, starts)
    before = ray.get(replay.stats.remote())["replay/added"]
    t0 = time.perf_counter()
    fed = ray.get(learner.train.remote(steps))["metrics"]
    dt = time.perf_counter() - t0
    added = ray.get(replay.stats.remote())["replay/added"] - before
    out["learner_fed_updates_per_s"] = fed["perf/learner_updates_per_s"]
    out["learner_fed_wait_fraction"] = fed["perf/learner_wait_fraction"]
    out["fed_rollout_transitions_per_s"] = added / dt
    out["fed_vs_alone"] = out["learner_fed_updates_per_s"] / out["learner_alone_updates_per_s"]
    for h in [*workers, learner, replay]:
        ray.kill(h)
    out["cpus"] = float(ray.cluster_resources().get("CPU", 0))
    out["note"] = "2-core machines share cores between the learner and the workers; fed_vs_alone shows it"
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


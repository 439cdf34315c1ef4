"""``dromo-ray bench pipeline``: the learner fed by model rollouts, in either rollout mode.

``rollout_mode="workers"`` — three measurements on a local Ray instance, with the real actor classes of
:mod:`dromo_ray.runtime.actors`:

1. learner alone: the replay actor is pre-filled, no rollout worker runs; updates/s and the fraction of
   learner time spent waiting for model chunks;
2. learner fed: the same learner while N rollout workers roll the target policy continuously and push into
   the replay actor (asynchronous mode); updates/s and wait fraction;
3. rollout throughput: 1..N workers rolling K start states each round in parallel; transitions/s.

``rollout_mode="learner"`` — the learner rolls out itself (``rollout.mode: learner``): the elite ensemble on the
learner's device rolls K start states H steps every ``rollout.interval`` updates into a device D_model. The
learner core runs in this process (no actor feeds it, so there is nothing for Ray to carry); updates/s, the wait
fraction (the rollout rounds' share of the learner's time) and rollout transitions/s.

Dynamics weights are freshly initialised (throughput does not depend on training). The dataset is collected with
the real Hopper-v5 environment (random policy) where Gymnasium's MuJoCo is installed, else synthetic Hopper-sized
states near the healthy posture (``dataset`` in the result says which).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from typing import Any

import numpy as np
import torch

from dromo_ray.bench.common import device_name, resolve_device, sync

ROLLOUT_MODES = ("workers", "learner")


def _setup(algo: str, steps: int, device: str, update_mode: str, rollout_mode: str, starts: int,
           interval: int) -> Any:
    from dromo_ray.core.config import config_from_dict

    return config_from_dict({
        "seed": 0, "device": device, "out_dir": tempfile.mkdtemp(prefix="dromo_bench_"),
        "data": {"dataset": "bench", "env": "hopper"},
        "agent": {"algorithm": algo, "batch_size": 256, "num_actions": 10, "update_mode": update_mode},
        "rollout": {"horizon": 5, "batch_size": starts, "interval": interval, "model_buffer_size": 1_000_000,
                    "mode": rollout_mode},
        "runtime": {"synchronous": False, "num_rollout_workers": 2, "rollout_worker_cpus": 0.5,
                    "learner_cpus": 0.9, "weight_sync_interval": 50, "replay_chunk_batches": 32},
        "train": {"total_steps": steps},
    })


def bench_dataset(n: int = 5000) -> tuple[Any, str]:
    """(OfflineDataset, what it is): Hopper-v5 random-policy transitions, or synthetic ones without MuJoCo."""
    try:
        from dromo_ray.data.gym_env import collect_transitions
    except ImportError:
        collect_transitions = None
    if collect_transitions is not None:
        return collect_transitions("hopper", "random", n, seed=0, progress=False), "hopper-v5 random policy"
    from dromo_ray.data.dataset import OfflineDataset

    rng = np.random.default_rng(0)
    obs = 0.1 * rng.standard_normal((n + 1, 11)).astype(np.float32)
    obs[:, 0] += 1.25  # torso height and angle of a healthy Hopper
    obs[:, 1] *= 0.2
    starts = np.zeros(n, bool)
    starts[::100] = True
    ds = OfflineDataset(obs[:-1], rng.uniform(-1, 1, (n, 3)), 0.1 * rng.standard_normal(n), obs[1:],
                        np.zeros(n, bool), np.roll(starts, -1), starts, "hopper", source="synthetic")
    return ds, "synthetic hopper-sized (no MuJoCo here)"


def _initial_dynamics(cfg: Any, dataset: Any) -> dict[str, torch.Tensor]:
    from dromo_ray.core import dynamics

    a = _arrays(dataset)
    inputs, targets = dynamics.make_inputs_targets(a.obs, a.act, a.next_obs, a.rew)
    model = dynamics.EnsembleDynamics(a.obs.shape[1], a.act.shape[1], cfg.dynamics,
                                      generator=torch.Generator().manual_seed(0))
    model.set_normalizer(dynamics.normalizer_stats(inputs, targets))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _arrays(dataset: Any) -> Any:
    from dromo_ray.core.types import NumpyBatch

    n = len(dataset)
    return NumpyBatch(*(np.asarray(x, dtype=np.float32) for x in (
        dataset.observations, dataset.actions, dataset.rewards, dataset.next_observations, dataset.terminals)),
        np.zeros(n, dtype=np.float32))


def measure_pipeline(*, algo: str = "dromo", steps: int = 300, device: str = "cpu", rollout_mode: str = "workers",
                     update_mode: str = "auto", starts_per_round: int = 10_000, interval: int = 250,
                     warmup: int = 20) -> dict[str, Any]:
    """The pipeline bench in one rollout mode (see the module docstring); ``device`` is the learner's (``cpu``,
    ``cuda``, ``cuda:N``; a device that cannot work is a UserError), ``update_mode`` its ``agent.update_mode``;
    K = ``starts_per_round`` start states per rollout round, H = 5, a round every ``interval`` updates (10k per 250:
    Alg. 1's default rate of 50k starts per 1000 updates), ``warmup`` untimed learner updates first."""
    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.errors import UserError

    if rollout_mode not in ROLLOUT_MODES:
        raise UserError(f"rollout mode {rollout_mode!r}: one of {', '.join(ROLLOUT_MODES)}")
    dev = resolve_device(device)
    set_torch_threads(1)
    cfg = _setup(algo, steps, "cpu" if dev.type == "cpu" else "cuda", update_mode, rollout_mode, starts_per_round,
                 interval)
    dataset, what = bench_dataset()
    if rollout_mode == "learner":
        result = _measure_learner_mode(cfg, dataset, steps, dev, warmup)
    else:
        try:
            import ray
        except ImportError:
            raise UserError("bench pipeline: the workers rollout mode needs Ray (pip install ray)") from None
        from dromo_ray.runtime.resources import ray_session

        del ray  # (imported only to say clearly when it is missing)
        with ray_session():
            result = _measure_workers_mode(cfg, dataset, steps, dev, warmup)
    result.update({"rollout_mode": rollout_mode, "dataset": what, "algo": algo,
                   "learner_card": device_name(dev) if dev.type == "cuda" else "cpu"})
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}


def _measure_workers_mode(cfg: Any, dataset: Any, steps: int, dev: torch.device, warmup: int) -> dict[str, Any]:
    import ray

    from dromo_ray.core.nets import TanhGaussianActor
    from dromo_ray.runtime.actors import (
        LearnerActor,
        ReplayActor,
        RolloutActor,
        behavior_hidden,
        learner_needs_dynamics,
    )
    from dromo_ray.runtime.pipeline import build_density_state
    from dromo_ray.runtime.resources import RoleResources

    spec_obs, spec_act = dataset.observations.shape[1], dataset.actions.shape[1]
    data_ref = ray.put(dataset)
    dyn_ref = ray.put(_initial_dynamics(cfg, dataset))
    behavior = None
    if cfg.agent.needs_behavior_policy():
        behavior = TanhGaussianActor(spec_obs, spec_act, behavior_hidden(cfg.agent)).state_dict()
    rt = cfg.runtime
    gpus = 1.0 if dev.type == "cuda" else 0.0
    roles = RoleResources.from_config(cfg, gpus)
    replay_name = f"dromo_ray.bench.replay.{uuid.uuid4().hex[:12]}"
    replay = roles.replay.actor_class(ReplayActor).options(name=replay_name).remote(
        cfg.rollout.model_buffer_size, spec_obs, spec_act, 1)
    learner = roles.learner.actor_class(LearnerActor).remote(
        cfg, "hopper", data_ref, replay, behavior, build_density_state(cfg, dataset), gpus,
        dyn_ref if learner_needs_dynamics(cfg) else None)
    policy = ray.get(learner.policy_states.remote())["target"]
    rollout_class = roles.rollout.actor_class(RolloutActor)
    max_workers = rt.num_rollout_workers
    inputs = {"dynamics": dyn_ref, "dataset": data_ref, "policy": ray.put(policy)}
    ray.get(replay.hold_worker_inputs.remote(inputs))
    workers = [rollout_class.remote(i, "hopper", None, replay_name, agent=cfg.agent, dynamics=cfg.dynamics,
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
    ray.get(learner.train.remote(warmup))  # warm-up (and the capture, in the captured update mode)
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
    return out


def _measure_learner_mode(cfg: Any, dataset: Any, steps: int, dev: torch.device, warmup: int) -> dict[str, Any]:
    from dromo_ray.core.agents import make_agent
    from dromo_ray.core.density import make_density
    from dromo_ray.core.dynamics import EnsembleDynamics
    from dromo_ray.core.envs import get_env_spec
    from dromo_ray.core.learner import DatasetSampler, Learner
    from dromo_ray.core.model_env import model_env_for
    from dromo_ray.core.nets import TanhGaussianActor
    from dromo_ray.core.rollout import LearnerRollouts

    spec = get_env_spec("hopper")
    model = EnsembleDynamics(spec.obs_dim, spec.act_dim, cfg.dynamics)
    model.load_state_dict(_initial_dynamics(cfg, dataset))
    model = model.to(dev)
    behavior = density = None
    if cfg.agent.needs_behavior_policy():
        behavior = TanhGaussianActor(spec.obs_dim, spec.act_dim, (256, 256))
        density = make_density(cfg.agent, np.asarray(dataset.observations, dtype=np.float32),
                               generator=torch.Generator().manual_seed(3))
    agent = make_agent(cfg.agent, spec.obs_dim, spec.act_dim, device=dev, seed=cfg.seed, behavior=behavior,
                       density=density, dataset_size=len(dataset), total_steps=cfg.train.total_steps,
                       dynamics=model if cfg.agent.needs_dynamics() else None)
    ro = cfg.rollout
    rollouts = LearnerRollouts(model_env_for(cfg.agent, model, spec.termination_fn), agent.target_actor,
                               dataset.observations, horizon=ro.horizon, num_starts=ro.batch_size,
                               buffer_size=ro.model_buffer_size, device=dev, seed=cfg.seed * 1000 + 999)
    core = Learner(agent, DatasetSampler(_arrays(dataset), dev, seed=cfg.seed + 17), cfg.agent.batch_size,
                       cfg.agent.f, None, chunk_batches=cfg.runtime.replay_chunk_batches,
                       update_mode=cfg.agent.update_mode, rollouts=rollouts, rollout_interval=ro.interval)
    core.train(warmup)  # warm-up: the first rollout round and the capture
    sync(dev)
    wait0, roll0, added0 = core.data_wait_s, core.rollout_s, rollouts.buffer.total_added
    rounds0 = rollouts.rounds
    t0 = time.perf_counter()
    m = core.train(steps)
    sync(dev)
    dt = time.perf_counter() - t0
    roll_s = core.rollout_s - roll0
    added = rollouts.buffer.total_added - added0
    return {"learner_device": str(dev), "update_mode": core.update_mode,
            "learner_updates_per_s": steps / dt, "learner_wait_fraction": (core.data_wait_s - wait0) / dt,
            "rollout_rounds": rollouts.rounds - rounds0, "rollout_transitions": float(added),
            "rollout_transitions_per_s": added / roll_s if roll_s > 0 else None,
            "starts_per_round": ro.batch_size, "horizon": ro.horizon, "rollout_interval": ro.interval,
            "final_critic_loss": float(m["train/critic_loss"])}

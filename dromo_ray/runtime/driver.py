"""The loop of Algorithm 1 on Ray actors (DESIGN.md "One DROMO run on Ray").

1. D is put in the object store once; every actor reads the same zero-copy arrays.
2. Dynamics trainers fit the ensemble's members in parallel (line 1); a behaviour fitter fits pi^beta.
3. Rollout workers roll the target policy through the elite ensemble (line 4) into the replay actor.
4. The learner samples d_f batches and runs the algorithm's update (lines 5-7).
5. Evaluators run the current policy in the real environment.
6. The driver reports metrics through a callback and writes checkpoints that resume the run.

Nothing here imports MLflow or Tune: the edges pass a :class:`Reporter`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
import torch

from dromo_ray.core.config import ExperimentConfig, to_dict
from dromo_ray.core.envs import get_env_spec
from dromo_ray.core.learner import NonFiniteLossError, numpy_rng_state, set_numpy_rng_state
from dromo_ray.core.messages import plain_message
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.scores import final_score
from dromo_ray.runtime import actors as A
from dromo_ray.runtime.checkpoint import load_checkpoint, save_checkpoint
from dromo_ray.runtime.cluster import learner_gpus, start_ray


class Reporter(Protocol):
    def __call__(self, metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None: ...


class RunFailed(RuntimeError):
    """The run stopped; ``checkpoint`` (if any) resumes it."""

    def __init__(self, reason: str, checkpoint: Path | None = None) -> None:
        reason = plain_message(reason)
        self.reason, self.checkpoint = reason, checkpoint
        hint = f" Resume from the last good checkpoint with --resume {checkpoint}" if checkpoint else ""
        super().__init__(reason + hint)


@dataclass
class RunResult:
    steps: int
    wall_s: float
    final_score: float
    """Mean normalized score of the last ``train.final_score_last_n`` evaluations (nan without evaluations)."""
    final_return: float
    evaluations: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    dynamics_metrics: dict[str, float] = field(default_factory=dict)


def _null_reporter(metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None:
    return None


def _ensure_ray(cfg: ExperimentConfig) -> None:
    # RAY_ADDRESS (if set) attaches to an existing cluster; otherwise a local, loopback-only instance starts.
    start_ray()


def _learner_gpus(cfg: ExperimentConfig) -> float:
    return learner_gpus(cfg, ray.cluster_resources().get("GPU", 0))


def _split_members(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def train_dynamics_stage(cfg: ExperimentConfig, dataset_ref: Any, dataset: Any, env_key: str,
                         rng: np.random.Generator) -> dict[str, Any]:
    """Alg. 1 line 1 on parallel actors, plus pi^beta (for DROMO) in parallel; returns states and metrics."""
    from dromo_ray.core import dynamics
    from dromo_ray.core.calibration import recalibrate

    spec = get_env_spec(env_key)
    n = len(dataset)
    train_idx, holdout_idx = dynamics.holdout_split(n, cfg.dynamics, rng)
    Trainer = A.remote(A.DynamicsTrainer, num_cpus=cfg.runtime.dynamics_trainer_cpus)
    parts = _split_members(cfg.dynamics.ensemble_size, cfg.dynamics.num_trainers)
    trainers = [Trainer.remote(spec.obs_dim, spec.act_dim, cfg.dynamics, k, cfg.seed * 7919 + i,
                               cfg.runtime.torch_threads) for i, k in enumerate(parts)]
    t0 = time.perf_counter()
    fits = [t.fit.remote(dataset_ref, train_idx, holdout_idx) for t in trainers]
    behavior_ref = None
    if cfg.agent.needs_behavior_policy():
        Fitter = A.remote(A.BehaviorFitter, num_cpus=cfg.runtime.dynamics_trainer_cpus)
        fitter = Fitter.remote(cfg.runtime.torch_threads)
        behavior_ref = fitter.fit.remote(dataset_ref, A._behavior_hidden(cfg), _behavior_steps(cfg, n), cfg.seed)
    results = ray.get(fits)
    models = [A.dynamics_from_state(r["state"], spec.obs_dim, spec.act_dim, cfg.dynamics) for r in results]
    losses = [np.asarray(r["holdout_losses"]) for r in results]
    model = dynamics.merge_ensembles(models, losses, cfg.dynamics.num_elites)
    metrics: dict[str, float] = {"dynamics/train_s": time.perf_counter() - t0}
    all_losses = np.concatenate(losses)
    metrics["dynamics/holdout_mse"] = float(all_losses.mean())
    metrics["dynamics/holdout_mse_elites"] = float(np.sort(all_losses)[: cfg.dynamics.num_elites].mean())
    metrics["dynamics/epochs"] = float(np.mean([r["metrics"].get("dynamics/epochs", 0) for r in results]))
    metrics["dynamics/train_rows_per_s"] = float(sum(r["metrics"].get("dynamics/train_rows_per_s", 0)
                                                     for r in results))
    arrays = A.dataset_arrays(dataset)
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


def _behavior_steps(cfg: ExperimentConfig, n: int) -> int:
    # About 20 epochs of D, between 500 and 20k steps.
    return int(min(20_000, max(500, 20 * n // 256)))


def with_entropy_reference(cfg: ExperimentConfig, stage: dict[str, Any], dataset: Any,
                           env_key: str) -> ExperimentConfig:
    """The ``entropy`` penalty's H_ref and delta (appendix B) from D under the trained ensemble, once, before any
    rollout; a copy of ``cfg`` with them filled in (values the config gives are kept). A resumed run recomputes
    them from the checkpoint's ensemble and the same rows, so they come out the same."""
    agent = cfg.agent
    if A._penalty_kind(agent) != "entropy" or None not in (agent.mopo_entropy_ref, agent.mopo_target_entropy):
        return cfg
    import dataclasses

    from dromo_ray.core.model_env import entropy_reference

    spec = get_env_spec(env_key)
    model = A.dynamics_from_state(stage["dynamics"], spec.obs_dim, spec.act_dim, cfg.dynamics)
    ref = entropy_reference(model, dataset.observations, dataset.actions, agent.mopo_entropy_quantile,
                            generator=torch.Generator().manual_seed(cfg.seed + 5), entropy_ref=agent.mopo_entropy_ref)
    target = ref.target if agent.mopo_target_entropy is None else agent.mopo_target_entropy
    stage["metrics"].update({"dynamics/entropy_ref": ref.entropy_ref, "dynamics/entropy_target": target})
    new_agent = dataclasses.replace(agent, mopo_entropy_ref=ref.entropy_ref, mopo_target_entropy=target)
    return dataclasses.replace(cfg, agent=new_agent)


def build_density_state(cfg: ExperimentConfig, dataset: Any) -> dict[str, Any] | None:
    if cfg.agent.algorithm != "dromo" or cfg.agent.effective_alpha() == 0:
        return None
    from dromo_ray.core.density import make_density

    gen = torch.Generator().manual_seed(cfg.seed + 3)
    density = make_density(cfg.agent, np.asarray(dataset.observations, dtype=np.float32), generator=gen)
    return density.state_dict()


def run_experiment(cfg: ExperimentConfig, dataset: Any, run_dir: str | Path, *,
                   reporter: Reporter | None = None, resume: str | Path | dict[str, Any] | None = None,
                   progress: bool = True, on_start: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run Algorithm 1 end to end; returns a :class:`RunResult` or raises :class:`RunFailed`.

    ``resume``: a checkpoint path, or a checkpoint already loaded (and checked) by the caller.
    """
    reporter = reporter or _null_reporter
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _ensure_ray(cfg)
    env_key = cfg.data.env or dataset.env_id
    spec = get_env_spec(env_key)
    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    dataset_ref = ray.put(dataset)

    ckpt = resume if isinstance(resume, dict) else (load_checkpoint(resume) if resume else None)
    if ckpt is not None:
        check_compatible(cfg, ckpt)
        set_numpy_rng_state(rng, ckpt["driver"]["rng"])
        stage = {"dynamics": ckpt["dynamics"], "behavior": ckpt.get("behavior"), "metrics": {}}
        density_state = ckpt.get("density")
    else:
        stage = train_dynamics_stage(cfg, dataset_ref, dataset, env_key, rng)
        density_state = build_density_state(cfg, dataset)
    cfg = with_entropy_reference(cfg, stage, dataset, env_key)
    if ckpt is None:
        reporter(stage["metrics"], 0)

    rt = cfg.runtime
    replay = A.remote(A.ReplayServer, num_cpus=0.01).remote(cfg.rollout.model_buffer_size, spec.obs_dim,
                                                            spec.act_dim, cfg.seed + 1)
    learner_gpus = _learner_gpus(cfg)
    dyn_ref = ray.put(stage["dynamics"])
    learner = A.remote(A.Learner, num_cpus=rt.learner_cpus, num_gpus=learner_gpus,
                       resources=rt.learner_resources).remote(cfg, env_key, dataset_ref, replay, stage["behavior"],
                                                              density_state, learner_gpus,
                                                              dyn_ref if A.learner_needs_dynamics(cfg) else None)
    if ckpt is not None:
        ray.get([learner.load_state_dict.remote(ckpt["learner"]), replay.load_state_dict.remote(ckpt["replay"])])
    policies = ray.get(learner.policy_states.remote())
    Worker = A.remote(A.RolloutWorker, num_cpus=rt.rollout_worker_cpus, resources=rt.rollout_worker_resources,
                      max_restarts=rt.max_worker_restarts)
    # The large constructor inputs travel as refs nested in a dict (the worker gets them itself), so that no
    # constructor argument of a restartable actor lives in the object store; the driver holds the refs for the
    # whole run, so a restarted worker finds them.
    worker_inputs = {"dynamics": dyn_ref, "dataset": dataset_ref, "policy": ray.put(policies["target"])}
    workers = [Worker.remote(i, cfg, env_key, worker_inputs, replay) for i in range(rt.num_rollout_workers)
               if cfg.rollout.mode == "workers"]  # rollout.mode learner: the learner rolls out itself
    Eval = A.remote(A.Evaluator, num_cpus=rt.evaluator_cpus)
    evaluators = [Eval.remote(env_key, cfg.agent.hidden_dims, cfg.train.max_episode_steps)
                  for _ in range(rt.num_evaluators)]
    if on_start is not None:
        on_start({"learner_device": ray.get(learner.device_name.remote()), "learner_gpus": learner_gpus,
                  "learner": learner, "replay": replay, "workers": workers, "evaluators": evaluators})

    drv = ckpt["driver"] if ckpt is not None else {"step": 0, "round": 0, "evals": []}
    step, round_idx = int(drv["step"]), int(drv["round"])
    evals: list[dict[str, float]] = list(drv["evals"])
    pending: dict[Any, int] = {}
    eval_count = len(evals)
    total = cfg.train.total_steps
    last_ckpt: Path | None = Path(ckpt["path"]) if ckpt is not None else None
    per_worker = _split_members(cfg.rollout.batch_size, rt.num_rollout_workers)

    def checkpoint(at: int) -> Path:
        learner_state, replay_state = ray.get([learner.state_dict.remote(), replay.state_dict.remote()])
        state = {
            "driver": {"step": at, "round": round_idx, "evals": evals, "rng": numpy_rng_state(rng)},
            "config": to_dict(cfg), "env": env_key, "run_dir": str(run_dir.resolve()),
            "dynamics": stage["dynamics"], "behavior": stage["behavior"], "density": density_state,
            "learner": learner_state, "replay": replay_state,
        }
        return save_checkpoint(run_dir, at, state)

    def collect_evals(block: bool) -> None:
        nonlocal pending
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending) if block else 1, timeout=None if block else 0)
        for ref in ready:
            at = pending.pop(ref)
            res = ray.get(ref)
            res["step"] = float(at)
            evals.append(res)
            reporter({k: v for k, v in res.items() if k != "step"}, at)

    def sync_round() -> None:
        """Synchronous mode: all workers roll with the current target policy; pushes in worker order."""
        nonlocal round_idx
        target = ray.put(ray.get(learner.policy_states.remote())["target"])
        ray.get([w.set_policy.remote(target, step) for w in workers])
        outs = ray.get([w.rollout.remote(k, cfg.seed * 100_003 + round_idx * 101 + i)
                        for i, (w, k) in enumerate(zip(workers, per_worker, strict=True))])
        for batch, _ in outs:
            ray.get(replay.add.remote(batch))
        round_idx += 1
        stats = [s for _, s in outs]
        reporter({"rollout/" + k: float(np.mean([s[k] for s in stats])) for k in stats[0]}, step)

    # Asynchronous mode: workers owe `rounds` of rollouts per publish, paced by the learner.
    # Each publish (every weight_sync_interval updates) owes one round of K·interval-share start states.
    rounds_per_publish = 1
    starts_per_publish = [max(1, math.ceil(k * rt.weight_sync_interval / cfg.rollout.interval)) for k in per_worker]

    published: list[Any] = []

    def publish(target_state: dict[str, Any], rounds: int) -> None:
        ref = ray.put(target_state)
        published[:] = [w.set_policy.remote(ref, step, rounds, k)
                        for w, k in zip(workers, starts_per_publish, strict=True)]

    try:
        if workers and not rt.synchronous:
            # Fill D_model with one full round (K start states) before the first update.
            initial = [w.rollout.remote(k) for w, k in zip(workers, per_worker, strict=True)]
            for batch, _ in ray.get(initial):
                ray.get(replay.add.remote(batch))
            publish(policies["target"], rounds_per_publish)
        bar = _progress(total, step, progress)
        boundaries = (cfg.train.log_interval, cfg.train.eval_interval, cfg.train.checkpoint_interval)
        while step < total:
            if workers and rt.synchronous and step % cfg.rollout.interval == 0:
                sync_round()
            horizon = min(_next_multiple(step, b) for b in boundaries)
            horizon = min(horizon, total, _next_multiple(step, cfg.rollout.interval) if rt.synchronous else total)
            if not rt.synchronous:
                horizon = min(horizon, _next_multiple(step, rt.weight_sync_interval))
            n = horizon - step
            out = ray.get(learner.train.remote(n))
            step = int(out["step"])
            bar.update(n)
            if workers and not rt.synchronous and step % rt.weight_sync_interval == 0:
                publish(ray.get(learner.policy_states.remote())["target"], rounds_per_publish)
            if step % cfg.train.log_interval == 0 or step == total:
                m = dict(out["metrics"])
                m["perf/wall_s"] = time.perf_counter() - t_start
                if workers:  # (learner-side rollouts report their own D_model's replay/ figures)
                    m.update(ray.get(replay.stats.remote()))
                reporter(m, step)
            if evaluators and (step % cfg.train.eval_interval == 0 or step == total):
                policy = ray.put(ray.get(learner.policy_states.remote())["current"])
                ev = evaluators[eval_count % len(evaluators)]
                pending[ev.evaluate.remote(policy, cfg.train.eval_episodes, cfg.seed * 1000 + eval_count)] = step
                eval_count += 1
            collect_evals(block=False)
            if evals:
                bar.set_postfix(score=f"{evals[-1]['eval/normalized_score']:.1f}")
            if step % cfg.train.checkpoint_interval == 0 and step < total:
                collect_evals(block=True)
                last_ckpt = checkpoint(step)
                reporter({}, step, last_ckpt)
        collect_evals(block=True)
        last_ckpt = checkpoint(step)
        reporter({}, step, last_ckpt)
        bar.close()
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if hasattr(e, "cause") else None
        if isinstance(cause, NonFiniteLossError):
            raise RunFailed(f"stopped: {cause}", last_ckpt) from None
        raise RunFailed(f"an actor failed: {str(e).splitlines()[0]}", last_ckpt) from None
    except ray.exceptions.RayActorError as e:
        raise RunFailed(f"the learner or replay actor died: {str(e).splitlines()[0]}", last_ckpt) from None
    finally:
        if published:  # let the last publish land before teardown (no retried calls on killed actors)
            ray.wait(published, num_returns=len(published), timeout=10)
        for h in [*workers, *evaluators, learner, replay]:
            ray.kill(h, no_restart=True)

    score, ret = final_score(evals, cfg.train.final_score_last_n)
    return RunResult(step, time.perf_counter() - t_start, score, ret, evals, last_ckpt, stage["metrics"])


def _next_multiple(step: int, k: int) -> int:
    return (step // k + 1) * k


def check_compatible(cfg: ExperimentConfig, ckpt: dict[str, Any]) -> None:
    """ConfigError naming the key when ``cfg`` cannot continue ``ckpt`` (networks, ensemble, loop mode)."""
    old = ckpt["config"]
    for section, key in [("agent", "algorithm"), ("agent", "hidden_dims"), ("dynamics", "ensemble_size"),
                         ("dynamics", "hidden_dims"), ("runtime", "synchronous")]:
        a, b = _plain(old[section][key]), _plain(to_dict(cfg)[section][key])
        if a != b:
            from dromo_ray.errors import ConfigError

            raise ConfigError(f"{section}.{key}: checkpoint has {a!r}, config has {b!r}")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="learner", unit="upd",
                dynamic_ncols=True, leave=False)


def load_policy_from_checkpoint(path: str | Path) -> tuple[TanhGaussianActor, str, dict[str, Any]]:
    """The current policy of a checkpoint (for ``dromo-ray evaluate``)."""
    from dromo_ray.runtime.checkpoint import CheckpointError

    state = load_checkpoint(path)
    try:
        spec = get_env_spec(state["env"])
        hidden = tuple(state["config"]["agent"]["hidden_dims"])
        actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, hidden)
        actor.load_state_dict(state["learner"]["agent"]["actor"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a well-formed file with the wrong contents
        what = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise CheckpointError(f"{state['path']}: no policy in this checkpoint ({what})") from None
    return actor.eval(), state["env"], state

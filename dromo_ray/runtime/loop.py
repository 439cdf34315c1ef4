"""The learner loop of Algorithm 1 (lines 2-8) over the actors of stage 2, driven from the driver process.

:class:`LearnerLoop` advances the learner in slices that end at the next boundary (log, evaluation,
checkpoint, rollout round or weight publish) and, at each boundary, does what falls there:

- synchronous mode: before every ``rollout.interval`` updates, all workers roll the current target policy
  with seeds fixed per round and push in worker order (bitwise-reproducible);
- asynchronous mode: D_model is filled with one full round first; every ``runtime.weight_sync_interval``
  updates the target policy is published and each worker owes one more round, paced by the learner;
- every ``train.log_interval`` updates the learner's and the replay actor's metrics are reported;
- every ``train.eval_interval`` updates the current policy goes to an evaluator (results are collected
  without blocking, and before every checkpoint);
- every ``train.checkpoint_interval`` updates, and at the end, a checkpoint that resumes the run exactly.

Nothing here imports MLflow or Tune: the edges pass a :class:`Reporter`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray

from dromo_ray.core.config import ExperimentConfig, to_dict
from dromo_ray.core.learner import NonFiniteLossError, numpy_rng_state
from dromo_ray.core.messages import plain_message
from dromo_ray.runtime.checkpoint import save_checkpoint
from dromo_ray.runtime.pipeline import RunActors, split_members
from dromo_ray.ui import progress as progress_bar


class Reporter(Protocol):
    def __call__(self, metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None: ...


def null_reporter(metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None:
    return None


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


ROUNDS_PER_PUBLISH = 1
"""Asynchronous mode: rollout rounds each worker owes per publish of the target policy."""


class LearnerLoop:
    """Lines 2-8 of Algorithm 1 over ``actors`` until ``train.total_steps`` updates (module docstring).

    ``stage`` (dynamics, behaviour and their metrics) and ``density_state`` go into every checkpoint as they are;
    ``resume``, a loaded checkpoint, gives the step, the rollout round and the evaluations to continue from.
    """

    def __init__(self, cfg: ExperimentConfig, env_key: str, run_dir: Path, actors: RunActors,
                 stage: dict[str, Any], density_state: dict[str, Any] | None, rng: np.random.Generator, *,
                 reporter: Reporter, progress: bool, t_start: float, resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.env_key, self.run_dir, self.actors = cfg, env_key, run_dir, actors
        self.stage, self.density_state, self.rng = stage, density_state, rng
        self.reporter, self.progress, self.t_start = reporter, progress, t_start
        driver = resume["driver"] if resume is not None else {"step": 0, "round": 0, "evals": []}
        self.step = int(driver["step"])
        self.round_idx = int(driver["round"])
        """Synchronous rollout rounds done (seeds the next round's rollouts)."""
        self.evals: list[dict[str, float]] = list(driver["evals"])
        self.eval_count = len(self.evals)
        """Evaluations submitted (picks the evaluator and seeds the episodes)."""
        self.pending: dict[Any, int] = {}
        """Evaluation refs still running -> the learner step of their policy."""
        self.last_checkpoint: Path | None = Path(resume["path"]) if resume is not None else None
        self.published: list[Any] = []
        """The latest publish's ``set_policy`` calls (awaited before teardown)."""
        rt = cfg.runtime
        self.per_worker = split_members(cfg.rollout.batch_size, rt.num_rollout_workers)
        """K start states per rollout round, split across the workers."""
        # Each publish (every weight_sync_interval updates) owes one round of K·interval-share start states.
        self.starts_per_publish = [max(1, math.ceil(k * rt.weight_sync_interval / cfg.rollout.interval))
                                   for k in self.per_worker]

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self, initial_target: dict[str, Any]) -> int:
        """Train to ``train.total_steps``, checkpoint at the end; returns the last step. Raises :class:`RunFailed`
        (with the last good checkpoint) when an actor fails or a loss becomes non-finite."""
        cfg, rt = self.cfg, self.cfg.runtime
        total = cfg.train.total_steps
        workers = bool(self.actors.workers)  # rollout.mode learner: no workers, the learner rolls out itself
        try:
            if workers and not rt.synchronous:
                self.fill_model_buffer()
                self.publish(initial_target)
            bar = progress_bar(total, "learner", "upd", enabled=self.progress, initial=self.step)
            while self.step < total:
                if workers and rt.synchronous and self.step % cfg.rollout.interval == 0:
                    self.sync_round()
                n = self.next_horizon() - self.step
                out = ray.get(self.actors.learner.train.remote(n))
                self.step = int(out["step"])
                bar.update(n)
                if workers and not rt.synchronous and self.step % rt.weight_sync_interval == 0:
                    self.publish(self.policy_state("target"))
                if self.step % cfg.train.log_interval == 0 or self.step == total:
                    self.report_training(out["metrics"])
                if self.actors.evaluators and (self.step % cfg.train.eval_interval == 0 or self.step == total):
                    self.submit_evaluation()
                self.collect_evaluations(block=False)
                if self.evals:
                    bar.set_postfix(score=f"{self.evals[-1]['eval/normalized_score']:.1f}")
                if self.step % cfg.train.checkpoint_interval == 0 and self.step < total:
                    self.collect_evaluations(block=True)
                    self.checkpoint()
            self.collect_evaluations(block=True)
            self.checkpoint()
            bar.close()
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if hasattr(e, "cause") else None
            if isinstance(cause, NonFiniteLossError):
                raise RunFailed(f"stopped: {cause}", self.last_checkpoint) from None
            raise RunFailed(f"an actor failed: {str(e).splitlines()[0]}", self.last_checkpoint) from None
        except ray.exceptions.RayActorError as e:
            raise RunFailed(f"the learner or replay actor died: {str(e).splitlines()[0]}",
                            self.last_checkpoint) from None
        return self.step

    def next_horizon(self) -> int:
        """The step of the next boundary: log, evaluation, checkpoint, the end, and the next rollout round
        (synchronous) or weight publish (asynchronous)."""
        cfg, rt = self.cfg, self.cfg.runtime
        boundaries = (cfg.train.log_interval, cfg.train.eval_interval, cfg.train.checkpoint_interval)
        horizon = min(_next_multiple(self.step, b) for b in boundaries)
        mode_boundary = rt.weight_sync_interval if not rt.synchronous else cfg.rollout.interval
        return min(horizon, cfg.train.total_steps, _next_multiple(self.step, mode_boundary))

    # ---- rollouts ---------------------------------------------------------------------------------------------
    def sync_round(self) -> None:
        """Synchronous mode: all workers roll with the current target policy; pushes in worker order."""
        workers, replay = self.actors.workers, self.actors.replay
        target = ray.put(self.policy_state("target"))
        ray.get([w.set_policy.remote(target, self.step) for w in workers])
        seed0 = self.cfg.seed * 100_003 + self.round_idx * 101
        outs = ray.get([w.rollout.remote(k, seed0 + i)
                        for i, (w, k) in enumerate(zip(workers, self.per_worker, strict=True))])
        for batch, _ in outs:
            ray.get(replay.add.remote(batch))
        self.round_idx += 1
        stats = [s for _, s in outs]
        self.reporter({"rollout/" + k: float(np.mean([s[k] for s in stats])) for k in stats[0]}, self.step)

    def fill_model_buffer(self) -> None:
        """Asynchronous mode: one full round (K start states) into D_model before the first update."""
        initial = [w.rollout.remote(k) for w, k in zip(self.actors.workers, self.per_worker, strict=True)]
        for batch, _ in ray.get(initial):
            ray.get(self.actors.replay.add.remote(batch))

    def publish(self, target_state: dict[str, Any]) -> None:
        """Asynchronous mode: new target-policy weights to every worker, each owing one more round."""
        ref = ray.put(target_state)
        self.published[:] = [w.set_policy.remote(ref, self.step, ROUNDS_PER_PUBLISH, k)
                             for w, k in zip(self.actors.workers, self.starts_per_publish, strict=True)]

    def policy_state(self, which: str) -> dict[str, Any]:
        """The learner's ``target`` (rollouts) or ``current`` (evaluation) policy weights."""
        return ray.get(self.actors.learner.policy_states.remote())[which]

    # ---- metrics, evaluations, checkpoints --------------------------------------------------------------------
    def report_training(self, learner_metrics: dict[str, float]) -> None:
        metrics = dict(learner_metrics)
        metrics["perf/wall_s"] = time.perf_counter() - self.t_start
        if self.actors.workers:  # (learner-side rollouts report their own D_model's replay/ figures)
            metrics.update(ray.get(self.actors.replay.stats.remote()))
        self.reporter(metrics, self.step)

    def submit_evaluation(self) -> None:
        """The current policy to the next evaluator (round robin); collected by :meth:`collect_evaluations`."""
        cfg = self.cfg
        policy = ray.put(self.policy_state("current"))
        evaluator = self.actors.evaluators[self.eval_count % len(self.actors.evaluators)]
        ref = evaluator.evaluate.remote(policy, cfg.train.eval_episodes, cfg.seed * 1000 + self.eval_count)
        self.pending[ref] = self.step
        self.eval_count += 1

    def collect_evaluations(self, block: bool) -> None:
        """Record and report finished evaluations: all of them (``block``) or those ready now."""
        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending) if block else 1,
                            timeout=None if block else 0)
        for ref in ready:
            at = self.pending.pop(ref)
            res = ray.get(ref)
            res["step"] = float(at)
            self.evals.append(res)
            self.reporter({k: v for k, v in res.items() if k != "step"}, at)

    def checkpoint(self) -> Path:
        """Everything that resumes the run at this step (runtime/checkpoint.py ``REQUIRED``); reported."""
        learner_state, replay_state = ray.get([self.actors.learner.state_dict.remote(),
                                               self.actors.replay.state_dict.remote()])
        state = {
            "driver": {"step": self.step, "round": self.round_idx, "evals": self.evals,
                       "rng": numpy_rng_state(self.rng)},
            "config": to_dict(self.cfg), "env": self.env_key, "run_dir": str(self.run_dir.resolve()),
            "dynamics": self.stage["dynamics"], "behavior": self.stage["behavior"], "density": self.density_state,
            "learner": learner_state, "replay": replay_state,
        }
        self.last_checkpoint = save_checkpoint(self.run_dir, self.step, state)
        self.reporter({}, self.step, self.last_checkpoint)
        return self.last_checkpoint


def _next_multiple(step: int, k: int) -> int:
    return (step // k + 1) * k

"""``algorithm: cql_rllib``: RLlib's CQL (new API stack) on the same offline dataset as DROMO.

The dataset (an :class:`~dromo_ray.data.dataset.OfflineDataset`, however it was loaded) is converted once
into Parquet in the columns RLlib's offline API reads by default (``OfflinePreLearner``'s ``SCHEMA``):
``eps_id, obs, actions, rewards, new_obs, terminateds, truncateds`` (D4RL's ``timeouts`` become
``truncateds``; actions already lie in [-1, 1], so ``actions_in_input_normalized=True``). RLlib reads it
with Ray Data and trains ``CQL`` with one local learner.

Evaluation and tracking follow the platform's conventions, not RLlib's: every ``train.eval_interval``
learner updates the learner's current policy is exported into a :class:`~dromo_ray.core.nets.TanhGaussianActor`
(:mod:`dromo_ray.rllib.export`, parity checked) and run deterministically (``tanh(mu)``) with
:func:`dromo_ray.data.gym_env.evaluate_policy`, seeds ``seed * 1000 + k`` as the DROMO evaluators use; the
reporter receives ``eval/return_mean``, ``eval/return_std``, ``eval/normalized_score``,
``eval/episode_length``, ``train/...`` and ``perf/...``. The final score is the mean normalized score of the
last ``train.final_score_last_n`` evaluations. The run's checkpoint is the final policy file
(:mod:`dromo_ray.data.policy_io`) with the learner's twin critic beside the actor, so that ``dromo-ray evaluate
--values`` sets CQL's Q against the Monte-Carlo return of its policy.

Config mapping (``ExperimentConfig`` -> ``CQLConfig``): ``agent.hidden_dims`` (ReLU MLPs of pi and Q),
``agent.actor_lr / critic_lr / entropy_lr`` -> ``actor_lr / critic_lr / alpha_lr``, ``agent.gamma``,
``agent.tau``, ``agent.batch_size`` -> ``train_batch_size_per_learner``, ``agent.num_actions`` ->
``num_actions``, ``agent.beta`` -> ``min_q_weight`` (the weight of the conservative log-sum-exp term, the
role beta plays in DROMO/COMBO), ``agent.init_entropy_coef`` -> ``initial_alpha``,
``agent.target_entropy`` (None: ``auto`` = -|A|), ``agent.max_grad_norm`` -> ``grad_clip``,
``train.total_steps`` -> learner updates. RLlib's other CQL defaults stay (``bc_iters`` is set to 0: no
behaviour-cloning warm-up, as the platform's own agents have none). The dynamics, rollout and most runtime
sections do not apply.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dromo_ray.core.files import atomic_path
from dromo_ray.core.scores import final_score
from dromo_ray.errors import ConfigError

Reporter = Callable[..., None]
# RLlib's ``qf_mean`` is the mean of min(Q_1, Q_2) at the policy's own sampled actions (``q_curr_repeat`` of its
# CQL learner), not at the data's: it goes out as ``train/q_policy``. ``train/q_data`` (the platform agents' Q on
# dataset rows, mean over both critics) is computed here from the learner's critic at every evaluation, on a fixed
# probe of 256 dataset rows.
_RLLIB_TRAIN_KEYS = {"policy_loss": "train/actor_loss", "alpha_value": "train/entropy_coef",
                     "qf_mean": "train/q_policy", "cql_loss": "train/cql_loss", "alpha_loss": "train/alpha_loss"}


def dataset_to_parquet(ds: Any, directory: str | Path, row_group_size: int = 65_536) -> Path:
    """Write ``ds`` as ``directory/data.parquet`` in RLlib's offline columns; returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def vectors(a: np.ndarray) -> pa.FixedSizeListArray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])

    table = pa.table({
        "eps_id": pa.array((np.cumsum(ds.episode_starts) - 1).astype(np.int64)),
        "obs": vectors(ds.observations), "actions": vectors(ds.actions),
        "rewards": pa.array(np.asarray(ds.rewards, dtype=np.float32)),
        "new_obs": vectors(ds.next_observations),
        "terminateds": pa.array(np.asarray(ds.terminals, dtype=bool)),
        "truncateds": pa.array(np.asarray(ds.timeouts, dtype=bool)),
    })
    with atomic_path(directory / "data.parquet") as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)
    return directory


def build_cql_config(cfg: Any, env_key: str, data_dir: Path, updates_per_iter: int):
    """The RLlib ``CQLConfig`` for an ``ExperimentConfig`` (see the module doc for the mapping)."""
    from ray.rllib.algorithms.cql import CQLConfig

    from dromo_ray.data.gym_env import env_spec
    from dromo_ray.rllib.algo import register_env
    from dromo_ray.rllib.module import module_config_kwargs

    a = cfg.agent
    spec = env_spec(env_key)
    training: dict[str, Any] = dict(
        lr=None, actor_lr=a.actor_lr, critic_lr=a.critic_lr, alpha_lr=a.entropy_lr, gamma=a.gamma, tau=a.tau,
        train_batch_size_per_learner=a.batch_size, twin_q=True, num_actions=a.num_actions,
        min_q_weight=a.beta, initial_alpha=a.init_entropy_coef, bc_iters=0,
        target_entropy="auto" if a.target_entropy is None else float(a.target_entropy),
    )
    if a.max_grad_norm > 0:
        training["grad_clip"] = a.max_grad_norm
    return (
        CQLConfig()
        # The env only gives RLlib its spaces (nothing samples from it).
        .environment(register_env(spec.gym_id), env_config={"max_episode_steps": cfg.train.max_episode_steps})
        .framework("torch")
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        .offline_data(
            input_=[str(Path(data_dir).resolve())], actions_in_input_normalized=True,
            # >= 2: RLlib 2.60 hands a local learner a bare batch (and then fails) when this is 1.
            dataset_num_iters_per_learner=max(2, int(updates_per_iter)),
            # One pre-learner actor on half a CPU: two whole-CPU actors (the default) starve the Parquet
            # read tasks on a 2-CPU machine and the pipeline never starts.
            map_batches_kwargs={"concurrency": 1, "num_cpus": 0.5},
        )
        .rl_module(**module_config_kwargs(tuple(a.hidden_dims), cql=True))
        .training(**training)
        .reporting(min_time_s_per_iteration=0, min_train_timesteps_per_iteration=0)
        .debugging(seed=cfg.seed, log_level="ERROR")
    )


def _train_metrics(result: dict[str, Any]) -> dict[str, float]:
    learner = (result.get("learners") or {}).get("default_policy") or {}
    out: dict[str, float] = {}

    def num(key: str) -> float | None:
        v = learner.get(key)
        return float(v) if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)) else None

    for key, name in _RLLIB_TRAIN_KEYS.items():
        if num(key) is not None:
            out[name] = num(key)
    q1, q2 = num("qf_loss"), num("qf_twin_loss")
    if q1 is not None:
        out["train/critic_loss"] = q1 + (q2 or 0.0)
    if num("logps") is not None:
        out["train/entropy"] = -num("logps")
    return out


def run_cql_rllib(cfg: Any, dataset: Any, run_dir: str | Path, *, reporter: Reporter | None = None,
                  resume: str | None = None, progress: bool = True, on_start: Callable[[dict], None] | None = None):
    """Train RLlib CQL on ``dataset`` for ``cfg.train.total_steps`` learner updates; returns the runtime's
    ``RunResult`` (so ``dromo_ray.train.train`` logs it like any other run)."""
    import ray
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from tqdm.auto import tqdm

    from dromo_ray.data.gym_env import evaluate_policy
    from dromo_ray.rllib.algo import build_algo_in
    from dromo_ray.rllib.export import critic_from_weights, export_policy, learner_module
    from dromo_ray.runtime.driver import RunFailed, RunResult

    if resume:
        raise ConfigError("cql_rllib: --resume is not supported (RLlib's CQL run restarts from scratch)")
    report = reporter or (lambda metrics, step, checkpoint=None: None)
    run_dir = Path(run_dir)
    env_key = dataset.env_id
    total = int(cfg.train.total_steps)
    chunk = max(2, min(cfg.train.log_interval, cfg.train.eval_interval, total))
    data_dir = dataset_to_parquet(dataset, run_dir / "rllib_offline")
    from dromo_ray.runtime.cluster import start_ray

    start_ray()
    for name in ("ray.rllib", "ray.data", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    if on_start is not None:
        on_start({"learner_device": "cpu", "algorithm": "cql_rllib"})

    algo = None
    evals: list[dict[str, float]] = []
    step, last_policy = 0, None
    t0 = time.perf_counter()
    probe = np.linspace(0, len(dataset) - 1, min(256, len(dataset))).astype(int)
    obs_probe, act_probe = dataset.observations[probe], dataset.actions[probe]
    bar = tqdm(total=total, disable=not progress, desc="cql_rllib", unit="upd", leave=False)
    try:
        algo = build_algo_in(build_cql_config(cfg, env_key, data_dir, chunk), run_dir / "rllib_logs")
        next_eval = cfg.train.eval_interval
        while step < total:
            t_it = time.perf_counter()
            result = algo.train()
            trained = int(((result.get("learners") or {}).get("default_policy") or {})
                          .get("num_module_steps_trained_lifetime", 0) or 0)
            step += chunk
            bar.update(chunk)
            metrics = _train_metrics(result)
            if any(not math.isfinite(v) for v in metrics.values()):
                raise RunFailed(f"cql_rllib: non-finite training metrics at update {step}: {metrics}")
            metrics.update({"perf/wall_s": time.perf_counter() - t0,
                            "perf/learner_updates_per_s": chunk / max(time.perf_counter() - t_it, 1e-9),
                            "train/rows_trained": float(trained)})
            report(metrics, step)
            if step >= next_eval or step >= total:
                next_eval += cfg.train.eval_interval
                # CQL never syncs the learner's weights to the local EnvRunner: learner_module does. The critic
                # comes from the learner's own weights; RLlib's CQL backs up Q(s', a') - alpha log pi(a'|s')
                # (a soft backup), alpha the learner's current value.
                learned = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
                critic = critic_from_weights(learned, dataset.observations.shape[1], dataset.actions.shape[1])
                critic_info = {"gamma": cfg.agent.gamma, "soft_backup": True,
                               "entropy_coef": metrics.get("train/entropy_coef", cfg.agent.init_entropy_coef)}
                last_policy, _ = export_policy(learner_module(algo, learned), run_dir / "policy.pt", obs_probe, meta={
                    "env_key": env_key, "algorithm": "cql_rllib", "learner_updates": step, "seed": cfg.seed},
                    critic=critic, critic_info=critic_info)
                with torch.no_grad():
                    q_data = critic(torch.as_tensor(obs_probe, dtype=torch.float32),
                                    torch.as_tensor(act_probe, dtype=torch.float32))
                report({"train/q_data": float(q_data.mean())}, step)
                from dromo_ray.data.policy_io import load_policy

                actor = load_policy(last_policy).actor

                @torch.no_grad()
                def act(obs: np.ndarray, actor=actor) -> np.ndarray:
                    return actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()

                res = evaluate_policy(act, env_key, episodes=cfg.train.eval_episodes,
                                      seed=cfg.seed * 1000 + len(evals), max_episode_steps=cfg.train.max_episode_steps)
                ev = {"eval/return_mean": float(res.mean_return), "eval/return_std": float(np.std(res.returns)),
                      "eval/normalized_score": float(res.mean_normalized),
                      "eval/episode_length": float(np.mean(res.lengths))}
                evals.append(ev)
                report(ev, step)
                bar.set_postfix(score=f"{ev['eval/normalized_score']:.1f}")
        report({}, step, last_policy)
    finally:
        bar.close()
        if algo is not None:
            algo.stop()
            # Close Ray Data's batch iterator now, while Ray is up (else it complains at interpreter exit).
            del algo
            gc.collect()
    score, ret = final_score(evals, cfg.train.final_score_last_n)
    return RunResult(step, time.perf_counter() - t0, score, ret, evals, last_policy, {})

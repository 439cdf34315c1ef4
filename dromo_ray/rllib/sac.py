"""Behaviour policies trained online with RLlib SAC (new API stack): ``dromo-ray behavior train --backend rllib``.

    cfg = BehaviorConfig(env="hopper", steps=1_000_000, out="behavior/hopper", seed=0).validate()
    result = train_behavior(cfg)          # result.index: what index.json says

Writes under ``out``::

    index.json            the checkpoints, each with its evaluated returns (see below; format
                          :data:`dromo_ray.data.policy_io.INDEX_FORMAT`, the one the sac backend writes too)
    replay.hdf5           every transition SAC collected, in order (:mod:`dromo_ray.rllib.replay_log`)
    policies/step_XXXXXXXX.pt   each checkpoint's policy as a dromo_ray policy file (dromo_ray.data.policy_io)
    rllib/                (with ``save_rllib``) the final RLlib Algorithm checkpoint
    rllib_logs/           the RLlib Algorithm's log directory (:func:`dromo_ray.rllib.algo.build_algo_in`; RLlib's
                          default is a new ``~/ray_results/<date>...`` directory per run)

Training: one Gymnasium v5 env sampled by the local EnvRunner (``num_env_runners=0``), SAC with twin Q,
learned temperature, ReLU MLPs of ``hidden`` widths, one update of ``batch_size`` rows per
``updates_every`` env steps (1 = the usual SAC ratio). Every ``checkpoint_every`` env steps the current pi
network is exported (parity with RLlib's module checked numerically, see :mod:`dromo_ray.rllib.export`)
and evaluated in the real environment with :func:`dromo_ray.data.gym_env.evaluate_policy`, from the file
just written, both deterministically (``tanh(mu)``, the usual SAC evaluation) and sampling from the policy
(the way the suite collects data). ``index.json`` records both, so ``dromo-ray suite make --policies OUT``
reads the run without RLlib.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.algorithms.sac import SACConfig
from tqdm.auto import tqdm

from dromo_ray.core.files import write_text_atomic
from dromo_ray.data.gym_env import env_spec, package_versions
from dromo_ray.data.online_sac import evaluate_policy_file
from dromo_ray.data.policy_io import INDEX_FORMAT
from dromo_ray.errors import ConfigError
from dromo_ray.rllib.algo import build_algo_in, register_env
from dromo_ray.rllib.export import check_action_space, export_policy, learner_module
from dromo_ray.rllib.module import module_config_kwargs
from dromo_ray.rllib.replay_log import ReplayLogCallback, ReplayLogWriter, drain_env_runners
from dromo_ray.runtime.cluster import start_ray

FLAGS = {"env": "--env", "steps": "--steps", "out": "--out", "seed": "--seed", "hidden": "--hidden",
         "checkpoint_every": "--checkpoint-every", "eval_episodes": "--eval-episodes",
         "learning_starts": "--learning-starts", "updates_every": "--updates-every", "time_limit_s": "--time-limit",
         "save_rllib": "--save-rllib"}
"""The ``dromo-ray behavior train`` flag of each field that has one (error messages name both)."""


def _bad(name: str, problem: str) -> ConfigError:
    """``ConfigError('steps (--steps): must be >= 1, got 0')``: the field, its flag when it has one, the problem."""
    flag = FLAGS.get(name)
    return ConfigError(f"{name}{f' ({flag})' if flag else ''}: {problem}")


@dataclass
class BehaviorConfig:
    """One RLlib SAC behaviour run. Defaults are SAC's published MuJoCo settings (Haarnoja et al. 2018, Table 1:
    Adam 3e-4 for every network and the temperature, gamma 0.99, tau 0.005, batch 256, 2x256 ReLU networks,
    10^6 replay rows), as D4RL's behaviour policies used; :meth:`validate` checks every field."""

    env: str
    """Environment key: hopper, halfcheetah or walker2d (Gymnasium v5)."""
    steps: int = 1_000_000
    """Env steps to train for (rounded up to a whole number of checkpoint intervals; D4RL's runs: 1M)."""
    out: str = ""
    """Output directory; default ``behavior_<env>``. Must be new or empty."""
    seed: int = 0
    """Seed of RLlib (``debugging(seed=...)``): networks, exploration and the training env."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of the policy and Q networks (ReLU)."""
    checkpoint_every: int = 0
    """Env steps between checkpoints; 0 means steps // 20."""
    eval_episodes: int = 10
    """Evaluation episodes per checkpoint and mode (deterministic and sampled)."""
    eval_seed: int = 1_000_000
    """Base seed of the evaluation envs (separate from the training env)."""
    learning_starts: int = 10_000
    """Env steps sampled before the first update (capped at a fifth of ``steps``)."""
    batch_size: int = 256
    """Rows per SAC update (``train_batch_size_per_learner``)."""
    actor_lr: float = 3e-4
    """Adam learning rate of the policy."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin Q networks."""
    alpha_lr: float = 3e-4
    """Adam learning rate of the entropy temperature (target entropy -|A|)."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target Q networks."""
    buffer_capacity: int = 1_000_000
    """Rows of RLlib's episode replay buffer."""
    updates_every: int = 1
    """Env steps per learner update (RLlib ``rollout_fragment_length``); 1 is SAC's usual ratio."""
    max_episode_steps: int = 1000
    """Time limit of the training and evaluation episodes (the MuJoCo v5 default)."""
    time_limit_s: float = 0.0
    """Stop at the first checkpoint after this many seconds of training (0: no limit); the index says so."""
    save_rllib: bool = False
    """Also save the final RLlib Algorithm checkpoint under ``out/rllib``."""
    progress: bool = True
    """Show a progress bar on stderr."""
    extra_meta: dict[str, Any] = field(default_factory=dict)
    """Extra top-level entries of ``index.json``."""

    def validate(self) -> BehaviorConfig:
        """Check every field (:class:`~dromo_ray.errors.ConfigError` naming the field and its flag), resolve
        ``env`` to its registry key and default ``out``; returns ``self``."""
        try:
            self.env = env_spec(self.env).key
        except ValueError as e:
            raise _bad("env", str(e)) from None
        for name in ("steps", "eval_episodes", "batch_size", "buffer_capacity", "updates_every",
                     "max_episode_steps"):
            if getattr(self, name) < 1:
                raise _bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "learning_starts", "seed", "eval_seed", "time_limit_s"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise _bad(name, f"must be a finite number >= 0, got {v}")
        for name in ("actor_lr", "critic_lr", "alpha_lr", "tau"):
            v = getattr(self, name)
            if not (0 < v < math.inf):
                raise _bad(name, f"must be > 0, got {v}")
        if not 0 < self.gamma < 1:
            raise _bad("gamma", f"must be in (0, 1), got {self.gamma}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise _bad("hidden", f"must be positive widths, got {self.hidden}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.out:
            self.out = f"behavior_{self.env}"
        return self

    def interval(self) -> int:
        """Checkpoint interval in env steps: a positive multiple of ``updates_every``."""
        every = self.checkpoint_every or max(self.steps // 20, 1)
        k = self.updates_every
        return max(k, int(math.ceil(every / k)) * k)

    def num_checkpoints(self) -> int:
        """Checkpoints the run writes: ``steps`` rounded up to whole intervals."""
        return int(math.ceil(self.steps / self.interval()))


@dataclass
class BehaviorResult:
    """What :func:`train_behavior` wrote: the run directory and its ``index.json``."""

    out: Path
    """The run directory."""
    index: dict[str, Any]
    """The contents of ``out/index.json``."""

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """``index['checkpoints']``: one entry per evaluated policy file, in training order."""
        return self.index["checkpoints"]


def build_sac_config(cfg: BehaviorConfig):
    """The RLlib ``SACConfig`` of a behaviour run (new API stack, local sampling)."""
    spec = env_spec(cfg.env)
    interval = cfg.interval()
    return (
        SACConfig()
        .environment(register_env(spec.gym_id), env_config={"max_episode_steps": cfg.max_episode_steps})
        .framework("torch")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1, rollout_fragment_length=cfg.updates_every)
        .learners(num_learners=0)
        .rl_module(**module_config_kwargs(cfg.hidden))
        .training(
            actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr, alpha_lr=cfg.alpha_lr, gamma=cfg.gamma, tau=cfg.tau,
            train_batch_size_per_learner=cfg.batch_size, twin_q=True, initial_alpha=1.0, target_entropy="auto",
            n_step=1, num_steps_sampled_before_learning_starts=min(cfg.learning_starts, cfg.steps // 5),
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": cfg.buffer_capacity},
        )
        # One train() call = one checkpoint interval, exactly (each training step samples updates_every steps).
        .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=interval,
                   min_train_timesteps_per_iteration=0)
        .callbacks(ReplayLogCallback)
        .debugging(seed=cfg.seed, log_level="ERROR")
    )


def versions() -> dict[str, str]:
    """Library versions a run records: the data packages' and Ray's and torch's."""
    return {**package_versions(), "ray": ray.__version__, "torch": torch.__version__.split("+")[0]}


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False))


def _learner_metrics(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    learner = (result.get("learners") or {}).get("default_policy") or {}
    for key in ("qf_loss", "policy_loss", "alpha_loss", "alpha_value", "qf_mean"):
        v = learner.get(key)
        if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)):
            out[key] = float(v)
    er = result.get("env_runners") or {}
    v = er.get("episode_return_mean")
    if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)):
        out["train_episode_return_mean"] = float(v)
    return out


def train_behavior(cfg: BehaviorConfig) -> BehaviorResult:
    """Train SAC, writing the replay log, policy files and ``index.json`` as it goes (see module doc).

    ``cfg`` is validated first (:class:`~dromo_ray.errors.ConfigError`); an ``out`` that is not a fresh or empty
    directory raises ``FileExistsError`` before anything is written. Starts Ray when none runs, and shuts down
    the Ray it started.
    """
    cfg.validate()
    spec = env_spec(cfg.env)
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # the sac backend's rule (online_sac.py)
        raise FileExistsError(f"{out} is not an empty directory; choose a fresh --out (the rllib backend does not "
                              "resume)")
    (out / "policies").mkdir(parents=True, exist_ok=True)
    interval, n_ckpt = cfg.interval(), cfg.num_checkpoints()
    vers = versions()
    run_meta = {"env_key": spec.key, "env_id": spec.gym_id, "seed": cfg.seed, "kind": "sac_replay_log",
                "algorithm": "rllib_sac", **{f"{k}_version": v for k, v in vers.items()}}
    config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                   if k not in ("progress", "extra_meta")}
    index: dict[str, Any] = {
        "format": INDEX_FORMAT, "env": spec.key, "gym_id": spec.gym_id, "seed": cfg.seed,
        "replay_log": "replay.hdf5", "config": config_dict, "versions": vers,
        "checkpoint_every": interval, "complete": False, "checkpoints": [], **cfg.extra_meta,
    }
    _write_json(out / "index.json", index)
    writer = ReplayLogWriter(out / "replay.hdf5", metadata=run_meta)

    started_ray = start_ray(configure_logging=True, logging_level=logging.ERROR,
                            num_cpus=max(1, min(2, os.cpu_count() or 1)))
    logging.getLogger("ray.rllib").setLevel(logging.ERROR)
    algo = None
    t0 = time.perf_counter()
    bar = tqdm(total=interval * n_ckpt, desc=f"SAC {spec.gym_id}", unit="step", disable=not cfg.progress,
               mininterval=1.0)
    try:
        algo = build_algo_in(build_sac_config(cfg), out / "rllib_logs")
        check_action_space(algo.get_module().action_space)
        for k in range(1, n_ckpt + 1):
            result = algo.train()
            rows = drain_env_runners(algo)
            if rows is not None:
                writer.append(rows)
            sampled = int((result.get("env_runners") or {}).get("num_env_steps_sampled_lifetime", writer.rows))
            if sampled != writer.rows:
                raise RuntimeError(f"replay log has {writer.rows} rows but RLlib sampled {sampled} env steps")
            bar.update(writer.rows - bar.n)
            name = f"step_{writer.rows:08d}"
            rel = f"policies/{name}.pt"
            with_obs = rows["observations"] if rows is not None else np.zeros((1, spec.obs_dim), np.float32)
            parity_obs = with_obs[np.linspace(0, len(with_obs) - 1, min(256, len(with_obs))).astype(int)]
            _, parity = export_policy(learner_module(algo), out / rel, parity_obs, meta={
                "env_key": spec.key, "env_id": spec.gym_id, "env_steps": writer.rows, "seed": cfg.seed,
                "checkpoint": name, "ray_version": vers["ray"]})
            ev = evaluate_policy_file(out / rel, spec.key, cfg.eval_episodes, cfg.eval_seed, cfg.max_episode_steps)
            entry = {"name": name, "policy": rel, "env_steps": writer.rows, "replay_rows": writer.rows,
                     "iteration": k, "wall_s": round(time.perf_counter() - t0, 2), **ev,
                     "eval_episodes": cfg.eval_episodes, "eval_seed": cfg.eval_seed,
                     "parity": parity, "train": _learner_metrics(result)}
            index["checkpoints"].append(entry)
            index["final"] = name
            _write_json(out / "index.json", index)
            bar.set_postfix(ret=f"{ev['return_mean']:.0f}", sampled=f"{ev['stochastic_return_mean']:.0f}")
            if cfg.time_limit_s and time.perf_counter() - t0 > cfg.time_limit_s and k < n_ckpt:
                index["stopped_early"] = f"time limit {cfg.time_limit_s:g}s reached after {writer.rows} env steps"
                break
        if cfg.save_rllib:
            algo.save_to_path(str((out / "rllib").resolve()))
            index["rllib_checkpoint"] = "rllib"
        writer.set_metadata(rows=writer.rows, complete=1)
        index.update(complete=True, env_steps=writer.rows, wall_s=round(time.perf_counter() - t0, 2))
        _write_json(out / "index.json", index)
    finally:
        bar.close()
        if algo is not None:
            algo.stop()
        if started_ray and ray.is_initialized():
            ray.shutdown()
    return BehaviorResult(out, index)


def summary_table(index: dict[str, Any]) -> str:
    """The checkpoints of ``index`` as text: env steps, deterministic and sampled return, normalized score."""
    from dromo_ray.ui import fmt, table

    rows = [[c["name"], c["env_steps"], fmt(c["return_mean"], 1), fmt(c["stochastic_return_mean"], 1),
             fmt(c["normalized_score"], 1)] for c in index["checkpoints"]]
    return table(["checkpoint", "env steps", "return (det)", "return (sampled)", "norm (det)"], rows)

"""``dromo-ray behavior train``: behaviour policies trained online with RLlib SAC (new API stack).

    dromo-ray behavior train --env hopper --steps 1000000 --out behavior/hopper --seed 0

Writes under ``--out``::

    index.json            the checkpoints, each with its evaluated returns (see below)
    replay.hdf5           every transition SAC collected, in order (dromo_ray.behavior.replay_log)
    policies/step_XXXXXXXX.pt   each checkpoint's policy as a dromo_ray policy file (dromo_ray.data.policy_io)
    rllib/                (with --save-rllib) the final RLlib Algorithm checkpoint
    rllib_logs/           the RLlib Algorithm's log directory (:func:`build_algo_in`; RLlib's default is a new
                          ``~/ray_results/<date>...`` directory per run)

Training: one Gymnasium v5 env sampled by the local EnvRunner (``num_env_runners=0``), SAC with twin Q,
learned temperature, ReLU MLPs of ``--hidden`` widths, one update of ``batch_size`` rows per
``updates_every`` env steps (1 = the usual SAC ratio). Every ``checkpoint_every`` env steps the current pi
network is exported (parity with RLlib's module checked numerically, see :mod:`dromo_ray.behavior.export`)
and evaluated in the real environment with :func:`dromo_ray.data.gym_env.evaluate_policy`, from the file
just written, both deterministically (``tanh(mu)``, the usual SAC evaluation) and sampling from the policy
(the way the suite collects data). ``index.json`` records both.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dromo_ray.core.files import write_text_atomic
from dromo_ray.data.online_sac import evaluate_policy_file

INDEX_FORMAT = "dromo_ray.behavior_index/1"


@dataclass
class BehaviorConfig:
    env: str
    """Environment key: hopper, halfcheetah or walker2d (Gymnasium v5)."""
    steps: int = 1_000_000
    """Env steps to train for (rounded up to a whole number of checkpoint intervals)."""
    out: str = ""
    """Output directory; default ``behavior_<env>``. Must be new or empty."""
    seed: int = 0
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
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    buffer_capacity: int = 1_000_000
    updates_every: int = 1
    """Env steps per learner update (RLlib ``rollout_fragment_length``); 1 is SAC's usual ratio."""
    max_episode_steps: int = 1000
    time_limit_s: float = 0.0
    """Stop at the first checkpoint after this many seconds of training (0: no limit); the index says so."""
    save_rllib: bool = False
    """Also save the final RLlib Algorithm checkpoint under ``out/rllib``."""
    progress: bool = True
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> BehaviorConfig:
        from dromo_ray.data.gym_env import env_spec

        self.env = env_spec(self.env).key
        for name in ("steps", "eval_episodes", "batch_size", "buffer_capacity", "updates_every",
                     "max_episode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.learning_starts < 0 or self.seed < 0 or self.time_limit_s < 0:
            raise ValueError("checkpoint_every, learning_starts, seed and time_limit_s must be >= 0")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive widths, got {self.hidden}")
        if not self.out:
            self.out = f"behavior_{self.env}"
        return self

    def interval(self) -> int:
        """Checkpoint interval in env steps: a positive multiple of ``updates_every``."""
        every = self.checkpoint_every or max(self.steps // 20, 1)
        k = self.updates_every
        return max(k, int(math.ceil(every / k)) * k)

    def num_checkpoints(self) -> int:
        return int(math.ceil(self.steps / self.interval()))


@dataclass
class BehaviorResult:
    out: Path
    index: dict[str, Any]

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        return self.index["checkpoints"]


def env_name(gym_id: str) -> str:
    return f"dromo_ray-{gym_id}"


def _register_env(gym_id: str) -> str:
    from ray.tune.registry import register_env

    from dromo_ray.behavior.replay_log import MujocoStateInfo
    from dromo_ray.data.gym_env import env_spec, gym_make

    spec = env_spec(gym_id)

    def creator(env_config: dict[str, Any]):
        return MujocoStateInfo(gym_make(spec, int(env_config.get("max_episode_steps", 1000))))

    name = env_name(gym_id)
    register_env(name, creator)
    return name


def build_sac_config(cfg: BehaviorConfig):
    """The RLlib ``SACConfig`` of a behaviour run (new API stack, local sampling)."""
    from ray.rllib.algorithms.sac import SACConfig

    from dromo_ray.behavior.replay_log import ReplayLogCallback
    from dromo_ray.behavior.rllib_module import module_config_kwargs
    from dromo_ray.data.gym_env import env_spec

    spec = env_spec(cfg.env)
    interval = cfg.interval()
    return (
        SACConfig()
        .environment(_register_env(spec.gym_id), env_config={"max_episode_steps": cfg.max_episode_steps})
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


def build_algo_in(config: Any, log_dir: str | os.PathLike) -> Any:
    """``config.build_algo()``, with the Algorithm's log directory at ``log_dir`` (created).

    An RLlib Algorithm built outside Tune makes its log directory with ray.tune's ``Trainable._setup_logdir``: a
    fresh ``~/ray_results/<date>...`` per Algorithm, left behind (empty, with the new API stack) by every run.
    The built Algorithm is of a subclass of ``config.algo_class`` that only overrides that method, so that what
    RLlib writes there stays in the run's own directory.
    """
    import copy

    base = config.algo_class
    if isinstance(base, str):
        from ray.tune.registry import get_trainable_cls

        base = get_trainable_cls(base)
    directory = str(Path(log_dir).resolve())

    class InRunDir(base):  # type: ignore[misc, valid-type]
        def _setup_logdir(self) -> None:
            os.makedirs(directory, exist_ok=True)
            self._logdir = directory

    InRunDir.__name__ = base.__name__  # (RLlib names metrics and logs after the class)
    return InRunDir(config=copy.deepcopy(config))


def versions() -> dict[str, str]:
    import ray
    import torch

    from dromo_ray.data.gym_env import package_versions

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
    """Train SAC, writing the replay log, policy files and ``index.json`` as it goes (see module doc)."""
    import ray
    from tqdm.auto import tqdm

    from dromo_ray.behavior.export import check_action_space, export_policy, learner_module
    from dromo_ray.behavior.replay_log import ReplayLogWriter, drain_env_runners
    from dromo_ray.data.gym_env import env_spec

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

    from dromo_ray.runtime.cluster import start_ray

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


def load_index(policies_dir: str | os.PathLike) -> dict[str, Any]:
    """``index.json`` of a behaviour run, checked. Policy paths in it are relative to ``policies_dir``."""
    from dromo_ray.errors import DatasetError

    path = Path(policies_dir) / "index.json"
    if not path.exists():
        raise DatasetError(str(path), "no behaviour index here; run `dromo-ray behavior train` first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(str(path), f"not JSON ({e})") from None
    if index.get("format") != INDEX_FORMAT:
        raise DatasetError(str(path), f"not a behaviour index (format {index.get('format')!r})", "format")
    if not index.get("checkpoints"):
        raise DatasetError(str(path), "has no checkpoints", "checkpoints")
    if not index.get("complete"):
        raise DatasetError(str(path), "the behaviour run did not finish (complete = false)", "complete")
    return index


def summary_table(index: dict[str, Any]) -> str:
    lines = [f"{'checkpoint':<15} {'env steps':>10} {'return (det)':>13} {'return (sampled)':>17} {'norm (det)':>11}"]
    for c in index["checkpoints"]:
        lines.append(f"{c['name']:<15} {c['env_steps']:>10} {c['return_mean']:>13.1f} "
                     f"{c['stochastic_return_mean']:>17.1f} {c['normalized_score']:>11.1f}")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``dromo-ray behavior train``."""
    import sys

    from dromo_ray.core.threads import set_torch_threads

    set_torch_threads(1)
    hidden = tuple(int(h) for h in str(args.hidden).split(",") if h.strip())
    cfg = BehaviorConfig(
        env=args.env, steps=args.steps, out=args.out or "", seed=args.seed, hidden=hidden,
        checkpoint_every=args.checkpoint_every, eval_episodes=args.eval_episodes,
        learning_starts=args.learning_starts, updates_every=args.updates_every, save_rllib=args.save_rllib,
        time_limit_s=args.time_limit,
        progress=sys.stderr.isatty() and not args.json,
    )
    from dromo_ray.errors import ConfigError  # a user error the CLI prints as one line (no import of cli)

    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        res = train_behavior(cfg)
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(res.index, indent=2))
    else:
        print(summary_table(res.index))
        print(f"wrote {res.out}/index.json, {res.out}/replay.hdf5 ({res.index['env_steps']} transitions) and "
              f"{len(res.checkpoints)} policy files in {res.index['wall_s']:.0f}s")
    return 0

"""The real Gymnasium v5 MuJoCo environments: construction, vectorised evaluation and data collection.

A policy here is an ``ActFn``: observations ``(n, D_o)`` float32 numpy -> actions ``(n, D_a)`` in
[-1, 1] (the action box of Hopper-v5, HalfCheetah-v5 and Walker2d-v5; actions are clipped to it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import gymnasium as gym
import mujoco
import numpy as np

from dromo_ray.core.envs import EnvSpec, get_env_spec
from dromo_ray.data.dataset import OfflineDataset

ActFn = Callable[[np.ndarray], np.ndarray]
MAX_EVAL_ENVS = 8


def env_spec(env_key: str) -> EnvSpec:
    """Registry entry of ``env_key``; an unknown key raises ValueError listing the known ones."""
    try:
        return get_env_spec(env_key)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None


_LOG = logging.getLogger("dromo_ray.mujoco")


def _mujoco_warning(message: str) -> None:
    _LOG.info("MuJoCo: %s", message.strip())


def _route_mujoco_warnings() -> None:
    """MuJoCo's default warning handler prints to stderr and appends to ./MUJOCO_LOG.TXT in whatever directory the
    user stands in; route its warnings to the ``dromo_ray.mujoco`` logger instead (MuJoCo 4 warns, for one, that
    HalfCheetah's ``settotalmass="14"`` compiler attribute is deprecated; it is still applied: the model's total
    mass is 14)."""
    if mujoco.get_mju_user_warning() is not _mujoco_warning:
        mujoco.set_mju_user_warning(_mujoco_warning)


def gym_make(spec: EnvSpec, max_episode_steps: int = 1000) -> gym.Env:
    """The one place a real environment is built: ``gym.make`` of the spec's id and MuJoCo model."""
    _route_mujoco_warnings()
    kwargs = {} if spec.xml_file is None else {"xml_file": spec.xml_file}
    return gym.make(spec.gym_id, max_episode_steps=int(max_episode_steps), **kwargs)


def make_env(env_key: str, seed: int | None = None, max_episode_steps: int = 1000) -> gym.Env:
    """The Gymnasium v5 environment of ``env_key`` (with its registry model, see ``EnvSpec.xml_file``) with a
    ``max_episode_steps`` time limit.

    With ``seed``, the environment is reset once with it (seeding its RNG) and its action space seeded.
    """
    spec = env_spec(env_key)
    env = gym_make(spec, max_episode_steps)
    if seed is not None:
        env.reset(seed=int(seed))
        env.action_space.seed(int(seed))
    return env


def package_versions() -> dict[str, str]:
    """Versions that make a collected dataset reproducible."""
    out = {}
    for pkg in ("gymnasium", "mujoco", "dromo-ray"):
        try:
            out[pkg.replace("-", "_")] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover - all are dependencies
            out[pkg.replace("-", "_")] = "unknown"
    if out["dromo_ray"] == "unknown":  # pragma: no cover
        from dromo_ray import __version__

        out["dromo_ray"] = __version__
    return out


def host_kind() -> dict[str, str]:
    """The host's CPU model and torch's CPU kernel level (``AVX2``, ``AVX512``, ...). A collected dataset is
    bitwise reproducible on one kind of host, not across kinds: the policy's float kernels differ in the last bit,
    and MuJoCo's dynamics grow the difference (2026-12-03: the same suite command gave hopper-medium a behaviour
    score of 42.36 on an AVX-512 Xeon against 42.25 on the earlier host; 1 or 2 torch threads gave identical rows)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability())}


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class EvalResult:
    """Episodes of one evaluation, in order env 0's episodes, env 1's, ...; shapes (episodes,)."""

    returns: np.ndarray
    lengths: np.ndarray
    normalized: np.ndarray
    """D4RL normalized scores of ``returns``."""
    mean_return: float
    mean_normalized: float


def _actions(act_fn: ActFn, obs: np.ndarray, act_dim: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    a = np.asarray(act_fn(np.asarray(obs, dtype=np.float32)), dtype=np.float64)
    if a.shape != (obs.shape[0], act_dim):
        raise ValueError(f"policy returned actions of shape {a.shape}, expected {(obs.shape[0], act_dim)}")
    return np.clip(a, low, high)


def evaluate_policy(act_fn: ActFn, env_key: str, episodes: int, seed: int, max_episode_steps: int = 1000,
                    num_envs: int | None = None) -> EvalResult:
    """Run exactly ``episodes`` episodes of ``act_fn`` in the real environment, vectorised.

    ``num_envs`` (default ``min(episodes, 8)``) environments step together in a ``SyncVectorEnv``; env j
    is reset with ``seed + j`` and runs a fixed quota of episodes (``episodes`` split as evenly as
    possible), so every episode is counted once and short episodes are not over-represented, as they
    would be by taking the first ``episodes`` to finish. Deterministic given ``seed`` when ``act_fn`` is.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    spec = env_spec(env_key)
    n = max(1, min(int(episodes), int(num_envs or MAX_EVAL_ENVS)))
    quota = np.array([episodes // n + (j < episodes % n) for j in range(n)], dtype=np.int64)
    venv = gym.vector.SyncVectorEnv(
        [lambda: gym_make(spec, max_episode_steps) for _ in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    low, high = venv.single_action_space.low, venv.single_action_space.high
    per_env: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    ret = np.zeros(n, dtype=np.float64)
    length = np.zeros(n, dtype=np.int64)
    done = np.zeros(n, dtype=np.int64)
    try:
        obs, _ = venv.reset(seed=[int(seed) + j for j in range(n)])
        while (done < quota).any():
            act = _actions(act_fn, obs, spec.act_dim, low, high)
            obs, rew, term, trunc, _ = venv.step(act)
            active = done < quota
            ret += np.where(active, rew, 0.0)
            length += active
            for j in np.flatnonzero((term | trunc) & active):
                per_env[j].append((float(ret[j]), int(length[j])))
                done[j] += 1
                ret[j], length[j] = 0.0, 0
    finally:
        venv.close()
    flat = [ep for eps in per_env for ep in eps]
    returns = np.array([r for r, _ in flat], dtype=np.float64)
    lengths = np.array([t for _, t in flat], dtype=np.int64)
    normalized = np.asarray(spec.normalized_score(returns), dtype=np.float64)
    return EvalResult(returns, lengths, normalized, float(returns.mean()), float(normalized.mean()))


@dataclass(frozen=True)
class Episode:
    """One episode of a policy in the real environment: observations (T, D_o) (s_0 .. s_{T-1}), actions
    (T, D_a), rewards (T,); ``terminated`` when it ended in a terminal state (else truncated at the step limit)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool


def record_episodes(act_fn: ActFn, env_key: str, episodes: int, seed: int,
                    max_episode_steps: int = 1000) -> list[Episode]:
    """Run ``episodes`` whole episodes of ``act_fn`` one after another in one environment (episode i reset with
    ``seed + i``) and keep every step, for checks that need the states and rewards themselves (a critic's value
    against the return that followed). Deterministic given ``seed`` when ``act_fn`` is."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    spec = env_spec(env_key)
    env = gym_make(spec, max_episode_steps)
    low, high = env.action_space.low, env.action_space.high
    out: list[Episode] = []
    try:
        for i in range(int(episodes)):
            obs, _ = env.reset(seed=int(seed) + i)
            o, a, r = [], [], []
            while True:
                act = _actions(act_fn, obs[None], spec.act_dim, low, high)[0]
                o.append(np.asarray(obs, dtype=np.float32))
                a.append(act.astype(np.float32))
                obs, rew, term, trunc, _ = env.step(act)
                r.append(float(rew))
                if term or trunc:
                    break
            out.append(Episode(np.stack(o), np.stack(a), np.asarray(r, dtype=np.float64), bool(term)))
    finally:
        env.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# Collection


def collect_transitions(env_key: str, policy: ActFn | Literal["random"], steps: int, seed: int,
                        noise: float = 0.0, progress: bool = True, max_episode_steps: int = 1000,
                        policy_name: str | None = None) -> OfflineDataset:
    """Record ``steps`` transitions of ``policy`` in the real environment.

    ``policy='random'`` draws actions uniformly from the action box; otherwise ``policy`` maps (1, D_o) to
    (1, D_a). Gaussian noise of std ``noise`` is added, then actions are clipped to the box. Action and
    noise draws come from ``np.random.default_rng(seed)``; the first reset is seeded with ``seed`` (later
    resets continue the env's RNG), so the result is deterministic given the seed (and a deterministic
    policy). ``terminated`` becomes ``terminals``, ``truncated`` (and not terminated) ``timeouts``; the last
    episode is usually partial. ``infos`` holds ``qpos``/``qvel`` (MuJoCo state read from
    ``env.unwrapped.data`` after reset and after each step: the state of ``observations[i]``) and
    ``next_qpos``/``next_qvel`` (the state of ``next_observations[i]``, before any reset).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if isinstance(policy, str) and policy != "random":
        raise ValueError(f"policy must be 'random' or a callable, got {policy!r}")
    from tqdm.auto import tqdm

    spec = env_spec(env_key)
    env = make_env(spec.key, max_episode_steps=max_episode_steps)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    data = env.unwrapped.data  # type: ignore[attr-defined]
    nq, nv = data.qpos.shape[0], data.qvel.shape[0]
    obs_buf = np.empty((steps, spec.obs_dim), np.float32)
    next_buf = np.empty((steps, spec.obs_dim), np.float32)
    act_buf = np.empty((steps, spec.act_dim), np.float32)
    rew_buf = np.empty(steps, np.float32)
    term_buf = np.zeros(steps, bool)
    trunc_buf = np.zeros(steps, bool)
    start_buf = np.zeros(steps, bool)
    qpos, qvel = np.empty((steps, nq)), np.empty((steps, nv))
    next_qpos, next_qvel = np.empty((steps, nq)), np.empty((steps, nv))

    bar = tqdm(total=steps, desc=f"collect {spec.gym_id}", unit="step", disable=not progress, mininterval=0.5)
    try:
        obs, _ = env.reset(seed=int(seed))
        new_episode = True
        for i in range(steps):
            if isinstance(policy, str):
                a = rng.uniform(low, high)
            else:
                a = _actions(policy, obs[None], spec.act_dim, low, high)[0]
            if noise > 0:
                a = a + noise * rng.standard_normal(spec.act_dim)
            a = np.clip(a, low, high).astype(np.float32)
            qpos[i], qvel[i] = data.qpos, data.qvel
            next_obs, rew, terminated, truncated, _ = env.step(a)
            obs_buf[i], act_buf[i], rew_buf[i], next_buf[i] = obs, a, rew, next_obs
            next_qpos[i], next_qvel[i] = data.qpos, data.qvel
            term_buf[i], trunc_buf[i] = terminated, truncated and not terminated
            start_buf[i], new_episode = new_episode, bool(terminated or truncated)
            obs = env.reset()[0] if new_episode else next_obs
            if (i + 1) % 1000 == 0 or i + 1 == steps:
                bar.update(i + 1 - bar.n)
    finally:
        bar.close()
        env.close()

    versions = package_versions()
    if policy_name is None:
        policy_name = "random" if isinstance(policy, str) else getattr(policy, "__name__", "callable")
    metadata = {
        "env_key": spec.key,
        "env_id": spec.gym_id,
        "env_model": spec.model,
        "gymnasium_version": versions["gymnasium"],
        "mujoco_version": versions["mujoco"],
        "dromo_ray_version": versions["dromo_ray"],
        "policy": policy_name,
        "noise": float(noise),
        "seed": int(seed),
        "steps": int(steps),
        "max_episode_steps": int(max_episode_steps),
    }
    return OfflineDataset(
        observations=obs_buf, actions=act_buf, rewards=rew_buf, next_observations=next_buf,
        terminals=term_buf, timeouts=trunc_buf, episode_starts=start_buf, env_id=spec.key,
        source=f"collect:{spec.key}", metadata=metadata,
        infos={"qpos": qpos, "qvel": qvel, "next_qpos": next_qpos, "next_qvel": next_qvel},
    )

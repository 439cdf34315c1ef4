"""The replay log: every transition RLlib SAC collected, in order, as an appendable D4RL-layout HDF5 file.

Rows are appended as training runs (one append per training iteration, file opened and closed each time,
so a crash loses at most the iteration in flight). Row ``i`` is environment step ``i`` of the run: the log
of the first ``n`` steps is the file's first ``n`` rows, which is how ``medium-replay`` is cut.

Layout: ``observations, actions, rewards, next_observations, terminals, timeouts`` (D4RL's keys, plus
``next_observations``), ``infos/{qpos,qvel,next_qpos,next_qvel}`` (MuJoCo state of ``observations[i]`` and
of ``next_observations[i]``) and ``metadata/*`` scalars. It reads with
:func:`dromo_ray.data.d4rl_io.read_d4rl` like any dataset. The last episode is partial when training
stopped in the middle of it (neither flag set on its last row).

Transitions are taken from RLlib's episode chunks in the ``on_sample_end`` callback of the EnvRunner
(:class:`ReplayLogCallback`) and drained by the driver with :func:`drain_env_runners`. Contiguity of
episodes needs one environment sampled sequentially: ``num_env_runners=0`` and
``num_envs_per_env_runner=1`` (what :mod:`dromo_ray.rllib.sac` configures).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback

ROW_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
INFO_KEYS = ("qpos", "qvel", "next_qpos", "next_qvel")
_PENDING = "_dromo_replay_rows"


def h5_scalar(v: Any) -> Any:
    """A metadata value HDF5 can store as a scalar: numbers and strings as is, anything else as JSON."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str, sort_keys=True)


class MujocoStateInfo(gym.Wrapper):
    """Adds ``qpos``/``qvel`` (copies of the MuJoCo state after reset / after each step) to ``info``."""

    def _state(self, info: dict[str, Any]) -> dict[str, Any]:
        data = self.env.unwrapped.data  # type: ignore[attr-defined]
        return {**info, "qpos": np.array(data.qpos, dtype=np.float64), "qvel": np.array(data.qvel, dtype=np.float64)}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, self._state(info)

    def step(self, action):
        obs, rew, term, trunc, info = self.env.step(action)
        return obs, rew, term, trunc, self._state(info)


def episode_rows(ep: Any) -> dict[str, np.ndarray]:
    """The transitions of one RLlib ``SingleAgentEpisode`` chunk as D4RL-layout rows."""
    obs = np.asarray(ep.get_observations(), dtype=np.float32)
    t = len(ep)
    act = np.asarray(ep.get_actions(), dtype=np.float32).reshape(t, -1)
    rew = np.asarray(ep.get_rewards(), dtype=np.float32).reshape(t)
    terminals = np.zeros(t, dtype=bool)
    timeouts = np.zeros(t, dtype=bool)
    if t and ep.is_terminated:
        terminals[-1] = True
    elif t and ep.is_truncated:
        timeouts[-1] = True
    rows = {"observations": obs[:-1], "actions": act, "rewards": rew, "next_observations": obs[1:],
            "terminals": terminals, "timeouts": timeouts}
    infos = ep.get_infos()
    if len(infos) == t + 1 and all("qpos" in i and "qvel" in i for i in infos):
        qpos = np.stack([np.asarray(i["qpos"], dtype=np.float64) for i in infos])
        qvel = np.stack([np.asarray(i["qvel"], dtype=np.float64) for i in infos])
        rows.update(qpos=qpos[:-1], qvel=qvel[:-1], next_qpos=qpos[1:], next_qvel=qvel[1:])
    return rows


class ReplayLogCallback(RLlibCallback):
    """Keeps the transitions of every sampled episode chunk on the EnvRunner until drained."""

    def on_sample_end(self, *, env_runner=None, metrics_logger=None, samples=None, **kwargs) -> None:
        if env_runner is None or not samples:
            return
        pending = getattr(env_runner, _PENDING, None)
        if pending is None:
            pending = []
            setattr(env_runner, _PENDING, pending)
        for ep in samples:
            if len(ep):
                pending.append(episode_rows(ep))


def _drain(env_runner: Any) -> list[dict[str, np.ndarray]]:
    rows = getattr(env_runner, _PENDING, None) or []
    setattr(env_runner, _PENDING, [])
    return rows


def drain_env_runners(algo: Any) -> dict[str, np.ndarray] | None:
    """Everything sampled since the last drain, concatenated in sampling order (None when nothing)."""
    chunks: list[dict[str, np.ndarray]] = []
    for part in algo.env_runner_group.foreach_env_runner(_drain, local_env_runner=True):
        chunks.extend(part or [])
    if not chunks:
        return None
    keys = [k for k in chunks[0] if all(k in c for c in chunks)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in keys}


class ReplayLogWriter:
    """Appendable D4RL-layout HDF5 file. ``rows`` is the number of rows written so far."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raise FileExistsError(f"replay log {self.path} already exists; use a fresh --out directory")
        with h5py.File(self.path, "w") as f:
            for k, v in (metadata or {}).items():
                f.create_dataset(f"metadata/{k}", data=h5_scalar(v))
        self.rows = 0

    def append(self, rows: dict[str, np.ndarray]) -> int:
        """Append ``rows`` (ROW_KEYS required, INFO_KEYS optional but consistent); returns the new total."""
        n = int(rows["observations"].shape[0])
        if n == 0:
            return self.rows
        with h5py.File(self.path, "a") as f:
            for key in ROW_KEYS + INFO_KEYS:
                name = key if key in ROW_KEYS else f"infos/{key}"
                if key not in rows:
                    if name in f:
                        raise ValueError(f"{self.path}: rows lack {key!r}, which earlier rows had")
                    continue
                arr = np.asarray(rows[key])
                if arr.shape[0] != n:
                    raise ValueError(f"{self.path}: {key} has {arr.shape[0]} rows, observations {n}")
                if name not in f:
                    if self.rows:
                        raise ValueError(f"{self.path}: rows bring {key!r}, which earlier rows lacked")
                    f.create_dataset(name, shape=(0, *arr.shape[1:]), maxshape=(None, *arr.shape[1:]),
                                     dtype=arr.dtype, chunks=(min(max(n, 1), 4096), *arr.shape[1:]))
                d = f[name]
                d.resize(self.rows + n, axis=0)
                d[self.rows:] = arr
            f.attrs["rows"] = self.rows + n
        self.rows += n
        return self.rows

    def set_metadata(self, **metadata: Any) -> None:
        with h5py.File(self.path, "a") as f:
            for k, v in metadata.items():
                name = f"metadata/{k}"
                if name in f:
                    del f[name]
                f.create_dataset(name, data=h5_scalar(v))

"""The offline dataset D: one typed container of transitions, and the checks every format's reader applies.

Rows are transitions ``(s, a, r, s', terminal)``. Shapes: N rows, D_o observation dims, D_a action dims.
Rows of one episode are contiguous and in time order; no row crosses an episode boundary, so inside an
episode ``next_observations[i] == observations[i + 1]``. An episode ends after a row with ``terminals``
(the environment terminated: no bootstrap) or ``timeouts`` (the episode was cut: bootstrap from s').
The last episode may end with neither flag: collection stopped in the middle of it (a *partial* episode).

This module knows no file format: the readers (:mod:`dromo_ray.data.d4rl_io`, :mod:`dromo_ray.data.minari_io`)
build an :class:`OfflineDataset` with the checks below, and :func:`dromo_ray.data.load.load_dataset` finds a
dataset by path or name on top of them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from dromo_ray.core.envs import ENVS, EnvSpec, get_env_spec
from dromo_ray.core.types import NumpyBatch
from dromo_ray.errors import DatasetError

STD_FLOOR = 1e-3
"""Lower bound of ``obs_std``: constant observation dims must not blow up normalisation."""
ACTION_BOUND = 1.0
"""Actions of Hopper-v5, HalfCheetah-v5 and Walker2d-v5 (and of D4RL's locomotion datasets) lie in [-1, 1]."""
ACTION_BOUND_ATOL = 1e-5
"""Slack of the action-box check (float rounding of actions clipped to exactly +-1)."""


@dataclass(frozen=True, eq=False)
class OfflineDataset:
    """Transitions of an offline dataset D, one row each, episodes contiguous.

    ``infos`` holds optional per-row arrays (first axis N), e.g. ``qpos``/``qvel`` (the MuJoCo state
    matching ``observations[i]``) and ``next_qpos``/``next_qvel`` (the state matching
    ``next_observations[i]``). Arrays are coerced to the documented dtypes on construction and their
    shapes checked; a mismatch raises :class:`DatasetError` naming ``source`` and the key.
    """

    observations: np.ndarray
    """(N, D_o) float32."""
    actions: np.ndarray
    """(N, D_a) float32."""
    rewards: np.ndarray
    """(N,) float32."""
    next_observations: np.ndarray
    """(N, D_o) float32: the real successor of ``observations[i]`` (also at timeouts)."""
    terminals: np.ndarray
    """(N,) bool: the environment terminated after this row (done for Q-learning)."""
    timeouts: np.ndarray
    """(N,) bool: the episode was cut after this row (not done: bootstrap from next_observations)."""
    episode_starts: np.ndarray
    """(N,) bool: this row is the first of an episode (row 0 always is)."""
    env_id: str
    """Registry key of :data:`dromo_ray.core.envs.ENVS` (``hopper``, ``halfcheetah``, ``walker2d``)."""
    source: str = ""
    """Where the data came from (a file path, ``minari:<id>``, ``collect:<env>``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (collector settings, versions, rows dropped on load, ...)."""
    infos: dict[str, np.ndarray] = field(default_factory=dict)
    """Optional per-row arrays, first axis N."""

    def __post_init__(self) -> None:
        src = self.source or "<dataset>"
        coerce = {
            "observations": np.float32, "actions": np.float32, "rewards": np.float32,
            "next_observations": np.float32, "terminals": np.bool_, "timeouts": np.bool_,
            "episode_starts": np.bool_,
        }
        for name, dtype in coerce.items():
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        n = self.observations.shape[0]
        if self.observations.ndim != 2 or self.actions.ndim != 2:
            raise DatasetError(src, "observations and actions must be 2-D (N, D)", "observations")
        if self.next_observations.shape != self.observations.shape:
            raise DatasetError(src, f"shape {self.next_observations.shape} differs from observations "
                               f"{self.observations.shape}", "next_observations")
        for name in ("actions", "rewards", "terminals", "timeouts", "episode_starts"):
            arr = getattr(self, name)
            if arr.shape[0] != n or (name != "actions" and arr.ndim != 1):
                raise DatasetError(src, f"shape {arr.shape} does not match {n} rows", name)
        for name, arr in self.infos.items():
            if np.shape(arr)[:1] != (n,):
                raise DatasetError(src, f"shape {np.shape(arr)} does not match {n} rows", f"infos/{name}")
        if n and not self.episode_starts[0]:
            raise DatasetError(src, "row 0 must start an episode", "episode_starts")

    # ---- sizes and statistics ------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def env_spec(self) -> EnvSpec:
        return get_env_spec(self.env_id)

    @cached_property
    def obs_mean(self) -> np.ndarray:
        """(D_o,) float32 mean of ``observations`` (computed in float64)."""
        return self.observations.mean(axis=0, dtype=np.float64).astype(np.float32)

    @cached_property
    def obs_std(self) -> np.ndarray:
        """(D_o,) float32 standard deviation of ``observations``, floored at :data:`STD_FLOOR`."""
        std = self.observations.std(axis=0, dtype=np.float64)
        return np.maximum(std, STD_FLOOR).astype(np.float32)

    # ---- episodes ------------------------------------------------------------------------------------

    @cached_property
    def episode_start_indices(self) -> np.ndarray:
        """(E,) int64 index of the first row of every episode."""
        return np.flatnonzero(self.episode_starts).astype(np.int64)

    @property
    def num_episodes(self) -> int:
        """Episodes in D, the partial last one included."""
        return int(self.episode_start_indices.shape[0])

    @cached_property
    def episode_lengths(self) -> np.ndarray:
        """(E,) int64 rows per episode, in dataset order."""
        return np.diff(np.append(self.episode_start_indices, len(self)))

    @property
    def last_episode_partial(self) -> bool:
        """True when the last row is neither terminal nor timeout: collection stopped mid-episode."""
        return len(self) > 0 and not (self.terminals[-1] or self.timeouts[-1])

    def episode_returns(self, include_partial: bool = False) -> np.ndarray:
        """(E,) float64 undiscounted return of each episode, in dataset order.

        A partial last episode (see :attr:`last_episode_partial`) is *excluded* unless
        ``include_partial``: its return is not comparable with complete episodes'. When the loader
        dropped a row whose next observation was unknown (files without ``next_observations``; see
        ``metadata['dropped_rows']``), that episode's return lacks the dropped reward.
        """
        if len(self) == 0:
            return np.zeros(0, dtype=np.float64)
        returns = np.add.reduceat(self.rewards.astype(np.float64), self.episode_start_indices)
        if self.last_episode_partial and not include_partial:
            returns = returns[:-1]
        return returns

    # ---- batches -------------------------------------------------------------------------------------

    def as_numpy_batch(self, idx: np.ndarray | slice) -> NumpyBatch:
        """Rows ``idx`` as a :class:`NumpyBatch`: done = terminals (float32 0/1), unc = 0."""
        obs = self.observations[idx]
        return NumpyBatch(
            obs=obs,
            act=self.actions[idx],
            rew=self.rewards[idx],
            next_obs=self.next_observations[idx],
            done=self.terminals[idx].astype(np.float32),
            unc=np.zeros(obs.shape[0], dtype=np.float32),
        )

    def sample(self, rng: np.random.Generator, n: int) -> NumpyBatch:
        """``n`` rows drawn uniformly with replacement using ``rng``."""
        if len(self) == 0:
            raise DatasetError(self.source or "<dataset>", "cannot sample from an empty dataset")
        return self.as_numpy_batch(rng.integers(0, len(self), size=int(n)))

    def subset(self, idx: np.ndarray) -> OfflineDataset:
        """The rows ``idx`` (sorted, unique) as a new dataset; episode starts are recomputed so that a row
        starts an episode when it did before or when its predecessor in the subset is not row ``i - 1``."""
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        starts = self.episode_starts[idx].copy()
        if idx.size:
            starts[0] = True
            starts[1:] |= np.diff(idx) != 1
        return OfflineDataset(
            self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
            self.terminals[idx], self.timeouts[idx], starts, self.env_id, self.source, dict(self.metadata),
            {k: v[idx] for k, v in self.infos.items()},
        )


# ---------------------------------------------------------------------------------------------------------
# Checks shared by the format readers.


def resolve_env(env: str | None, *hints: str | None, obs_dim: int | None = None,
                source: str = "<dataset>") -> EnvSpec:
    """The environment of a dataset: ``env`` when given, else the first hint (metadata value, file or
    dataset name) that names a registry environment, else the only registry entry with ``obs_dim``."""
    if env:
        try:
            return get_env_spec(env)
        except KeyError:
            raise DatasetError(source, f"unknown environment {env!r}; known: {', '.join(ENVS)}",
                               "env") from None
    for hint in hints:
        if not hint:
            continue
        try:
            return get_env_spec(str(hint))
        except KeyError:
            continue
    if obs_dim is not None:
        matches = [s for s in ENVS.values() if s.obs_dim == obs_dim]
        if len(matches) == 1:
            return matches[0]
    raise DatasetError(source, "cannot tell the environment from the metadata or the name; "
                       f"pass --env ({', '.join(ENVS)})", "env")


def check_dims(spec: EnvSpec, obs_dim: int, act_dim: int, src: str) -> None:
    """Observation and action sizes must be the named environment's."""
    if obs_dim != spec.obs_dim:
        raise DatasetError(src, f"rows have {obs_dim} dims but {spec.key} ({spec.gym_id}) observations have "
                           f"{spec.obs_dim}; wrong file or wrong --env?", "observations")
    if act_dim != spec.act_dim:
        raise DatasetError(src, f"rows have {act_dim} dims but {spec.key} ({spec.gym_id}) actions have "
                           f"{spec.act_dim}; wrong file or wrong --env?", "actions")


def check_action_box(actions: np.ndarray, spec: EnvSpec, source: str, allow_unbounded: bool = False) -> None:
    """Actions (N, D_a) must lie in the action box [-1, 1] (within :data:`ACTION_BOUND_ATOL`) unless
    ``allow_unbounded``: a file with larger actions is most likely not a dataset of this environment."""
    if allow_unbounded or actions.size == 0:
        return
    mag = np.abs(actions)
    bad = mag > ACTION_BOUND + ACTION_BOUND_ATOL
    if bad.any():
        row, dim = (int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(source, f"actions leave the action box [-1, 1] of {spec.gym_id}: |a| reaches "
                           f"{float(mag.max()):.4g} ({int(bad.any(axis=1).sum())} rows, the first is row {row}, "
                           f"dim {dim}); D4RL locomotion actions are bounded, so this is probably the wrong file. "
                           "To load it anyway set data.allow_unbounded_actions: true (data info: "
                           "--allow-unbounded-actions)", "actions")


def terminal_wins(terminals: np.ndarray, timeouts: np.ndarray, source: str) -> tuple[np.ndarray, int]:
    """``timeouts`` with the rows that are also ``terminals`` cleared, and how many there were.

    A row flagged both ended the episode by termination, and a terminated transition is not bootstrapped
    whether or not the time limit came at the same step: the terminal wins (Gymnasium's ``terminated``
    overrides ``truncated``; D4RL's ``qlearning_dataset`` reads ``done`` from ``terminals``; the collectors of
    this package record such a step as terminal only). A warning says how many rows were resolved so.
    """
    both = terminals & timeouts
    k = int(both.sum())
    if k:
        warnings.warn(f"{source}: {k} rows are flagged both terminal and timeout (first at row "
                      f"{int(np.argmax(both))}); read as terminal (no bootstrap), the timeout flag dropped",
                      stacklevel=3)
        timeouts = timeouts & ~terminals
    return timeouts, k

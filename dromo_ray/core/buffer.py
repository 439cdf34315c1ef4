"""D_model: a bounded FIFO of model transitions (Alg. 1 lines 2 and 4), in numpy for cheap shipping
(:class:`ReplayBuffer`), or in torch on the learner's device for learner-side rollouts (:class:`DeviceReplayBuffer`).

Shapes: C capacity, D_o observation dims, D_a action dims, n rows. Fields match
:class:`dromo_ray.core.types.NumpyBatch`: obs (n, D_o), act (n, D_a), rew (n,), next_obs (n, D_o),
done (n,) float 0/1, unc (n,), all float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dromo_ray.core.types import Batch, NumpyBatch

FIELDS = NumpyBatch._fields


class ReplayBuffer:
    """A ring buffer: once full, each new row overwrites the oldest. Sampling takes the RNG as an argument."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int) -> None:
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity, self.obs_dim, self.act_dim = int(capacity), int(obs_dim), int(act_dim)
        self._shapes = {"obs": (obs_dim,), "act": (act_dim,), "rew": (), "next_obs": (obs_dim,), "done": (),
                        "unc": ()}
        self._data = {f: np.zeros((self.capacity, *self._shapes[f]), dtype=np.float32) for f in FIELDS}
        self._ptr = 0  # next row to write
        self._size = 0
        self.total_added = 0
        """Rows ever added (including overwritten ones)."""

    def __len__(self) -> int:
        return self._size

    def _check(self, batch: NumpyBatch) -> int:
        n = batch.size
        for f, a in zip(FIELDS, batch, strict=True):
            a = np.asarray(a)
            if a.shape != (n, *self._shapes[f]):
                want = (n, *self._shapes[f])
                raise ValueError(f"ReplayBuffer.add: {f} must have shape {want}, got {a.shape}")
        return n

    def add(self, batch: NumpyBatch) -> None:
        """Append n rows in order (vectorised; wraps around, overwriting the oldest rows)."""
        n = self._check(batch)
        if n == 0:
            return
        self.total_added += n
        if n >= self.capacity:  # only the newest `capacity` rows survive, and the order stays FIFO
            batch = NumpyBatch(*(np.asarray(a)[n - self.capacity:] for a in batch))
            n = self.capacity
        first = min(n, self.capacity - self._ptr)
        for f, a in zip(FIELDS, batch, strict=True):
            a = np.asarray(a, dtype=np.float32)
            self._data[f][self._ptr:self._ptr + first] = a[:first]
            if first < n:
                self._data[f][: n - first] = a[first:]
        self._ptr = (self._ptr + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def _gather(self, idx: np.ndarray) -> NumpyBatch:
        return NumpyBatch(*(self._data[f][idx] for f in FIELDS))

    def sample(self, n: int, rng: np.random.Generator) -> NumpyBatch:
        """n rows drawn uniformly with replacement from the filled part."""
        if self._size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        return self._gather(rng.integers(0, self._size, size=int(n)))

    def sample_chunk(self, num_batches: int, batch_size: int, rng: np.random.Generator) -> NumpyBatch:
        """``num_batches`` batches in one array set, shape (num_batches * batch_size, ...); batch i is rows
        [i * batch_size, (i + 1) * batch_size)."""
        return self.sample(int(num_batches) * int(batch_size), rng)

    def ordered(self) -> NumpyBatch:
        """Every stored row, oldest first (copies)."""
        if self._size < self.capacity:
            idx = np.arange(self._size)
        else:
            idx = (np.arange(self.capacity) + self._ptr) % self.capacity
        return self._gather(idx)

    def state_dict(self) -> dict[str, Any]:
        """The filled part of every array (storage order) plus the pointers: restores contents and order."""
        state: dict[str, Any] = {f: self._data[f][: self._size].copy() for f in FIELDS}
        state.update(capacity=self.capacity, obs_dim=self.obs_dim, act_dim=self.act_dim, ptr=self._ptr,
                     size=self._size, total_added=self.total_added)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (int(state["capacity"]), int(state["obs_dim"]), int(state["act_dim"])) != (
                self.capacity, self.obs_dim, self.act_dim):
            raise ValueError("ReplayBuffer.load_state_dict: capacity or dims differ from this buffer's "
                             f"({state['capacity']}, {state['obs_dim']}, {state['act_dim']}) vs "
                             f"({self.capacity}, {self.obs_dim}, {self.act_dim})")
        size = int(state["size"])
        for f in FIELDS:
            a = np.asarray(state[f], dtype=np.float32)
            if a.shape != (size, *self._shapes[f]):
                raise ValueError(f"ReplayBuffer.load_state_dict: {f} has shape {a.shape}, "
                                 f"expected {(size, *self._shapes[f])}")
            self._data[f][:size] = a
            self._data[f][size:] = 0.0
        self._size, self._ptr = size, int(state["ptr"])
        self.total_added = int(state.get("total_added", size))


class DeviceReplayBuffer:
    """D_model as torch tensors on one device (``rollout.mode: learner``): the same bounded FIFO as
    :class:`ReplayBuffer`, filled by learner-side rollouts and sampled there without leaving the device.

    Rows are :class:`~dromo_ray.core.types.Batch` fields: obs (C, D_o), act (C, D_a), rew (C,), next_obs (C, D_o),
    done (C,) float 0/1, unc (C,), float32. ``state_dict`` has :class:`ReplayBuffer`'s layout (numpy), so either
    buffer restores the other's state.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device | str) -> None:
        if capacity < 1:
            raise ValueError(f"DeviceReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity, self.obs_dim, self.act_dim = int(capacity), int(obs_dim), int(act_dim)
        self.device = torch.device(device)
        self._shapes = {"obs": (obs_dim,), "act": (act_dim,), "rew": (), "next_obs": (obs_dim,), "done": (),
                        "unc": ()}
        self._data = {f: torch.zeros((self.capacity, *self._shapes[f]), device=self.device) for f in FIELDS}
        self._ptr = 0
        self._size = 0
        self.total_added = 0

    def __len__(self) -> int:
        return self._size

    def add(self, batch: Batch) -> None:
        """Append n rows (a torch ``Batch``, any device) in order, overwriting the oldest once full."""
        n = int(batch.obs.shape[0])
        for f, a in zip(FIELDS, batch, strict=True):
            if tuple(a.shape) != (n, *self._shapes[f]):
                raise ValueError(f"DeviceReplayBuffer.add: {f} must have shape {(n, *self._shapes[f])}, "
                                 f"got {tuple(a.shape)}")
        if n == 0:
            return
        self.total_added += n
        if n >= self.capacity:
            batch = Batch(*(a[n - self.capacity:] for a in batch))
            n = self.capacity
        first = min(n, self.capacity - self._ptr)
        for f, a in zip(FIELDS, batch, strict=True):
            a = a.to(self.device, non_blocking=True)
            self._data[f][self._ptr:self._ptr + first].copy_(a[:first])
            if first < n:
                self._data[f][: n - first].copy_(a[first:])
        self._ptr = (self._ptr + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def sample_chunk(self, num_batches: int, batch_size: int, generator: torch.Generator) -> Batch:
        """``num_batches`` batches of ``batch_size`` rows drawn uniformly with replacement (``generator`` on the
        buffer's device), as one torch ``Batch`` of num_batches·batch_size rows; batch i is rows
        [i·batch_size, (i + 1)·batch_size)."""
        if self._size == 0:
            raise ValueError("DeviceReplayBuffer.sample_chunk: the buffer is empty")
        idx = torch.randint(self._size, (int(num_batches) * int(batch_size),), generator=generator,
                            device=self.device)
        return Batch(*(self._data[f].index_select(0, idx) for f in FIELDS))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {f: self._data[f][: self._size].cpu().numpy().copy() for f in FIELDS}
        state.update(capacity=self.capacity, obs_dim=self.obs_dim, act_dim=self.act_dim, ptr=self._ptr,
                     size=self._size, total_added=self.total_added)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (int(state["capacity"]), int(state["obs_dim"]), int(state["act_dim"])) != (
                self.capacity, self.obs_dim, self.act_dim):
            raise ValueError("DeviceReplayBuffer.load_state_dict: capacity or dims differ from this buffer's")
        size = int(state["size"])
        for f in FIELDS:
            a = torch.as_tensor(np.asarray(state[f], dtype=np.float32))
            if tuple(a.shape) != (size, *self._shapes[f]):
                raise ValueError(f"DeviceReplayBuffer.load_state_dict: {f} has shape {tuple(a.shape)}, "
                                 f"expected {(size, *self._shapes[f])}")
            self._data[f].zero_()
            self._data[f][:size].copy_(a)
        self._size, self._ptr = size, int(state["ptr"])
        self.total_added = int(state.get("total_added", size))

"""Named batches that cross module boundaries. Shapes: B rows, D_o observation dims, D_a action dims."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    """A batch of transitions as torch tensors on one device.

    obs (B, D_o), act (B, D_a), rew (B,), next_obs (B, D_o), done (B,) float 0/1 (terminal, not timeout),
    unc (B,): the model's uncertainty u(s, a) for model rows (MOPO's penalty signal), 0 for dataset rows.
    """

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    done: torch.Tensor
    unc: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self))

    @property
    def size(self) -> int:
        return int(self.obs.shape[0])


class NumpyBatch(NamedTuple):
    """The same transitions as numpy arrays (cheap to ship between Ray processes)."""

    obs: np.ndarray
    act: np.ndarray
    rew: np.ndarray
    next_obs: np.ndarray
    done: np.ndarray
    unc: np.ndarray

    def to_torch(self, device: torch.device | str = "cpu") -> Batch:
        return Batch(*(torch.as_tensor(np.asarray(a, dtype=np.float32), device=device) for a in self))

    @property
    def size(self) -> int:
        """Rows (``len()`` stays the tuple's field count, so namedtuple methods keep working)."""
        return int(self.obs.shape[0])


class MixedBatch(NamedTuple):
    """A d_f batch: ``real`` rows drawn from D (fraction f) and ``model`` rows from D_model (1 - f).

    DROMO's conservative term needs to know which rows came from D (E_D Q) and which from rho (E_rho Q).
    """

    real: Batch
    model: Batch

    def joined(self) -> Batch:
        return Batch(*(torch.cat([a, b], 0) for a, b in zip(self.real, self.model, strict=True)))

    def to(self, device: torch.device | str) -> MixedBatch:
        return MixedBatch(self.real.to(device), self.model.to(device))

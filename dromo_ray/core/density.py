"""|D(s)| ≈ |D| · d^{π^β}(s): how many dataset states lie near s (the denominator of Eq. 13's variance term).

Lemma 4.1's proof replaces |D| · d^{π^β}(s) by |D(s)|, the count of dataset states at s. With continuous states
that count is an estimate; two are offered:

- :class:`ConstantDensity` — every state counts |D| (d^{π^β} taken as 1: the penalty becomes
  α · E_s sqrt(Var_{π^f} Q) after the normalisation below).
- :class:`KDEDensity` — a Gaussian kernel density against a FIXED subsample of K dataset states, normalised
  with the dataset mean/std. The count is dimensionally a number of states::

      |D(s)| ≈ |D| · (1/K) Σ_k k(s, c_k) / k(s, s),      k(x, y) = exp(-||z(x) - z(y)||² / (2 h²))

  i.e. |D| times the mean kernel value relative to the kernel value at distance 0 (= 1): the expected number
  of dataset states within about one bandwidth h (in standard deviations of the data) of s. It equals |D| at
  a state every dataset state sits on, and falls to 0 far from the data; it is clipped from below at
  ``floor`` so that the penalty stays finite off the data.

Normalisation (beside Eq. 13; see ``losses.action_variance_penalty``): the variance term divides by the
RELATIVE density ``relative_count(s) = |D(s)| / N_ref``, N_ref = ``reference``, the estimator's mean count over
dataset states: |D| for the constant estimator (so its relative density is 1 everywhere) and, for the KDE,
the leave-one-out mean count over its K centres, (|D| / (K-1)) · mean_j Σ_{k≠j} k(c_j, c_k) — an unbiased
estimate of E_{s~D} |D(s)| that does not count a centre as its own neighbour. Dividing by |D(s)| itself
would scale the term by 1/sqrt(|D|) (≈ 1/1000 on D4RL) and make α mean different things per estimator.

Both are ``nn.Module`` s whose state lives in buffers, so ``state_dict()`` / ``load_state_dict()`` carry them in
checkpoints and ``.to(device)`` moves them; N_ref is derived from them (a non-persistent buffer, recomputed
on load, so checkpoints keep their keys). Shapes: B states, D_o observation dims, K centres.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from dromo_ray.core.config import AgentConfig


@runtime_checkable
class StateDensity(Protocol):
    """count(obs (B, D_o)) -> (B,) ≈ |D| · d^{π^β}(s), clipped from below; ``relative_count`` = count / N_ref
    (``reference``, the mean count over dataset states); checkpointable."""

    reference: torch.Tensor

    def count(self, obs: torch.Tensor) -> torch.Tensor: ...

    def relative_count(self, obs: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


class ConstantDensity(nn.Module):
    """Every state counts |D| = ``n_total``."""

    def __init__(self, n_total: int) -> None:
        super().__init__()
        if n_total < 1:
            raise ValueError(f"ConstantDensity: n_total must be >= 1, got {n_total}")
        self.register_buffer("n_total", torch.tensor(float(n_total)))

    @property
    def reference(self) -> torch.Tensor:
        """N_ref = |D|: every dataset state counts |D|."""
        return self.n_total

    @torch.no_grad()
    def count(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, D_o) -> (B,) all equal to |D|."""
        return self.n_total.to(obs.dtype).expand(obs.shape[0])

    @torch.no_grad()
    def relative_count(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, D_o) -> (B,) all equal to 1 (= |D| / N_ref)."""
        return torch.ones(obs.shape[0], dtype=obs.dtype, device=obs.device)


class KDEDensity(nn.Module):
    """Gaussian-kernel count of dataset states near s (see the module docstring for the definition).

    states: (N, D_o) dataset observations (numpy or torch); n_total: |D| (defaults to N); bandwidth: h in
    normalised units; subsample: K centres drawn once without replacement (all N when N <= K); floor: lower clip
    of the count; generator: torch.Generator (or numpy Generator) for the subsample.
    """

    def __init__(self, states: np.ndarray | torch.Tensor, n_total: int | None = None, bandwidth: float = 1.0,
                 subsample: int = 2048, floor: float = 1.0,
                 generator: torch.Generator | np.random.Generator | None = None) -> None:
        super().__init__()
        x = torch.as_tensor(np.asarray(states) if not torch.is_tensor(states) else states,
                            dtype=torch.float32).detach().cpu()
        if x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"KDEDensity: states must be (N, D_o) with N >= 1, got {tuple(x.shape)}")
        if bandwidth <= 0 or floor < 0 or subsample < 1:
            raise ValueError("KDEDensity: bandwidth and subsample must be > 0, floor >= 0")
        n = x.shape[0]
        mean = x.mean(0)
        std = x.std(0, unbiased=False).clamp_min(1e-6)
        k = min(int(subsample), n)
        if k == n:
            idx = torch.arange(n)
        elif isinstance(generator, np.random.Generator):
            idx = torch.as_tensor(np.sort(generator.choice(n, size=k, replace=False)))
        else:
            idx = torch.randperm(n, generator=generator)[:k].sort().values
        centres = (x[idx] - mean) / std
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("centres", centres)
        self.register_buffer("n_total", torch.tensor(float(n if n_total is None else n_total)))
        self.register_buffer("bandwidth", torch.tensor(float(bandwidth)))
        self.register_buffer("floor", torch.tensor(float(floor)))
        self.register_buffer("reference", torch.zeros(()), persistent=False)
        self._set_reference()

    @torch.no_grad()
    def _set_reference(self) -> None:
        # N_ref: leave-one-out mean count over the centres (a centre's kernel with itself, 1, is left out).
        c = self.centres
        k = c.shape[0]
        if k < 2:
            ref = self.n_total.clone()
        else:
            inv_2h2 = 0.5 / self.bandwidth.square()
            c_sq = c.square().sum(1)
            total = torch.zeros((), dtype=c.dtype, device=c.device)
            for rows in c.split(1024):
                d2 = torch.addmm(c_sq.unsqueeze(0) + rows.square().sum(1, keepdim=True), rows, c.T,
                                 alpha=-2.0).clamp_min_(0.0)
                total += (-d2 * inv_2h2).exp().sum() - rows.shape[0]
            ref = self.n_total * total / (k * (k - 1))
        self.reference = ref.clamp_min(torch.clamp_min(self.floor, 1e-6)).to(self.reference.device)

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        out = super().load_state_dict(state_dict, *args, **kwargs)
        self._set_reference()
        return out

    @classmethod
    def empty(cls, obs_dim: int, num_centres: int) -> KDEDensity:
        """A placeholder of the right buffer shapes, to ``load_state_dict`` into."""
        return cls(torch.zeros(num_centres, obs_dim), n_total=1)

    @torch.no_grad()
    def count(self, obs: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """(B, D_o) -> (B,): |D| · mean_k exp(-||z - c_k||² / 2h²), clipped at ``floor``."""
        assert obs.dim() == 2 and obs.shape[1] == self.centres.shape[1], (
            f"KDEDensity.count expects (B, {self.centres.shape[1]}), got {tuple(obs.shape)}")
        z = (obs.to(self.mean.dtype) - self.mean) / self.std
        inv_2h2 = 0.5 / self.bandwidth.square()
        c_sq = self.centres.square().sum(1)
        log_k = math.log(self.centres.shape[0])
        outs = []
        for z_chunk in z.split(chunk):
            # -||z - c||² / 2h² = (2 z·c - ||c||² - ||z||²) / 2h²
            d2 = torch.addmm(c_sq.unsqueeze(0) + z_chunk.square().sum(1, keepdim=True), z_chunk,
                             self.centres.T, alpha=-2.0).clamp_min_(0.0)
            log_mean_kernel = torch.logsumexp(-d2 * inv_2h2, dim=1) - log_k
            outs.append(self.n_total * log_mean_kernel.exp())
        return torch.cat(outs).clamp_min(self.floor).to(obs.dtype)

    @torch.no_grad()
    def relative_count(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, D_o) -> (B,): |D(s)| / N_ref (1 at a state of average dataset density)."""
        return self.count(obs) / self.reference.to(obs.dtype)


def make_density(cfg: AgentConfig, states: np.ndarray | torch.Tensor, *, n_total: int | None = None,
                 generator: torch.Generator | np.random.Generator | None = None) -> ConstantDensity | KDEDensity:
    """The estimator named by ``cfg.density`` for dataset observations ``states`` (N, D_o)."""
    n = int(states.shape[0]) if n_total is None else int(n_total)
    if cfg.density == "constant":
        return ConstantDensity(n)
    return KDEDensity(states, n_total=n, bandwidth=cfg.kde_bandwidth, subsample=cfg.kde_subsample,
                      floor=cfg.density_floor, generator=generator)


def density_from_state(state: dict[str, Any]) -> ConstantDensity | KDEDensity:
    """Rebuild an estimator from its ``state_dict()`` (the keys say which kind)."""
    if "centres" in state:
        centres = state["centres"]
        density: ConstantDensity | KDEDensity = KDEDensity.empty(int(centres.shape[1]), int(centres.shape[0]))
    elif set(state) == {"n_total"}:
        density = ConstantDensity(1)
    else:
        raise ValueError(f"density_from_state: unrecognised keys {sorted(state)}")
    density.load_state_dict(state)
    return density

"""The learned model as a batched environment: one step of T_phi for B rows at once (Alg. 1 line 4).

Shapes: B rows, D_o observation dims, D_a action dims, D_t = D_o + 1 targets, K elites.

Each row is advanced by one elite member drawn uniformly at random per row (as MBPO/MOPO), so the
transition distribution is the uniform mixture of the elites. Only the elites are evaluated (one batched
forward over K members). Three uncertainty signals u(s, a) are computed for every row:

* ``max_aleatoric``: max over elites of ||sigma_i(s, a)||_2 (MOPO's penalty);
* ``disagreement``: max over elites of ||mu_i(s, a) - mean_j mu_j(s, a)||_2;
* ``entropy``: 1/2 (1 + log 2 pi sigma^2) summed over the D_t output dims, of the member that produced the
  row (appendix B's u(s, a), used by mopo_auto).

All three use the unnormalised predictive variance, ``var_scale`` (appendix A recalibration) included, over
all D_t outputs (state change and reward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from dromo_ray.core.dynamics import EnsembleDynamics

PENALTIES = ("max_aleatoric", "disagreement", "entropy")


class ModelStep(NamedTuple):
    """One model step. next_obs (B, D_o), rew (B,), done (B,) bool, unc (B,) the selected signal,
    signals: every signal name in :data:`PENALTIES` -> (B,), member (B,) long: the ensemble index (an elite)
    that produced each row."""

    next_obs: torch.Tensor
    rew: torch.Tensor
    done: torch.Tensor
    unc: torch.Tensor
    signals: dict[str, torch.Tensor]
    member: torch.Tensor


class ModelEnv:
    """Batched environment over an :class:`EnsembleDynamics`.

    ``termination_fn`` maps next observations (B, D_o) torch -> (B,) bool (see :mod:`dromo_ray.core.envs`).
    ``penalty`` names the signal returned as ``unc``.
    """

    def __init__(self, model: EnsembleDynamics, termination_fn: Callable[[torch.Tensor], torch.Tensor],
                 penalty: str = "max_aleatoric") -> None:
        if penalty not in PENALTIES:
            raise ValueError(f"ModelEnv: penalty {penalty!r} is not one of {', '.join(PENALTIES)}")
        self.model, self.termination_fn, self.penalty = model, termination_fn, penalty

    @property
    def obs_dim(self) -> int:
        return self.model.obs_dim

    @property
    def act_dim(self) -> int:
        return self.model.act_dim

    @torch.no_grad()
    def step(self, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None = None,
             deterministic: bool = False) -> ModelStep:
        """Advance every row one step. ``generator`` (on the model's device) draws members and noise.

        ``deterministic``: no Gaussian noise; each row takes the *mean* of its (still randomly drawn) elite
        member, as MBPO's deterministic mode does.
        """
        m = self.model
        assert obs.dim() == 2 and act.dim() == 2 and obs.shape[0] == act.shape[0], (
            f"ModelEnv.step expects obs (B, {m.obs_dim}) and act (B, {m.act_dim}), "
            f"got {tuple(obs.shape)} and {tuple(act.shape)}"
        )
        assert obs.shape[1] == m.obs_dim and act.shape[1] == m.act_dim, (
            f"ModelEnv.step expects obs (B, {m.obs_dim}) and act (B, {m.act_dim}), "
            f"got {tuple(obs.shape)} and {tuple(act.shape)}"
        )
        elites = m.elite_idx
        mean, var = m.predict(obs, act, members=elites)  # (K, B, D_t) each, unnormalised
        k, b, _ = mean.shape
        pick = torch.randint(k, (b,), generator=generator, device=obs.device)  # position among the elites
        rows = torch.arange(b, device=obs.device)
        mu, v = mean[pick, rows], var[pick, rows]  # (B, D_t): one gather each
        if deterministic:
            y = mu
        else:
            y = mu + v.sqrt() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        next_obs = obs + y[:, : m.obs_dim]
        rew = y[:, m.obs_dim]
        done = torch.as_tensor(self.termination_fn(next_obs), device=obs.device).to(torch.bool).reshape(b)
        signals = {
            "max_aleatoric": var.sqrt().norm(dim=-1).amax(0),
            "disagreement": (mean - mean.mean(0, keepdim=True)).norm(dim=-1).amax(0),
            "entropy": (0.5 * (1.0 + torch.log(2.0 * math.pi * v))).sum(-1),
        }
        return ModelStep(next_obs, rew, done, signals[self.penalty], signals, elites[pick])

"""MOPO's reward penalty r̄ = r̂ - λ u(s, a) on the model rows, with λ fixed (MOPO) or learned (appendix B.1).

u(s, a) arrives with the batch (``Batch.unc``), computed by the model env from the dynamics ensemble
(``AgentConfig.mopo_uncertainty``). For ``mopo_auto`` it is the ``entropy`` signal of
:mod:`dromo_ray.core.model_env`: u = max(0, H - H_ref) >= 0, the excess of the per-dimension entropy H of the
model's prediction (normalised output space) over its q-quantile on D, so that -λu is never a bonus; δ =
``mopo_target_entropy`` is in the same units (by default E_D[u], set by the driver from D after the ensemble is
trained). Dataset rows are never penalised (their u is 0 by the ``Batch`` contract; we do not even look at it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from dromo_ray.core import losses as L
from dromo_ray.core.agents.sac import SACLosses, adam, portable_opt_state


@dataclasses.dataclass(frozen=True)
class MopoLosses(SACLosses):
    """MOPO: SAC on d_f with model rewards r - λu."""

    reward_penalty: torch.Tensor
    """E[λ u(s, a)] over the model rows."""
    uncertainty: torch.Tensor
    """E[u(s, a)] over the model rows."""
    mopo_lambda: torch.Tensor


@dataclasses.dataclass(frozen=True)
class MopoAutoLosses(SACLosses):
    """MOPO with λ learned by the dual update of appendix B.1 (Eq. 28-30)."""

    reward_penalty: torch.Tensor
    uncertainty: torch.Tensor
    mopo_lambda: torch.Tensor
    mopo_lambda_loss: torch.Tensor
    """J(λ) = λ (δ - E[u])."""


class FixedPenalty:
    """MOPO: a constant λ = ``cfg.mopo_lambda``."""

    def __init__(self, lam: float, device: torch.device) -> None:
        self.lam = torch.tensor(float(lam), device=device)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def reward(self, rew: torch.Tensor, unc: torch.Tensor) -> torch.Tensor:
        return L.mopo_penalised_reward(rew, unc, self.lam)

    def update(self, unc: torch.Tensor) -> dict[str, torch.Tensor]:
        u = unc.mean() if unc.numel() else self.lam.new_zeros(())
        return {"reward_penalty": self.lam * u, "uncertainty": u, "mopo_lambda": self.lam.clone()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DualPenalty:
    """MOPO-auto: λ = exp(log λ) >= 0 follows J(λ) = λ (δ - E[u]) by Adam on log λ (Eq. 28-30): it rises while
    the model rows are more uncertain than δ and falls otherwise. The reward of an update uses the λ of its
    start; the dual step follows the actor step (like SAC's temperature)."""

    def __init__(self, init_lambda: float, target: float, lr: float, device: torch.device) -> None:
        self.target = float(target)
        self.log_lambda = torch.tensor(math.log(max(float(init_lambda), 1e-8)), device=device, requires_grad=True)
        self.opt = adam([self.log_lambda], lr, device)

    def reward(self, rew: torch.Tensor, unc: torch.Tensor) -> torch.Tensor:
        return L.mopo_penalised_reward(rew, unc, self.log_lambda.detach().exp())

    def update(self, unc: torch.Tensor) -> dict[str, torch.Tensor]:
        lam = self.log_lambda.detach().exp()
        if unc.numel() == 0:
            zero = lam.new_zeros(())
            return {"reward_penalty": zero, "uncertainty": zero, "mopo_lambda": lam, "mopo_lambda_loss": zero}
        u = unc.detach().mean()
        loss = L.mopo_lambda_loss(self.log_lambda, unc, self.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"reward_penalty": lam * u, "uncertainty": u, "mopo_lambda": lam, "mopo_lambda_loss": loss.detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda.detach(), "opt": portable_opt_state(self.opt)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        with torch.no_grad():
            self.log_lambda.copy_(state["log_lambda"])
        self.opt.load_state_dict(state["opt"])

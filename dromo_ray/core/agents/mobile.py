"""MOBILE's Bellman-inconsistency penalty (Sun et al., "Model-Bellman Inconsistency for Model-based Offline RL",
ICML 2023), subtracted from the Bellman target of the model rows.

Each elite member i of the dynamics ensemble gives its own Bellman estimate of a model transition's (s, a):

    T̂_i Q(s, a) = (1/N) Σ_j [ r_ij + γ V(s'_ij) ],   (s'_ij, r_ij) ~ T̂_i(· | s, a),  j = 1..N
    V(s') = min_k Q_ψ'_k(s', a'),  a' ~ π_θ(·|s')

and the uncertainty is their disagreement, the standard deviation over the K elites:

    U(s, a) = Std_i [ T̂_i Q(s, a) ]                         (unbiased, over i = 1..K)
    y(s, a) = r + γ (1 - d) V(s') - β U(s, a)   on model rows;   y = r + γ (1 - d) V(s')   on dataset rows.

Choices, each checked against the authors' code (github.com/yihaosun1124/mobile, ``policies/mobile.py`` and
``dynamics/ensemble_dynamics.py``; OfflineRL-Kit's ``policy/model_based/mobile.py`` is the same):

- the elites only, N samples from each elite's Gaussian (``AgentConfig.mobile_num_samples``, N = 10 there);
- V at a' sampled from the current policy π_θ, min over the target critics, no entropy term; the N·K draws of
  s' and of a' are independent across members (as in the code), so members that agree still differ by the
  Monte Carlo noise of their N-sample means;
- the penalty is computed for the model rows only: dataset rows are real transitions (the code zeroes their
  penalty; we never compute it);
- no termination mask inside U (the code has none: a member whose s' is terminal still contributes γ V(s'));
- U is detached (computed under no_grad) and enters the target like a reward penalty, outside the γ(1 - d) factor;
- ``mobile_penalty_form="bellman"`` (default) is the paper's T̂_i Q with the reward samples and γ; the code
  computes Std_i of (1/N) Σ_j V(s'_ij) only (no r, no γ): ``mobile_penalty_form="next_value"``. The two differ by
  the members' reward disagreement and a factor γ on the value part;
- the code clamps the target at 0 (``target_q.clamp(0)``), which neither equation has; we do not.

The sample distribution is the one the rollouts use (:meth:`EnsembleDynamics.predict`, ``var_scale`` included:
with ``dynamics.recalibrate`` the recalibrated variance; MOBILE's presets turn recalibration off).

Shapes: K elites, B_m model rows, N samples per elite, D_o observation dims, D_t = D_o + 1 model outputs.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from dromo_ray.core.agents.sac import SACLosses
from dromo_ray.core.config import DynamicsConfig
from dromo_ray.core.dynamics import EnsembleDynamics

PENALTY_FORMS = ("bellman", "next_value")


@dataclasses.dataclass(frozen=True)
class MobileLosses(SACLosses):
    """MOBILE: SAC on d_f with the model rows' Bellman target lowered by β U(s, a)."""

    mobile_penalty: torch.Tensor
    """E[β U(s, a)] over the model rows: what the target lost on average."""
    mobile_uncertainty: torch.Tensor
    """E[U(s, a)] over the model rows."""
    mobile_uncertainty_max: torch.Tensor
    """max U(s, a) over the model rows."""


def bellman_inconsistency(estimates: torch.Tensor) -> torch.Tensor:
    """U(s, a) = Std_i[(1/N) Σ_j T_ij]: estimates (N, K, B) of r_ij + γ V(s'_ij) (or V(s'_ij)) -> (B,).

    The mean over the N samples of member i is its Bellman estimate T̂_i Q(s, a); the unbiased standard deviation
    over the K members is the inconsistency (the authors' ``pred_next_qs.mean(0).std(0)``)."""
    assert estimates.dim() == 3 and estimates.shape[1] >= 2, (
        f"bellman_inconsistency: estimates (N, K>=2, B) expected, got {tuple(estimates.shape)}")
    return estimates.mean(0).std(0, correction=1)


class BellmanInconsistencyPenalty:
    """MOBILE's target penalty β U(s, a) (a ``TargetPenalty`` of :class:`~dromo_ray.core.agents.sac.SACAgent`).

    Owns a frozen copy of the trained ensemble on the agent's device (never the caller's module: loading a state
    writes into it). Its weights travel in ``state_dict()["dynamics"]``, so an agent restores from its own
    state alone (``restore_agent``) and a resumed run continues bitwise; the weights never change.
    """

    def __init__(self, dynamics: EnsembleDynamics, *, beta: float, num_samples: int, gamma: float,
                 form: str = "bellman", device: torch.device | str = "cpu") -> None:
        if form not in PENALTY_FORMS:
            raise ValueError(f"mobile penalty form {form!r} is not one of {', '.join(PENALTY_FORMS)}")
        if int(dynamics.elite_idx.numel()) < 2:
            raise ValueError(f"mobile: the penalty is a standard deviation over the elites; the ensemble has "
                             f"{int(dynamics.elite_idx.numel())} elite(s), needs >= 2")
        if num_samples < 1:
            raise ValueError(f"mobile: num_samples must be >= 1, got {num_samples}")
        self.dynamics = copy.deepcopy(dynamics).to(device).eval().requires_grad_(False)
        self.beta, self.num_samples, self.gamma, self.form = float(beta), int(num_samples), float(gamma), form

    @torch.no_grad()
    def uncertainty(self, obs: torch.Tensor, act: torch.Tensor, next_value: Callable[[torch.Tensor], torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
        """U(s, a) for obs (B, D_o), act (B, D_a) -> (B,); every sample drawn from ``generator``."""
        m = self.dynamics
        b, d_o = obs.shape[0], m.obs_dim
        mean, var = m.predict(obs, act, members=m.elite_idx)  # (K, B, D_t) each: [s' - s, r]
        k = mean.shape[0]
        eps = torch.randn((self.num_samples, *mean.shape), generator=generator, device=mean.device,
                          dtype=mean.dtype)
        y = mean + var.sqrt() * eps  # (N, K, B, D_t)
        next_obs = obs + y[..., :d_o]  # (N, K, B, D_o)
        v = next_value(next_obs.reshape(-1, d_o)).reshape(self.num_samples, k, b)  # (N, K, B)
        estimates = y[..., d_o] + self.gamma * v if self.form == "bellman" else v
        return bellman_inconsistency(estimates)

    def penalty(self, obs: torch.Tensor, act: torch.Tensor, next_value: Callable[[torch.Tensor], torch.Tensor],
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """β U(s, a) (B,) for the model rows, and the loss record's fields."""
        if obs.shape[0] == 0:
            zero = obs.new_zeros(())
            return obs.new_zeros(0), {"mobile_penalty": zero, "mobile_uncertainty": zero,
                                      "mobile_uncertainty_max": zero}
        u = self.uncertainty(obs, act, next_value, generator)
        pen = self.beta * u
        return pen, {"mobile_penalty": pen.mean(), "mobile_uncertainty": u.mean(), "mobile_uncertainty_max": u.max()}

    def state_dict(self) -> dict[str, Any]:
        return {"dynamics": self.dynamics.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "dynamics" in state:
            self.dynamics.load_state_dict(state["dynamics"])


def ensemble_from_state(state: dict[str, torch.Tensor]) -> EnsembleDynamics:
    """An :class:`EnsembleDynamics` shaped like ``state`` (members, widths, elites read from the tensors) with its
    weights loaded: how ``restore_agent`` rebuilds MOBILE's ensemble without the run's DynamicsConfig."""
    out_dim = int(state["max_logvar"].shape[-1])
    obs_dim = out_dim - 1
    act_dim = int(state["in_mean"].shape[0]) - obs_dim
    layer_keys = sorted((k for k in state if k.startswith("net.layers.") and k.endswith(".weight")),
                        key=lambda k: int(k.split(".")[2]))
    hidden = tuple(int(state[k].shape[-1]) for k in layer_keys)
    members, elites = int(state["max_logvar"].shape[0]), int(state["elite_idx"].numel())
    cfg = DynamicsConfig(ensemble_size=members, num_elites=elites, hidden_dims=hidden)
    model = EnsembleDynamics(obs_dim, act_dim, cfg)
    model.load_state_dict(state)
    return model

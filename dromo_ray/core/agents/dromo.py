"""DROMO's critic terms (Eq. 13 second and third terms, or Eq. 17) — and COMBO's, which is DROMO with α = 0.

Every extra critic input is planned here and evaluated by the agent in the same twin-critic forward as the batch:

- ``variance_form="action"`` (Eq. 13): M actions per d_f state from π^f = f·π^β + (1-f)·π, each drawn from π^β
  with probability f, else from π (f = weight of the DATASET, Theorem 4.2; Eq. 9 has it the other way round);
  B·M rows. The denominators are RELATIVE densities |D(s)| / N_ref from a
  :class:`~dromo_ray.core.density.StateDensity` (the normalisation beside Eq. 13, ``losses.py``).
- ``variance_form="strict"`` (Eq. 17): variance of Q across the batch; no extra rows. An ABLATION only: it
  pulls the Q-values of different states together.
- ``conservative_form="expectation"`` (Eq. 13 / COMBO Eq. 8): ρ states with an action from the current π
  (ρ = d^π_M̂(s)π(a|s)); one row per ρ-state.
- ``conservative_form="logsumexp"`` (COMBO practice, CQL(H)): per ρ-state M uniform actions, M from π(·|s),
  M from π(·|s'), importance-weighted by their proposal densities; 3M rows per ρ-state.
The ρ-states (the push-down states) are the model rows of the batch (``conservative_states="model"``, Eq. 8/13)
or every row of the d_f batch (``"mixed"``, OfflineRL-Kit's COMBO default); B_ρ of them. In both conservative
forms E_D Q is the mean over the dataset rows (s, a) of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch

from dromo_ray.core import losses as L
from dromo_ray.core.agents.sac import PolicyDist, SACLosses, UpdateInputs
from dromo_ray.core.density import StateDensity
from dromo_ray.core.nets import TanhGaussianActor


@dataclasses.dataclass(frozen=True)
class DromoLosses(SACLosses):
    """DROMO: Bellman + α·variance penalty + β·conservative (Eq. 13, or Eq. 17's strict variance, an ablation)."""

    variance_penalty: torch.Tensor
    conservative: torch.Tensor
    variance_to_bellman: torch.Tensor
    """variance_penalty / bellman: how strongly the variance term weighs against the Bellman term (not a loss)."""


@dataclasses.dataclass(frozen=True)
class ComboLosses(SACLosses):
    """COMBO: Bellman + β·conservative (Eq. 8; DROMO with α = 0)."""

    conservative: torch.Tensor


class DromoPlan(NamedTuple):
    """Extra critic rows of one update and what the loss needs besides their Q-values.

    obs (N, D_o), act (N, D_a) with N = n_var + n_rho; count (B,) relative density |D(s)| / N_ref of the
    variance rows (or None);
    log_proposal (B_ρ, 3M) for the log-sum-exp rows (or None); per_state: actions per state in each block.
    """

    obs: torch.Tensor | None
    act: torch.Tensor | None
    n_var: int
    var_per_state: int
    count: torch.Tensor | None
    n_rho: int
    rho_per_state: int
    log_proposal: torch.Tensor | None


class DromoTerms:
    """Critic terms of DROMO (α > 0) and COMBO (α = 0). All sampling uses the agent's generator."""

    def __init__(self, *, alpha: float, beta: float, f: float, num_actions: int, act_dim: int,
                 variance_form: str = "action", conservative_form: str = "logsumexp",
                 conservative_states: str = "model",
                 behavior: TanhGaussianActor | None = None, density: StateDensity | None = None,
                 report_variance: bool = True) -> None:
        if variance_form not in ("action", "strict") or conservative_form not in ("expectation", "logsumexp"):
            raise ValueError(f"unknown variance_form {variance_form!r} or conservative_form {conservative_form!r}")
        if conservative_states not in ("model", "mixed"):
            raise ValueError(f"unknown conservative_states {conservative_states!r} (model or mixed)")
        self.conservative_states = conservative_states
        self.alpha, self.beta, self.f = float(alpha), float(beta), float(f)
        self.num_actions, self.act_dim = int(num_actions), int(act_dim)
        self.variance_form, self.conservative_form = variance_form, conservative_form
        self.uses_action_variance = self.alpha > 0 and variance_form == "action"
        if self.uses_action_variance and self.f > 0 and behavior is None:
            raise ValueError("DROMO's variance over π^f needs the behaviour policy π^β (fit_behavior_policy)")
        if self.uses_action_variance and density is None:
            raise ValueError("DROMO's variance term needs a state density |D(s)| (ConstantDensity or KDEDensity)")
        self.behavior, self.density = behavior, density
        self.report_variance = report_variance  # False for COMBO, whose loss record has no variance term
        if behavior is not None:
            behavior.requires_grad_(False)
        self.log_uniform = -self.act_dim * math.log(2.0)  # log density of U([-1, 1]^{D_a})

    # ------------------------------------------------------------------------------------------------------
    def plan(self, x: UpdateInputs) -> DromoPlan:
        """Sample the extra critic inputs (no grad)."""
        obs, gen, m = x.obs, x.generator, self.num_actions
        b, n_real = obs.shape[0], x.n_real
        n_model = b - n_real
        obs_parts: list[torch.Tensor] = []
        act_parts: list[torch.Tensor] = []
        n_var = var_per_state = n_rho = rho_per_state = 0
        count = log_proposal = None

        if self.uses_action_variance:
            # π^f (Eq. 13): each action from π^β with probability f, else from π; one forward of each policy.
            a = x.pi.sample(gen, m)[0]  # (B, M, D_a)
            if self.f > 0:
                assert self.behavior is not None
                a_beta = _dist(self.behavior, obs).sample(gen, m)[0]
                from_beta = torch.rand((b, m, 1), generator=gen, device=obs.device) < self.f
                a = torch.where(from_beta, a_beta, a)
            assert self.density is not None
            count = self.density.relative_count(obs)  # |D(s)| / N_ref: the normalisation beside Eq. 13
            obs_parts.append(obs.unsqueeze(1).expand(-1, m, -1).reshape(b * m, -1))
            act_parts.append(a.reshape(b * m, -1))
            n_var, var_per_state = b * m, m

        if self.beta > 0 and n_real > 0 and n_model > 0:
            # push-down states: the model rows (ρ's states, Eq. 8/13) or the whole d_f batch ("mixed")
            rows = slice(n_real, None) if self.conservative_states == "model" else slice(None)
            s_rho, pi_rho, pi_next_rho = obs[rows], x.pi[rows], x.pi_next[rows]
            b_rho = s_rho.shape[0]
            if self.conservative_form == "expectation":
                a_rho = pi_rho.sample(gen)[0]  # (B_ρ, D_a): ρ(s, a) = d^π_M̂(s) π(a|s)
                obs_parts.append(s_rho)
                act_parts.append(a_rho)
                n_rho, rho_per_state = b_rho, 1
            else:
                a_unif = torch.rand((b_rho, m, self.act_dim), generator=gen, device=obs.device) * 2.0 - 1.0
                a_s, logp_s = pi_rho.sample(gen, m)
                a_sn, logp_sn = pi_next_rho.sample(gen, m)
                acts = torch.cat([a_unif, a_s, a_sn], 1)  # (B_ρ, 3M, D_a), all evaluated at the state s
                log_proposal = torch.cat([logp_s.new_full((b_rho, m), self.log_uniform), logp_s, logp_sn], 1)
                k = 3 * m
                obs_parts.append(s_rho.unsqueeze(1).expand(-1, k, -1).reshape(b_rho * k, -1))
                act_parts.append(acts.reshape(b_rho * k, -1))
                n_rho, rho_per_state = b_rho * k, k

        if not obs_parts:
            return DromoPlan(None, None, 0, 0, None, 0, 0, None)
        return DromoPlan(torch.cat(obs_parts), torch.cat(act_parts), n_var, var_per_state, count, n_rho,
                         rho_per_state, log_proposal)

    def extra_rows(self, plan: DromoPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if plan.obs is None else (plan.obs, plan.act)  # type: ignore[return-value]

    def losses(self, q: torch.Tensor, q_extra: torch.Tensor | None, plan: DromoPlan, n_real: int
               ) -> dict[str, torch.Tensor]:
        """q (E, B) on the batch, q_extra (E, N) on the planned rows -> {term: (E,)}."""
        e = q.shape[0]
        zero = q.new_zeros(e)
        out: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            if self.variance_form == "action":
                assert q_extra is not None and plan.count is not None
                q_var = q_extra[:, : plan.n_var].reshape(e, -1, plan.var_per_state)  # (E, B, M)
                out["variance_penalty"] = L.action_variance_penalty(q_var, plan.count, self.alpha)
            else:
                out["variance_penalty"] = L.strict_variance_penalty(q, self.alpha)
        elif self.report_variance:
            out["variance_penalty"] = zero
        if plan.n_rho > 0:
            assert q_extra is not None
            q_rho = q_extra[:, plan.n_var:].reshape(e, -1, plan.rho_per_state)  # (E, B_ρ, 1 or 3M)
            q_data = q[:, :n_real]
            if self.conservative_form == "expectation":
                out["conservative"] = L.conservative_expectation(q_rho[..., 0], q_data, self.beta)
            else:
                assert plan.log_proposal is not None
                out["conservative"] = L.conservative_logsumexp(q_rho, plan.log_proposal, q_data, self.beta)
        else:
            out["conservative"] = zero
        return out

    def metrics(self, terms: dict[str, torch.Tensor], bellman: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diagnostics beside the loss terms (summed over the twins): ``variance_to_bellman`` for DROMO."""
        if not self.report_variance:
            return {}
        return {"variance_to_bellman": terms["variance_penalty"].detach() / bellman.detach().clamp_min(1e-12)}

    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.behavior is not None:
            state["behavior"] = self.behavior.state_dict()
        if self.density is not None:
            state["density"] = self.density.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.behavior is not None and "behavior" in state:
            self.behavior.load_state_dict(state["behavior"])
        if self.density is not None and "density" in state:
            self.density.load_state_dict(state["density"])


def _dist(actor: TanhGaussianActor, obs: torch.Tensor) -> PolicyDist:
    return PolicyDist(*actor.dist_params(obs))

"""The loss terms of DROMO (Eq. 13, 14, 17), COMBO (Eq. 8), SAC and MOPO (appendix B), as pure functions.

Shapes: E critics (the twin ensemble, E = 2), B rows of a d_f batch, M sampled actions per state, K actions of
the log-sum-exp estimate per ρ-state. Every critic term returns one value per critic, shape (E,): the twins are
independent networks, each minimising its own Eq. 13; the agent sums them (CleanRL's ``qf1_loss + qf2_loss``).

Notation (the paper's): f is the weight of the DATASET, d_f = f·d + (1-f)·ρ and π^f = f·π^β + (1-f)·π, as in
Theorem 4.2 and the text under Eq. 13. Eq. 9 writes d_f = f·ρ + (1-f)·d, the other way round; we follow
Theorem 4.2 (and ``AgentConfig.f``).
"""

from __future__ import annotations

import functools
import math

import torch

VARIANCE_EPS = 1e-8
"""ε inside the square roots of the variance terms (see :func:`action_variance_penalty`)."""


def soft_bellman_target(rew: torch.Tensor, done: torch.Tensor, next_q: torch.Tensor, next_logp: torch.Tensor,
                        gamma: float, ent_coef: torch.Tensor | float) -> torch.Tensor:
    """T̂^π Q'(s, a) = r + γ (1 - done) (min_j Q'_j(s', a') - c · log π(a'|s')),  a' ~ π(·|s')   (SAC's backup).

    The empirical Bellman backup of Eq. 6 (dataset rows) and Eq. 7 (model rows) on the target critics Q_ψ'
    (min of the twins), with SAC's entropy bonus (temperature c) added inside the backup: Eq. 6/7 themselves
    have no entropy term (see :func:`deterministic_bellman_target`, ``AgentConfig.deterministic_backup``).
    rew (B,), done (B,) 0/1, next_q (E, B) target-critic values at (s', a'), next_logp (B,) -> (B,).
    """
    soft_v = next_q.min(0).values - ent_coef * next_logp
    return rew + gamma * (1.0 - done) * soft_v


def deterministic_bellman_target(rew: torch.Tensor, done: torch.Tensor, next_q: torch.Tensor,
                                 gamma: float) -> torch.Tensor:
    """T̂^π Q'(s, a) = r + γ (1 - done) min_j Q'_j(s', a'),  a' ~ π(·|s')   (Eq. 6/7 as written).

    No entropy term in the target: the "deterministic backup" of CQL's and OfflineRL-Kit's COMBO code.
    rew (B,), done (B,) 0/1, next_q (E, B) -> (B,).
    """
    return rew + gamma * (1.0 - done) * next_q.min(0).values


def bellman_error(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½ E_{d_f}[(Q_ψ(s, a) - T̂^π Q_ψ'(s, a))²]   (Eq. 13, first term).  q (E, B), target (B,) -> (E,).

    Convention: we keep the ½ of Eq. 13 (and of Eq. 8, COMBO's objective as the paper restates it). The
    published COMBO/CQL code minimises the plain mean square (CQL's ``nn.MSELoss``; OfflineRL-Kit's COMBO
    ``((q - target_q) ** 2).mean()``) beside β_pub · (conservative term), so its gradient ratio conservative :
    Bellman is β_pub : 2(Q - T̂Q); ours is β : (Q - T̂Q). The ratios agree when β = β_pub / 2, which is how the
    presets in tune_configs/ set β. α's term sits beside the same ½.
    """
    return 0.5 * (q - target.detach()).square().mean(-1)


@functools.lru_cache(maxsize=16)
def _rounded_sqrt(eps: float, dtype: torch.dtype) -> float:
    # sqrt(ε) as x's dtype computes it (once per (ε, dtype); a CPU scalar, never a device sync).
    return float(torch.tensor(eps, dtype=dtype).sqrt())


def _sqrt_eps(x: torch.Tensor, eps: float) -> torch.Tensor:
    # sqrt(x + ε) - sqrt(ε): exactly 0 at x = 0 and with a finite gradient there (sqrt's is infinite at 0).
    return (x + eps).sqrt() - _rounded_sqrt(eps, x.dtype)


def action_variance_penalty(q_samples: torch.Tensor, count: torch.Tensor, alpha: float,
                            eps: float = VARIANCE_EPS) -> torch.Tensor:
    """α · E_{s~d_f}[ sqrt( Var_{a~π^f(·|s)} Q_ψ(s, a) / n(s) ) ]   (Eq. 13, second term).

    q_samples (E, B, M): Q_ψ at M actions per state drawn from π^f (actions detached, so the term is
    differentiable in ψ only); count (B,): the denominator n(s) -> (E,).

    Normalisation (our choice, beside Eq. 13): Eq. 13 divides by |D| · d^{π^β}(s) ≈ |D(s)|, a count of order
    |D| ≈ 1e6 on D4RL, so that α · sqrt(Var / |D(s)|) ≈ α · std / 1000 and DROMO with α in any usable range is
    COMBO; α's meaning would also depend on |D| and on the estimator. The agent therefore passes the RELATIVE
    density n(s) = |D(s)| / N_ref, N_ref = the estimator's mean count over dataset states (``density.py``):
    the same objective as Eq. 13 with Eq. 13's weight α_13 = α · sqrt(N_ref). At a state of average dataset
    density both estimators give α · std_{π^f} Q; the KDE's state dependence (scarce states penalised more,
    Lemma 4.1) is kept as the density ratio d^{π^β}(s) / E_D d^{π^β}.

    The variance is the unbiased sample variance over the M actions. A small ε sits inside the square root,
    as sqrt(x + ε) - sqrt(ε), so that the gradient is finite when the variance is 0 (a deterministic π^f)
    while the value there stays exactly 0.
    """
    assert q_samples.dim() == 3 and q_samples.shape[-1] >= 2, f"q_samples (E, B, M>=2), got {tuple(q_samples.shape)}"
    var = q_samples.var(-1, correction=1)  # (E, B)
    return alpha * _sqrt_eps(var / count, eps).mean(-1)


def strict_variance_penalty(q: torch.Tensor, alpha: float, eps: float = VARIANCE_EPS) -> torch.Tensor:
    """α · sqrt( Var_{d_f}(Q_ψ(s, a)) / n )   (Eq. 17, the strict variant: an ABLATION).

    Kept for the paper's linear/NTK analysis (sections 4.2-4.3); as a training objective it pulls the Q-values
    of DIFFERENT states together (the variance is across the batch), which is not a penalty on uncertainty at
    a state. Never a default; ``AgentConfig.variance_form``.

    q (E, B): Q_ψ on the d_f batch; the unbiased variance is taken ACROSS the batch and n = B, the number of
    d_f samples the variance is estimated from (Theorem 3.1's n) -> (E,). Same ε treatment as Eq. 13's term.
    """
    n = q.shape[-1]
    return alpha * _sqrt_eps(q.var(-1, correction=1) / n, eps)


def conservative_expectation(q_rho: torch.Tensor, q_data: torch.Tensor, beta: float) -> torch.Tensor:
    """β · (E_{s,a~ρ}[Q_ψ(s, a)] - E_{s,a~D}[Q_ψ(s, a)])   (Eq. 13 third term; COMBO's Eq. 8).

    q_rho (E, B_ρ): Q_ψ at model-rollout states with actions from the current π (ρ = d^π_M̂(s) π(a|s), as COMBO
    defines it); q_data (E, B_D): Q_ψ at dataset (s, a) -> (E,).
    """
    return beta * (q_rho.mean(-1) - q_data.mean(-1))


def conservative_logsumexp(q_rho_actions: torch.Tensor, log_proposal: torch.Tensor, q_data: torch.Tensor,
                           beta: float) -> torch.Tensor:
    """β · (E_{s~ρ}[ log ∫ exp Q_ψ(s, a) da ] - E_{s,a~D}[Q_ψ(s, a)])   (the practical COMBO / CQL(H) form).

    The integral is estimated per ρ-state by importance sampling over K actions from three proposals (M uniform
    on [-1, 1]^{D_a}, M from π(·|s), M from π(·|s')), each weighted by its own proposal density:
    log ∫ exp Q da ≈ logsumexp_k(Q_k - log q_k(a_k)) - log K.
    q_rho_actions (E, B_ρ, K); log_proposal (B_ρ, K) = log q_k(a_k) (detached); q_data (E, B_D) -> (E,).
    Working implementations drop the constant -log K; it moves the value, not the gradient. We keep it so that
    the term is an estimate of the soft maximum it stands for.
    """
    k = q_rho_actions.shape[-1]
    soft_max = torch.logsumexp(q_rho_actions - log_proposal.detach(), dim=-1) - math.log(k)  # (E, B_ρ)
    return beta * (soft_max.mean(-1) - q_data.mean(-1))


def sac_actor_loss(q_pi: torch.Tensor, logp: torch.Tensor, ent_coef: torch.Tensor | float) -> torch.Tensor:
    """-(E_{s~d_f, a~π}[min_j Q_j(s, a)] + R(π)),  R(π) = c · H(π)   (Eq. 14 as a loss; SAC's entropy for R).

    q_pi (E, B): critics at reparameterised a ~ π_θ(·|s); logp (B,) -> scalar.
    """
    return (ent_coef * logp - q_pi.min(0).values).mean()


def entropy_coef_loss(log_ent_coef: torch.Tensor, logp: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """J(c) = E[-c (log π(a|s) + H̄)], c = exp(log c)   (SAC's automatic temperature).  logp (B,) -> scalar."""
    return -(log_ent_coef.exp() * (logp.detach() + target_entropy)).mean()


def mopo_penalised_reward(rew: torch.Tensor, unc: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """r̄(s, a) = r̂(s, a) - λ u(s, a)   (MOPO, section 2.3).  rew (B,), unc (B,) -> (B,)."""
    return rew - lam * unc


def mopo_lambda_loss(log_lambda: torch.Tensor, unc: torch.Tensor, target: float) -> torch.Tensor:
    """J(λ) = λ · (δ - E_ρ[u(s, a)]),  λ = exp(log λ) >= 0   (appendix B.1, Eq. 28-30).

    Eq. 28: λ* = argmin_λ E_ρ[-λ H(T̂(s, a)) + λ δ] = argmin_λ λ (δ - E[H]). With u the entropy signal in place
    of H, ∂J/∂log λ = λ (δ - E[u]): when the model is more uncertain than allowed (E[u] > δ) the gradient is
    negative and descent raises λ; when E[u] < δ it lowers λ. (Eq. 30 writes α log T̂ + α δ; -log T̂ is the
    entropy in expectation, so it is the same objective.)  unc (B,) -> scalar.
    """
    return log_lambda.exp() * (target - unc.detach().mean())

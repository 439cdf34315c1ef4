"""Tabular DROMO: a finite-MDP version of the critic (Eq. 13, Lemma 4.1 / Eq. 15) for checking the paper's claims.

(One file over ~500 lines, for one reason: it is one chain of exact computations, the paper's Section 3 to
Theorem 4.2 in order, each step using the previous ones; nothing imports it but the tests.)

Everything is numpy float64 (torch float64 only for autograd of the Eq. 13 objective). Shapes: S states,
A actions; a Q-table, a policy and a state-action distribution are all ``(S, A)``; a model is ``P (S, A, S)``
with ``P[s, a, s'] = P(s'|s, a)``, ``r (S, A)``, a discount ``gamma`` and an initial distribution ``mu (S,)``.

Conventions (the paper's Section 3 and Theorem 4.2, and DESIGN.md):

* ``f`` is the weight of the *dataset*: ``d_f = f·d + (1 - f)·rho`` and ``pi_f = f·pi_beta + (1 - f)·pi``.
  The paper's Eq. 9 (in the COMBO recap) writes ``d_f = f·rho + (1 - f)·d``, i.e. the other way round; we
  follow Section 3 / Theorem 4.2 (``T_hat = f·T_{M~} + (1 - f)·T_{M^}``: the dataset MDP gets ``f``), so
  ``f = 1`` means "dataset only" throughout.
* ``rho(s, a) = d^pi_{M^}(s)·pi(a|s)``: the normalised discounted occupancy of ``pi`` in the model used for
  rollouts, ``d^pi(s) = (1 - gamma)·mu^T (I - gamma P_pi)^{-1}``.
* ``d(s, a) = d^{pi_beta}(s)·pi_beta(a|s)`` in the true MDP (the dataset's distribution, no sampling error),
  and ``|D(s)| = |D|·d^{pi_beta}(s)``.
* ``T_hat`` (the backup in Eq. 13/15) is the Bellman operator of a "backup MDP". Theorem 4.2 uses
  ``f·T_{M~} + (1 - f)·T_{M^}``; since the backup is affine in ``(P, r)`` this is the backup of the mixed MDP
  :func:`mix_mdps` ``(f, M~, M^)``. :func:`make_problem` builds it with ``M~ = `` the true MDP (no sampling
  error in the dataset part).

What the Lemma 4.1 update (Eq. 15) is, exactly (see :func:`lemma41_surrogate`): the paper sets the derivative
of Eq. 13 to zero after two replacements in the variance term's derivative,

1. ``d/dQ(s,a) sqrt(Var_{pi_f} Q(s,.)) = pi_f(a|s)·(Q(s,a) - m(s)) / sqrt(Var)`` with
   ``m(s) = sum_b pi_f(b|s) Q(s,b)`` is replaced by ``pi_f(a|s)·(1 - pi_f(a|s))·Q(s,a) / sqrt(Var)`` -- the
   mean ``m(s)`` is replaced by the action's own share ``pi_f(a|s)·Q(s,a)`` (the other actions' part of the
   mean is dropped), so the penalty shrinks Q towards 0 instead of towards its ``pi_f``-mean;
2. ``d_f(s)·pi_f(a|s)`` is replaced by ``d_f(s, a)``; these differ by
   ``f(1 - f)(d^{pi_beta}(s) - rho(s))(pi_beta(a|s) - pi(a|s))``;

and it evaluates ``sqrt(Var)`` at ``Q^k`` (a constant in the k-th problem). Eq. 15 is then the exact
minimiser of the quadratic :func:`lemma41_surrogate`, and a fixed point ``Q*`` of Eq. 15 has zero surrogate
gradient at ``Q = Q^k = Q*``. It is *not* a stationary point of Eq. 13 when ``alpha > 0``: the exact variance
gradient sums to zero over actions (Var is shift invariant), the replaced one does not; when
``d_f(s, a) = d_f(s) pi_f(a|s)`` the two agree at a state only if ``Q(s, .) = 0`` (``A >= 2``), and
generically the same holds otherwise. The exact argmin of Eq. 13 has its own closed form
(:func:`eq13_argmin`): a group-lasso-type shrinkage of the *centred* target towards its ``pi_f``-mean.

``Var = 0`` in Eq. 15: the factor ``1 - lambda/(lambda + sqrt(Var·|D(s)|))`` is 0 where ``lambda > 0`` (the
surrogate's penalty weight is infinite) and is taken as 1 where ``lambda = 0`` (no penalty, 0/0). So
``Q = 0`` is always a (spurious) fixed point of Eq. 15 when ``alpha > 0`` and every ``pi_f(a|s) < 1``:
iterations are started from the COMBO (``alpha = 0``) fixed point, never from zeros.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

FloatArray = npt.NDArray[np.float64]

__all__ = [
    "DromoProblem",
    "FixedPoint",
    "OneStepGap",
    "TabularMDP",
    "affine_in_beta",
    "chi_terms",
    "combo_fixed_point",
    "combo_update",
    "conservative_target",
    "c_var",
    "eq13_argmin",
    "eq13_fixed_point",
    "eq13_gradient",
    "eq13_objective",
    "eq13_optimality_violation",
    "eq15_fixed_point",
    "eq15_jacobian",
    "eq15_update",
    "expected_under",
    "f_interpolate",
    "gap",
    "lemma41_gradient",
    "lemma41_surrogate",
    "make_problem",
    "mix_mdps",
    "occupancy",
    "one_step_gap",
    "perturb_mdp",
    "policy_evaluation",
    "policy_variance",
    "q_pi",
    "random_mdp",
    "random_policy",
    "shrink_factor",
    "state_occupancy",
]


# ----------------------------------------------------------------------------------------------------------
# Finite MDPs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TabularMDP:
    """A finite discounted MDP. ``P (S, A, S)`` row-stochastic in the last axis, ``r (S, A)``, ``mu (S,)``."""

    P: FloatArray
    r: FloatArray
    gamma: float
    mu: FloatArray

    def __post_init__(self) -> None:
        P = np.asarray(self.P, dtype=np.float64)
        r = np.asarray(self.r, dtype=np.float64)
        mu = np.asarray(self.mu, dtype=np.float64)
        if P.ndim != 3 or P.shape[0] != P.shape[2]:
            raise ValueError(f"P must be (S, A, S), got {P.shape}")
        if r.shape != P.shape[:2]:
            raise ValueError(f"r must be (S, A) = {P.shape[:2]}, got {r.shape}")
        if mu.shape != (P.shape[0],):
            raise ValueError(f"mu must be (S,) = ({P.shape[0]},), got {mu.shape}")
        if np.any(P < 0) or not np.allclose(P.sum(-1), 1.0, atol=1e-10):
            raise ValueError("P(.|s, a) must be probability vectors")
        if np.any(mu < 0) or not np.isclose(mu.sum(), 1.0, atol=1e-10):
            raise ValueError("mu must be a probability vector")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "r", r)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "gamma", float(self.gamma))

    @property
    def n_states(self) -> int:
        return int(self.P.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.P.shape[1])

    def next_value(self, q: FloatArray, pi: FloatArray) -> FloatArray:
        """``(P^pi Q)(s, a) = sum_{s'} P(s'|s, a) sum_{a'} pi(a'|s') Q(s', a')``, shape ``(S, A)``."""
        return self.P @ (pi * q).sum(-1)

    def backup(self, q: FloatArray, pi: FloatArray) -> FloatArray:
        """The Bellman backup ``T^pi Q = r + gamma P^pi Q``, shape ``(S, A)``."""
        return self.r + self.gamma * self.next_value(q, pi)

    def policy_matrix(self, pi: FloatArray) -> FloatArray:
        """``P^pi`` as an ``(S·A, S·A)`` matrix: ``P^pi[(s, a), (s', a')] = P(s'|s, a) pi(a'|s')``."""
        S, A = self.n_states, self.n_actions
        return (self.P[:, :, :, None] * pi[None, None, :, :]).reshape(S * A, S * A)

    def state_matrix(self, pi: FloatArray) -> FloatArray:
        """``P_pi[s, s'] = sum_a pi(a|s) P(s'|s, a)``, shape ``(S, S)``."""
        return np.einsum("sa,sat->st", pi, self.P)


def _check_policy(pi: FloatArray, S: int, A: int, name: str = "pi") -> FloatArray:
    pi = np.asarray(pi, dtype=np.float64)
    if pi.shape != (S, A):
        raise ValueError(f"{name} must be (S, A) = ({S}, {A}), got {pi.shape}")
    if np.any(pi < 0) or not np.allclose(pi.sum(-1), 1.0, atol=1e-10):
        raise ValueError(f"{name}(.|s) must be probability vectors")
    return pi


def random_mdp(
    rng: np.random.Generator,
    n_states: int,
    n_actions: int,
    *,
    gamma: float = 0.9,
    reward_range: tuple[float, float] = (0.0, 1.0),
    concentration: float = 1.0,
) -> TabularMDP:
    """A random MDP: ``P(.|s, a) ~ Dirichlet(concentration)``, ``r ~ U(reward_range)``, ``mu ~ Dirichlet(1)``.

    All randomness comes from ``rng``; Dirichlet draws have full support almost surely, so every
    occupancy is positive and ``d_f > 0`` everywhere.
    """
    P = rng.dirichlet(np.full(n_states, concentration), size=(n_states, n_actions))
    r = rng.uniform(reward_range[0], reward_range[1], size=(n_states, n_actions))
    mu = rng.dirichlet(np.ones(n_states))
    return TabularMDP(P=P, r=r, gamma=gamma, mu=mu)


def random_policy(rng: np.random.Generator, n_states: int, n_actions: int, concentration: float = 1.0) -> FloatArray:
    """A random stochastic policy ``(S, A)``, each row ``~ Dirichlet(concentration)``."""
    return rng.dirichlet(np.full(n_actions, concentration), size=n_states)


def perturb_mdp(mdp: TabularMDP, rng: np.random.Generator, noise: float) -> TabularMDP:
    """A "learned model" of ``mdp``: ``P^ = (1 - noise) P + noise·Dirichlet(1)``, ``r^ = r + noise·U(-1, 1)``.

    ``mu`` and ``gamma`` are kept. ``noise`` in ``[0, 1]``.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    S, A = mdp.n_states, mdp.n_actions
    P = (1.0 - noise) * mdp.P + noise * rng.dirichlet(np.ones(S), size=(S, A))
    r = mdp.r + noise * rng.uniform(-1.0, 1.0, size=(S, A))
    return TabularMDP(P=P, r=r, gamma=mdp.gamma, mu=mdp.mu)


def mix_mdps(weight: float, first: TabularMDP, second: TabularMDP) -> TabularMDP:
    """The MDP whose backup is ``weight·T_first + (1 - weight)·T_second`` (the backup is affine in P, r)."""
    if first.gamma != second.gamma or not np.allclose(first.mu, second.mu):
        raise ValueError("mixed MDPs must share gamma and mu")
    return TabularMDP(
        P=weight * first.P + (1.0 - weight) * second.P,
        r=weight * first.r + (1.0 - weight) * second.r,
        gamma=first.gamma,
        mu=first.mu,
    )


def q_pi(mdp: TabularMDP, pi: FloatArray) -> FloatArray:
    """``Q^pi`` by one linear solve of ``(I - gamma P^pi) Q = r`` (``S·A`` unknowns), shape ``(S, A)``."""
    pi = _check_policy(pi, mdp.n_states, mdp.n_actions)
    n = mdp.n_states * mdp.n_actions
    q = np.linalg.solve(np.eye(n) - mdp.gamma * mdp.policy_matrix(pi), mdp.r.reshape(n))
    return q.reshape(mdp.n_states, mdp.n_actions)


def policy_evaluation(mdp: TabularMDP, pi: FloatArray, *, tol: float = 1e-12, max_iter: int = 10_000) -> FloatArray:
    """``Q^pi`` by iterating ``Q <- T^pi Q`` from zeros until the sup-norm change is below ``tol``."""
    pi = _check_policy(pi, mdp.n_states, mdp.n_actions)
    q = np.zeros_like(mdp.r)
    for _ in range(max_iter):
        q_new = mdp.backup(q, pi)
        if np.max(np.abs(q_new - q)) < tol:
            return q_new
        q = q_new
    raise RuntimeError(f"policy evaluation did not converge in {max_iter} iterations")


def state_occupancy(mdp: TabularMDP, pi: FloatArray) -> FloatArray:
    """Normalised discounted state occupancy ``d^pi(s) = (1 - gamma) mu^T (I - gamma P_pi)^{-1}``, ``(S,)``."""
    pi = _check_policy(pi, mdp.n_states, mdp.n_actions)
    S = mdp.n_states
    d = np.linalg.solve((np.eye(S) - mdp.gamma * mdp.state_matrix(pi)).T, (1.0 - mdp.gamma) * mdp.mu)
    return d


def occupancy(mdp: TabularMDP, pi: FloatArray) -> FloatArray:
    """State-action occupancy ``d^pi(s)·pi(a|s)``, shape ``(S, A)``, sums to 1."""
    return state_occupancy(mdp, pi)[:, None] * pi


def f_interpolate(f: float, dataset_term: FloatArray, rollout_term: FloatArray) -> FloatArray:
    """``f·dataset_term + (1 - f)·rollout_term``: ``d_f`` from ``(d, rho)``, ``pi_f`` from ``(pi_beta, pi)``.

    ``f`` weighs the dataset, as in Section 3 and Theorem 4.2 (Eq. 9 writes it the other way round).
    """
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"f must be in [0, 1], got {f}")
    return f * dataset_term + (1.0 - f) * rollout_term


def expected_under(q: FloatArray, dist: FloatArray) -> float:
    """``E_{(s, a) ~ dist}[Q(s, a)]`` for a state-action distribution ``dist (S, A)``."""
    return float(np.sum(dist * q))


def gap(q: FloatArray, d: FloatArray, rho: FloatArray) -> float:
    """Eq. 16's gap ``E_d[Q] - E_rho[Q]``."""
    return float(np.sum((d - rho) * q))


def policy_variance(q: FloatArray, p: FloatArray) -> FloatArray:
    """``Var_{a ~ p(.|s)} Q(s, a)`` for every state, shape ``(S,)`` (the population variance under ``p``)."""
    m = (p * q).sum(-1, keepdims=True)
    return np.maximum((p * (q - m) ** 2).sum(-1), 0.0)


# ----------------------------------------------------------------------------------------------------------
# One DROMO critic problem
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DromoProblem:
    """Everything one tabular DROMO critic iteration needs (Eq. 13 / Eq. 15).

    backup_mdp: the MDP whose Bellman operator is ``T_hat`` in Eq. 13/15.
    pi, pi_beta: the evaluated policy and the behaviour policy, ``(S, A)``.
    rho: ``d^pi_{M^}(s) pi(a|s)``, the rollout occupancy, ``(S, A)``.
    d: ``d^{pi_beta}(s) pi_beta(a|s)``, the dataset distribution, ``(S, A)``.
    d_beta_state: ``d^{pi_beta}(s)``, ``(S,)``.
    f: weight of the dataset in ``d_f`` and ``pi_f``. alpha: Eq. 13's variance weight. beta: the
    conservative weight. dataset_size: ``|D|``.
    """

    backup_mdp: TabularMDP
    pi: FloatArray
    pi_beta: FloatArray
    rho: FloatArray
    d: FloatArray
    d_beta_state: FloatArray
    f: float
    alpha: float
    beta: float
    dataset_size: float

    def __post_init__(self) -> None:
        S, A = self.backup_mdp.n_states, self.backup_mdp.n_actions
        object.__setattr__(self, "pi", _check_policy(self.pi, S, A, "pi"))
        object.__setattr__(self, "pi_beta", _check_policy(self.pi_beta, S, A, "pi_beta"))
        for name in ("rho", "d"):
            x = np.asarray(getattr(self, name), dtype=np.float64)
            if x.shape != (S, A) or np.any(x < 0) or not np.isclose(x.sum(), 1.0, atol=1e-9):
                raise ValueError(f"{name} must be a distribution over (S, A) = ({S}, {A})")
            object.__setattr__(self, name, x)
        dbs = np.asarray(self.d_beta_state, dtype=np.float64)
        if dbs.shape != (S,) or np.any(dbs <= 0):
            raise ValueError("d_beta_state must be (S,) and positive (|D(s)| = |D| d^{pi_beta}(s) > 0)")
        object.__setattr__(self, "d_beta_state", dbs)
        if not 0.0 <= self.f <= 1.0:
            raise ValueError(f"f must be in [0, 1], got {self.f}")
        if self.alpha < 0 or self.beta < 0 or self.dataset_size <= 0:
            raise ValueError("need alpha >= 0, beta >= 0, dataset_size > 0")
        if np.any(self.d_f <= 0):
            raise ValueError("d_f must be positive everywhere (Eq. 15 divides by it)")

    def with_(self, **changes: float) -> DromoProblem:
        """A copy with some scalars changed (e.g. ``problem.with_(beta=2.0)``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def n_states(self) -> int:
        return self.backup_mdp.n_states

    @property
    def n_actions(self) -> int:
        return self.backup_mdp.n_actions

    @cached_property
    def d_f(self) -> FloatArray:
        """``d_f = f·d + (1 - f)·rho``, ``(S, A)``."""
        return f_interpolate(self.f, self.d, self.rho)

    @cached_property
    def d_f_state(self) -> FloatArray:
        """The state marginal ``d_f(s)``, ``(S,)``."""
        return self.d_f.sum(-1)

    @cached_property
    def pi_f(self) -> FloatArray:
        """``pi_f = f·pi_beta + (1 - f)·pi``, ``(S, A)``."""
        return f_interpolate(self.f, self.pi_beta, self.pi)

    @cached_property
    def lam(self) -> FloatArray:
        """Lemma 4.1's ``lambda(s, a) = alpha (1 - pi_f(a|s))``, ``(S, A)``."""
        return self.alpha * (1.0 - self.pi_f)

    @cached_property
    def counts(self) -> FloatArray:
        """``|D(s)| = |D|·d^{pi_beta}(s)``, ``(S,)``."""
        return self.dataset_size * self.d_beta_state

    @cached_property
    def kappa(self) -> FloatArray:
        """The conservative shift ``(rho - d) / d_f``, ``(S, A)``."""
        return (self.rho - self.d) / self.d_f

    @cached_property
    def variance_weight(self) -> FloatArray:
        """Eq. 13's per-state weight of ``sqrt(Var)``: ``alpha·d_f(s) / sqrt(|D(s)|)``, ``(S,)``."""
        return self.alpha * self.d_f_state / np.sqrt(self.counts)

    def backup(self, q: FloatArray) -> FloatArray:
        """``T_hat^pi Q``, ``(S, A)``."""
        return self.backup_mdp.backup(q, self.pi)

    @cached_property
    def _whitened_penalty(self) -> tuple[FloatArray, FloatArray]:
        """Eigen-decomposition of ``W^{-1/2} (diag(pi_f) - pi_f pi_f^T) W^{-1/2}`` per state, ``W = diag(d_f(s, .))``.

        Returns eigenvalues ``(S, A)`` (tiny ones set to 0) and eigenvectors ``(S, A, A)``.
        """
        p = self.pi_f
        m = np.einsum("sa,ab->sab", p, np.eye(self.n_actions)) - p[:, :, None] * p[:, None, :]
        iw = 1.0 / np.sqrt(self.d_f)
        k = iw[:, :, None] * m * iw[:, None, :]
        lam, vec = np.linalg.eigh(k)
        lam = np.where(lam > 1e-12 * np.max(np.abs(lam), axis=-1, keepdims=True), lam, 0.0)
        return lam, vec


def make_problem(
    true_mdp: TabularMDP,
    pi: FloatArray,
    pi_beta: FloatArray,
    *,
    f: float,
    alpha: float,
    beta: float,
    dataset_size: float,
    model_mdp: TabularMDP | None = None,
    backup_mdp: TabularMDP | None = None,
) -> DromoProblem:
    """Build a :class:`DromoProblem`.

    ``d``, ``d^{pi_beta}(s)`` come from ``pi_beta`` in ``true_mdp`` (the dataset, no sampling error).
    ``rho`` is the occupancy of ``pi`` in ``model_mdp`` (default: ``true_mdp``, i.e. a perfect model).
    ``T_hat`` is the backup of ``backup_mdp``; by default Theorem 4.2's ``f·T_{true} + (1 - f)·T_{model}``
    (which is ``T_{true}`` when no model is given).
    """
    model = true_mdp if model_mdp is None else model_mdp
    backup = mix_mdps(f, true_mdp, model) if backup_mdp is None else backup_mdp
    return DromoProblem(
        backup_mdp=backup,
        pi=pi,
        pi_beta=pi_beta,
        rho=occupancy(model, pi),
        d=occupancy(true_mdp, pi_beta),
        d_beta_state=state_occupancy(true_mdp, pi_beta),
        f=f,
        alpha=alpha,
        beta=beta,
        dataset_size=dataset_size,
    )


# ----------------------------------------------------------------------------------------------------------
# COMBO (alpha = 0) and Lemma 4.1 (Eq. 15)
# ----------------------------------------------------------------------------------------------------------


def conservative_target(problem: DromoProblem, q_k: FloatArray) -> FloatArray:
    """``T_hat Q^k - beta (rho - d) / d_f``: the braces of Eq. 15, ``(S, A)``."""
    return problem.backup(q_k) - problem.beta * problem.kappa


def combo_update(problem: DromoProblem, q_k: FloatArray) -> FloatArray:
    """COMBO's tabular update (Yu et al. 2021): the argmin of Eq. 8 with the target frozen at ``Q^k``.

    Setting ``d_f (Q - T_hat Q^k) + beta (rho - d) = 0`` gives ``Q = T_hat Q^k - beta (rho - d)/d_f``.
    """
    return problem.backup(q_k) - problem.beta * (problem.rho - problem.d) / problem.d_f


def combo_fixed_point(problem: DromoProblem) -> FloatArray:
    """The fixed point of :func:`combo_update`: ``(I - gamma P^pi_hat)^{-1} (r_hat - beta (rho - d)/d_f)``."""
    mdp = problem.backup_mdp
    n = problem.n_states * problem.n_actions
    rhs = (mdp.r - problem.beta * problem.kappa).reshape(n)
    q = np.linalg.solve(np.eye(n) - mdp.gamma * mdp.policy_matrix(problem.pi), rhs)
    return q.reshape(problem.n_states, problem.n_actions)


def affine_in_beta(problem: DromoProblem) -> tuple[FloatArray, FloatArray]:
    """With ``alpha = 0`` the fixed point is affine in beta: returns ``(Q_0, Q_1)`` with ``Q_beta = Q_0 + beta Q_1``."""
    q0 = combo_fixed_point(problem.with_(beta=0.0))
    q1 = combo_fixed_point(problem.with_(beta=1.0)) - q0
    return q0, q1


def shrink_factor(problem: DromoProblem, q_k: FloatArray) -> FloatArray:
    """Eq. 15's factor ``1 - lambda / (lambda + sqrt(Var_{pi_f}(Q^k(s,.)) |D(s)|))``, ``(S, A)``.

    The variance is that of ``Q^k`` (the previous iterate), as in the proof of Theorem 4.2 (Eq. 32).
    With ``Var = 0``: 0 where ``lambda > 0``, and 1 where ``lambda = 0`` (0/0, no penalty).
    """
    root = np.sqrt(policy_variance(q_k, problem.pi_f) * problem.counts)[:, None]
    lam = problem.lam
    denom = lam + root
    safe = np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, root / safe, 1.0) * np.ones_like(lam)


def eq15_update(problem: DromoProblem, q_k: FloatArray) -> FloatArray:
    """Lemma 4.1's closed-form update (Eq. 15): ``shrink_factor(Q^k) * (T_hat Q^k - beta (rho - d)/d_f)``."""
    return shrink_factor(problem, q_k) * conservative_target(problem, q_k)


def _pinned_update(problem: DromoProblem, q: FloatArray, collapsed: npt.NDArray[np.bool_]) -> FloatArray:
    """Eq. 15 with the factor of the ``collapsed`` states set to its ``Var = 0`` value (0 where lambda > 0)."""
    fac = shrink_factor(problem, q)
    fac[collapsed] = np.where(problem.lam[collapsed] > 0, 0.0, 1.0)
    return fac * conservative_target(problem, q)


def eq15_jacobian(problem: DromoProblem, q: FloatArray, collapsed: npt.NDArray[np.bool_] | None = None) -> FloatArray:
    """Jacobian of :func:`eq15_update` at ``Q`` as an ``(S·A, S·A)`` matrix.

    ``d/dQ [F(Q) * X(Q)] = diag(F) gamma P^pi_hat + diag(X) dF/dQ`` with ``X = T_hat Q - beta kappa`` and
    ``dF(s,a)/dQ(s,b) = lambda(s,a) / (lambda(s,a) + R_s)^2 · sqrt(|D(s)|) pi_f(b|s) (Q(s,b) - m(s)) / sqrt(Var_s)``,
    ``R_s = sqrt(Var_s |D(s)|)``. States in ``collapsed`` use the ``Var = 0`` factor (a constant), as do
    states with ``Var = 0`` (where F is not differentiable).
    """
    S, A = problem.n_states, problem.n_actions
    mdp = problem.backup_mdp
    if collapsed is None:
        collapsed = np.zeros(S, dtype=bool)
    p = problem.pi_f
    var = policy_variance(q, p)
    smooth = (var > 0) & ~collapsed
    root = np.sqrt(var * problem.counts)
    fac = shrink_factor(problem, q)
    fac[collapsed] = np.where(problem.lam[collapsed] > 0, 0.0, 1.0)
    x = conservative_target(problem, q)
    m = (p * q).sum(-1, keepdims=True)
    safe_sd = np.sqrt(np.where(smooth, var, 1.0))
    droot = np.sqrt(problem.counts)[:, None] * p * (q - m) / safe_sd[:, None]  # (S, B)
    denom = problem.lam + root[:, None]
    dfac = problem.lam / np.where(denom > 0, denom, 1.0) ** 2  # (S, A)
    local = (x * dfac)[:, :, None] * droot[:, None, :] * smooth[:, None, None]  # (S, A, B)
    jac = mdp.gamma * fac.reshape(-1, 1) * mdp.policy_matrix(problem.pi)
    blocks = jac.reshape(S, A, S, A)
    blocks[np.arange(S), :, np.arange(S), :] += local
    return blocks.reshape(S * A, S * A)


def _newton(
    problem: DromoProblem, q: FloatArray, collapsed: npt.NDArray[np.bool_], tol: float, max_iter: int
) -> tuple[FloatArray, int, bool]:
    """Damped Newton on ``G(Q) = Q - pinned_update(Q)`` (Armijo on ``|G|_2``). Returns (Q, iterations, converged)."""
    n = q.size
    res = q - _pinned_update(problem, q, collapsed)
    for it in range(1, max_iter + 1):
        if float(np.max(np.abs(res))) <= tol * max(1.0, float(np.max(np.abs(q)))):
            return q, it - 1, True
        jac = np.eye(n) - eq15_jacobian(problem, q, collapsed)
        try:
            step = np.linalg.solve(jac, res.reshape(n)).reshape(q.shape)
        except np.linalg.LinAlgError:
            return q, it, False
        if not np.all(np.isfinite(step)):
            return q, it, False
        norm, t = float(np.linalg.norm(res)), 1.0
        while t >= 1e-8:
            q_try = q - t * step
            res_try = q_try - _pinned_update(problem, q_try, collapsed)
            if float(np.linalg.norm(res_try)) < (1.0 - 1e-4 * t) * norm:
                break
            t *= 0.5
        else:
            return q, it, False
        q, res = q_try, res_try
    return q, max_iter, bool(float(np.max(np.abs(res))) <= tol * max(1.0, float(np.max(np.abs(q)))))


@dataclass(frozen=True)
class FixedPoint:
    """A fixed point found by iteration.

    q: the table. iterations: iterations used. residual: ``max |Q - update(Q)|``. collapsed ``(S,)``: states
    with ``Var_{pi_f} Q(s,.) = 0`` at the fixed point (for Eq. 15: ``Q(s, a) = 0`` wherever ``lambda > 0``).
    """

    q: FloatArray
    iterations: int
    residual: float
    collapsed: npt.NDArray[np.bool_]


def eq15_fixed_point(
    problem: DromoProblem,
    q0: FloatArray | None = None,
    *,
    method: Literal["newton", "frozen_factor", "iterate"] = "newton",
    tol: float = 1e-11,
    max_iter: int = 2_000,
) -> FixedPoint:
    """Find a fixed point ``Q* = shrink_factor(Q*) * (T_hat Q* - beta kappa)`` of Eq. 15.

    ``q0`` defaults to the COMBO fixed point (``alpha = 0``); never start from zeros.

    Fixed points are not unique when ``alpha > 0``: with ``Var = 0`` the factor is 0 (where lambda > 0), so
    ``Q(s, .) = 0`` is self-consistent at any state, and pinning it at a subset of states and solving for the
    rest (when that has a solution) gives a fixed point ("collapsed" states; Assumption C.1 of the paper,
    ``Var >= 1/kappa_Var``, rules these out). Non-collapsed fixed points need not be unique either. And the map is not a
    contraction: where ``sqrt(Var·|D(s)|)`` is comparable to ``lambda`` the factor reacts so strongly to
    ``Q^k`` that plain iteration can cycle or wander chaotically, so "iterate Eq. 15" need not converge.

    * "iterate": plain ``Q <- eq15_update(Q)`` (what the paper prescribes);
    * "frozen_factor": freeze ``F(Q)``, solve the linear fixed point ``Q = F * (r_hat + gamma P^pi_hat Q -
      beta kappa)`` exactly, refresh ``F``, repeat;
    * "newton": damped Newton on ``G(Q) = Q - eq15_update(Q)`` with :func:`eq15_jacobian`. If it stalls (the
      only nearby fixed point has a collapsed state, where ``G`` has a kink), the state with the smallest
      ``sqrt(Var·|D(s)|) / max_a lambda`` is collapsed and Newton restarts; repeated up to S times.
      Collapsing is a last resort, so a fixed point without collapsed states is preferred when Newton
      reaches one.

    Converged means ``max |Q - eq15_update(Q)| <= tol·max(1, max |Q|)`` (reported as ``residual``).
    Raises ``RuntimeError`` otherwise.
    """
    q = combo_fixed_point(problem) if q0 is None else np.asarray(q0, dtype=np.float64).copy()
    mdp = problem.backup_mdp
    n = problem.n_states * problem.n_actions
    S = problem.n_states

    def finish(x: FloatArray, it: int) -> FixedPoint:
        # Newton can approach a collapsed state (Var -> 0, Q(s, .) -> 0) only up to the tolerance; snap such
        # states to the exact collapsed value when that keeps the residual within tolerance.
        sd = np.sqrt(policy_variance(x, problem.pi_f))
        near = sd <= 1e-9 * max(1.0, float(np.max(np.abs(x))))
        if near.any():
            snapped = x.copy()
            snapped[near] = _pinned_update(problem, x, near)[near]
            if converged(snapped):
                x = snapped
        err = float(np.max(np.abs(x - eq15_update(problem, x))))
        sd = np.sqrt(policy_variance(x, problem.pi_f))
        scale = np.maximum(1.0, np.max(np.abs(x), axis=-1))
        return FixedPoint(q=x, iterations=it, residual=err, collapsed=sd <= 1e-12 * scale)

    def converged(x: FloatArray) -> bool:
        err = float(np.max(np.abs(x - eq15_update(problem, x))))
        return err <= tol * max(1.0, float(np.max(np.abs(x))))

    if method == "newton":
        collapsed = np.zeros(S, dtype=bool)
        total = 0
        for _ in range(S + 1):
            q, its, ok = _newton(problem, q, collapsed, tol, max_iter)
            total += its
            if ok and converged(q):
                return finish(q, total)
            if not np.all(np.isfinite(q)) or collapsed.all():
                break
            score = np.sqrt(policy_variance(q, problem.pi_f) * problem.counts) / np.maximum(problem.lam.max(-1), 1e-300)
            score[collapsed] = np.inf
            collapsed[int(np.argmin(score))] = True
            q = _pinned_update(problem, q, collapsed)
        raise RuntimeError("Eq. 15 (newton) did not converge")
    if method not in ("frozen_factor", "iterate"):
        raise ValueError(f"unknown method {method!r}")
    pmat = mdp.policy_matrix(problem.pi)
    for it in range(1, max_iter + 1):
        if method == "iterate":
            q_new = eq15_update(problem, q)
        else:
            fac = shrink_factor(problem, q).reshape(n)
            rhs = fac * (mdp.r - problem.beta * problem.kappa).reshape(n)
            q_new = np.linalg.solve(np.eye(n) - mdp.gamma * fac[:, None] * pmat, rhs).reshape(q.shape)
        if not np.all(np.isfinite(q_new)):
            raise RuntimeError(f"Eq. 15 ({method}) diverged")
        q = q_new
        if converged(q):
            return finish(q, it)
    err = float(np.max(np.abs(q - eq15_update(problem, q))))
    raise RuntimeError(f"Eq. 15 ({method}) did not converge in {max_iter} iterations (last residual {err:.3g})")


# ----------------------------------------------------------------------------------------------------------
# Eq. 13 (exact) and the surrogate that Eq. 15 actually minimises
# ----------------------------------------------------------------------------------------------------------


def _t(x: FloatArray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def eq13_objective(problem: DromoProblem, q: torch.Tensor, q_k: FloatArray) -> torch.Tensor:
    """Eq. 13 in tabular form, as a torch float64 scalar differentiable in ``q (S, A)``; target frozen at ``Q^k``.

    ``½ sum d_f (Q - T_hat Q^k)^2 + alpha sum_s d_f(s) sqrt(Var_{pi_f} Q(s,.) / |D(s)|)
    + beta (sum rho Q - sum d Q)``.
    """
    y = _t(problem.backup(q_k))
    p = _t(problem.pi_f)
    bellman = 0.5 * (_t(problem.d_f) * (q - y) ** 2).sum()
    m = (p * q).sum(-1, keepdim=True)
    var = (p * (q - m) ** 2).sum(-1)
    variance = problem.alpha * (_t(problem.d_f_state) * torch.sqrt(var / _t(problem.counts))).sum()
    conservative = problem.beta * ((_t(problem.rho) - _t(problem.d)) * q).sum()
    return bellman + variance + conservative


def eq13_gradient(problem: DromoProblem, q: FloatArray, q_k: FloatArray) -> FloatArray:
    """Analytic gradient of :func:`eq13_objective` w.r.t. ``Q`` (needs ``Var_{pi_f} Q(s,.) > 0`` where ``alpha > 0``).

    ``d_f (Q - T_hat Q^k) + alpha d_f(s) pi_f(a|s) (Q(s,a) - m(s)) / sqrt(Var(s) |D(s)|) + beta (rho - d)``.
    """
    p = problem.pi_f
    m = (p * q).sum(-1, keepdims=True)
    root = np.sqrt(policy_variance(q, p) * problem.counts)
    var_term = np.zeros_like(q)
    if problem.alpha > 0:
        var_term = problem.alpha * problem.d_f_state[:, None] * p * (q - m) / root[:, None]
    return problem.d_f * (q - problem.backup(q_k)) + var_term + problem.beta * (problem.rho - problem.d)


def eq13_optimality_violation(
    problem: DromoProblem, q: FloatArray, q_k: FloatArray, *, flat_tol: float = 1e-12
) -> FloatArray:
    """How far ``Q`` is from satisfying Eq. 13's first-order condition (target frozen at ``Q^k``), per state ``(S,)``.

    Where ``Var_{pi_f} Q(s,.) > 0``: ``max_a |gradient|`` (:func:`eq13_gradient`). Where ``Var = 0`` (``sqrt``
    is not differentiable; "flat" means ``sd <= flat_tol·max(1, max|Q(s,.)|)``) the subgradient condition
    ``0 in g + c·{L^T u : |u| <= 1}``, ``g = d_f (Q - T_hat Q^k) + beta (rho - d)``, ``L^T L = M =
    diag(pi_f) - pi_f pi_f^T``, ``c = alpha d_f(s)/sqrt(|D(s)|)``: the violation is
    ``max(|g - M M^+ g|_inf, sqrt(g^T M^+ g) - c, 0)``.
    """
    g = problem.d_f * (q - problem.backup(q_k)) + problem.beta * (problem.rho - problem.d)
    if problem.alpha == 0:
        return np.max(np.abs(g), axis=-1)
    p = problem.pi_f
    sd = np.sqrt(policy_variance(q, p))
    flat = sd <= flat_tol * np.maximum(1.0, np.max(np.abs(q), axis=-1))
    m = (p * q).sum(-1, keepdims=True)
    c = problem.variance_weight
    full = g + c[:, None] * p * (q - m) / np.where(flat, 1.0, sd)[:, None]
    out = np.max(np.abs(full), axis=-1)
    if np.any(flat):
        mm = p[:, :, None] * np.eye(problem.n_actions) - p[:, :, None] * p[:, None, :]
        mp = np.linalg.pinv(mm, hermitian=True)
        gp = np.einsum("sab,sb->sa", mp, g)
        off_range = np.max(np.abs(g - np.einsum("sab,sb->sa", mm, gp)), axis=-1)
        dual = np.sqrt(np.maximum((g * gp).sum(-1), 0.0))
        out = np.where(flat, np.maximum(np.maximum(off_range, dual - c), 0.0), out)
    return out


def lemma41_surrogate(problem: DromoProblem, q: torch.Tensor, q_k: FloatArray) -> torch.Tensor:
    """The objective whose exact minimiser is Eq. 15 (what the proof of Lemma 4.1 really differentiates).

    ``½ sum d_f (Q - T_hat Q^k)^2 + ½ sum_{s,a} lambda(s,a) d_f(s,a) Q(s,a)^2 / sqrt(Var_{pi_f}(Q^k(s,.)) |D(s)|)
    + beta (sum rho Q - sum d Q)``: Eq. 13 with the variance term's derivative replaced by the paper's
    ``alpha d_f(s,a) (1 - pi_f(a|s)) Q(s,a) / sqrt(Var(Q^k) |D(s)|)`` (see the module docstring).
    Needs ``Var(Q^k(s,.)) > 0`` wherever ``lambda > 0``.
    """
    y = _t(problem.backup(q_k))
    root = _t(np.sqrt(policy_variance(q_k, problem.pi_f) * problem.counts))[:, None]
    bellman = 0.5 * (_t(problem.d_f) * (q - y) ** 2).sum()
    shrink = 0.5 * (_t(problem.lam * problem.d_f) * q**2 / root).sum()
    conservative = problem.beta * ((_t(problem.rho) - _t(problem.d)) * q).sum()
    return bellman + shrink + conservative


def lemma41_gradient(problem: DromoProblem, q: FloatArray, q_k: FloatArray) -> FloatArray:
    """Analytic gradient of :func:`lemma41_surrogate` (the paper's approximate derivative of Eq. 13)."""
    root = np.sqrt(policy_variance(q_k, problem.pi_f) * problem.counts)[:, None]
    return (
        problem.d_f * (q - problem.backup(q_k))
        + problem.lam * problem.d_f * q / root
        + problem.beta * (problem.rho - problem.d)
    )


def eq13_argmin(problem: DromoProblem, q_k: FloatArray, *, newton_steps: int = 60) -> FloatArray:
    """The exact minimiser of Eq. 13 over the table ``Q`` for a frozen target ``T_hat Q^k`` (corrected Lemma 4.1).

    Per state, with ``z = T_hat Q^k - beta (rho - d)/d_f``, ``W = diag(d_f(s, .))``, ``c = alpha d_f(s)/sqrt(|D(s)|)``
    and ``M = diag(pi_f) - pi_f pi_f^T`` (so ``Var_{pi_f} Q = Q^T M Q``), Eq. 13 is
    ``½ (Q - z)^T W (Q - z) + c sqrt(Q^T M Q)`` + const: strictly convex. Its minimiser is
    ``Q = (W + t M)^{-1} W z`` with ``t = c / sqrt(Var(Q))``; in the eigenbasis of ``W^{-1/2} M W^{-1/2}``
    (eigenvalues ``l_i``) the condition is ``sum_i l_i zh_i^2 / (u + l_i)^2 = c^2`` for ``u = 1/t``, solved by
    Newton on ``1/phi(u)`` (concave, so Newton from ``u = 0`` is monotone). If ``c >= c_max =
    sqrt(sum zh_i^2 / l_i)``, the minimiser has ``Var = 0``: ``Q(s, .)`` is the ``d_f``-weighted mean of ``z``.

    When ``d_f(s, a) = d_f(s) pi_f(a|s)`` (e.g. ``f in {0, 1}``) this is the closed form
    ``Q = m + (1 - alpha / sqrt(|D(s)| Var_{pi_f}(z)))_+ (z - m)``, ``m = E_{pi_f}[z]``: the *centred* target is
    shrunk towards its mean, unlike Eq. 15, which shrinks the whole target towards 0.
    """
    z = conservative_target(problem, q_k)
    if problem.alpha == 0:
        return z
    lam, vec = problem._whitened_penalty
    sw = np.sqrt(problem.d_f)
    zh = np.einsum("sba,sb->sa", vec, sw * z)  # U^T W^{1/2} z
    pos = lam > 0
    c = problem.variance_weight
    safe_lam = np.where(pos, lam, 1.0)
    c_max = np.sqrt(np.where(pos, zh**2 / safe_lam, 0.0).sum(-1))
    b2 = np.where(pos, lam * zh**2, 0.0)
    u = np.zeros(problem.n_states)
    interior = c < c_max
    for _ in range(newton_steps):
        denom = u[:, None] + safe_lam
        phi = np.sqrt((b2 / denom**2).sum(-1))
        dpsi = (b2 / denom**3).sum(-1) / np.maximum(phi, 1e-300) ** 3
        step = np.where(interior, (1.0 / c - 1.0 / np.maximum(phi, 1e-300)) / np.maximum(dpsi, 1e-300), 0.0)
        u = u + step
        if np.all(np.abs(step) <= 1e-14 * np.maximum(u, 1e-300)):
            break
    gain = np.where(pos, u[:, None] / (u[:, None] + safe_lam), 1.0)
    gain = np.where(interior[:, None], gain, np.where(pos, 0.0, 1.0))
    return np.einsum("sab,sb->sa", vec, zh * gain) / sw


def eq13_fixed_point(
    problem: DromoProblem, q0: FloatArray | None = None, *, tol: float = 1e-11, max_iter: int = 5_000
) -> FixedPoint:
    """Iterate the exact argmin of Eq. 13 (:func:`eq13_argmin`) to a fixed point, from COMBO's by default."""
    q = combo_fixed_point(problem) if q0 is None else np.asarray(q0, dtype=np.float64).copy()
    change = np.inf
    for it in range(1, max_iter + 1):
        q_new = eq13_argmin(problem, q)
        change = float(np.max(np.abs(q_new - q)))
        q = q_new
        if change <= tol * max(1.0, float(np.max(np.abs(q)))):
            sd = np.sqrt(policy_variance(q, problem.pi_f))
            collapsed = sd <= 1e-12 * np.maximum(1.0, np.max(np.abs(q), axis=-1))
            return FixedPoint(q=q, iterations=it, residual=change, collapsed=collapsed)
    raise RuntimeError(f"Eq. 13 iteration did not converge in {max_iter} iterations (last change {change:.3g})")


# ----------------------------------------------------------------------------------------------------------
# Theorem 4.4 (gap expansion) and Corollary 4.3 (lower bound) helpers
# ----------------------------------------------------------------------------------------------------------


def chi_terms(problem: DromoProblem) -> tuple[float, float]:
    """The proof of Theorem 4.4's ``chi_1 = E_rho[(rho - d)/d_f] >= 0`` and ``chi_2 = -E_d[(rho - d)/d_f] >= 0``.

    With ``d_f = f d + (1 - f) rho``: ``chi_1 = f·X``, ``chi_2 = (1 - f)·X`` with ``X = sum (rho - d)^2 / d_f``.
    """
    return float(np.sum(problem.rho * problem.kappa)), float(-np.sum(problem.d * problem.kappa))


def c_var(problem: DromoProblem, q_k: FloatArray, dist: FloatArray) -> float:
    """The proof's ``C_Var(dist) = E_dist[lambda / (lambda + sqrt(Var_{pi_f}(Q^k) |D(s)|))] = E_dist[1 - F]``."""
    return float(np.sum(dist * (1.0 - shrink_factor(problem, q_k))))


@dataclass(frozen=True)
class OneStepGap:
    """Theorem 4.4 for one iteration from a common ``Q^k``.

    ``gap(eq15_update(Q^k)) - gap(T^pi Q^k) = offset + slope·beta`` exactly (``T^pi``: the true backup),
    because Eq. 15's factor depends on ``Q^k`` only. ``slope = sum F (rho - d)^2 / d_f >= 0``;
    ``threshold`` = the smallest beta >= 0 from which the gap strictly expands (``inf`` if never).
    ``paper_threshold`` is the proof's bound with its printed coefficient ``(1 + C_Var(rho)) chi_1 +
    (1 - C_Var(d)) chi_2`` and its factorisation ``E[F X] = E[F] E[X]`` (see the test module).
    """

    offset: float
    slope: float
    threshold: float
    chi1: float
    chi2: float
    c_var_rho: float
    c_var_d: float
    paper_threshold: float


def one_step_gap(problem: DromoProblem, q_k: FloatArray, true_mdp: TabularMDP) -> OneStepGap:
    """Exact one-step gap expansion (see :class:`OneStepGap`) and the proof's own threshold."""
    base = problem.with_(beta=0.0)
    fac = shrink_factor(problem, q_k)
    tq = true_mdp.backup(q_k, problem.pi)
    offset = gap(eq15_update(base, q_k), problem.d, problem.rho) - gap(tq, problem.d, problem.rho)
    slope = float(np.sum(fac * (problem.rho - problem.d) ** 2 / problem.d_f))
    if slope > 0:
        threshold = max(0.0, -offset / slope)
    else:
        threshold = 0.0 if offset > 0 else float("inf")
    chi1, chi2 = chi_terms(problem)
    cr, cd = c_var(problem, q_k, problem.rho), c_var(problem, q_k, problem.d)
    delta = problem.backup(q_k) - tq
    d, rho = problem.d, problem.rho
    numer = np.sum((cr * rho - cd * d) * tq) + np.sum(((1 - cd) * d - (1 - cr) * rho) * delta)
    paper = float(numer / ((1 + cr) * chi1 + (1 - cd) * chi2))
    return OneStepGap(
        offset=float(offset),
        slope=slope,
        threshold=float(threshold),
        chi1=chi1,
        chi2=chi2,
        c_var_rho=cr,
        c_var_d=cd,
        paper_threshold=paper,
    )

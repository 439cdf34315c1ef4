"""Tabular DROMO: the paper's Section 4.1 claims checked exactly on random finite MDPs.

Setting (unless a test says otherwise): 100 seeded random MDPs, S in {4, 5, 6}, A in {2, 3}, gamma = 0.9,
rewards U(-1, 1) (mixed signs on purpose: Eq. 15 shrinks towards 0, which is pessimistic only for positive
values), random pi and pi_beta, f ~ U(0.2, 0.8) (weight of the dataset), |D| = 1000, alpha = 1.

Two backups ("T_hat"):
* "exact":     T_hat = the true backup, rho = occupancy of pi in the true MDP (a perfect model, no sampling error);
* "perturbed": a learned model M^ = perturb_mdp(M, 0.3), rho = occupancy of pi in M^, and Theorem 4.2's
               T_hat = f·T_M + (1 - f)·T_M^ (the dataset part without sampling error).
Q^pi is always the true MDP's (linear solve). d = d^{pi_beta}(s) pi_beta(a|s) in the true MDP.

Findings, each pinned by a test below (numbers are for this seed; the report quotes them):
* Lemma 4.1: Eq. 15 is the exact minimiser of a surrogate (Eq. 13 with the variance term's derivative
  replaced, ``lemma41_surrogate``), so its fixed points are stationary for that surrogate -- but never for
  Eq. 13 itself when alpha > 0. The exact argmin of Eq. 13 is a different closed form (``eq13_argmin``).
  Eq. 15 iterated as the paper says need not converge, and it has spurious "collapsed" fixed points
  (Q(s, .) = 0 where Var = 0).
* Theorem 4.4 holds for one iteration from a common Q^k, with an exact threshold; the proof's own threshold
  is wrong (sign slip and E[F X] = E[F] E[X]). At the fixed point it needs an extra condition; a 2-state MDP
  breaks it for every beta > 0.
* Corollary 4.3: "=" is wrong, it is "<=" (strict for beta > 0 with an exact model). With Theorem 4.2's
  mixed backup and rho from the model the bound can fail for every beta; the extra condition is
  E_{rho_That}[(rho - d)/d_f] > 0 with rho_That the occupancy in T_hat's MDP.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dromo_ray.theory.tabular import (
    DromoProblem,
    TabularMDP,
    affine_in_beta,
    chi_terms,
    combo_fixed_point,
    combo_update,
    conservative_target,
    eq13_argmin,
    eq13_fixed_point,
    eq13_gradient,
    eq13_objective,
    eq13_optimality_violation,
    eq15_fixed_point,
    eq15_jacobian,
    eq15_update,
    expected_under,
    f_interpolate,
    gap,
    lemma41_gradient,
    lemma41_surrogate,
    make_problem,
    occupancy,
    one_step_gap,
    perturb_mdp,
    policy_evaluation,
    policy_variance,
    q_pi,
    random_mdp,
    random_policy,
    shrink_factor,
    state_occupancy,
)

N_MDPS = 100
ALPHA = 1.0
DATASET_SIZE = 1000.0
GAMMA = 0.9
BETAS = np.array([0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0])
SETTINGS = ("exact", "perturbed")


@dataclass(frozen=True)
class Instance:
    mdp: TabularMDP
    model: TabularMDP
    pi: np.ndarray
    pi_beta: np.ndarray
    f: float
    qk: np.ndarray  # an arbitrary Q^k (Q^pi + noise) for one-step checks

    def problem(self, setting: str = "exact", *, alpha: float = ALPHA, beta: float = 1.0) -> DromoProblem:
        model = None if setting == "exact" else self.model
        return make_problem(
            self.mdp,
            self.pi,
            self.pi_beta,
            f=self.f,
            alpha=alpha,
            beta=beta,
            dataset_size=DATASET_SIZE,
            model_mdp=model,
        )

    @property
    def mu_pi(self) -> np.ndarray:
        return self.mdp.mu[:, None] * self.pi


@functools.cache
def instances() -> tuple[Instance, ...]:
    rng = np.random.default_rng(20240611)
    out = []
    for _ in range(N_MDPS):
        S, A = int(rng.integers(4, 7)), int(rng.integers(2, 4))
        mdp = random_mdp(rng, S, A, gamma=GAMMA, reward_range=(-1.0, 1.0))
        pi, pi_beta = random_policy(rng, S, A), random_policy(rng, S, A)
        model = perturb_mdp(mdp, rng, 0.3)
        qk = q_pi(mdp, pi) + rng.normal(size=(S, A))
        out.append(Instance(mdp, model, pi, pi_beta, float(rng.uniform(0.2, 0.8)), qk))
    return tuple(out)


def smallest_beta_from_which(holds: np.ndarray) -> float:
    """The smallest grid beta such that ``holds`` is true there and at every larger grid beta (inf if none)."""
    if not holds[-1]:
        return float("inf")
    k = len(holds) - 1
    while k > 0 and holds[k - 1]:
        k -= 1
    return float(BETAS[k])


@functools.cache
def beta_scan(setting: str) -> dict[str, np.ndarray]:
    """Eq. 15 fixed points (alpha = 1) on the BETAS grid for every instance: gap and lower-bound margins."""
    gap_margin = np.empty((N_MDPS, len(BETAS)))
    lb_margin = np.empty((N_MDPS, len(BETAS)))
    collapsed = np.zeros((N_MDPS, len(BETAS)), dtype=bool)
    for i, inst in enumerate(instances()):
        base = inst.problem(setting, beta=0.0)
        qt = q_pi(inst.mdp, inst.pi)
        g0, e0 = gap(qt, base.d, base.rho), expected_under(qt, inst.mu_pi)
        for j, b in enumerate(BETAS):
            fp = eq15_fixed_point(base.with_(beta=float(b)))
            gap_margin[i, j] = gap(fp.q, base.d, base.rho) - g0
            lb_margin[i, j] = e0 - expected_under(fp.q, inst.mu_pi)
            collapsed[i, j] = bool(fp.collapsed.any())
    return {"gap": gap_margin, "lb": lb_margin, "collapsed": collapsed}


# ----------------------------------------------------------------------------------------------------------
# Unit tests: the MDP machinery, alpha = beta = 0, alpha = 0 (COMBO), Var = 0
# ----------------------------------------------------------------------------------------------------------


def test_q_pi_linear_solve_matches_iterative_policy_evaluation() -> None:
    for inst in instances():
        q_lin = q_pi(inst.mdp, inst.pi)
        np.testing.assert_allclose(q_lin, policy_evaluation(inst.mdp, inst.pi, tol=1e-12), atol=1e-9)
        np.testing.assert_allclose(q_lin, inst.mdp.backup(q_lin, inst.pi), atol=1e-12)  # Bellman equation


def test_occupancy_is_normalised_discounted_flow_and_f_weighs_the_dataset() -> None:
    for inst in instances()[:20]:
        mdp, pi = inst.mdp, inst.pi
        rho = occupancy(mdp, pi)
        assert rho.sum() == pytest.approx(1.0) and np.all(rho > 0)
        # d(s') = (1 - gamma) mu(s') + gamma sum_{s,a} d(s, a) P(s'|s, a)
        ds = state_occupancy(mdp, pi)
        np.testing.assert_allclose(ds, (1 - mdp.gamma) * mdp.mu + mdp.gamma * np.einsum("sa,sat->t", rho, mdp.P))
        # E_{mu, pi}[Q] = E_rho[r] / (1 - gamma) for Q = Q^pi
        assert expected_under(q_pi(mdp, pi), inst.mu_pi) == pytest.approx(expected_under(mdp.r, rho) / (1 - mdp.gamma))
        pr = inst.problem()
        # f is the dataset's weight (Section 3 / Theorem 4.2; Eq. 9 writes it the other way round).
        np.testing.assert_allclose(pr.with_(f=1.0).d_f, pr.d)
        np.testing.assert_allclose(pr.with_(f=0.0).d_f, pr.rho)
        np.testing.assert_allclose(pr.with_(f=1.0).pi_f, pr.pi_beta)
        np.testing.assert_allclose(pr.pi_f, f_interpolate(pr.f, pr.pi_beta, pr.pi))


def test_alpha_beta_zero_is_policy_evaluation() -> None:
    for inst in instances()[:20]:
        for setting in SETTINGS:
            pr = inst.problem(setting, alpha=0.0, beta=0.0)
            np.testing.assert_allclose(eq15_update(pr, inst.qk), pr.backup(inst.qk), atol=1e-13)
            fp = eq15_fixed_point(pr, np.zeros_like(inst.qk), method="iterate", tol=1e-12)
            np.testing.assert_allclose(fp.q, q_pi(pr.backup_mdp, inst.pi), atol=1e-9)
            if setting == "exact":
                np.testing.assert_allclose(fp.q, q_pi(inst.mdp, inst.pi), atol=1e-9)


def test_alpha_zero_is_combo() -> None:
    for inst in instances():
        pr = inst.problem("perturbed", alpha=0.0, beta=3.0)
        q_new = eq15_update(pr, inst.qk)
        np.testing.assert_allclose(q_new, combo_update(pr, inst.qk), atol=1e-12)
        # ... which is the argmin of Eq. 8 (= Eq. 13 with alpha = 0): the autograd gradient vanishes there.
        qt = torch.tensor(q_new, requires_grad=True)
        eq13_objective(pr, qt, inst.qk).backward()
        assert qt.grad is not None and float(qt.grad.abs().max()) < 1e-12
        np.testing.assert_allclose(eq13_argmin(pr, inst.qk), q_new, atol=1e-12)
        # COMBO's fixed point is a linear solve, and affine in beta.
        q_star = combo_fixed_point(pr)
        np.testing.assert_allclose(combo_update(pr, q_star), q_star, atol=1e-10)
        q0, q1 = affine_in_beta(pr)
        np.testing.assert_allclose(q0 + 3.0 * q1, q_star, atol=1e-9)


def test_var_zero_convention_and_spurious_zero_fixed_point() -> None:
    inst = instances()[0]
    pr = inst.problem(beta=2.0)
    zeros = np.zeros_like(inst.qk)
    # Var(Q^k(s,.)) = 0 and lambda > 0: factor 0. So Q = 0 is a fixed point of Eq. 15 for ANY r, beta.
    assert np.all(pr.lam > 0)
    np.testing.assert_array_equal(shrink_factor(pr, zeros), 0.0)
    np.testing.assert_array_equal(eq15_update(pr, zeros), 0.0)
    # lambda = 0 and Var = 0 (0/0): factor 1, no shrinkage (alpha = 0 here; pi_f(a|s) = 1 would need
    # d_f(s, b) = 0 for the other actions, which Eq. 15 cannot divide by).
    no_alpha = pr.with_(alpha=0.0)
    np.testing.assert_array_equal(shrink_factor(no_alpha, zeros), 1.0)
    np.testing.assert_allclose(eq15_update(no_alpha, zeros), conservative_target(no_alpha, zeros))


def test_eq13_gradient_and_eq15_jacobian_match_autograd() -> None:
    for inst in instances()[:30]:
        pr = inst.problem("perturbed", beta=0.7)
        q = inst.qk + 0.5
        qt = torch.tensor(q, requires_grad=True)
        eq13_objective(pr, qt, inst.qk).backward()
        assert qt.grad is not None
        np.testing.assert_allclose(qt.grad.numpy(), eq13_gradient(pr, q, inst.qk), atol=1e-12)
        qs = torch.tensor(q, requires_grad=True)
        lemma41_surrogate(pr, qs, inst.qk).backward()
        assert qs.grad is not None
        np.testing.assert_allclose(qs.grad.numpy(), lemma41_gradient(pr, q, inst.qk), atol=1e-12)
        # Jacobian of Eq. 15 by central differences.
        eps, n = 1e-6, q.size
        num = np.empty((n, n))
        for k in range(n):
            e = np.zeros(n)
            e[k] = eps
            e = e.reshape(q.shape)
            num[:, k] = ((eq15_update(pr, q + e) - eq15_update(pr, q - e)) / (2 * eps)).reshape(n)
        np.testing.assert_allclose(eq15_jacobian(pr, q), num, atol=1e-6)


def test_eq15_iteration_is_not_a_contraction_newton_finds_fixed_points() -> None:
    """Lemma 4.1 says "iterate Eq. 15"; plain iteration can cycle/wander (the factor depends on Var(Q^k))."""
    failures, different, newton_iters = 0, 0, []
    for inst in instances():
        pr = inst.problem(beta=1.0)
        fp = eq15_fixed_point(pr)  # Newton (default); raises if not converged
        newton_iters.append(fp.iterations)
        try:
            it = eq15_fixed_point(pr, method="iterate", max_iter=600)
        except RuntimeError:
            failures += 1
            continue
        # Both are fixed points; with several fixed points (see eq15_fixed_point) they may differ.
        for x in (fp, it):
            assert np.abs(x.q - eq15_update(pr, x.q)).max() <= 1e-10 * max(1.0, np.abs(x.q).max())
        different += int(np.abs(fp.q - it.q).max() > 1e-6)
        if len(newton_iters) <= 30:
            try:
                ff = eq15_fixed_point(pr, method="frozen_factor", max_iter=500)
            except RuntimeError:
                continue
            assert np.abs(ff.q - eq15_update(pr, ff.q)).max() <= 1e-10 * max(1.0, np.abs(ff.q).max())
    print(
        f"\n[Eq. 15] plain iteration failed to converge on {failures}/{N_MDPS} MDPs (beta = 1); Newton converged "
        f"on all (median {np.median(newton_iters):.0f} iterations); they reached different fixed points on {different}"
    )
    assert failures >= 1


# ----------------------------------------------------------------------------------------------------------
# Claim 1: what Eq. 15's fixed point is a stationary point of (Lemma 4.1)
# ----------------------------------------------------------------------------------------------------------
#
# The proof of Lemma 4.1 differentiates Eq. 13 w.r.t. Q(s, a) and writes the variance term's derivative as
#     alpha d_f(s, a) (1 - pi_f(a|s)) Q(s, a) / sqrt(Var_{pi_f}(Q(s,.)) |D(s)|).
# The exact derivative is
#     alpha d_f(s) pi_f(a|s) (Q(s, a) - m(s)) / sqrt(Var_{pi_f}(Q(s,.)) |D(s)|),   m(s) = E_{pi_f}[Q(s,.)].
# Two replacements were made: (1) m(s) -> pi_f(a|s) Q(s, a) (the other actions' part of the mean dropped),
# (2) d_f(s) pi_f(a|s) -> d_f(s, a) (equal only when f in {0, 1}, pi = pi_beta at s, or d^{pi_beta}(s) =
# rho(s)); and sqrt(Var) is then held at Q^k. So Eq. 15 is EXACTLY the argmin of the quadratic
# ``lemma41_surrogate`` (frozen Var(Q^k)) and its fixed points are stationary points of that surrogate at
# Q = Q^k -- this is what we test precisely. They are NOT stationary points of Eq. 13 for alpha > 0:
# the exact variance gradient sums to 0 over actions (Var is shift invariant) while the replaced one does
# not. The residual vanishes at a state only if Q(s,.) solves a homogeneous linear system which, when
# d_f(s, a) = d_f(s) pi_f(a|s), forces pi_f(a|s) Q(s, a) = m(s) for all a, hence Q(s,.) = 0 (Var = 0) for
# A >= 2 -- and generically does so otherwise. Lemma 4.1's "setting the derivative of
# Eq. 13 to 0 gives Eq. 15" is therefore wrong as written. The corrected statement: the exact argmin of
# Eq. 13 per iteration is ``eq13_argmin`` (shrink the *centred* target towards its pi_f-mean, a
# group-lasso step), which satisfies Eq. 13's (sub)gradient condition exactly; tested below too.


def _scale(pr: DromoProblem, q: np.ndarray) -> float:
    """A scale for gradient magnitudes: the Bellman term's size."""
    return float(np.max(pr.d_f * (np.abs(q) + np.abs(pr.backup(q))))) + float(np.max(np.abs(pr.rho - pr.d)))


def test_eq15_update_is_exact_argmin_of_the_lemma41_surrogate() -> None:
    for inst in instances():
        for setting in SETTINGS:
            pr = inst.problem(setting, beta=1.0)
            q_new = eq15_update(pr, inst.qk)
            qt = torch.tensor(q_new, requires_grad=True)
            lemma41_surrogate(pr, qt, inst.qk).backward()
            assert qt.grad is not None
            assert float(qt.grad.abs().max()) <= 1e-12 * _scale(pr, inst.qk)


def test_eq15_fixed_point_is_stationary_for_the_surrogate_not_for_eq13() -> None:
    n_collapsed, rel_exact, sum_exact, sum_paper = 0, [], [], []
    for inst in instances():
        pr = inst.problem(beta=1.0)
        fp = eq15_fixed_point(pr)
        q = fp.q
        live = ~fp.collapsed
        # Collapsed states (Var = 0): Eq. 15's convention gives Q(s, a) = 0 wherever lambda > 0.
        n_collapsed += int(fp.collapsed.sum())
        np.testing.assert_array_equal(q[fp.collapsed][pr.lam[fp.collapsed] > 0], 0.0)
        # Elsewhere: the surrogate's gradient at Q = Q^k = Q* vanishes (autograd, float64).
        qt = torch.tensor(q, requires_grad=True)
        lemma41_surrogate(pr, qt, q).backward()
        assert qt.grad is not None
        scale = _scale(pr, q)
        assert float(qt.grad.numpy()[live].__abs__().max()) <= 1e-9 * scale
        # Eq. 13's exact gradient at the same point is the predicted difference of the two derivatives ...
        with np.errstate(divide="ignore", invalid="ignore"):  # collapsed states (Var = 0) are dropped
            g13 = eq13_gradient(pr, q, q)[live]
            p, root = pr.pi_f, np.sqrt(policy_variance(q, pr.pi_f) * pr.counts)[:, None]
            m = (p * q).sum(-1, keepdims=True)
            exact_var = (ALPHA * pr.d_f_state[:, None] * p * (q - m) / root)[live]
            paper_var = (pr.lam * pr.d_f * q / root)[live]
        np.testing.assert_allclose(g13, exact_var - paper_var, atol=1e-9 * scale)
        # ... which is never 0: the exact variance gradient sums to 0 over actions, the paper's does not.
        sum_exact.append(float(np.abs(exact_var.sum(-1)).max()))
        sum_paper.append(float(np.abs(paper_var.sum(-1)).max()))
        rel_exact.append(float(np.abs(g13).max()) / scale)
    print(
        f"\n[Lemma 4.1] Eq. 13 gradient at Eq. 15 fixed points / Bellman scale: min {min(rel_exact):.2e}, "
        f"median {np.median(rel_exact):.2e}, max {max(rel_exact):.2e}; collapsed states {n_collapsed}"
    )
    assert max(sum_exact) < 1e-10
    assert min(sum_paper) > 1e-6
    assert min(rel_exact) > 1e-5  # not stationary for Eq. 13 in any of the 100 MDPs


def test_replacement_two_vanishes_only_in_the_special_cases() -> None:
    # d_f(s, a) - d_f(s) pi_f(a|s) = f (1 - f) (d^{pi_beta}(s) - rho(s)) (pi_beta(a|s) - pi(a|s))
    for inst in instances()[:20]:
        pr = inst.problem(beta=1.0)
        ds, rs = pr.d.sum(-1), pr.rho.sum(-1)
        diff = pr.d_f - pr.d_f_state[:, None] * pr.pi_f
        np.testing.assert_allclose(diff, pr.f * (1 - pr.f) * (ds - rs)[:, None] * (pr.pi_beta - pr.pi), atol=1e-14)
        for f in (0.0, 1.0):
            q = pr.with_(f=f)
            np.testing.assert_allclose(q.d_f, q.d_f_state[:, None] * q.pi_f, atol=1e-15)


def test_corrected_lemma41_exact_argmin_of_eq13() -> None:
    worst, flat_states, improvements, fp_dist = 0.0, 0, [], []
    for inst in instances():
        for setting in SETTINGS:
            pr = inst.problem(setting, beta=1.0)
            q_star = eq13_argmin(pr, inst.qk)
            viol = eq13_optimality_violation(pr, q_star, inst.qk)
            worst = max(worst, float(viol.max()) / _scale(pr, inst.qk))
            flat_states += int((policy_variance(q_star, pr.pi_f) < 1e-20).sum())
            # It minimises Eq. 13, so it beats Eq. 15's update on Eq. 13 (strictly: they differ).
            obj = [float(eq13_objective(pr, torch.tensor(x), inst.qk)) for x in (q_star, eq15_update(pr, inst.qk))]
            assert obj[0] < obj[1]
            improvements.append(obj[1] - obj[0])
        # Closed form when d_f(s, a) = d_f(s) pi_f(a|s) (f = 0): shrink the centred target towards its mean.
        p0 = inst.problem(beta=1.0).with_(f=0.0)
        z = conservative_target(p0, inst.qk)
        m = (p0.pi_f * z).sum(-1, keepdims=True)
        shrink = np.maximum(0.0, 1.0 - ALPHA / np.sqrt(p0.counts * policy_variance(z, p0.pi_f)))[:, None]
        np.testing.assert_allclose(eq13_argmin(p0, inst.qk), m + shrink * (z - m), atol=1e-10)
    # Iterating the exact argmin: its fixed point satisfies Eq. 13's first-order condition at Q = Q^k.
    for inst in instances()[:50]:
        pr = inst.problem(beta=1.0)
        fp = eq13_fixed_point(pr, tol=1e-12)
        assert eq13_optimality_violation(pr, fp.q, fp.q).max() <= 1e-9 * _scale(pr, fp.q)
        q15 = eq15_fixed_point(pr).q
        fp_dist.append(float(np.abs(q15 - fp.q).max() / np.abs(fp.q).max()))
    print(
        f"\n[Lemma 4.1 corrected] worst violation {worst:.1e}, states at Var = 0 (hard threshold) {flat_states}; "
        f"|Q*_Eq15 - Q*_Eq13|/|Q*_Eq13|: median {np.median(fp_dist):.2f}, max {max(fp_dist):.2f}"
    )
    assert worst <= 1e-10
    assert flat_states >= 1  # the hard-threshold branch is exercised


# ----------------------------------------------------------------------------------------------------------
# Claim 2: the gap-expanding property (Theorem 4.4, Eq. 16)
# ----------------------------------------------------------------------------------------------------------
#
# What the proof shows is a ONE-STEP statement: from a common Q^k, Eq. 15's Q_hat^{k+1} vs the true backup
# T^pi Q^k. Because Eq. 15's factor F depends on Q^k only, the gap difference is exactly affine in beta,
#     gap(Q_hat^{k+1}) - gap(T^pi Q^k) = offset + beta · sum F (rho - d)^2 / d_f,
# with a non-negative slope, so a threshold exists (``one_step_gap``). The proof's own threshold is wrong:
# its beta-coefficient "(1 + C_Var(rho)) chi_1 + (1 - C_Var(d)) chi_2" has a sign slip (1 - C_Var(rho)),
# and it factorises E_rho[F X] = E_rho[F] E_rho[X], true only if F is constant; the printed threshold is
# too small for about half of the MDPs (even with the sign fixed).
# At the FIXED POINT (what "iteratively playing Eq. 13" converges to) the penalty is propagated through
# the Bellman operator: with alpha = 0, gap(Q_hat_beta) - gap(Q^pi) = a + beta (rho - d)^T
# (I - gamma P^pi_That)^{-1} D_f^{-1} (rho - d), and that quadratic form is not positive definite. The
# theorem needs it to be > 0 (extra condition); it is on random dense MDPs, but a 2-state MDP below has it
# < 0, so the gap SHRINKS for every beta > 0 (alpha = 0 and alpha = 1 alike).


def test_gap_expansion_one_step_exact_threshold() -> None:
    thresholds, paper_too_small = [], 0
    for inst in instances():
        for setting in SETTINGS:
            pr = inst.problem(setting, beta=0.0)
            o = one_step_gap(pr, inst.qk, inst.mdp)
            x = float(np.sum((pr.rho - pr.d) ** 2 / pr.d_f))
            assert o.chi1 >= 0 and o.chi2 >= 0
            assert o.chi1 == pytest.approx(pr.f * x) and o.chi2 == pytest.approx((1 - pr.f) * x)
            assert o.slope > 0

            target_gap = gap(inst.mdp.backup(inst.qk, inst.pi), pr.d, pr.rho)  # the true backup T^pi Q^k

            def expands(beta: float, pr: DromoProblem = pr, qk: np.ndarray = inst.qk, g: float = target_gap) -> bool:
                return gap(eq15_update(pr.with_(beta=beta), qk), pr.d, pr.rho) > g

            t = o.threshold
            assert expands(t * (1 + 1e-6) + 1e-9) and expands(10 * t + 1.0) and expands(1e4)
            if t > 0:
                assert not expands(t * (1 - 1e-6))
            thresholds.append(t)
            paper_too_small += int(max(o.paper_threshold, 0.0) < t * (1 - 1e-9))
    th = np.array(thresholds)
    print(
        f"\n[Thm 4.4 one step] threshold > 0 in {np.mean(th > 0):.0%}, median {np.median(th):.3g}, "
        f"max {th.max():.3g}; the proof's threshold is too small in {paper_too_small}/{len(th)}"
    )
    assert paper_too_small >= 1


def test_gap_expansion_at_fixed_point_random_mdps() -> None:
    for setting in SETTINGS:
        # alpha = 0: exactly affine in beta, so the exact threshold is known.
        thr0 = []
        for inst in instances():
            pr = inst.problem(setting, alpha=0.0, beta=0.0)
            q0, q1 = affine_in_beta(pr)
            a = gap(q0, pr.d, pr.rho) - gap(q_pi(inst.mdp, inst.pi), pr.d, pr.rho)
            b = gap(q1, pr.d, pr.rho)
            if setting == "exact":
                assert a == pytest.approx(0.0, abs=1e-9)  # Q_hat = Q^pi at beta = 0
                a = 0.0
            kappa_form = float(
                (pr.rho - pr.d).reshape(-1)
                @ np.linalg.solve(
                    np.eye(pr.rho.size) - GAMMA * pr.backup_mdp.policy_matrix(inst.pi), pr.kappa.reshape(-1)
                )
            )
            assert b == pytest.approx(kappa_form)  # the extra condition's quadratic form
            assert b > 0  # holds on these (dense) random MDPs
            thr0.append(max(0.0, -a / b))
        # alpha = 1: scan beta; the gap must expand from some beta on, up to the grid's end.
        scan = beta_scan(setting)
        bmin = np.array([smallest_beta_from_which(row > 0) for row in scan["gap"]])
        print(
            f"\n[Thm 4.4 fixed point, {setting}] alpha=0 threshold: >0 in {np.mean(np.array(thr0) > 0):.0%}, "
            f"max {max(thr0):.3g}; alpha=1 smallest grid beta: at 0 in {np.mean(bmin == 0):.0%}, "
            f"median {np.median(bmin):.3g}, max {bmin.max():.3g}; "
            f"fixed points with collapsed states {scan['collapsed'].sum()}/{scan['collapsed'].size}"
        )
        assert np.all(bmin <= 30.0)  # holds at every grid beta >= 30 on all 100 MDPs


def gap_counterexample() -> tuple[TabularMDP, np.ndarray, np.ndarray]:
    """State 0: action 0 stays, action 1 moves to the absorbing state 1. pi keeps action 0 (prob. 0.99)
    everywhere; pi_beta mostly stays in 0 but, once in 1, plays action 1. The penalty on pi's action
    (1, 0), which the data barely covers, is propagated by the backup into the dataset's (1, 1)."""
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[0, 1, 1] = 1.0
    P[1, :, 1] = 1.0
    mdp = TabularMDP(P=P, r=np.array([[0.0, 0.0], [0.0, 1.0]]), gamma=GAMMA, mu=np.array([1.0, 0.0]))
    pi = np.array([[0.99, 0.01], [0.99, 0.01]])
    pi_beta = np.array([[0.9, 0.1], [0.01, 0.99]])
    return mdp, pi, pi_beta


def test_gap_expansion_fails_at_fixed_point_counterexample() -> None:
    mdp, pi, pi_beta = gap_counterexample()
    for alpha in (0.0, ALPHA):
        base = make_problem(mdp, pi, pi_beta, f=0.5, alpha=alpha, beta=0.0, dataset_size=DATASET_SIZE)
        g0 = gap(q_pi(mdp, pi), base.d, base.rho)
        margins = [gap(eq15_fixed_point(base.with_(beta=float(b))).q, base.d, base.rho) - g0 for b in BETAS[1:]]
        assert max(margins) < 0  # the gap shrinks for every beta > 0 on the grid (up to 1000)
        if alpha == 0:
            q0, q1 = affine_in_beta(base)
            assert gap(q1, base.d, base.rho) == pytest.approx(-2.6666, abs=1e-3)  # slope < 0: never expands
        # ... while the one-step statement still holds from Q^k = Q^pi.
        assert one_step_gap(base, q_pi(mdp, pi), mdp).slope > 0


# ----------------------------------------------------------------------------------------------------------
# Claim 3: the lower bound (Theorem 4.2 / Corollary 4.3)
# ----------------------------------------------------------------------------------------------------------
#
# Corollary 4.3 (and C.3) write E_{mu,pi}[Q_hat] "=" E_{mu,pi}[Q^pi]; a lower bound is "<=". With alpha = 0
# and rho_That the occupancy of pi in T_hat's MDP, exactly
#     E_{mu,pi}[Q_hat_beta] = E_{mu,pi}[Q^pi_That] - beta / (1 - gamma) · E_{rho_That}[(rho - d)/d_f].
# With an exact model (T_hat = T, rho = rho_That) the last expectation is chi_1 = f·sum (rho - d)^2/d_f > 0,
# so "<" holds strictly for every beta > 0 and "=" only at beta = 0. With Theorem 4.2's mixed backup and rho
# from the model, rho != rho_That and the expectation can be <= 0: then the bound fails for EVERY beta. The
# proof silently uses E_{mu,pi}[S^pi kappa] = E_rho[kappa] / (1 - gamma), valid only if rho = rho_That:
# that is the missing condition (note f = 0, rollouts only, gives chi_1 = 0: no pessimism at all).
# The alpha-term is not pessimistic by itself: Eq. 15 shrinks towards 0, so negative values go UP (Theorem
# 4.2's step "factor <= 1" needs the braces >= 0); with rewards < 0 and beta = 0, Q_hat >= Q^pi.


def test_lower_bound_exact_model() -> None:
    for inst in instances():
        pr = inst.problem("exact", alpha=0.0, beta=0.0)
        chi1, _ = chi_terms(pr)
        e_pi = expected_under(q_pi(inst.mdp, inst.pi), inst.mu_pi)
        for beta in (0.0, 0.5, 7.0):
            q_hat = combo_fixed_point(pr.with_(beta=beta))
            e_hat = expected_under(q_hat, inst.mu_pi)
            assert e_hat == pytest.approx(e_pi - beta * chi1 / (1 - GAMMA), abs=1e-9)
        assert chi1 > 0  # so "=" holds only at beta = 0, "<" for every beta > 0
    scan = beta_scan("exact")
    bmin = np.array([smallest_beta_from_which(row >= 0) for row in scan["lb"]])
    fails_at_zero = int(np.sum(scan["lb"][:, 0] < 0))
    print(
        f"\n[Cor 4.3 exact, alpha=1] fails at beta=0 in {fails_at_zero}/{N_MDPS} (shrinkage towards 0 raises "
        f"negative values); smallest grid beta: median {np.median(bmin):.3g}, max {bmin.max():.3g}"
    )
    assert np.all(bmin <= 30.0)  # holds at every grid beta >= 30 on all 100 MDPs
    assert fails_at_zero >= 1


def test_alpha_term_alone_is_pessimistic_only_for_positive_values() -> None:
    rng = np.random.default_rng(7)
    for sign in (1.0, -1.0):
        for _ in range(20):
            mdp = random_mdp(rng, 4, 2, gamma=GAMMA, reward_range=(0.1, 1.0))
            mdp = TabularMDP(P=mdp.P, r=sign * mdp.r, gamma=GAMMA, mu=mdp.mu)
            pi, pi_beta = random_policy(rng, 4, 2), random_policy(rng, 4, 2)
            pr = make_problem(mdp, pi, pi_beta, f=0.5, alpha=ALPHA, beta=0.0, dataset_size=DATASET_SIZE)
            diff = eq15_fixed_point(pr).q - q_pi(mdp, pi)
            assert np.all(sign * diff <= 1e-10)  # r > 0: Q_hat <= Q^pi; r < 0: Q_hat >= Q^pi (over-estimates)


def test_lower_bound_perturbed_model_mixed_backup() -> None:
    thr = []
    for inst in instances():
        pr = inst.problem("perturbed", alpha=0.0, beta=0.0)
        rho_that = occupancy(pr.backup_mdp, inst.pi)
        slope = expected_under(pr.kappa, rho_that) / (1 - GAMMA)
        q0, q1 = affine_in_beta(pr)
        assert -expected_under(q1, inst.mu_pi) == pytest.approx(slope)
        assert expected_under(q0, inst.mu_pi) == pytest.approx(expected_under(q_pi(pr.backup_mdp, inst.pi), inst.mu_pi))
        assert slope > 0  # the extra condition holds on these random MDPs
        offset = expected_under(q_pi(inst.mdp, inst.pi), inst.mu_pi) - expected_under(q0, inst.mu_pi)
        t = max(0.0, -offset / slope)
        e_pi = offset + expected_under(q0, inst.mu_pi)
        assert expected_under(combo_fixed_point(pr.with_(beta=t * (1 + 1e-6) + 1e-9)), inst.mu_pi) < e_pi
        if t > 0:
            assert expected_under(combo_fixed_point(pr.with_(beta=t * (1 - 1e-6))), inst.mu_pi) > e_pi
        thr.append(t)
    scan = beta_scan("perturbed")
    bmin = np.array([smallest_beta_from_which(row >= 0) for row in scan["lb"]])
    print(
        f"\n[Cor 4.3 perturbed] alpha=0 threshold: >0 in {np.mean(np.array(thr) > 0):.0%}, median "
        f"{np.median(thr):.3g}, max {max(thr):.3g}; alpha=1 smallest grid beta: median {np.median(bmin):.3g}, "
        f"max {bmin.max():.3g}"
    )
    assert np.all(bmin <= 30.0)  # holds at every grid beta >= 30 on all 100 MDPs


def test_lower_bound_fails_for_every_beta_when_rho_is_not_from_the_backup_mdp() -> None:
    """True MDP: everything moves to state 1 (reward 0). Model: state 0 is absorbing (reward 1), state 1's
    action 0 returns to 0. The model over-estimates; the dataset lives in state 1, which the model's rollouts
    rarely visit, so (rho - d)/d_f < 0 there and the mixed backup (half true dynamics) carries that
    *negative* penalty back to the start: more beta, more over-estimation."""
    P = np.zeros((2, 2, 2))
    P[:, :, 1] = 1.0
    P_hat = np.zeros((2, 2, 2))
    P_hat[0, :, 0] = P_hat[1, 0, 0] = P_hat[1, 1, 1] = 1.0
    r, mu = np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([1.0, 0.0])
    mdp, model = TabularMDP(P=P, r=r, gamma=GAMMA, mu=mu), TabularMDP(P=P_hat, r=r, gamma=GAMMA, mu=mu)
    pi, pi_beta = np.array([[0.5, 0.5], [0.1, 0.9]]), np.full((2, 2), 0.5)
    mu_pi = mu[:, None] * pi
    e_pi = expected_under(q_pi(mdp, pi), mu_pi)
    mixed = make_problem(mdp, pi, pi_beta, f=0.5, alpha=0.0, beta=0.0, dataset_size=DATASET_SIZE, model_mdp=model)
    assert expected_under(mixed.kappa, occupancy(mixed.backup_mdp, pi)) < 0  # the extra condition fails
    over = [expected_under(combo_fixed_point(mixed.with_(beta=float(b))), mu_pi) - e_pi for b in BETAS]
    assert min(over) > 0 and np.all(np.diff(over) > 0)  # over-estimates, more so as beta grows
    # With T_hat = T_model (rho from the same MDP as the backup) the bound holds for large beta.
    consistent = make_problem(
        mdp, pi, pi_beta, f=0.5, alpha=0.0, beta=0.0, dataset_size=DATASET_SIZE, model_mdp=model, backup_mdp=model
    )
    under = [e_pi - expected_under(combo_fixed_point(consistent.with_(beta=float(b))), mu_pi) for b in BETAS]
    assert under[0] < 0 and smallest_beta_from_which(np.array(under) > 0) == 1.0

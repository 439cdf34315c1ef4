"""Each loss term of Eq. 13/14/17 (and SAC, MOPO) against a hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dromo_ray.core import losses
from dromo_ray.core.agents.dromo import DromoTerms
from dromo_ray.core.agents.sac import PolicyDist, UpdateInputs
from dromo_ray.core.density import ConstantDensity
from dromo_ray.core.nets import TanhGaussianActor, TwinCritic


def test_soft_bellman_target_uses_min_of_twins_and_entropy():
    rew = torch.tensor([1.0, 2.0])
    done = torch.tensor([0.0, 1.0])
    next_q = torch.tensor([[3.0, 5.0], [4.0, 1.0]])  # (E=2, B=2)
    logp = torch.tensor([-1.0, 0.5])
    y = losses.soft_bellman_target(rew, done, next_q, logp, gamma=0.9, ent_coef=0.2)
    # row 0: 1 + 0.9 * (min(3, 4) - 0.2 * -1) ; row 1 is terminal
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * (3.0 + 0.2), 2.0]))


def test_bellman_error_is_half_mean_square_per_critic():
    q = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([1.0, 1.0, 1.0])
    assert torch.allclose(losses.bellman_error(q, y), torch.tensor([0.5 * (0 + 1 + 4) / 3, 0.5 * 3 / 3]))


def test_action_variance_penalty_matches_hand_computation():
    q = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]]])  # (E=1, B=2, M=3)
    var = [1.0, 3.0]  # unbiased: ((1-2)^2 + 0 + (3-2)^2) / 2 ; ((-1)^2 + (-1)^2 + 2^2) / 2
    n, alpha = 100.0, 0.7
    expected = alpha * (math.sqrt(var[0] / n) + math.sqrt(var[1] / n)) / 2
    out = losses.action_variance_penalty(q, torch.full((2,), n), alpha, eps=0.0)
    assert out.shape == (1,) and out.item() == pytest.approx(expected, rel=1e-6)
    # the default ε only moves the value by at most α sqrt(ε)
    out_eps = losses.action_variance_penalty(q, torch.full((2,), n), alpha)
    assert out_eps.item() == pytest.approx(expected, abs=alpha * math.sqrt(losses.VARIANCE_EPS))
    # per-state counts |D(s)| divide per state
    counts = torch.tensor([1.0, 4.0])
    out_c = losses.action_variance_penalty(q, counts, 1.0, eps=0.0)
    assert out_c.item() == pytest.approx((math.sqrt(1.0) + math.sqrt(3.0 / 4.0)) / 2, rel=1e-6)


def test_action_variance_penalty_is_zero_with_finite_gradient_for_identical_actions():
    critic = TwinCritic(3, 2, (8,))
    obs = torch.randn(4, 1, 3).expand(4, 5, 3)
    act = torch.full((4, 5, 2), 0.3)  # M = 5 identical actions per state
    q = critic(obs, act)  # (2, 4, 5)
    pen = losses.action_variance_penalty(q, torch.full((4,), 10.0), alpha=1.0)
    # identical rows can differ in the last bit through a blocked matmul; exactly 0 for exactly equal Q
    assert torch.allclose(pen, torch.zeros(2), atol=1e-6)
    assert torch.equal(losses.action_variance_penalty(q[..., :1].expand_as(q), torch.full((4,), 10.0), 1.0),
                       torch.zeros(2))
    pen.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters())


class _DeterministicPolicy(TanhGaussianActor):
    """π^β with σ = 0: every sample is tanh(μ(s))."""

    def dist_params(self, obs):
        mu, _ = super().dist_params(obs)
        return mu, torch.full_like(mu, -1e4)


def test_variance_term_vanishes_when_pi_f_is_deterministic():
    """f = 1 with a deterministic π^β: all M actions of a state are equal, Var_{π^f} Q = 0."""
    torch.manual_seed(0)
    obs_dim, act_dim, b, m = 3, 2, 6, 4
    behavior = _DeterministicPolicy(obs_dim, act_dim, (8,))
    terms = DromoTerms(alpha=1.0, beta=0.0, f=1.0, num_actions=m, act_dim=act_dim, behavior=behavior,
                       density=ConstantDensity(100))
    pi = PolicyDist(torch.randn(b, act_dim), torch.zeros(b, act_dim))
    obs = torch.randn(b, obs_dim)
    plan = terms.plan(UpdateInputs(obs, obs, 3, pi, pi, torch.Generator().manual_seed(0)))
    assert plan.n_var == b * m and plan.n_rho == 0
    acts = plan.act.reshape(b, m, act_dim)
    assert torch.equal(acts, acts[:, :1].expand_as(acts))
    critic = TwinCritic(obs_dim, act_dim, (8,))
    q_extra = critic(plan.obs, plan.act)
    out = terms.losses(critic(obs, obs[:, :act_dim]), q_extra, plan, n_real=3)
    assert torch.allclose(out["variance_penalty"], torch.zeros(2), atol=1e-6)


def test_pi_f_mixes_behaviour_and_policy_with_weight_f():
    """Each of the M actions comes from π^β with probability f (the DATASET weight), else from π."""
    obs_dim, act_dim, b, m, f = 2, 1, 200, 10, 0.3
    behavior = _DeterministicPolicy(obs_dim, act_dim, (4,))
    with torch.no_grad():
        for p in behavior.parameters():
            p.zero_()  # π^β(s) = tanh(0) = 0 exactly
    terms = DromoTerms(alpha=1.0, beta=0.0, f=f, num_actions=m, act_dim=act_dim, behavior=behavior,
                       density=ConstantDensity(1))
    pi = PolicyDist(torch.full((b, act_dim), 1.0), torch.full((b, act_dim), -1.0))  # never exactly 0
    obs = torch.zeros(b, obs_dim)
    plan = terms.plan(UpdateInputs(obs, obs, b // 2, pi, pi, torch.Generator().manual_seed(1)))
    frac_beta = (plan.act == 0).float().mean().item()
    assert frac_beta == pytest.approx(f, abs=0.03)


def test_strict_variance_penalty_eq17():
    q = torch.tensor([[1.0, 2.0, 3.0, 6.0], [1.0, 1.0, 1.0, 1.0]])
    var0 = torch.tensor([1.0, 2.0, 3.0, 6.0]).var().item()  # unbiased across the batch
    out = losses.strict_variance_penalty(q, alpha=2.0, eps=0.0)
    assert out[0].item() == pytest.approx(2.0 * math.sqrt(var0 / 4), rel=1e-6)
    assert out[1].item() == 0.0


def test_conservative_expectation_value_and_gradient_direction():
    q_rho = torch.tensor([[1.0, 3.0]], requires_grad=True)
    q_data = torch.tensor([[0.5, 0.5, 2.0]], requires_grad=True)
    out = losses.conservative_expectation(q_rho, q_data, beta=2.0)
    assert out.item() == pytest.approx(2.0 * (2.0 - 1.0))
    out.sum().backward()
    # gradient descent lowers Q on ρ rows and raises it on D rows
    assert (q_rho.grad > 0).all() and (q_data.grad < 0).all()


def test_conservative_term_expands_the_gap_between_data_and_rho_through_a_critic():
    """Descent on β(E_ρ Q - E_D Q) widens E_D Q - E_ρ Q (the gap-expanding direction of Theorem 4.4)."""
    torch.manual_seed(0)
    critic = TwinCritic(3, 2, (16, 16))
    s_rho, a_rho = torch.randn(8, 3), torch.rand(8, 2) * 2 - 1
    s_d, a_d = torch.randn(8, 3) + 2.0, torch.rand(8, 2) * 2 - 1
    opt = torch.optim.SGD(critic.parameters(), lr=1e-2)
    with torch.no_grad():
        gap_before = critic(s_d, a_d).mean() - critic(s_rho, a_rho).mean()
    for _ in range(5):
        loss = losses.conservative_expectation(critic(s_rho, a_rho), critic(s_d, a_d), beta=1.0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert critic(s_d, a_d).mean() - critic(s_rho, a_rho).mean() > gap_before + 0.05


def test_conservative_logsumexp_matches_manual_computation():
    torch.manual_seed(0)
    e, b_rho, k, b_d = 2, 3, 6, 4
    q_rho = torch.randn(e, b_rho, k, requires_grad=True)
    log_q = torch.randn(b_rho, k)
    q_data = torch.randn(e, b_d, requires_grad=True)
    out = losses.conservative_logsumexp(q_rho, log_q, q_data, beta=0.5)
    for j in range(e):
        soft = []
        for i in range(b_rho):
            w = [math.exp(q_rho[j, i, t].item() - log_q[i, t].item()) for t in range(k)]
            soft.append(math.log(sum(w) / k))
        expected = 0.5 * (sum(soft) / b_rho - q_data[j].mean().item())
        assert out[j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    out.sum().backward()
    assert (q_rho.grad > 0).all() and (q_data.grad < 0).all()


def test_sac_actor_loss_and_temperature_loss():
    q_pi = torch.tensor([[1.0, 4.0], [2.0, 3.0]])
    logp = torch.tensor([-1.0, 0.0])
    assert losses.sac_actor_loss(q_pi, logp, 0.5).item() == pytest.approx(((-0.5 - 1.0) + (0.0 - 3.0)) / 2)
    log_c = torch.tensor(0.0, requires_grad=True)
    # entropy -E[log π] = 0.5 below the target H̄ = 2: the temperature must rise (negative gradient)
    losses.entropy_coef_loss(log_c, logp, target_entropy=2.0).backward()
    assert log_c.grad.item() < 0


def test_mopo_reward_and_lambda_loss_sign():
    assert torch.allclose(losses.mopo_penalised_reward(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), 2.0),
                          torch.tensor([0.0, 0.0]))
    for u, rises in ((2.0, True), (0.1, False)):
        log_lam = torch.tensor(0.0, requires_grad=True)
        losses.mopo_lambda_loss(log_lam, torch.full((4,), u), target=1.0).backward()
        assert (log_lam.grad.item() < 0) == rises  # descent raises λ iff E[u] > δ

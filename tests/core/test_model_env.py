"""The model environment (elite sampling, termination, uncertainty signals) and branched rollouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dromo_ray.core.config import DynamicsConfig
from dromo_ray.core.dynamics import EnsembleDynamics, NormalizerStats
from dromo_ray.core.envs import ENVS, halfcheetah_termination
from dromo_ray.core.model_env import ModelEnv
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.rollout import rollout, rollout_stats

OBS, ACT = 11, 3  # Hopper-sized
CFG = DynamicsConfig(ensemble_size=5, num_elites=2, hidden_dims=(16, 16))


def random_model(seed: int = 0) -> EnsembleDynamics:
    m = EnsembleDynamics(OBS, ACT, CFG, generator=torch.Generator().manual_seed(seed))
    g = np.random.default_rng(seed)
    m.set_normalizer(NormalizerStats(
        g.normal(size=OBS + ACT).astype(np.float32), g.uniform(0.5, 2, OBS + ACT).astype(np.float32),
        g.normal(size=OBS + 1).astype(np.float32) * 0.1, g.uniform(0.05, 0.3, OBS + 1).astype(np.float32)))
    m.set_elites([3, 1])
    return m


def still_model() -> EnsembleDynamics:
    """Every member predicts exactly zero state change and zero reward (mean), with small variance."""
    m = EnsembleDynamics(OBS, ACT, CFG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.net.out.weight.zero_()
        m.net.out.bias.zero_()
        m.net.out.bias[..., OBS + 1:] = -6.0  # raw log-variance
    return m


def healthy_hopper_obs(b: int) -> torch.Tensor:
    obs = torch.zeros(b, OBS)
    obs[:, 0] = 1.25  # torso height
    return obs


def test_sampled_member_is_always_an_elite():
    env = ModelEnv(random_model(), halfcheetah_termination)
    st = env.step(torch.randn(2000, OBS), torch.rand(2000, ACT) * 2 - 1, torch.Generator().manual_seed(0))
    assert set(st.member.tolist()) == {1, 3}
    assert st.next_obs.shape == (2000, OBS) and st.rew.shape == st.unc.shape == st.done.shape == (2000,)
    assert st.done.dtype == torch.bool and set(st.signals) == {"max_aleatoric", "disagreement", "entropy"}


def test_termination_applied():
    env = ModelEnv(still_model(), ENVS["hopper"].termination_fn)
    obs = healthy_hopper_obs(4)
    obs[1, 0] = 0.5  # too low
    obs[2, 1] = 0.3  # torso angle out of range
    obs[3, 5] = 150.0  # state out of range
    st = env.step(obs, torch.zeros(4, ACT), torch.Generator().manual_seed(0), deterministic=True)
    torch.testing.assert_close(st.next_obs, obs)
    assert st.done.tolist() == [False, True, True, True]


def test_signals_match_hand_computation():
    m = random_model(1)
    m.var_scale.copy_(torch.linspace(0.5, 2.0, OBS + 1))
    obs, act = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    with torch.no_grad():
        mean, logvar = m(obs, act)  # all members, unnormalised, no var_scale
    var = (logvar.exp() * m.var_scale).double().numpy()
    mean = mean.double().numpy()
    s = m.out_std.double().numpy()
    elites = [3, 1]
    # entropy: per-dimension entropy of the elite mixture's variance, in output space normalised by out_std
    mu_n, var_n = mean[elites] / s, var[elites] / s**2
    mix = var_n.mean(0) + mu_n.var(0)
    entropy = (0.5 * (1.0 + np.log(2.0 * math.pi * mix))).mean(-1)
    for all_members, members in ((True, [0, 1, 2, 3, 4]), (False, elites)):
        env = ModelEnv(m, halfcheetah_termination, penalty="entropy", all_members=all_members)
        st = env.step(obs, act, torch.Generator().manual_seed(0))
        np.testing.assert_allclose(st.signals["entropy"].numpy(), entropy, rtol=1e-4)
        np.testing.assert_allclose(st.unc.numpy(), entropy, rtol=1e-4)  # no reference: unc = H
        aleatoric = np.linalg.norm(np.sqrt(var[members]), axis=-1).max(0)
        np.testing.assert_allclose(st.signals["max_aleatoric"].numpy(), aleatoric, rtol=1e-4)
        mu = mean[members]
        disagreement = np.linalg.norm(mu - mu.mean(0), axis=-1).max(0)
        np.testing.assert_allclose(st.signals["disagreement"].numpy(), disagreement, rtol=1e-4, atol=1e-6)
    # with a reference the entropy penalty is the excess max(0, H - H_ref)
    ref = float(np.median(entropy))
    st = ModelEnv(m, halfcheetah_termination, penalty="entropy", entropy_ref=ref).step(obs, act)
    np.testing.assert_allclose(st.unc.numpy(), np.maximum(entropy - ref, 0.0), rtol=1e-4, atol=1e-6)


def test_deterministic_returns_member_mean_and_noise_has_model_variance():
    m = random_model(2)
    env = ModelEnv(m, halfcheetah_termination)
    obs, act = torch.randn(8, OBS), torch.rand(8, ACT) * 2 - 1
    st = env.step(obs, act, torch.Generator().manual_seed(0), deterministic=True)
    mean, var = m.predict(obs, act)
    mu = mean[st.member, torch.arange(8)]
    torch.testing.assert_close(st.next_obs, obs + mu[:, :OBS])
    torch.testing.assert_close(st.rew, mu[:, OBS])
    # stochastic: one elite, one state repeated; the sample variance is var * var_scale
    m.set_elites([4])
    m.var_scale.fill_(4.0)
    n = 20000
    st = env.step(obs[:1].expand(n, OBS), act[:1].expand(n, ACT), torch.Generator().manual_seed(1))
    mean, var = m.predict(obs[:1], act[:1], members=torch.tensor([4]))
    emp = torch.cat([st.next_obs - obs[:1], st.rew[:, None]], 1)
    np.testing.assert_allclose(emp.var(0).numpy(), var[0, 0].numpy(), rtol=0.06)
    tol = 4 * float(var.max().sqrt()) / n**0.5
    np.testing.assert_allclose(emp.mean(0).numpy(), mean[0, 0].numpy(), atol=tol)


def test_step_rejects_bad_shapes_and_penalty():
    env = ModelEnv(random_model(), halfcheetah_termination)
    with pytest.raises(AssertionError):
        env.step(torch.randn(4, OBS + 1), torch.randn(4, ACT))
    with pytest.raises(AssertionError):
        env.step(torch.randn(4, OBS), torch.randn(3, ACT))
    with pytest.raises(ValueError):
        ModelEnv(random_model(), halfcheetah_termination, penalty="variance")


def _actor(seed: int = 0) -> TanhGaussianActor:
    torch.manual_seed(seed)
    return TanhGaussianActor(OBS, ACT, (16,))


def test_rollout_shapes_and_determinism():
    env = ModelEnv(random_model(3), halfcheetah_termination)
    actor = _actor()
    start = torch.randn(50, OBS)
    a = rollout(env, actor, start, 4, torch.Generator().manual_seed(0))
    b = rollout(env, actor, start, 4, torch.Generator().manual_seed(0))
    c = rollout(env, actor, start, 4, torch.Generator().manual_seed(1))
    assert a.obs.shape == (200, OBS) and a.act.shape == (200, ACT) and a.next_obs.shape == (200, OBS)
    assert a.rew.shape == a.done.shape == a.unc.shape == (200,)
    assert all(x.dtype == np.float32 for x in a)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.act, c.act)
    np.testing.assert_array_equal(a.obs[:50], start.numpy())
    np.testing.assert_array_equal(a.obs[50:100], a.next_obs[:50])  # no terminations: rows chain on
    assert np.abs(a.act).max() < 1.0 and (a.unc > 0).all()
    stats = rollout_stats(a, 50)
    assert stats["rollout/transitions"] == 200 and stats["rollout/frac_terminated"] == 0.0


def test_terminated_rows_stop():
    env = ModelEnv(still_model(), ENVS["hopper"].termination_fn)
    start = healthy_hopper_obs(10)
    start[:3, 0] = 0.5  # three rows fall on the first step
    batch = rollout(env, _actor(), start, 3, torch.Generator().manual_seed(0), deterministic_model=True)
    assert batch.size == 10 + 7 + 7
    assert batch.done[:10].tolist() == [1.0] * 3 + [0.0] * 7
    assert batch.done[10:].sum() == 0 and (batch.obs[10:, 0] == 1.25).all()
    stats = rollout_stats(batch, 10)
    assert stats["rollout/frac_terminated"] == pytest.approx(0.3)
    assert stats["rollout/transitions"] == 24 and stats["rollout/mean_reward"] == pytest.approx(0.0)
    everyone_falls = healthy_hopper_obs(5)
    everyone_falls[:, 0] = 0.1
    batch = rollout(env, _actor(), everyone_falls, 5, torch.Generator().manual_seed(0))
    assert batch.size == 5 and batch.done.sum() == 5


def test_chunked_predict_equals_one_pass():
    m = random_model(4)
    obs, act = torch.randn(50, OBS), torch.randn(50, ACT)
    for a, b in zip(m.predict(obs, act, m.elite_idx, chunk_size=7), m.predict(obs, act, m.elite_idx, chunk_size=0),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_chunked_rollout_covers_every_start_state():
    env = ModelEnv(random_model(5), halfcheetah_termination)
    start = torch.randn(50, OBS)
    a = rollout(env, _actor(), start, 3, torch.Generator().manual_seed(0), chunk_size=16)
    b = rollout(env, _actor(), start, 3, torch.Generator().manual_seed(0), chunk_size=16)
    assert a.size == 150
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # chunk-major: rows [0, 16) are chunk 0's step 0, rows [16, 32) its step 1 (chained), ...
    np.testing.assert_array_equal(a.obs[:16], start[:16].numpy())
    np.testing.assert_array_equal(a.obs[16:32], a.next_obs[:16])
    np.testing.assert_array_equal(a.obs[48:64], start[16:32].numpy())
    empty = rollout(env, _actor(), torch.zeros(0, OBS), 3, torch.Generator().manual_seed(0))
    assert empty.size == 0 and empty.obs.shape == (0, OBS)

"""π^β by maximum likelihood and the |D(s)| estimators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dromo_ray.core.behavior import fit_behavior_policy
from dromo_ray.core.config import AgentConfig
from dromo_ray.core.density import ConstantDensity, KDEDensity, StateDensity, density_from_state, make_density


def test_behavior_policy_log_likelihood_rises_on_data_from_a_known_policy():
    rng = np.random.default_rng(0)
    n, obs_dim, act_dim = 3000, 3, 2
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    w = rng.normal(size=(obs_dim, act_dim)).astype(np.float32)
    act = np.tanh(obs @ w + 0.2 * rng.normal(size=(n, act_dim))).astype(np.float32)
    act[:10] = 1.0  # saturated actions, as in D4RL, must not produce inf
    actor, m = fit_behavior_policy(obs, act, hidden=(32, 32), steps=400, batch_size=128, lr=3e-3, seed=0)
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["holdout_log_likelihood"] > m["initial_holdout_log_likelihood"] + 1.0, m
    assert m["holdout_size"] == 300
    with torch.no_grad():
        pred = actor(torch.as_tensor(obs[10:500])).numpy()
    target = np.tanh(obs[10:500] @ w)
    assert np.mean((pred - target) ** 2) < 0.5 * np.mean(target**2)
    # deterministic under the seed
    actor2, m2 = fit_behavior_policy(obs, act, hidden=(32, 32), steps=20, batch_size=128, seed=0)
    actor3, m3 = fit_behavior_policy(obs, act, hidden=(32, 32), steps=20, batch_size=128, seed=0)
    assert m2 == m3


def test_constant_density_counts_every_state_as_the_dataset():
    d = ConstantDensity(1234)
    assert isinstance(d, StateDensity)
    assert torch.equal(d.count(torch.randn(5, 3)), torch.full((5,), 1234.0))
    assert torch.equal(density_from_state(d.state_dict()).count(torch.zeros(2, 3)), torch.full((2,), 1234.0))


def test_kde_counts_more_near_data_than_far_and_clips_at_floor():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 3.0
    kde = KDEDensity(states, n_total=10_000, bandwidth=0.5, subsample=512, floor=2.0, generator=g)
    assert isinstance(kde, StateDensity) and kde.centres.shape == (512, 4)
    near = kde.count(torch.full((1, 4), 3.0))
    mid = kde.count(torch.tensor([[5.0, 3.0, 3.0, 3.0]]))
    far = kde.count(torch.full((1, 4), 100.0))
    assert 2.0 < mid.item() < near.item() <= 10_000
    assert far.item() == 2.0  # clipped at the floor
    # round trip through a state dict (as in a checkpoint)
    restored = density_from_state(kde.state_dict())
    x = torch.randn(7, 4) + 3.0
    assert torch.equal(restored.count(x), kde.count(x))


def test_kde_count_matches_its_definition():
    """|D| · mean_k exp(-||z - c_k||² / 2h²) with z normalised by the dataset mean/std."""
    states = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # mean (1, 2), std (1, 2): centres (-1, -1), (1, 1)
    kde = KDEDensity(states, n_total=100, bandwidth=1.0, subsample=10, floor=0.0)
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])  # z = (0, 0) and (-1, -1)
    expected = torch.tensor([100 * math.exp(-1.0), 100 * (1.0 + math.exp(-4.0)) / 2])
    assert torch.allclose(kde.count(x), expected, rtol=1e-5)


def test_make_density_follows_the_config():
    states = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    const = make_density(AgentConfig(density="constant"), states)
    assert isinstance(const, ConstantDensity) and const.count(torch.zeros(1, 3)).item() == 300
    kde = make_density(AgentConfig(density="kde", kde_subsample=50, density_floor=3.0), states,
                       generator=torch.Generator().manual_seed(1))
    assert isinstance(kde, KDEDensity) and kde.centres.shape == (50, 3) and kde.floor.item() == 3.0
    with pytest.raises(ValueError):
        density_from_state({"unknown": torch.zeros(1)})

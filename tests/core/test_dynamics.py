"""The probabilistic dynamics ensemble (Alg. 1 line 1): shapes, learning, early stopping, elites, merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dromo_ray.core.config import DynamicsConfig
from dromo_ray.core.dynamics import (
    DynamicsTrainer,
    EnsembleDynamics,
    holdout_split,
    make_inputs_targets,
    merge_ensembles,
    normalizer_stats,
    train_ensemble,
)

A = np.array([[0.1, -0.2], [0.3, 0.05]])
BM = np.array([[0.5], [-0.4]])
C = np.array([1.0, -0.5])
SIGMA = np.array([0.05, 0.2, 0.1])  # noise std of (ds_0, ds_1, r)


def linear_gaussian(n: int, seed: int) -> tuple[np.ndarray, ...]:
    """s' = s + A s + B a + eps_s, r = c.s + eps_r with known noise stds SIGMA."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 2)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(n, 1)).astype(np.float32)
    nxt = obs + obs @ A.T + act @ BM.T + SIGMA[:2] * rng.normal(size=(n, 2))
    rew = obs @ C + SIGMA[2] * rng.normal(size=n)
    return obs, act, nxt.astype(np.float32), rew.astype(np.float32)


def small_cfg(**kw) -> DynamicsConfig:
    base = dict(ensemble_size=3, num_elites=2, hidden_dims=(32, 32), batch_size=64, learning_rate=3e-3,
                max_epochs=30, max_epochs_since_update=5)
    base.update(kw)
    return DynamicsConfig(**base)


@pytest.fixture(scope="module")
def data():
    return make_inputs_targets(*linear_gaussian(3000, seed=0))


@pytest.fixture(scope="module")
def trained(data):
    x, y = data
    cfg = small_cfg()
    model = EnsembleDynamics(2, 1, cfg, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    tr, ho = holdout_split(len(x), cfg, rng)
    model.set_normalizer(normalizer_stats(x[tr], y[tr]))
    trainer = DynamicsTrainer(model, cfg, torch.Generator().manual_seed(2))
    metrics = trainer.train(x[tr], y[tr], x[ho], y[ho])
    return model, trainer, metrics, (x[ho], y[ho])


def test_make_inputs_targets():
    obs, act, nxt, rew = linear_gaussian(5, seed=3)
    x, y = make_inputs_targets(obs, act, nxt, rew)
    assert x.shape == (5, 3) and y.shape == (5, 3) and x.dtype == y.dtype == np.float32
    np.testing.assert_allclose(y[:, :2], nxt - obs, rtol=1e-6)
    np.testing.assert_allclose(y[:, 2], rew)
    with pytest.raises(ValueError):
        make_inputs_targets(obs, act, nxt[:4], rew)


def test_holdout_split_ratio_and_cap():
    cfg = DynamicsConfig(holdout_ratio=0.2, max_holdout=30)
    tr, ho = holdout_split(100, cfg, np.random.default_rng(0))
    assert len(ho) == 20 and len(tr) == 80 and not set(tr) & set(ho)
    tr, ho = holdout_split(1000, cfg, np.random.default_rng(0))
    assert len(ho) == 30 and len(tr) == 970


def test_shapes_and_asserted_errors():
    cfg = small_cfg(ensemble_size=4)
    m = EnsembleDynamics(5, 2, cfg)
    obs, act = torch.randn(7, 5), torch.randn(7, 2)
    mean, logvar = m(obs, act)
    assert mean.shape == logvar.shape == (4, 7, 6)
    mean3, _ = m(obs.expand(4, 7, 5), act.expand(4, 7, 2))
    torch.testing.assert_close(mean3, mean)
    mean_e, var_e = m.predict(obs, act, members=torch.tensor([2, 0]))
    assert mean_e.shape == var_e.shape == (2, 7, 6)
    torch.testing.assert_close(mean_e, mean[[2, 0]].detach())
    assert (logvar <= m.max_logvar + 2 * torch.log(m.out_std)).all()
    with pytest.raises(AssertionError):
        m(torch.randn(7, 4), act)  # wrong obs dim
    with pytest.raises(AssertionError):
        m(obs, torch.randn(6, 2))  # row mismatch
    with pytest.raises(AssertionError):
        m(torch.randn(3, 7, 5), torch.randn(3, 7, 2))  # 3 != E = 4 members
    with pytest.raises(AssertionError):
        m.forward_normalized(torch.randn(4, 7, 6))  # wrong input dim


def test_learns_linear_gaussian_system(trained):
    model, _, metrics, _ = trained
    rng = np.random.default_rng(5)
    obs = rng.normal(size=(500, 2)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(500, 1)).astype(np.float32)
    mean, var = model.predict(torch.from_numpy(obs), torch.from_numpy(act), members=model.elite_idx)
    true_mean = np.concatenate([obs @ A.T + act @ BM.T, (obs @ C)[:, None]], 1)
    err = np.abs(mean.numpy() - true_mean).mean(axis=(0, 1))
    assert (err < 0.4 * SIGMA + 0.01).all(), err
    std = np.sqrt(var.numpy()).mean(axis=(0, 1))
    np.testing.assert_allclose(std, SIGMA, rtol=0.2)
    assert metrics["dynamics/train_rows_per_s"] > 0 and metrics["dynamics/epochs"] >= 1


def test_best_weights_restored_and_elites_are_lowest_holdout(trained):
    model, trainer, metrics, (hx, hy) = trained
    losses = trainer.evaluate(hx, hy)
    np.testing.assert_allclose(losses, trainer.holdout_losses, rtol=1e-5)  # best weights are the ones kept
    expected = np.argsort(trainer.holdout_losses, kind="stable")[:2]
    assert model.elite_idx.tolist() == expected.tolist()
    assert metrics["dynamics/holdout_mse"] == pytest.approx(trainer.holdout_losses[expected].mean())
    flags = [metrics[f"dynamics/is_elite_member_{i}"] for i in range(3)]
    assert [i for i, f in enumerate(flags) if f == 1.0] == sorted(expected.tolist())
    assert all(isinstance(v, float) for v in metrics.values())


def test_early_stopping_stops_without_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3)).astype(np.float32)
    y = rng.normal(size=(600, 3)).astype(np.float32)  # pure noise: nothing to learn beyond the mean
    cfg = small_cfg(max_epochs=0, max_epochs_since_update=2, batch_size=100)
    model = EnsembleDynamics(2, 1, cfg, generator=torch.Generator().manual_seed(0))
    metrics = train_ensemble(model, x, y, rng, torch.Generator().manual_seed(0))
    assert 3 <= metrics["dynamics/epochs"] < 60


def test_max_epochs_caps_training(data):
    x, y = data
    cfg = small_cfg(max_epochs=2)
    model = EnsembleDynamics(2, 1, cfg, generator=torch.Generator().manual_seed(0))
    metrics = train_ensemble(model, x[:500], y[:500], np.random.default_rng(0),
                             torch.Generator().manual_seed(0))
    assert metrics["dynamics/epochs"] == 2


def _train_seeded(x, y, seed: int, cfg: DynamicsConfig) -> EnsembleDynamics:
    model = EnsembleDynamics(2, 1, cfg, generator=torch.Generator().manual_seed(seed))
    train_ensemble(model, x, y, np.random.default_rng(seed), torch.Generator().manual_seed(seed))
    return model


def test_determinism_under_seed(data):
    x, y = data[0][:600], data[1][:600]
    cfg = small_cfg(max_epochs=3, bootstrap=True)
    a, b, c = (_train_seeded(x, y, s, cfg) for s in (7, 7, 8))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.net.out.weight, c.net.out.weight)


def test_merge_equals_concatenation(data):
    x, y = data[0][:800], data[1][:800]
    cfg = small_cfg(max_epochs=2, num_elites=3)
    tr, ho = holdout_split(len(x), cfg, np.random.default_rng(0))
    stats = normalizer_stats(x[tr], y[tr])
    subs, losses = [], []
    for k, seed in ((2, 10), (3, 11)):  # two "actors": same split and stats, different init seeds
        m = EnsembleDynamics(2, 1, cfg, num_members=k, generator=torch.Generator().manual_seed(seed))
        m.set_normalizer(stats)
        t = DynamicsTrainer(m, cfg, torch.Generator().manual_seed(seed))
        t.train(x[tr], y[tr], x[ho], y[ho])
        subs.append(m)
        losses.append(t.holdout_losses)
    merged = merge_ensembles(subs, losses)
    assert merged.num_members == 5
    obs, act = torch.randn(9, 2), torch.randn(9, 1)
    with torch.no_grad():
        mm, ml = merged(obs, act)
        parts = [s(obs, act) for s in subs]
    torch.testing.assert_close(mm, torch.cat([p[0] for p in parts]))
    torch.testing.assert_close(ml, torch.cat([p[1] for p in parts]))
    all_losses = np.concatenate(losses)
    assert merged.elite_idx.tolist() == np.argsort(all_losses, kind="stable")[:3].tolist()
    # the merged ensemble's holdout losses are the concatenation of the parts'
    t = DynamicsTrainer(merged, cfg)
    np.testing.assert_allclose(t.evaluate(x[ho], y[ho]), all_losses, rtol=1e-5)
    other = EnsembleDynamics(2, 1, cfg, num_members=2)  # default normaliser: differs
    with pytest.raises(ValueError):
        merge_ensembles([subs[0], other], [losses[0], losses[0]])


def test_state_dict_round_trip(trained):
    model, trainer, _, _ = trained
    model.var_scale.fill_(1.5)
    clone = EnsembleDynamics(2, 1, small_cfg())  # fresh: different weights, default elites and stats
    clone.load_state_dict(model.state_dict())
    obs, act = torch.randn(6, 2), torch.randn(6, 1)
    for a, b in zip(model.predict(obs, act), clone.predict(obs, act), strict=True):
        torch.testing.assert_close(a, b)
    assert clone.elite_idx.tolist() == model.elite_idx.tolist()
    model.var_scale.fill_(1.0)
    # a different elite count (e.g. after a merge) loads as well
    model.set_elites([2])
    clone.load_state_dict(model.state_dict())
    assert clone.elite_idx.tolist() == [2] and clone.num_elites == 1
    model.set_elites(np.argsort(trainer.holdout_losses, kind="stable")[:2])
    state = trainer.state_dict()
    t2 = DynamicsTrainer(clone, small_cfg())
    t2.load_state_dict(state)
    np.testing.assert_array_equal(t2.holdout_losses, trainer.holdout_losses)

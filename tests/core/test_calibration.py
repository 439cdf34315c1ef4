"""Appendix A: l1 calibration error of Gaussian predictions and per-dimension variance recalibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dromo_ray.core.calibration import calibration_error, fit_variance_scale, recalibrate
from dromo_ray.core.config import DynamicsConfig
from dromo_ray.core.dynamics import EnsembleDynamics


def gaussian_rows(n: int = 20000, d: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(n, d))
    std = rng.uniform(0.1, 2.0, size=(n, d))
    targets = mean + std * rng.normal(size=(n, d))
    return mean, std, targets


def test_calibrated_predictor_has_near_zero_error():
    mean, std, y = gaussian_rows()
    ce = calibration_error(mean, std, y)
    assert ce.shape == (3,)
    assert (ce < 0.01).all(), ce


@pytest.mark.parametrize("factor", [3.0, 1.0 / 3.0])
def test_miscalibrated_predictor_has_large_error(factor):
    mean, std, y = gaussian_rows()
    ce = calibration_error(mean, std * factor, y)
    assert (ce > 0.12).all(), ce


def test_mixture_of_identical_members_equals_single_and_torch_inputs_work():
    mean, std, y = gaussian_rows(2000)
    single = calibration_error(mean, std * 2, y, num_levels=10)
    mix = calibration_error(torch.tensor(np.stack([mean] * 3)), torch.tensor(np.stack([std * 2] * 3)),
                            torch.tensor(y), num_levels=10)
    np.testing.assert_allclose(mix, single)
    with pytest.raises(ValueError):
        calibration_error(mean, std[:10], y)


def test_fit_variance_scale_closed_form_recovers_factor():
    mean, std, y = gaussian_rows()
    s = fit_variance_scale(mean, std / 3.0, y)
    np.testing.assert_allclose(s, 9.0, rtol=0.05)
    assert (calibration_error(mean, std / 3.0 * np.sqrt(s), y) < 0.01).all()


def constant_model(obs_dim: int = 2, act_dim: int = 1) -> EnsembleDynamics:
    """Every member predicts mean 0 and one fixed variance per dim, whatever the input."""
    cfg = DynamicsConfig(ensemble_size=3, num_elites=2, hidden_dims=(8,))
    m = EnsembleDynamics(obs_dim, act_dim, cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.net.out.weight.zero_()
        m.net.out.bias.zero_()
        m.net.out.bias[..., obs_dim + 1:] = torch.tensor([-2.0, -1.0, 0.0])
    return m


@pytest.mark.parametrize("true_factor", [3.0, 1.0 / 3.0])
def test_recalibrate_reduces_error_and_sets_var_scale(true_factor):
    m = constant_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 3)).astype(np.float32)
    with torch.no_grad():
        _, logvar = m(torch.from_numpy(x[:, :2]), torch.from_numpy(x[:, 2:]))
    model_std = (0.5 * logvar[0]).exp().numpy()
    y = (true_factor * model_std * rng.normal(size=model_std.shape)).astype(np.float32)
    out = recalibrate(m, x, y)
    assert out["dynamics/calibration_error_before"] > 0.12
    assert out["dynamics/calibration_error_after"] < 0.02
    assert out["dynamics/calibration_accepted"] == 1.0
    np.testing.assert_allclose(m.var_scale.numpy(), true_factor**2, rtol=0.08)
    # the recalibrated model now reports the scaled variance
    _, var = m.predict(torch.from_numpy(x[:5, :2]), torch.from_numpy(x[:5, 2:]))
    np.testing.assert_allclose(var[0].numpy(), (model_std[:5] ** 2) * m.var_scale.numpy(), rtol=1e-5)


def test_recalibrate_rejects_bad_shapes():
    m = constant_model()
    with pytest.raises(ValueError):
        recalibrate(m, np.zeros((10, 4), np.float32), np.zeros((10, 3), np.float32))

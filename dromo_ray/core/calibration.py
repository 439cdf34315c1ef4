"""Calibration of the dynamics model's Gaussian predictions (appendix A).

Theorem A.2 bounds the value gap between the learned and the true MDP by the model's l1 calibration
error, so we measure it and reduce it with a per-dimension variance scale.

The l1 calibration error of a predictive distribution Q, per output dim d, over L quantile levels
p_j = j / (L + 1):  CE_d = (1/L) sum_j | freq_d(p_j) - p_j |,  freq_d(p) = fraction of rows whose target
falls below Q's p-quantile, i.e. whose PIT value F_Q(y_d) <= p.

Which distribution. :func:`recalibrate` measures the *uniform mixture of the elites*, because that is what
:class:`dromo_ray.core.model_env.ModelEnv` samples from (a random elite per row, then its Gaussian); its CDF
is the mean of the elites' Gaussian CDFs. The scale is one variance factor per output dim shared by all
members, fitted in closed form as the minimiser of the elites' summed Gaussian NLL on the fitting rows,
s_d = mean over elites and rows of ((y - mu_i) / sigma_i)^2, then kept only if it lowers the mixture's
error on the evaluation rows (see ``fit_fraction``). Platt-like scaling has known limits (Remark A.4); this
is the simplest member of that family.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dromo_ray.core.dynamics import EnsembleDynamics

Array = np.ndarray | torch.Tensor


def _t(a: Array) -> torch.Tensor:
    return torch.as_tensor(a).detach().cpu().to(torch.float64)


def _pit(mean: torch.Tensor, std: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Probability integral transform F(y): (N, D) for a Gaussian or an (M, N, D) uniform mixture."""
    z = (targets - mean) / std
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return cdf.mean(0) if cdf.dim() == 3 else cdf


def _check(mean: torch.Tensor, std: torch.Tensor, targets: torch.Tensor) -> None:
    if mean.shape != std.shape or mean.dim() not in (2, 3) or tuple(targets.shape) != tuple(mean.shape[-2:]):
        raise ValueError("calibration: expected mean and std (N, D) or (M, N, D) and targets (N, D); got "
                         f"{tuple(mean.shape)}, {tuple(std.shape)}, {tuple(targets.shape)}")


def calibration_error(mean: Array, std: Array, targets: Array, num_levels: int = 20) -> np.ndarray:
    """Per-dimension l1 calibration error (D,) of Gaussian predictions.

    mean, std: (N, D) for one Gaussian per row, or (M, N, D) for a uniform mixture of M Gaussians per row.
    targets (N, D). 0 is perfectly calibrated; the maximum is about 0.5.
    """
    mean, std, targets = _t(mean), _t(std), _t(targets)
    _check(mean, std, targets)
    u = _pit(mean, std, targets)  # (N, D)
    p = torch.arange(1, num_levels + 1, dtype=torch.float64) / (num_levels + 1)  # (L,)
    freq = (u.unsqueeze(-1) <= p).to(torch.float64).mean(0)  # (D, L)
    return (freq - p).abs().mean(-1).numpy()


def fit_variance_scale(mean: Array, std: Array, targets: Array, eps: float = 1e-12) -> np.ndarray:
    """Per-dimension variance scale s (D,) minimising the Gaussian NLL of N(mu, s sigma^2) on the rows:
    s_d = mean(((y - mu) / sigma)^2), pooled over members when given (M, N, D)."""
    mean, std, targets = _t(mean), _t(std), _t(targets)
    _check(mean, std, targets)
    z2 = ((targets - mean) / std).square()
    s = z2.reshape(-1, z2.shape[-1]).mean(0)
    return s.clamp_min(eps).numpy()


@torch.no_grad()
def recalibrate(model: EnsembleDynamics, inputs: np.ndarray, targets: np.ndarray, num_levels: int = 20,
                fit_fraction: float = 0.5) -> dict[str, float]:
    """Fit ``model.var_scale`` on holdout rows (inputs (N, D_o + D_a), targets (N, D_o + 1), as from
    :func:`dromo_ray.core.dynamics.make_inputs_targets`) and report the elite mixture's calibration error.

    The first ``fit_fraction`` of the rows fit the scale and the rest measure the error before (raw model,
    scale 1) and after, so that "after" is out of sample; ``fit_fraction=1`` fits and measures on all rows.
    The new scale is kept only when it does not raise the error; otherwise ``var_scale`` returns to ones.
    Returns ``dynamics/calibration_error_before``, ``..._after`` (means over dims), ``..._accepted`` (0/1)
    and ``dynamics/var_scale_mean``.
    """
    if not 0.0 < fit_fraction <= 1.0:
        raise ValueError(f"recalibrate: fit_fraction must be in (0, 1], got {fit_fraction}")
    dev = model.in_mean.device
    x = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=dev)
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32), device=dev)
    if x.dim() != 2 or x.shape[1] != model.in_dim or tuple(y.shape) != (x.shape[0], model.out_dim):
        raise ValueError(f"recalibrate: expected inputs (N, {model.in_dim}) and targets "
                         f"(N, {model.out_dim}), got {tuple(x.shape)} and {tuple(y.shape)}")
    mean, logvar = model(x[:, : model.obs_dim], x[:, model.obs_dim:], members=model.elite_idx)
    mean, std, y = mean.cpu(), (0.5 * logvar).exp().cpu(), y.cpu()
    n = y.shape[0]
    n_fit = n if fit_fraction >= 1.0 or n < 4 else max(1, int(round(n * fit_fraction)))
    ev = slice(n_fit, n) if n_fit < n else slice(0, n)
    scale = fit_variance_scale(mean[:, :n_fit], std[:, :n_fit], y[:n_fit])
    before = calibration_error(mean[:, ev], std[:, ev], y[ev], num_levels)
    after = calibration_error(mean[:, ev], std[:, ev] * torch.as_tensor(np.sqrt(scale), dtype=std.dtype),
                              y[ev], num_levels)
    accepted = float(after.mean()) <= float(before.mean())
    new_scale = torch.as_tensor(scale if accepted else np.ones_like(scale), dtype=torch.float32, device=dev)
    model.var_scale.copy_(new_scale)
    return {
        "dynamics/calibration_error_before": float(before.mean()),
        "dynamics/calibration_error_after": float(after.mean() if accepted else before.mean()),
        "dynamics/calibration_accepted": float(accepted),
        "dynamics/var_scale_mean": float(new_scale.mean()),
    }

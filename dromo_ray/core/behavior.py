"""π^β by maximum likelihood (section 2.2: π^β ← argmax_π E_{s,a~D}[log π(a|s)]), needed by DROMO's π^f.

A :class:`TanhGaussianActor` is fitted to the (s, a) pairs of D. Dataset actions are clipped into
[-1 + ε, 1 - ε] before atanh (ε = ``action_eps``, 1e-4 by default): D4RL-style datasets hold actions saturated at
exactly ±1, whose pre-tanh value would be infinite; with ε = 1e-4 it is atanh(1 - 1e-4) ≈ 4.95, which the actor's
log-std range can represent. The paper writes E[π(a|s)]; we maximise the log-likelihood (the usual MLE).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dromo_ray.core.nets import TanhGaussianActor


def fit_behavior_policy(obs: np.ndarray, act: np.ndarray, *, hidden: tuple[int, ...] = (256, 256), steps: int,
                        batch_size: int = 256, lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
                        holdout_ratio: float = 0.1, max_holdout: int = 5000,
                        action_eps: float = 1e-4) -> tuple[TanhGaussianActor, dict[str, float]]:
    """Fit π^β on obs (N, D_o), act (N, D_a) in [-1, 1]; returns the actor (on ``device``) and metrics.

    Metrics (floats): ``holdout_log_likelihood`` (mean log π^β(a|s) per transition on the held-out rows, after
    fitting), ``initial_holdout_log_likelihood`` (the same before fitting), ``train_log_likelihood`` (mean over
    the last 10% of steps), ``holdout_size``, ``steps``.
    """
    obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
    act_t = torch.as_tensor(np.asarray(act), dtype=torch.float32).clamp(-1.0 + action_eps, 1.0 - action_eps)
    if obs_t.dim() != 2 or act_t.dim() != 2 or obs_t.shape[0] != act_t.shape[0]:
        raise ValueError(f"fit_behavior_policy: obs (N, D_o) and act (N, D_a) expected, got "
                         f"{tuple(obs_t.shape)} and {tuple(act_t.shape)}")
    if steps < 1:
        raise ValueError("fit_behavior_policy: steps must be >= 1")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    n = obs_t.shape[0]
    n_hold = min(int(max_holdout), int(n * holdout_ratio)) if n >= 10 else 0
    perm = torch.randperm(n, generator=gen)
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]
    obs_t, act_t = obs_t.to(dev), act_t.to(dev)
    hold_obs, hold_act = obs_t[hold_idx.to(dev)], act_t[hold_idx.to(dev)]
    train_idx = train_idx.to(dev)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        actor = TanhGaussianActor(obs_t.shape[1], act_t.shape[1], tuple(hidden))
    actor = actor.to(dev)
    opt = torch.optim.Adam(actor.parameters(), lr=lr, **_adam_kwargs(dev))

    @torch.no_grad()
    def holdout_ll() -> float:
        if n_hold == 0:
            return float("nan")
        total = sum(actor.log_prob(o, a, eps=action_eps).sum() for o, a in
                    zip(hold_obs.split(8192), hold_act.split(8192), strict=True))
        return float(total) / n_hold

    init_ll = holdout_ll()
    tail = max(1, steps // 10)
    tail_sum = torch.zeros((), device=dev)
    for step in range(steps):
        rows = train_idx[torch.randint(len(train_idx), (batch_size,), generator=gen).to(dev)]
        ll = actor.log_prob(obs_t[rows], act_t[rows], eps=action_eps).mean()
        opt.zero_grad(set_to_none=True)
        (-ll).backward()
        opt.step()
        if step >= steps - tail:
            tail_sum += ll.detach()
    actor.eval()
    metrics = {
        "holdout_log_likelihood": holdout_ll(),
        "initial_holdout_log_likelihood": init_ll,
        "train_log_likelihood": float(tail_sum) / tail,
        "holdout_size": float(n_hold),
        "steps": float(steps),
    }
    if not math.isfinite(metrics["train_log_likelihood"]):
        raise FloatingPointError("fit_behavior_policy: non-finite log-likelihood")
    return actor, metrics


def _adam_kwargs(device: torch.device) -> dict[str, bool]:
    # Fused Adam (one kernel over all parameters) on CPU and CUDA.
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}

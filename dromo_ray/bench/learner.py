"""``dromo-ray bench learner``: agent updates/s and achieved GFLOP/s at the reference sizes.

Reference sizes: batch 256 (f = 0.5: 128 rows from D, 128 from D_model), 3×256 actor and critics, Hopper
(|S| = 11, |A| = 3), M = 10 actions per state, the log-sum-exp conservative form over 3×10 actions per ρ-state,
a KDE density over 2048 centres and a 2×256 behaviour policy for DROMO; for MOBILE the 7 × 4×200 ensemble of the
presets (5 elites) and N = 10 next-state samples per elite (its penalty: 5·10 rows of π_θ and Q_ψ' per model row).

FLOPs are counted from the layer sizes and the rows that pass through each network in one update: 2·in·out per
row and linear layer; forward + backward = 3× forward for a network being trained, forward only for targets and
no-grad samplers, forward + input-gradient backward = 2× forward for the critic in the actor step (its weights
get no gradient there). Element-wise work (activations, log-probs, log-sum-exp, the KDE) is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from dromo_ray.bench.common import check_at_least, device_name, emit, measured_matmul_peak_gflops, resolve_device, sync
from dromo_ray.core.agents import make_agent
from dromo_ray.core.config import AgentConfig, DynamicsConfig
from dromo_ray.core.density import KDEDensity
from dromo_ray.core.dynamics import EnsembleDynamics
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.threads import set_torch_threads
from dromo_ray.core.types import Batch, MixedBatch

OBS_DIM, ACT_DIM = 11, 3
DATASET_SIZE = 1_000_000


def _linear_flops(module: torch.nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def flops_per_update(cfg: AgentConfig, batch: int, actor: torch.nn.Module, critic: Any,
                     behavior: torch.nn.Module | None, dynamics: EnsembleDynamics | None = None) -> dict[str, float]:
    """Forward-equivalent FLOPs of one update, by network (see the module docstring)."""
    n_real = int(round(cfg.f * batch))
    n_model = batch - n_real
    m = cfg.num_actions
    rows = batch  # the d_f batch itself
    uses_variance = cfg.needs_behavior_policy()
    if uses_variance:
        rows += batch * m
    if cfg.effective_beta() > 0:
        rows += n_model * (3 * m if cfg.conservative_form == "logsumexp" else 1)
    q = critic.net.flops_per_row()
    a = _linear_flops(actor)
    out = {
        "critic_rows": float(rows),
        "critic": 3.0 * rows * q,  # trained: Bellman + variance + conservative rows in one forward/backward
        "target_critic": 1.0 * batch * q,
        "critic_in_actor_step": 2.0 * batch * q,
        "actor": 3.0 * batch * a + 1.0 * batch * a,  # trained at s; no-grad sampler at s'
        "behavior": float(batch * _linear_flops(behavior)) if (uses_variance and behavior is not None) else 0.0,
    }
    if dynamics is not None and cfg.needs_dynamics():
        # MOBILE: the elites' forward at the model rows, then π_θ and Q_ψ' (no grad) at N·K sampled s' per row.
        k = int(dynamics.elite_idx.numel())
        rows_s = n_model * k * cfg.mobile_num_samples
        out["dynamics"] = float(n_model * dynamics.flops_per_row() * k / dynamics.num_members)
        out["penalty_actor"] = float(rows_s * a)
        out["penalty_target_critic"] = float(rows_s * q)
    out["total"] = sum(v for k, v in out.items() if k != "critic_rows")
    return out


def _batches(n: int, batch: int, f: float, device: torch.device, gen: torch.Generator) -> list[MixedBatch]:
    n_real = int(round(f * batch))
    sizes = (n_real, batch - n_real)
    out = []
    for _ in range(n):
        parts = []
        for j, b in enumerate(sizes):
            obs = torch.randn(b, OBS_DIM, generator=gen)
            next_obs = obs + 0.1 * torch.randn(b, OBS_DIM, generator=gen)
            parts.append(Batch(obs=obs, act=torch.rand(b, ACT_DIM, generator=gen) * 1.98 - 0.99,
                               rew=torch.randn(b, generator=gen), next_obs=next_obs,
                               done=(torch.rand(b, generator=gen) < 0.01).float(),
                               unc=torch.rand(b, generator=gen) if j == 1 else torch.zeros(b)).to(device))
        out.append(MixedBatch(*parts))
    return out


def measure(algo: str, device: torch.device, batch: int = 256, steps: int = 50, warmup: int = 5, rounds: int = 3,
            cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time ``rounds`` × ``steps`` updates (``sync_metrics=False``, one host sync at the end of each round) after
    ``warmup`` updates. The best round is the figure (the machine may be shared); the median is reported too."""
    sizes: dict[str, Any] = dict(algorithm=algo, batch_size=batch, hidden_dims=(256, 256, 256), num_actions=10,
                                 conservative_form="logsumexp", variance_form="action", density="kde")
    cfg = AgentConfig(**{**sizes, **(cfg_overrides or {})})
    cfg.validate()
    gen = torch.Generator().manual_seed(0)
    behavior = density = None
    if algo == "dromo":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            behavior = TanhGaussianActor(OBS_DIM, ACT_DIM, (256, 256))
        density = KDEDensity(torch.randn(20_000, OBS_DIM, generator=gen), n_total=DATASET_SIZE,
                             bandwidth=cfg.kde_bandwidth, subsample=cfg.kde_subsample, floor=cfg.density_floor,
                             generator=gen)
    dynamics = None
    if cfg.needs_dynamics():
        dynamics = EnsembleDynamics(OBS_DIM, ACT_DIM, DynamicsConfig(), generator=torch.Generator().manual_seed(2))
    agent = make_agent(cfg, OBS_DIM, ACT_DIM, device=device, seed=0, behavior=behavior, density=density,
                       dataset_size=DATASET_SIZE, dynamics=dynamics)
    batches = _batches(8, batch, cfg.f, device, gen)
    for i in range(warmup):
        agent.update(batches[i % len(batches)], sync_metrics=False)
    sync(device)
    times, loss = [], float("nan")
    for _ in range(rounds):
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        for i in range(steps):
            metrics = agent.update(batches[i % len(batches)], sync_metrics=False)
        loss = float(metrics["train/critic_loss"])  # the one host sync of the round
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = flops_per_update(cfg, batch, agent.actor, agent.critic, behavior, dynamics)
    ups = steps / min(times)
    return {"algo": algo, "updates_per_s": ups, "updates_per_s_median": steps / statistics.median(times),
            "ms_per_update": 1e3 / ups, "critic_rows_per_update": int(flops["critic_rows"]),
            "gflop_per_update": flops["total"] / 1e9, "achieved_gflops": flops["total"] * ups / 1e9,
            "final_critic_loss": loss}


def peak_gflops(device: torch.device, tries: int = 3) -> float:
    """The best of a few short matmul-peak measurements (robust to a neighbour's burst on a shared machine)."""
    return max(measured_matmul_peak_gflops(device, seconds=0.5) for _ in range(tries))


def run(args: argparse.Namespace) -> int:
    check_at_least("--steps", args.steps, 1)
    check_at_least("--batch", args.batch, 2)  # (f = 0.5 splits it between D and D_model)
    check_at_least("--threads", args.threads, 0)
    resolve_device(args.device)
    threads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
    set_torch_threads(threads)
    device = resolve_device(args.device)
    peak_before = peak_gflops(device)
    result = measure(args.algo, device, batch=args.batch, steps=args.steps)
    peak = max(peak_before, peak_gflops(device))  # before and after: a neighbour's burst lowers one of them
    result.update({"measured_matmul_peak_gflops": peak, "fraction_of_peak": result["achieved_gflops"] / peak,
                   "device": device_name(device), "threads": torch.get_num_threads(), "batch": args.batch,
                   "steps": args.steps})
    emit(result, args.json, f"learner bench: {args.algo}")
    return 0

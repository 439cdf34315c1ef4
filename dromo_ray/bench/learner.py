"""``dromo-ray bench learner``: learner updates/s (eager and captured), wait fraction, achieved GFLOP/s.

Timed through the learner's own loop, ``Learner.train``: each update draws its d_f batch (dataset rows on the
device, model rows from chunks of an in-process D_model) and runs the algorithm's update, eagerly or as one CUDA
graph replay (``agent.update_mode: captured``, ``core/agents/captured.py``); one host sync per round.

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

import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from dromo_ray.bench.common import device_name, measured_matmul_peak_gflops, resolve_device, sync
from dromo_ray.core.agents import make_agent
from dromo_ray.core.agents.captured import resolve_update_mode
from dromo_ray.core.buffer import ReplayBuffer
from dromo_ray.core.config import AgentConfig, DynamicsConfig
from dromo_ray.core.density import KDEDensity
from dromo_ray.core.dynamics import EnsembleDynamics
from dromo_ray.core.learner import DatasetSampler, Learner
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.threads import set_torch_threads
from dromo_ray.core.types import NumpyBatch

OBS_DIM, ACT_DIM = 11, 3
DATASET_SIZE = 1_000_000
"""|D| the KDE density counts against (D4RL's 1M transitions)."""
DATA_ROWS = 100_000
"""Synthetic rows of the bench's dataset and of its D_model."""
MOPO_AUTO_DELTA = 0.5
"""δ of MOPO-auto's dual update for the bench (a run's driver sets it from D; speed does not depend on it)."""


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


def _agent(algo: str, device: torch.device, batch: int, hidden: tuple[int, ...], update_mode: str,
           gen: torch.Generator) -> tuple[Any, AgentConfig, Any, Any]:
    sizes: dict[str, Any] = dict(algorithm=algo, batch_size=batch, hidden_dims=hidden, num_actions=10,
                                 conservative_form="logsumexp", variance_form="action", density="kde",
                                 update_mode=update_mode)
    if algo == "mopo_auto":
        sizes["mopo_target_entropy"] = MOPO_AUTO_DELTA
    cfg = AgentConfig(**sizes)
    cfg.validate()
    behavior = density = None
    if cfg.needs_behavior_policy():
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
    return agent, cfg, behavior, dynamics


def synthetic_rows(n: int, rng: np.random.Generator, model: bool) -> NumpyBatch:
    """n Hopper-sized transitions of random numbers (speed does not depend on the values)."""
    obs = rng.standard_normal((n, OBS_DIM), dtype=np.float32)
    return NumpyBatch(obs, rng.uniform(-0.99, 0.99, (n, ACT_DIM)).astype(np.float32),
                      rng.standard_normal(n, dtype=np.float32),
                      obs + 0.1 * rng.standard_normal((n, OBS_DIM), dtype=np.float32),
                      (rng.random(n) < 0.01).astype(np.float32),
                      rng.random(n, dtype=np.float32) if model else np.zeros(n, np.float32))


def learner_core(algo: str, device: torch.device, *, batch: int = 256, hidden: tuple[int, ...] = (256, 256, 256),
                 update_mode: str = "eager", rows: int = DATA_ROWS, chunk_batches: int = 64) -> tuple[Learner, Any]:
    """The learner of the bench: the agent at the reference sizes, ``rows`` synthetic dataset rows on ``device``
    and a D_model of ``rows`` synthetic rows in an in-process :class:`ReplayBuffer` (numpy, as the replay actor
    holds it), served in chunks of ``chunk_batches`` batches; returns (Learner, (cfg, behavior, dynamics))."""
    gen = torch.Generator().manual_seed(0)
    agent, cfg, behavior, dynamics = _agent(algo, device, batch, hidden, update_mode, gen)
    rng = np.random.default_rng(0)
    sampler = DatasetSampler(synthetic_rows(rows, rng, model=False), device, seed=1)
    buf = ReplayBuffer(rows, OBS_DIM, ACT_DIM)
    buf.add(synthetic_rows(rows, rng, model=True))
    core = Learner(agent, sampler, batch, cfg.f, lambda k, b: buf.sample_chunk(k, b, rng),
                       chunk_batches=chunk_batches, update_mode=update_mode)
    return core, (cfg, behavior, dynamics)


def time_core(core: Learner, device: torch.device, steps: int, warmup: int, rounds: int) -> dict[str, float]:
    """Best of ``rounds`` × ``steps`` updates through ``Learner.train`` (its one host sync ends each round)
    after ``warmup`` updates (which include the capture); the learner's wait fraction over all rounds."""
    core.train(warmup)
    sync(device)
    times: list[float] = []
    wait0 = core.data_wait_s
    loss = float("nan")
    for _ in range(rounds):
        t0 = time.perf_counter()
        loss = core.train(steps)["train/critic_loss"]
        sync(device)
        times.append(time.perf_counter() - t0)
    wait = core.data_wait_s - wait0
    return {"updates_per_s": steps / min(times), "updates_per_s_median": steps / statistics.median(times),
            "wait_fraction": wait / sum(times), "final_critic_loss": loss}


def peak_gflops(device: torch.device, tries: int = 3) -> float:
    """The best of a few short matmul-peak measurements (robust to a neighbour's burst on a shared machine)."""
    return max(measured_matmul_peak_gflops(device, seconds=0.5) for _ in range(tries))


def measure_learner(*, algo: str = "dromo", device: str = "cpu", batch: int = 256, steps: int = 50,
                    threads: int = 0, update_modes: tuple[str, ...] = ("eager", "captured"),
                    hidden: tuple[int, ...] = (256, 256, 256), warmup: int = 5, rounds: int = 3,
                    peak: bool = True) -> dict[str, Any]:
    """Learner updates/s of ``algo`` in each of ``update_modes`` (``eager``, ``captured``), through the learner's
    own loop (``Learner.train``: d_f batch assembly, model chunks, one host sync per round).

    Returns updates/s and the learner's wait fraction per mode (``eager_updates_per_s``, ...), the captured-vs-eager
    ratio, and for the device's default mode (``agent.update_mode: auto``: captured on CUDA, eager elsewhere, or
    the only mode measured) ``updates_per_s``, FLOPs per update, achieved GFLOP/s and, with ``peak``, the fraction
    of the measured fp32 matmul peak. On CPU ``captured`` is the static-buffer step without a graph (no CUDA graph
    exists there), so its ratio only shows what the static buffers cost. ``--device`` errors are UserErrors.
    """
    dev = resolve_device(device)
    set_torch_threads(threads if threads > 0 else (os.cpu_count() or 1))
    peak_before = peak_gflops(dev) if peak else float("nan")
    modes = tuple(dict.fromkeys(update_modes))
    result: dict[str, Any] = {"algo": algo}
    flops: dict[str, float] = {}
    for mode in modes:
        core, (cfg, behavior, dynamics) = learner_core(algo, dev, batch=batch, hidden=hidden, update_mode=mode)
        timing = time_core(core, dev, steps, warmup, rounds)
        result.update({f"{mode}_{k}": v for k, v in timing.items()})
        if mode == "captured":  # False on CPU, or where an auto capture fell back to eager
            result["captured_graph"] = bool(core.captured is not None and core.captured.graph)
        flops = flops_per_update(cfg, batch, core.agent.actor, core.agent.critic, behavior, dynamics)
    default = resolve_update_mode("auto", dev)
    default = default if default in modes else modes[0]
    ups = result[f"{default}_updates_per_s"]
    result.update({"update_mode": default, "updates_per_s": ups, "wait_fraction": result[f"{default}_wait_fraction"],
                   "ms_per_update": 1e3 / ups, "critic_rows_per_update": int(flops["critic_rows"]),
                   "gflop_per_update": flops["total"] / 1e9, "achieved_gflops": flops["total"] * ups / 1e9})
    if {"eager", "captured"} <= set(modes):
        result["captured_vs_eager"] = result["captured_updates_per_s"] / result["eager_updates_per_s"]
    if peak:
        pk = max(peak_before, peak_gflops(dev))  # before and after: a neighbour's burst lowers one of them
        result.update({"measured_matmul_peak_gflops": pk, "fraction_of_peak": result["achieved_gflops"] / pk})
    result.update({"device": device_name(dev), "threads": torch.get_num_threads(), "batch": batch, "steps": steps})
    return result

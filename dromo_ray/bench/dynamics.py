"""``dromo-ray bench dynamics``: ensemble training rows/s and model-env transitions/s, with achieved GFLOP/s.

Definitions (so that figures compare with a reference single-process PyTorch MBPO-style trainer):

* **row** (training): one (s, a) row of the minibatch per gradient step of the *whole* ensemble. With
  batch size B each step counts B rows, although each of the E members sees its own B rows (its own
  shuffle), i.e. E * B member-rows. ``train_rows_per_s`` = B x steps/s; ``train_member_rows_per_s`` =
  E x that. This is the reference's definition (it reports ~20,000 rows/s for 7 members of 4x200 SiLU,
  B = 256).
* **FLOPs** are counted from layer sizes: a forward of one row through every member is
  sum_layers 2 * d_in * d_out * E; a training row costs 3x that (forward + backward for inputs and
  weights); elementwise work, the loss and Adam are not counted. The model-env step counts the forward of
  the K elites and of the policy.
* **transition** (model env): one row advanced by one step: the policy's action plus one model step
  (K-elite forward, member sampling, Gaussian noise, termination, all three uncertainty signals).
  ``model_env_step`` times one step of 50,000 rows given to ``ModelEnv.step`` at once; ``rollout`` times
  :func:`dromo_ray.core.rollout.rollout` (H = 5, 50,000 start states, a termination function that never
  fires, the numpy result included), which is what a rollout worker runs.

Data are synthetic, Hopper-sized (11 obs, 3 act); speed does not depend on the values.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from dromo_ray.bench.common import device_name, measured_matmul_peak_gflops, resolve_device, sync
from dromo_ray.core.config import AgentConfig, DynamicsConfig
from dromo_ray.core.dynamics import DynamicsTrainer, EnsembleDynamics, normalizer_stats
from dromo_ray.core.envs import ENVS, halfcheetah_termination
from dromo_ray.core.model_env import ModelEnv
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.rollout import rollout
from dromo_ray.core.threads import set_torch_threads

OBS, ACT = ENVS["hopper"].obs_dim, ENVS["hopper"].act_dim
REFERENCE_ROWS_PER_S = 20_000.0


def _actor_flops_per_row(actor: TanhGaussianActor) -> int:
    return sum(2 * m.in_features * m.out_features for m in actor.modules() if isinstance(m, torch.nn.Linear))


def _rates(fn, device: torch.device, seconds: float) -> list[float]:
    """Run ``fn`` (returns work units done) in back-to-back timed windows for ``seconds``; units/s of each."""
    fn()  # warm-up: allocator, optimizer state, kernels
    sync(device)
    rates: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t0 = time.perf_counter()
        units = fn()
        sync(device)
        rates.append(units / (time.perf_counter() - t0))
    return rates


def bench_training(device: torch.device, cfg: DynamicsConfig, seconds: float, rows: int = 50_000,
                   seed: int = 0) -> dict[str, float]:
    """Gradient steps of the whole ensemble through :meth:`DynamicsTrainer.train_epoch` (the code path of
    :meth:`DynamicsTrainer.train`), in windows of 25 steps."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, OBS + ACT)).astype(np.float32)
    y = rng.normal(size=(rows, OBS + 1)).astype(np.float32)
    model = EnsembleDynamics(OBS, ACT, cfg, generator=torch.Generator().manual_seed(seed)).to(device)
    model.set_normalizer(normalizer_stats(x, y))
    gen = torch.Generator(device).manual_seed(seed)
    trainer = DynamicsTrainer(model, cfg, gen)
    xt = (torch.as_tensor(x, device=device) - model.in_mean) / model.in_std
    yt = (torch.as_tensor(y, device=device) - model.out_mean) / model.out_std
    e, b = model.num_members, cfg.batch_size
    window = 25 * b
    perm = torch.argsort(torch.rand(e, rows, generator=gen, device=device), dim=1)
    pos = [0]
    losses: list[torch.Tensor] = []

    def window_fn() -> int:
        start = pos[0]
        pos[0] = (start + window) % (rows - window)
        losses.append(trainer.train_epoch(xt, yt, perm[:, start:start + window]))
        return window  # rows, counted once per step of the whole ensemble

    rates = _rates(window_fn, device, seconds)
    assert torch.isfinite(torch.stack(losses)).all().item()
    flops = 3 * model.flops_per_row()
    med, best = float(np.median(rates)), max(rates)
    return {
        "train_rows_per_s": med,
        "train_rows_per_s_best": best,
        "train_member_rows_per_s": med * e,
        "train_steps_per_s": med / b,
        "train_gflops": med * flops / 1e9,
        "train_gflops_best": best * flops / 1e9,
    }


@torch.no_grad()
def bench_model_env(device: torch.device, cfg: DynamicsConfig, seconds: float, batch: int = 50_000,
                    horizon: int = 5, seed: int = 0) -> dict[str, float]:
    """Transitions/s of (a) one policy action + one ``ModelEnv.step`` on ``batch`` rows at once and
    (b) a whole :func:`rollout` of ``horizon`` steps from ``batch`` start states (chunked, never terminating,
    numpy result included)."""
    model = EnsembleDynamics(OBS, ACT, cfg, generator=torch.Generator().manual_seed(seed)).to(device)
    model.set_elites(np.arange(cfg.num_elites))
    torch.manual_seed(seed)
    actor = TanhGaussianActor(OBS, ACT, AgentConfig().hidden_dims).to(device)
    env = ModelEnv(model, halfcheetah_termination, penalty="max_aleatoric")
    gen = torch.Generator(device).manual_seed(seed)
    obs = torch.randn(batch, OBS, generator=gen, device=device)

    def one_step() -> int:
        act, _ = actor.sample(obs, generator=gen)
        env.step(obs, act, gen)
        return batch

    def one_rollout() -> int:
        return rollout(env, actor, obs, horizon, gen).size

    flops = cfg.num_elites * model.flops_per_row() // model.num_members + _actor_flops_per_row(actor)
    out: dict[str, float] = {"model_env_batch": float(batch)}
    for name, fn in (("model_env_step", one_step), ("rollout", one_rollout)):
        rates = _rates(fn, device, seconds)
        med, best = float(np.median(rates)), max(rates)
        out[f"{name}_transitions_per_s"] = med
        out[f"{name}_transitions_per_s_best"] = best
        out[f"{name}_gflops"] = med * flops / 1e9
        out[f"{name}_gflops_best"] = best * flops / 1e9
    return out


def measure_dynamics(device: str = "cpu", threads: int = 0, seconds: float = 4.0) -> dict[str, Any]:
    """Every figure of ``dromo-ray bench dynamics`` (see the module docstring): the matmul peak, ensemble training
    rows/s and model-env transitions/s with their GFLOP/s and share of the peak. ``threads`` 0: all cores."""
    dev = resolve_device(device or "cpu")
    set_torch_threads(int(threads or 0) or (os.cpu_count() or 1))
    cfg = DynamicsConfig()
    # The best of three 1-s measurements: on a shared machine a single one can be low, inflating the %.
    peak = max(measured_matmul_peak_gflops(dev) for _ in range(3))
    result: dict[str, Any] = {
        "device": device_name(dev),
        "threads": torch.get_num_threads(),
        "ensemble": f"{cfg.ensemble_size} x {'x'.join(map(str, cfg.hidden_dims))} SiLU, batch {cfg.batch_size}/member",
        "timing": f"median (and best) of back-to-back windows over {seconds:g} s each",
        "matmul_peak_gflops": peak,
    }
    result.update(bench_training(dev, cfg, seconds))
    result["train_pct_of_peak"] = 100.0 * result["train_gflops"] / peak
    result["train_pct_of_peak_best"] = 100.0 * result["train_gflops_best"] / peak
    result["train_vs_reference_20k"] = result["train_rows_per_s"] / REFERENCE_ROWS_PER_S
    result.update(bench_model_env(dev, cfg, seconds))
    result["model_env_step_pct_of_peak"] = 100.0 * result["model_env_step_gflops"] / peak
    result["rollout_pct_of_peak"] = 100.0 * result["rollout_gflops"] / peak
    return result

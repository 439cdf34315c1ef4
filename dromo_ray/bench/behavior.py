"""``dromo-ray bench behavior``: online SAC speed end to end (env step + action + one update per env step).

Two backends at the same sizes (2×256 ReLU networks, the given batch, one update per env step, one torch thread):

- ``sac``: the project's loop (:class:`dromo_ray.data.online_sac.OnlineSAC`), what ``behavior train`` runs;
- ``rllib``: RLlib's SAC (new API stack) as ``behavior train --backend rllib`` configures it: one env step and one
  update per training iteration (``rollout_fragment_length=1``). ``--rllib-fragment K`` samples K env steps per
  iteration (RLlib still runs one update per iteration), which shows how much of its cost is per-iteration
  overhead rather than the update.

Figures: ``env_steps_per_s`` (env steps over the wall time of the timed part, updates included) and
``updates_per_s`` (updates over the same wall time). The warm-up (``learning_starts`` random steps) is not timed.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from dromo_ray.core.threads import set_torch_threads


def measure_sac(env: str, steps: int, batch: int, warmup: int) -> dict[str, Any]:
    from dromo_ray.data.online_sac import OnlineSAC, OnlineSACConfig

    with tempfile.TemporaryDirectory(prefix="dromo_bench_behavior_") as tmp:
        cfg = OnlineSACConfig(env=env, steps=warmup + steps, out=str(Path(tmp) / "run"), batch_size=batch,
                              learning_starts=warmup, eval_every=10**9, checkpoint_minutes=10**6,
                              log_every=10**9, final_eval=False)
        trainer = OnlineSAC(cfg)
        trainer.run()
        t = trainer.timing
    wall = t["learning_wall_s"]
    n = int(t["learning_steps"])
    return {"env_steps_per_s": n / wall, "updates_per_s": n / wall, "timed_env_steps": n,
            "update_share": t["update_s"] / max(wall, 1e-9)}


def measure_rllib(env: str, steps: int, batch: int, warmup: int, fragment: int = 1) -> dict[str, Any]:
    """RLlib SAC: time ``steps`` env steps after ``warmup`` random ones (one update per iteration of ``fragment``
    env steps)."""
    import logging
    import os

    from dromo_ray.rllib.sac import BehaviorConfig, build_sac_config
    from dromo_ray.runtime.resources import ray_session

    cfg = BehaviorConfig(env=env, steps=warmup + steps, learning_starts=warmup, batch_size=batch,
                         updates_every=fragment, checkpoint_every=fragment, progress=False).validate()
    with ray_session(configure_logging=True, logging_level=logging.ERROR,
                     num_cpus=max(1, min(2, os.cpu_count() or 1))):
        algo = None
        try:
            sac = build_sac_config(cfg).reporting(min_sample_timesteps_per_iteration=fragment)
            sac.num_steps_sampled_before_learning_starts = warmup
            algo = sac.build_algo()

            def sampled(result: dict[str, Any]) -> int:
                return int((result.get("env_runners") or {}).get("num_env_steps_sampled_lifetime", 0))

            n0 = 0
            while n0 < warmup + fragment:  # warm-up, plus one iteration with updates (first-call costs untimed)
                n0 = sampled(algo.train())
            t0 = time.perf_counter()
            n = n0
            iters = 0
            while n - n0 < steps:
                n = sampled(algo.train())
                iters += 1
            wall = time.perf_counter() - t0
        finally:
            if algo is not None:
                algo.stop()
    return {"env_steps_per_s": (n - n0) / wall, "updates_per_s": iters / wall, "timed_env_steps": n - n0,
            "fragment": fragment}


def measure_behavior(env: str = "hopper", backend: str = "sac", steps: int = 1000, batch: int = 256,
                     warmup: int = 1000, rllib_steps: int = 0, rllib_fragment: int = 1) -> dict[str, Any]:
    """Every figure of ``dromo-ray bench behavior``: env steps/s and updates/s of online SAC at one update per env
    step on one thread, for ``backend`` sac (the project's SAC core), rllib, or both (then prefixed by backend;
    the unprefixed pair is the first backend's)."""
    set_torch_threads(1)
    result: dict[str, Any] = {"env": env, "batch": batch, "torch_threads": 1}
    backends = ("sac", "rllib") if backend == "both" else (backend,)
    for b in backends:
        if b == "sac":
            r = measure_sac(env, steps, batch, warmup)
        else:
            r = measure_rllib(env, rllib_steps or steps, batch, warmup, rllib_fragment)
        for k, v in r.items():
            result[f"{b}_{k}"] = v
        if b == backends[0]:
            result["env_steps_per_s"], result["updates_per_s"] = r["env_steps_per_s"], r["updates_per_s"]
    return result

"""``dromo-ray bench learner | dynamics | behavior | pipeline | gpu``."""

from __future__ import annotations

import argparse

UPDATE_MODES = {"both": ("eager", "captured"), "eager": ("eager",), "captured": ("captured",)}


def cmd_bench_learner(args: argparse.Namespace) -> int:
    from dromo_ray.bench.common import check_at_least, emit
    from dromo_ray.bench.learner import measure_learner

    check_at_least("--steps", args.steps, 1)
    check_at_least("--batch", args.batch, 2)  # (f = 0.5 splits it between D and D_model)
    check_at_least("--threads", args.threads, 0)
    result = measure_learner(algo=args.algo, device=args.device, batch=args.batch, steps=args.steps,
                             threads=args.threads, update_modes=UPDATE_MODES[args.update_mode])
    emit(result, args.json, f"learner bench: {args.algo}")
    return 0


def cmd_bench_dynamics(args: argparse.Namespace) -> int:
    from dromo_ray.bench.common import check_at_least, emit
    from dromo_ray.bench.dynamics import measure_dynamics

    check_at_least("--seconds", args.seconds, 0, exclusive=True)
    check_at_least("--threads", args.threads, 0)
    result = measure_dynamics(args.device, args.threads, args.seconds)
    emit(result, args.json, "dromo-ray bench dynamics")
    return 0


def cmd_bench_behavior(args: argparse.Namespace) -> int:
    from dromo_ray.bench.behavior import measure_behavior
    from dromo_ray.bench.common import check_at_least, emit

    for flag, value, minimum in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--warmup", args.warmup, 1),
                                 ("--rllib-steps", args.rllib_steps, 0), ("--rllib-fragment", args.rllib_fragment, 1)):
        check_at_least(flag, value, minimum)
    result = measure_behavior(args.env, args.backend, args.steps, args.batch, args.warmup, args.rllib_steps,
                              args.rllib_fragment)
    emit(result, args.json, f"online SAC, {args.env}, batch {args.batch}, one update per env step, 1 thread")
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    import json

    from dromo_ray.bench.common import check_at_least, emit
    from dromo_ray.bench.pipeline import ROLLOUT_MODES, measure_pipeline

    check_at_least("--steps", args.steps, 1)
    modes = ROLLOUT_MODES if args.rollout_mode == "both" else (args.rollout_mode,)
    results = {m: measure_pipeline(algo=args.algo, steps=args.steps, device=args.device, rollout_mode=m,
                                   update_mode=args.update_mode) for m in modes}
    if args.json and len(results) > 1:
        print(json.dumps(results, indent=2, sort_keys=True))
        return 0
    for m, result in results.items():
        emit(result, args.json, f"bench pipeline ({args.algo}, batch 256, K=10000, H=5, rollout mode {m})")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from dromo_ray.bench.common import check_at_least, resolve_device
    from dromo_ray.bench.gpu import run_gpu_check
    from dromo_ray.errors import UserError

    check_at_least("--budget", args.budget, 0, exclusive=True)
    if resolve_device(args.device).type != "cuda" and not args.quick:
        raise UserError(f"--device {args.device}: the GPU check runs on CUDA (a CPU device only with --quick)")
    report = run_gpu_check(device=args.device, out=args.out, quick=args.quick, budget_s=args.budget)
    return 0 if report["passed"] else 1

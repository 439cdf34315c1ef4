"""``dromo-ray bench learner | dynamics | behavior | pipeline``."""

from __future__ import annotations

import argparse


def cmd_bench_learner(args: argparse.Namespace) -> int:
    from dromo_ray.bench.learner import run

    return run(args)


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
    from dromo_ray.bench.pipeline import run

    return run(args)

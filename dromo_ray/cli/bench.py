"""``dromo-ray bench learner | dynamics | behavior | pipeline``."""

from __future__ import annotations

import argparse


def cmd_bench_learner(args: argparse.Namespace) -> int:
    from dromo_ray.bench.learner import run

    return run(args)


def cmd_bench_dynamics(args: argparse.Namespace) -> int:
    from dromo_ray.bench.dynamics import run

    return run(args)


def cmd_bench_behavior(args: argparse.Namespace) -> int:
    from dromo_ray.bench.behavior import run

    return run(args)


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from dromo_ray.bench.pipeline import run

    return run(args)

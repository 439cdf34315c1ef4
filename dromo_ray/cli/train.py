"""``dromo-ray train`` and ``evaluate``."""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from dromo_ray.train import run

    return run(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dromo_ray.train import run_evaluate

    return run_evaluate(args)

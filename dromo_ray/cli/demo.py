"""``dromo-ray demo``."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from dromo_ray.demo import run

    return run(args)

"""``dromo-ray sweep``."""

from __future__ import annotations

import argparse


def cmd_sweep(args: argparse.Namespace) -> int:
    from dromo_ray.sweep import run

    return run(args)

"""``dromo-ray report``."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    from dromo_ray.report import run

    return run(args)

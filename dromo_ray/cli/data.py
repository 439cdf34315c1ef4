"""``dromo-ray collect``, ``data info`` and ``suite make``."""

from __future__ import annotations

import argparse


def cmd_collect(args: argparse.Namespace) -> int:
    from dromo_ray.data.collect import run

    return run(args)


def cmd_data_info(args: argparse.Namespace) -> int:
    from dromo_ray.data.info import run

    return run(args)


def cmd_suite_make(args: argparse.Namespace) -> int:
    from dromo_ray.behavior.suite import run_suite

    return run_suite(args)

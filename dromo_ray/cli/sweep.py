"""``dromo-ray sweep``: run or continue a Ray Tune sweep; print its ranking (or ``--json``); the exit code."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_sweep(args: argparse.Namespace) -> int:
    """0: every trial finished; 1: a trial failed; 130: interrupted (``--resume`` continues it)."""
    from dromo_ray.sweep import print_final, run_sweep

    result = run_sweep(args.sweep, tracking_uri=args.tracking_uri, resume=args.resume,
                       progress=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_final(result.to_dict(), result.trial_keys)
    if result.interrupted:
        print(f"dromo-ray sweep: interrupted; continue with: dromo-ray sweep {args.sweep} --resume", file=sys.stderr)
        return 130
    return 1 if result.failed else 0

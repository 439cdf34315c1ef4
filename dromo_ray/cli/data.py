"""``dromo-ray collect``, ``data info`` and ``suite make``."""

from __future__ import annotations

import argparse
import json
import sys

from dromo_ray.errors import UserError


def cmd_collect(args: argparse.Namespace) -> int:
    """``dromo-ray collect``: record, write, say what was written."""
    from dromo_ray.data.collect import collect_dataset

    if args.steps < 1:
        raise UserError(f"--steps: must be >= 1, got {args.steps}")
    if args.noise < 0:
        raise UserError(f"--noise: must be >= 0, got {args.noise}")
    res = collect_dataset(args.env, args.steps, args.out, policy=args.policy, seed=args.seed, noise=args.noise,
                          fmt=args.format, progress=sys.stderr.isatty())
    ds = res.dataset
    complete = len(ds.episode_returns())
    print(f"wrote {len(ds)} transitions of {ds.env_spec.gym_id} ({ds.num_episodes} episodes, {complete} complete; "
          f"policy {res.policy_name}, noise {args.noise}, seed {args.seed}) to {res.written}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    """``dromo-ray data info``: the summary figures as a table, or JSON."""
    from dromo_ray.data.info import dataset_info, format_info
    from dromo_ray.data.load import load_dataset

    info = dataset_info(load_dataset(args.dataset, env=args.env, allow_unbounded_actions=args.allow_unbounded_actions))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_suite_make(args: argparse.Namespace) -> int:
    """``dromo-ray suite make``: one line per part as it is made, then the suite's table (or the manifest)."""
    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.data.suite import PARTS, make_suite, summary_table

    set_torch_threads(1)
    parts = PARTS if args.parts in ("", "all") else tuple(p.strip() for p in args.parts.split(",") if p.strip())
    manifest = make_suite(
        args.env, args.size, args.out or f"suite_{args.env}", args.policies or None,
        seed=args.seed, parts=parts, deterministic=args.deterministic, minari=not args.no_minari,
        progress=sys.stderr.isatty() and not args.json,
        log=None if args.json else (lambda s: print(s, flush=True)), expert_rule=args.expert,
    )
    print(json.dumps(manifest, indent=2) if args.json else summary_table(manifest))
    return 0

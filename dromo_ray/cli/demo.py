"""``dromo-ray demo``."""

from __future__ import annotations

import argparse
import json


def cmd_demo(args: argparse.Namespace) -> int:
    from dromo_ray.demo import run_demo

    res = run_demo(args.out, args.steps, args.seed, args.tracking_uri, progress=not args.json,
                   say=(lambda s: None) if args.json else print)
    summary, cfg = res.summary, res.config
    if args.json:
        print(json.dumps({**summary.to_dict(), "behavior_normalized_score": res.behavior_normalized_score},
                         indent=2))
        return 0
    curve = "  ".join(f"{step}: {score:.1f}" for step, score in summary.eval_curve)
    print(f"  learned policy, D4RL normalized score by update:  {curve}")
    print(f"  final (mean of last {cfg.train.final_score_last_n} evaluations): {summary.final_normalized_score:.1f} "
          f"(return {summary.final_return:.1f})   behaviour data: {res.behavior_normalized_score:.1f}")
    print(f"  {summary.steps} {cfg.agent.algorithm.upper()} updates in {summary.wall_s:.0f}s on "
          f"{summary.learner_device}")
    print(f"  mlflow run id: {summary.mlflow_run_id}")
    print(f"  checkpoint:    {summary.checkpoint}")
    if res.tracking_uri.startswith("sqlite:"):
        print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {res.tracking_uri} --host 127.0.0.1 --port 5000")
    return 0

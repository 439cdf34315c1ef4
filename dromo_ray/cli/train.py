"""``dromo-ray train`` and ``evaluate``: flags in, one summary out, failures as exit codes.

``train``: a run that fails (an actor died, a loss became non-finite) prints one line and exits 1, naming the
checkpoint to resume from; Ctrl-C / SIGTERM are handled by :mod:`dromo_ray.cli.main` (130 / 143, the run
recorded as KILLED in MLflow and its checkpoint kept).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from dromo_ray.errors import UserError

if TYPE_CHECKING:
    from dromo_ray.train import TrainSummary


def cmd_train(args: argparse.Namespace) -> int:
    from dromo_ray.config import load_config
    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.runtime.driver import RunFailed
    from dromo_ray.train import train

    set_torch_threads(1)
    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg, tracking_uri=args.tracking_uri, resume=args.resume, progress=not args.json)
    except RunFailed as e:
        print(f"dromo-ray train: run failed: {e}", flush=True)
        return 1
    print_summary(summary, args.json)
    return 0


def print_summary(summary: TrainSummary, as_json: bool) -> None:
    """The ``train`` result: a JSON object (``--json``) or five lines for a person."""
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    session = summary.steps - summary.resumed_from
    done = (f"{summary.steps} updates in {summary.wall_s:.1f}s" if not summary.resumed_from else
            f"{summary.steps} updates ({session} in this session, resumed at step {summary.resumed_from}, "
            f"{summary.wall_s:.1f}s)")
    print(f"done: {summary.algorithm} on {summary.dataset}: {done} on {summary.learner_device}")
    print(f"  final normalized score (mean of last evaluations): {summary.final_normalized_score:.2f}"
          f"  (return {summary.final_return:.1f}, {summary.num_evaluations} evaluations)")
    print(f"  checkpoint:    {summary.checkpoint}")
    print(f"  mlflow run id: {summary.mlflow_run_id}")
    print(f"  tracking uri:  {summary.tracking_uri}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.train import evaluate_checkpoint, model_error, value_check

    if args.episodes < 1:
        raise UserError(f"--episodes: expected a positive integer, got {args.episodes}")
    if args.tail < 0:
        raise UserError(f"--tail: expected a non-negative integer, got {args.tail}")
    if args.horizon < 1:
        raise UserError(f"--horizon: expected a positive integer, got {args.horizon}")
    set_torch_threads(1)
    out = evaluate_checkpoint(args.checkpoint, episodes=args.episodes, seed=args.seed)
    if args.values:
        out["values"] = value_check(args.checkpoint, episodes=args.episodes, seed=args.seed, tail=args.tail)
    if args.model_error:
        out["model_error"] = model_error(args.checkpoint, episodes=args.episodes, seed=args.seed,
                                         horizon=args.horizon)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['env']}: return {out['return_mean']:.1f} ± {out['return_std']:.1f} over {out['episodes']} "
          f"episodes, normalized score {out['normalized_score']:.2f}")
    if args.values:
        v = out["values"]
        soft = (f" - entropy bonus {v['entropy_bonus']:.1f} (soft backup, alpha {v['entropy_coef']:.3g}) = "
                f"{v['q_min_minus_bonus']:.1f}" if v["soft_backup"] else "")
        print(f"values at {v['states']} visited states (gamma {v['gamma']}): Q(s, mu(s)) min {v['q_min_mean']:.1f} "
              f"(mean of members {v['q_mean_mean']:.1f}){soft}; Monte-Carlo return {v['mc_return_mean']:.1f}; "
              f"lower bound {'holds' if v['lower_bound_holds'] else 'violated'}")
    if args.model_error:
        m = out["model_error"]
        per_h = ", ".join(f"h={e['h']}: {e['obs_rmse_std_units']:.3f} std / {e['reward_mae']:.3f}"
                          for e in m["per_h"])
        print(f"model error from {m['starts']} visited states (observation RMSE in dataset stds / reward MAE): "
              f"{per_h}; predicted reward std at h=1 {m['predicted_reward_std_h1']:.3f}, real reward "
              f"{m['real_reward_mean']:.3f} ± {m['real_reward_std']:.3f}")
    return 0

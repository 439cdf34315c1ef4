"""``dromo-ray demo``: the whole pipeline on local Ray with an embedded MLflow store, on CPU, in minutes.

1. collect a small Hopper dataset with the real Gymnasium v5 environment;
2. train the dynamics ensemble on parallel Ray actors (and pi^beta beside them);
3. run DROMO with every actor kind present: rollout workers, the replay actor, the learner, an evaluator;
4. evaluate in the real environment, record everything in MLflow, print the score and how to look at it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dromo_ray.config import dump_config
from dromo_ray.core.config import config_from_dict

DEMO_STEPS = 3000


def demo_config(dataset: str, out_dir: str, seed: int, steps: int) -> dict[str, Any]:
    """A small but complete DROMO run; every knob has the name it has in tune_configs/*.yaml."""
    return {
        "seed": seed,
        "device": "auto",
        "out_dir": out_dir,
        "data": {"dataset": dataset, "env": "hopper"},
        "dynamics": {"ensemble_size": 5, "num_elites": 3, "hidden_dims": [128, 128, 128], "max_epochs": 25,
                     "num_trainers": 2, "batch_size": 256},
        "agent": {"algorithm": "dromo", "hidden_dims": [128, 128], "batch_size": 128, "f": 0.5, "alpha": 1.0,
                  "beta": 1.0, "num_actions": 10, "density": "kde", "conservative_form": "logsumexp",
                  "actor_lr": 3e-4},
        "rollout": {"horizon": 5, "batch_size": 2000, "interval": 250, "model_buffer_size": 200_000},
        "runtime": {"synchronous": False, "num_rollout_workers": 2, "num_evaluators": 1,
                    "rollout_worker_cpus": 0.25, "evaluator_cpus": 0.25, "dynamics_trainer_cpus": 0.5,
                    "learner_cpus": 0.5, "weight_sync_interval": 250, "replay_chunk_batches": 50},
        "train": {"total_steps": steps, "eval_interval": max(1, steps // 3), "eval_episodes": 5,
                  "log_interval": 250, "checkpoint_interval": max(1, steps // 2), "final_score_last_n": 2},
        "tracking": {"experiment": "dromo_ray_demo"},
    }


def run(args: argparse.Namespace) -> int:
    from dromo_ray.cli import main as cli_main
    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.train import train

    set_torch_threads(1)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "hopper_random-v5.hdf5"
    if not data.exists():
        print(f"[1/4] collecting 20,000 Hopper-v5 transitions (random policy) -> {data}")
        code = cli_main(["collect", "--env", "hopper", "--policy", "random", "--steps", "20000",
                         "--out", str(data), "--seed", str(args.seed)])
        if code:
            return code
    else:
        print(f"[1/4] reusing {data}")
    cfg = config_from_dict(demo_config(str(data), str(out / "runs"), args.seed, args.steps or DEMO_STEPS))
    dump_config(cfg, out / "demo_config.yaml")
    print(f"[2/4] config written to {out / 'demo_config.yaml'}")
    print("[3/4] training dynamics ensemble + DROMO on local Ray (rollout workers, replay, learner, evaluator)")
    tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    summary = train(cfg, tracking_uri=tracking_uri, progress=not args.json)
    print("[4/4] done")
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    print(f"  normalized score (D4RL, mean of last {cfg.train.final_score_last_n} evaluations): "
          f"{summary.final_normalized_score:.2f}   return {summary.final_return:.1f}")
    print(f"  {summary.steps} DROMO updates in {summary.wall_s:.0f}s on {summary.learner_device}")
    print(f"  mlflow run id: {summary.mlflow_run_id}")
    print(f"  checkpoint:    {summary.checkpoint}")
    if tracking_uri.startswith("sqlite:"):
        print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    return 0

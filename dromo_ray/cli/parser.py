"""The ``dromo-ray`` argument parser: every command, flag and help text, and nothing else.

Each command's handler is ``dromo_ray.cli.<area>.cmd_<command>(args) -> int``, imported only when that command
runs, so ``dromo-ray --help`` imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import importlib

from dromo_ray.core.config import AGENT_ALGORITHMS, ENV_KEYS

DESCRIPTION = """\
Offline model-based reinforcement learning on Ray: DROMO, COMBO, MOPO, MOPO-auto, MBPO, MOBILE and RLlib CQL
from one config, with the dynamics ensemble, model rollouts and the learner as Ray actors and every run
recorded in MLflow.

Start with `dromo-ray demo` (a whole run on a few CPU minutes); `dromo-ray COMMAND --help` explains a command."""


def _handler(area: str, func: str):
    """The handler ``dromo_ray.cli.<area>.<func>``, imported when the command runs (``--help`` stays fast)."""
    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"dromo_ray.cli.{area}"), func)(args)

    return call


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set agent.alpha=0.5 (repeatable)")


# Where train and sweep write runs (dromo_ray.tracking.resolve_tracking_uri).
RUN_STORE = "the config's tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else an embedded sqlite store in out_dir"


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON document instead of text")


def _add_tracking(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--tracking-uri", default=None, help=f"MLflow tracking URI (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dromo-ray", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    # demo ---------------------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="the whole pipeline on local Ray with an embedded MLflow store (CPU, minutes)")
    p.add_argument("--out", default="dromo_demo", help="working directory for data, checkpoints and mlflow.db")
    p.add_argument("--steps", type=int, default=None, help="learner updates (default: the demo's budget)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data collection, the ensemble and the agent")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: OUT/mlflow.db)")
    _add_json(p)
    p.set_defaults(func=_handler("demo", "cmd_demo"))

    # collect ------------------------------------------------------------------------------------------
    p = sub.add_parser("collect", help="collect an offline dataset with a real Gymnasium v5 MuJoCo environment")
    p.add_argument("--env", required=True, choices=ENV_KEYS, help="environment")
    p.add_argument("--policy", default="random", help="'random' or a policy file saved by dromo-ray")
    p.add_argument("--steps", type=int, required=True, help="transitions to record")
    p.add_argument("--out", required=True,
                   help="output file (.hdf5) for d4rl; a dataset id (namespace/name-v0) for minari")
    p.add_argument("--seed", type=int, default=0, help="seed of the env resets and the policy's sampling")
    p.add_argument("--format", choices=["d4rl", "minari"], default="d4rl", help="D4RL-layout HDF5 or a Minari "
                   "dataset")
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to policy actions")
    p.set_defaults(func=_handler("data", "cmd_collect"))

    # data info ----------------------------------------------------------------------------------------
    p = sub.add_parser("data", help="inspect datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("info", help="transitions, episodes, returns and normalized score of a dataset")
    q.add_argument("dataset", help="HDF5 path, D4RL name (hopper-medium-v2) or minari:<id>")
    q.add_argument("--env", default=None, help="environment key, when the name does not say it")
    q.add_argument("--allow-unbounded-actions", action="store_true", help="load a dataset whose actions leave "
                   "[-1, 1] (an error otherwise; train: data.allow_unbounded_actions)")
    _add_json(q)
    q.set_defaults(func=_handler("data", "cmd_data_info"))

    # train / evaluate ---------------------------------------------------------------------------------
    p = sub.add_parser("train", help="one run of Algorithm 1 on Ray, tracked in MLflow")
    p.add_argument("config", help="YAML config (see tune_configs/tasks/)")
    _add_set(p)
    _add_tracking(p, RUN_STORE)
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="checkpoint directory or file (or an out_dir run name) to continue from")
    _add_json(p)
    p.set_defaults(func=_handler("train", "cmd_train"))

    p = sub.add_parser("evaluate", help="evaluate a checkpoint's policy in the real environment")
    p.add_argument("checkpoint", help="a run directory, its checkpoints/ directory (the latest one), a checkpoint "
                   "directory or its state.pt; or a policy file (an RLlib CQL run's policy.pt, which --values "
                   "reads its critic from, or a behaviour policy)")
    p.add_argument("--episodes", type=int, default=10, help="real-environment episodes")
    p.add_argument("--seed", type=int, default=12345, help="seed of the evaluation's environment resets")
    p.add_argument("--values", action="store_true",
                   help="also set the critic's Q(s, mu(s)) against the Monte-Carlo return at the visited states "
                        "(the lower-bound check; deterministic policy)")
    p.add_argument("--tail", type=int, default=500,
                   help="with --values: a truncated episode's last TAIL states are left out (their return is cut)")
    p.add_argument("--model-error", action="store_true",
                   help="also replay the real actions through the checkpoint's dynamics ensemble from the visited "
                        "states and print its error against the real env for h = 1 .. --horizon")
    p.add_argument("--horizon", type=int, default=5, help="with --model-error: the open-loop horizon")
    _add_json(p)
    p.set_defaults(func=_handler("train", "cmd_evaluate"))

    # sweep / report -----------------------------------------------------------------------------------
    p = sub.add_parser("sweep", help="a Ray Tune sweep; every trial is an MLflow run under one parent")
    p.add_argument("sweep", help="sweep YAML (see tune_configs/sweeps/)")
    _add_tracking(p, RUN_STORE)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    _add_json(p)
    p.set_defaults(func=_handler("sweep", "cmd_sweep"))

    p = sub.add_parser("report", help="tables and learning curves from MLflow runs")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (a sweep's `name:`, a train "
                   "config's tracking.experiment)")
    p.add_argument("--out", default="report", help="directory for results.md, results.csv and the PNG curves")
    _add_tracking(p, "$MLFLOW_TRACKING_URI, else dromo_runs/mlflow.db, the store train and sweep "
                  "write by default")
    _add_json(p)
    p.set_defaults(func=_handler("report", "cmd_report"))

    # behavior / suite ---------------------------------------------------------------------------------
    p = sub.add_parser("behavior", help="behaviour policies trained online with SAC in the real environment")
    bsub = p.add_subparsers(dest="behavior_command", required=True)
    q = bsub.add_parser("train", help="SAC on a Gymnasium v5 env: evaluated policy checkpoints (index.json), a "
                        "replay log of every transition (replay.hdf5); resumable")
    q.add_argument("--env", choices=ENV_KEYS, default=None,
                   help="environment (required unless --resume)")
    q.add_argument("--steps", type=int, default=None, help="env steps (default 1M, D4RL's budget; with --resume: "
                   "the new total)")
    q.add_argument("--out", default=None, help="output directory (default behavior_<env>); must be fresh")
    q.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR where it stopped")
    q.add_argument("--seed", type=int, default=0, help="seed of the networks, the env and the replay sampling")
    q.add_argument("--hidden", default="256,256", help="hidden widths of the policy and Q networks")
    q.add_argument("--batch-size", type=int, default=256, help="rows per SAC update (SAC's published 256)")
    q.add_argument("--eval-every", type=int, default=10_000, help="env steps between evaluated checkpoints")
    q.add_argument("--checkpoint-every", type=int, default=0, help="(rllib backend) env steps between "
                   "checkpoints (default steps/20)")
    q.add_argument("--eval-episodes", type=int, default=10, help="evaluation episodes per checkpoint and mode")
    q.add_argument("--learning-starts", type=int, default=None, help="random env steps before the first update "
                   "(default 5000; rllib: 10000)")
    q.add_argument("--updates-every", type=int, default=1, help="(rllib backend) env steps per SAC update")
    q.add_argument("--time-limit", type=float, default=0.0, help="stop (resumably) after this many seconds "
                   "(0: none)")
    q.add_argument("--backend", choices=["sac", "rllib"], default="sac", help="sac: the project's SAC core "
                   "(fast, resumable); rllib: RLlib's SAC (new API stack)")
    q.add_argument("--save-rllib", action="store_true", help="(rllib backend) also save the RLlib checkpoint")
    _add_json(q)
    q.set_defaults(func=_handler("behavior", "cmd_behavior_train"))

    q = bsub.add_parser("ship", help="copy a behaviour run's medium or expert checkpoint into the package's shipped "
                        "policies (re-evaluated; medium also ships its replay actions)")
    q.add_argument("--run", required=True, help="output directory of `behavior train`")
    q.add_argument("--part", required=True, choices=["medium", "expert"], help="which shipped policy the "
                   "checkpoint becomes")
    q.add_argument("--checkpoint", default=None, help="checkpoint name (default: the part's selection rule)")
    q.add_argument("--episodes", type=int, default=10, help="evaluation episodes per action mode")
    q.add_argument("--into", default=None, help="shipped-policy directory (default: the package's)")
    _add_json(q)
    q.set_defaults(func=_handler("behavior", "cmd_behavior_ship"))

    p = sub.add_parser("suite", help="D4RL-v2-style datasets made from the shipped policies or a behaviour run")
    ssub = p.add_subparsers(dest="suite_command", required=True)
    q = ssub.add_parser("make", help="random, medium, medium-replay, expert, medium-expert as D4RL HDF5 and "
                        "Minari (resumable)")
    q.add_argument("--env", required=True, choices=ENV_KEYS, help="environment")
    q.add_argument("--size", type=int, default=1_000_000, help="transitions of random, medium and expert")
    q.add_argument("--out", default=None, help="output directory (default suite_<env>)")
    q.add_argument("--policies", default=None, help="output directory of a `behavior train` run (default: the "
                   "medium and expert policies shipped with the package)")
    q.add_argument("--seed", type=int, default=0, help="collection seed (part i uses seed + i)")
    q.add_argument("--parts", default="all", help="comma-separated subset of random,medium,medium-replay,"
                   "expert,medium-expert")
    q.add_argument("--deterministic", action="store_true", help="collect with tanh(mu) instead of sampling "
                   "from the policy (D4RL sampled)")
    q.add_argument("--expert", choices=["final", "best"], default="final", help="expert = the final checkpoint "
                   "(D4RL) or the one with the highest return")
    q.add_argument("--no-minari", action="store_true", help="write the D4RL-layout HDF5 files only")
    _add_json(q)
    q.set_defaults(func=_handler("data", "cmd_suite_make"))

    # bench --------------------------------------------------------------------------------------------
    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("learner", help="learner updates/s and achieved GFLOP/s")
    q.add_argument("--algo", choices=AGENT_ALGORITHMS, default="dromo", help="the agent whose update is timed")
    q.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    q.add_argument("--batch", type=int, default=256, help="rows per update")
    q.add_argument("--steps", type=int, default=50, help="timed updates")
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    q.add_argument("--update-mode", choices=["both", "eager", "captured"], default="both",
                   help="which updates to time (captured: one CUDA graph replay per update on CUDA; on CPU the "
                   "same static-buffer step without a graph)")
    _add_json(q)
    q.set_defaults(func=_handler("bench", "cmd_bench_learner"))
    q = bsub.add_parser("dynamics", help="ensemble training rows/s and model-env transitions/s")
    q.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    q.add_argument("--seconds", type=float, default=4.0, help="length of each timing window set")
    _add_json(q)
    q.set_defaults(func=_handler("bench", "cmd_bench_dynamics"))
    q = bsub.add_parser("behavior", help="online SAC env steps/s and updates/s (one update per env step)")
    q.add_argument("--env", choices=ENV_KEYS, default="hopper", help="environment")
    q.add_argument("--backend", choices=["sac", "rllib", "both"], default="sac", help="the project's SAC core, "
                   "RLlib's SAC, or both side by side")
    q.add_argument("--steps", type=int, default=1000, help="timed env steps (each with one update)")
    q.add_argument("--rllib-steps", type=int, default=0, help="timed env steps for rllib (default --steps)")
    q.add_argument("--rllib-fragment", type=int, default=1, help="env steps per RLlib iteration")
    q.add_argument("--batch", type=int, default=256, help="rows per SAC update")
    q.add_argument("--warmup", type=int, default=1000, help="random env steps before updates (not timed)")
    _add_json(q)
    q.set_defaults(func=_handler("bench", "cmd_bench_behavior"))
    q = bsub.add_parser("pipeline", help="learner with actors feeding it vs alone; rollout scaling")
    q.add_argument("--steps", type=int, default=300, help="timed learner updates per measurement")
    q.add_argument("--algo", choices=AGENT_ALGORITHMS, default="dromo", help="the learner's agent")
    q.add_argument("--device", default="cpu", help="the learner's device: cpu, cuda or cuda:N")
    q.add_argument("--rollout-mode", choices=["workers", "learner", "both"], default="workers",
                   help="workers: CPU rollout-worker actors feed the learner (Ray); learner: the learner rolls "
                   "out itself on its device (rollout.mode)")
    q.add_argument("--update-mode", choices=["auto", "eager", "captured"], default="auto",
                   help="the learner's agent.update_mode")
    _add_json(q)
    q.set_defaults(func=_handler("bench", "cmd_bench_pipeline"))
    q = bsub.add_parser("gpu", help="the GPU check: graphed == eager updates for every algorithm, the learner "
                        "bench (captured and eager) and the pipeline bench in both rollout modes, one JSON file")
    q.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only with --quick, for tests)")
    q.add_argument("--out", default="gpu_check.json", help="the JSON file written (after every stage)")
    q.add_argument("--quick", action="store_true", help="tiny sizes and a few updates: the same code path in "
                   "seconds (figures mean nothing)")
    q.add_argument("--budget", type=float, default=270.0, help="seconds after which remaining stages are "
                   "skipped (recorded as such)")
    q.set_defaults(func=_handler("bench", "cmd_bench_gpu"))

    return parser


def _version() -> str:
    from dromo_ray import __version__

    return f"dromo-ray {__version__}"

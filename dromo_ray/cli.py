"""``dromo-ray`` command line. Parsers live here; each handler lives in its own module and is imported
lazily so that ``dromo-ray --help`` stays fast.

Handlers have the signature ``run(args: argparse.Namespace) -> int``. User errors (bad config, bad dataset,
bad checkpoint) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

os.environ.setdefault("RAY_DEDUP_LOGS", "1")


class UserError(Exception):
    """An error whose message is enough: printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C would be: the same clean stop, exit code 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


_ERROR_TYPES = (("dromo_ray.core.config", "ConfigError"), ("dromo_ray.runtime.checkpoint", "CheckpointError"),
                ("dromo_ray.tracking", "TrackingError"), ("dromo_ray.data.errors", "DatasetError"))
"""Library errors that are user errors (module, class)."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The user-error types of the modules imported so far: an exception of one of them can only have been raised
    if its module was imported, so nothing is imported here (an error costs no torch or MLflow import)."""
    types: list[type[BaseException]] = [UserError, FileNotFoundError]
    for module, name in _ERROR_TYPES:
        cls = getattr(sys.modules.get(module), name, None)  # (None while not imported, or half-imported)
        if cls is not None:
            types.append(cls)
    return tuple(types)


def _handler(module: str, func: str = "run"):
    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return call


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set agent.alpha=0.5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dromo-ray", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    # demo ---------------------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="the whole pipeline on local Ray with an embedded MLflow store (CPU, minutes)")
    p.add_argument("--out", default="dromo_demo", help="working directory for data, checkpoints and mlflow.db")
    p.add_argument("--steps", type=int, default=None, help="learner updates (default: the demo's budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("dromo_ray.demo"))

    # collect ------------------------------------------------------------------------------------------
    p = sub.add_parser("collect", help="collect an offline dataset with a real Gymnasium v5 MuJoCo environment")
    p.add_argument("--env", required=True, choices=["hopper", "halfcheetah", "walker2d"])
    p.add_argument("--policy", default="random", help="'random' or a policy file saved by dromo-ray")
    p.add_argument("--steps", type=int, required=True, help="transitions to record")
    p.add_argument("--out", required=True,
                   help="output file (.hdf5) for d4rl; a dataset id (namespace/name-v0) for minari")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["d4rl", "minari"], default="d4rl")
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to policy actions")
    p.set_defaults(func=_handler("dromo_ray.data.collect"))

    # data info ----------------------------------------------------------------------------------------
    p = sub.add_parser("data", help="inspect datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("info", help="transitions, episodes, returns and normalized score of a dataset")
    q.add_argument("dataset", help="HDF5 path, D4RL name (hopper-medium-v2) or minari:<id>")
    q.add_argument("--env", default=None, help="environment key, when the name does not say it")
    q.add_argument("--allow-unbounded-actions", action="store_true", help="load a dataset whose actions leave "
                   "[-1, 1] (an error otherwise; train: data.allow_unbounded_actions)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.data.info"))

    # train / evaluate ---------------------------------------------------------------------------------
    p = sub.add_parser("train", help="one run of Algorithm 1 on Ray, tracked in MLflow")
    p.add_argument("config", help="YAML config (see tune_configs/)")
    _add_set(p)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                   "an embedded sqlite store under out_dir)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="checkpoint directory or file (or an out_dir run name) to continue from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("dromo_ray.train"))

    p = sub.add_parser("evaluate", help="evaluate a checkpoint's policy in the real environment")
    p.add_argument("checkpoint")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("dromo_ray.train", "run_evaluate"))

    # sweep / report -----------------------------------------------------------------------------------
    p = sub.add_parser("sweep", help="a Ray Tune sweep; every trial is an MLflow run under one parent")
    p.add_argument("sweep", help="sweep YAML (see tune_configs/)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("dromo_ray.sweep"))

    p = sub.add_parser("report", help="tables and learning curves from MLflow runs")
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", default="report")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("dromo_ray.report"))

    # behavior / suite ---------------------------------------------------------------------------------
    p = sub.add_parser("behavior", help="behaviour policies trained online with SAC in the real environment")
    bsub = p.add_subparsers(dest="behavior_command", required=True)
    q = bsub.add_parser("train", help="SAC on a Gymnasium v5 env: evaluated policy checkpoints (index.json), a "
                        "replay log of every transition (replay.hdf5); resumable")
    q.add_argument("--env", choices=["hopper", "halfcheetah", "walker2d"], default=None,
                   help="environment (required unless --resume)")
    q.add_argument("--steps", type=int, default=None, help="env steps (default 1M, D4RL's budget; with --resume: "
                   "the new total)")
    q.add_argument("--out", default=None, help="output directory (default behavior_<env>); must be fresh")
    q.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR where it stopped")
    q.add_argument("--seed", type=int, default=0)
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
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.cli", "cmd_behavior_train"))

    q = bsub.add_parser("ship", help="copy a behaviour run's medium or expert checkpoint into the package's shipped "
                        "policies (re-evaluated; medium also ships its replay actions)")
    q.add_argument("--run", required=True, help="output directory of `behavior train`")
    q.add_argument("--part", required=True, choices=["medium", "expert"])
    q.add_argument("--checkpoint", default=None, help="checkpoint name (default: the part's selection rule)")
    q.add_argument("--episodes", type=int, default=10, help="evaluation episodes per action mode")
    q.add_argument("--into", default=None, help="shipped-policy directory (default: the package's)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.cli", "cmd_behavior_ship"))

    p = sub.add_parser("suite", help="D4RL-v2-style datasets made from the shipped policies or a behaviour run")
    ssub = p.add_subparsers(dest="suite_command", required=True)
    q = ssub.add_parser("make", help="random, medium, medium-replay, expert, medium-expert as D4RL HDF5 and "
                        "Minari (resumable)")
    q.add_argument("--env", required=True, choices=["hopper", "halfcheetah", "walker2d"])
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
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.behavior.suite", "run_suite"))

    # bench --------------------------------------------------------------------------------------------
    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("learner", help="learner updates/s and achieved GFLOP/s")
    q.add_argument("--algo", choices=["dromo", "combo", "mopo", "mopo_auto", "mbpo", "mobile"], default="dromo")
    q.add_argument("--device", default="cpu")
    q.add_argument("--batch", type=int, default=256)
    q.add_argument("--steps", type=int, default=50, help="timed updates")
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.bench.learner"))
    q = bsub.add_parser("dynamics", help="ensemble training rows/s and model-env transitions/s")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--seconds", type=float, default=4.0, help="length of each timing window set")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.bench.dynamics"))
    q = bsub.add_parser("behavior", help="online SAC env steps/s and updates/s (one update per env step)")
    q.add_argument("--env", choices=["hopper", "halfcheetah", "walker2d"], default="hopper")
    q.add_argument("--backend", choices=["sac", "rllib", "both"], default="sac")
    q.add_argument("--steps", type=int, default=1000, help="timed env steps (each with one update)")
    q.add_argument("--rllib-steps", type=int, default=0, help="timed env steps for rllib (default --steps)")
    q.add_argument("--rllib-fragment", type=int, default=1, help="env steps per RLlib iteration")
    q.add_argument("--batch", type=int, default=256)
    q.add_argument("--warmup", type=int, default=1000, help="random env steps before updates (not timed)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.bench.behavior"))
    q = bsub.add_parser("pipeline", help="learner with actors feeding it vs alone; rollout scaling")
    q.add_argument("--steps", type=int, default=300, help="timed learner updates per measurement")
    q.add_argument("--algo", choices=["dromo", "combo", "mopo", "mopo_auto", "mbpo", "mobile"], default="dromo")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_handler("dromo_ray.bench.pipeline"))

    return parser


def _parse_widths(text: str, flag: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(h) for h in str(text).split(",") if h.strip())
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return widths


def cmd_behavior_train(args: argparse.Namespace) -> int:
    """``dromo-ray behavior train``."""
    if args.backend == "rllib":
        from dromo_ray.behavior.train import run_train

        if args.resume:
            raise UserError("--resume: the rllib backend is not resumable; use --backend sac")
        if args.env is None:
            raise UserError("--env is required")
        args.learning_starts = 10_000 if args.learning_starts is None else args.learning_starts
        args.steps = 1_000_000 if args.steps is None else args.steps
        return run_train(args)
    import json

    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.data.online_sac import OnlineSAC, OnlineSACConfig

    set_torch_threads(1)
    progress = sys.stderr.isatty() and not args.json
    log = None if args.json else (lambda s: print(s, flush=True))
    try:
        if args.resume:
            trainer = OnlineSAC.resume(args.resume, steps=args.steps, time_limit_s=args.time_limit, progress=progress,
                                       log=log)
        else:
            if args.env is None:
                raise UserError("--env is required (or --resume DIR)")
            cfg = OnlineSACConfig(env=args.env, steps=1_000_000 if args.steps is None else args.steps,
                                  out=args.out or "", seed=args.seed, hidden=_parse_widths(args.hidden, "--hidden"),
                                  batch_size=args.batch_size,
                                  eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                                  learning_starts=5_000 if args.learning_starts is None else args.learning_starts,
                                  time_limit_s=args.time_limit)
            cfg.validate()
            trainer = OnlineSAC(cfg, progress=progress, log=log)
        index = trainer.run()
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(index, indent=2))
    else:
        state = "complete" if index["complete"] else f"stopped: {index.get('stopped_early', '')}"
        print(f"{index['env_steps']} env steps, {len(index['checkpoints'])} checkpoints ({state}); "
              f"{trainer.out}/index.json")
        if not index["complete"]:
            print(f"continue with: dromo-ray behavior train --resume {trainer.out}")
    # A signal stopped the run resumably (state saved): the shell still learns it was a signal.
    stopped = str(index.get("stopped_early", ""))
    return 143 if stopped.startswith("SIGTERM") else 130 if stopped.startswith("SIGINT") else 0


def cmd_behavior_ship(args: argparse.Namespace) -> int:
    """``dromo-ray behavior ship``."""
    import json

    from dromo_ray.core.threads import set_torch_threads
    from dromo_ray.data.shipped import ship_checkpoint

    set_torch_threads(1)
    if args.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {args.episodes}")
    e = ship_checkpoint(args.run, args.part, args.checkpoint, episodes=args.episodes, directory=args.into)
    if args.json:
        print(json.dumps(e, indent=2))
    else:
        print(f"shipped {e['env']}-{e['part']}: {e['checkpoint']} ({e['env_steps']} env steps), sampled return "
              f"{e['stochastic_return_mean']:.1f} ± {e['stochastic_return_std']:.1f} (normalized "
              f"{e['stochastic_normalized_score']:.1f}), deterministic {e['return_mean']:.1f} ± {e['return_std']:.1f}")
    return 0


def _version() -> str:
    from dromo_ray import __version__

    return f"dromo-ray {__version__}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Ctrl-C (130) and SIGTERM (143) are one line and a clean stop from the first statement
    on: the handler is installed, and the ``try`` entered, before any heavy import (parsing is light; the error
    types and the command's module import torch, Ray, MLflow, ...). SIGTERM raises :class:`Terminated` where
    Ctrl-C raises ``KeyboardInterrupt``, so the cleanup that handles one (atomic writes remove their temporary
    file, :mod:`dromo_ray.core.files`; a run records itself killed) handles both."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        try:
            return _run(args)
        except KeyboardInterrupt:
            raise
        except _user_error_types() as e:  # one line, exit 2
            msg = str(e) if not isinstance(e, FileNotFoundError) else f"file not found: {e.filename or e}"
            from dromo_ray.core.messages import plain_message

            msg = " ".join(plain_message(msg).split())  # one line, whatever the underlying library printed
            print(f"dromo-ray {command}: error: {msg}", file=sys.stderr)
            return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated), at any point, imports included
        what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        hint = getattr(e, "resume_hint", "")
        prog = f"dromo-ray {command}" if command else "dromo-ray"
        print(f"{prog}: {what}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(args: argparse.Namespace) -> int:
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

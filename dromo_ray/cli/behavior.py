"""``dromo-ray behavior train`` and ``behavior ship``."""

from __future__ import annotations

import argparse
import sys

from dromo_ray.errors import UserError


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
        return _train_rllib(args)
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


def _train_rllib(args: argparse.Namespace) -> int:
    """``behavior train --backend rllib``: RLlib SAC (:mod:`dromo_ray.rllib.sac`), not resumable."""
    import json

    from dromo_ray.core.threads import set_torch_threads

    if args.resume:
        raise UserError("--resume: the rllib backend is not resumable; use --backend sac")
    if args.env is None:
        raise UserError("--env is required")
    set_torch_threads(1)
    from dromo_ray.rllib.sac import BehaviorConfig, summary_table, train_behavior

    cfg = BehaviorConfig(
        env=args.env, steps=1_000_000 if args.steps is None else args.steps, out=args.out or "", seed=args.seed,
        hidden=_parse_widths(args.hidden, "--hidden"), checkpoint_every=args.checkpoint_every,
        eval_episodes=args.eval_episodes,
        learning_starts=10_000 if args.learning_starts is None else args.learning_starts,
        updates_every=args.updates_every, save_rllib=args.save_rllib, time_limit_s=args.time_limit,
        progress=sys.stderr.isatty() and not args.json,
    ).validate()  # a ConfigError names the field and its flag
    try:
        res = train_behavior(cfg)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(res.index, indent=2))
    else:
        print(summary_table(res.index))
        print(f"wrote {res.out}/index.json, {res.out}/replay.hdf5 ({res.index['env_steps']} transitions) and "
              f"{len(res.checkpoints)} policy files in {res.index['wall_s']:.0f}s")
    return 0

"""``dromo-ray collect``: record an offline dataset with a real Gymnasium v5 MuJoCo environment.

    dromo-ray collect --env hopper --policy random --steps 100000 --out data/hopper_random.hdf5
    dromo-ray collect --env hopper --policy actor.pt --noise 0.1 --steps 100000 \\
        --format minari --out dromo/hopper-medium-v0

Transitions are gathered in memory, then written atomically: an interrupted or failing run leaves no file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dromo_ray.errors import DatasetError


def run(args: argparse.Namespace) -> int:
    from dromo_ray.data.gym_env import ActFn, collect_transitions, env_spec

    spec = env_spec(args.env)
    if args.steps < 1:
        raise DatasetError(str(args.out), f"--steps must be >= 1, got {args.steps}")
    if args.noise < 0:
        raise DatasetError(str(args.out), f"--noise must be >= 0, got {args.noise}")
    if args.format == "minari":
        from dromo_ray.data.minari_io import check_dataset_id, minari_root

        check_dataset_id(args.out)
        if (minari_root() / args.out).exists():
            raise DatasetError(f"minari:{args.out}", f"a Minari dataset with this id already exists under "
                               f"{minari_root()}; choose another id")
    elif Path(args.out).is_dir():
        raise DatasetError(str(args.out), "is a directory; --out names the HDF5 file to write")

    policy: ActFn | str
    if args.policy == "random":
        policy, policy_name = "random", "random"
    else:
        from dromo_ray.data.policy_io import load_policy

        try:
            loaded = load_policy(args.policy, deterministic=True, seed=args.seed)
        except DatasetError as e:  # torch's unpickling messages run over many lines: keep the first
            raise DatasetError(e.source, e.problem.splitlines()[0], e.key) from None
        if (loaded.actor.obs_dim, loaded.actor.act_dim) != (spec.obs_dim, spec.act_dim):
            got = f"{loaded.actor.obs_dim} -> {loaded.actor.act_dim}"
            raise DatasetError(str(args.policy), f"policy maps {got} dims but {spec.gym_id} has "
                               f"{spec.obs_dim} -> {spec.act_dim}", "obs_dim")
        policy, policy_name = loaded, str(Path(args.policy))

    ds = collect_transitions(spec.key, policy, steps=args.steps, seed=args.seed, noise=args.noise,
                             progress=sys.stderr.isatty(), policy_name=policy_name)
    try:
        if args.format == "minari":
            from dromo_ray.data.minari_io import write_minari

            where = f"Minari dataset {args.out} ({write_minari(ds, args.out)})"
        else:
            from dromo_ray.data.d4rl_io import write_d4rl

            where = str(write_d4rl(ds, args.out))
    except OSError as e:  # unwritable directory, full disk, ...: nothing was left behind
        raise DatasetError(str(args.out), f"cannot write ({type(e).__name__}: {e.strerror or e})") from None
    complete = len(ds.episode_returns())
    print(f"wrote {len(ds)} transitions of {spec.gym_id} ({ds.num_episodes} episodes, {complete} complete; "
          f"policy {policy_name}, noise {args.noise}, seed {args.seed}) to {where}")
    return 0

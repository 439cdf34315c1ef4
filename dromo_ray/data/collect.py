"""Record an offline dataset with a real Gymnasium v5 MuJoCo environment and write it (``dromo-ray collect``).

    collect_dataset("hopper", 100_000, "data/hopper_random.hdf5")
    collect_dataset("hopper", 100_000, "dromo/hopper-medium-v0", policy="actor.pt", noise=0.1, fmt="minari")

Transitions are gathered in memory, then written atomically: an interrupted or failing run leaves no file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dromo_ray.data.d4rl_io import write_d4rl
from dromo_ray.data.dataset import OfflineDataset
from dromo_ray.data.gym_env import ActFn, collect_transitions, env_spec
from dromo_ray.data.minari_io import check_dataset_id, minari_root, write_minari
from dromo_ray.data.policy_io import load_policy
from dromo_ray.errors import ConfigError, DatasetError

Format = Literal["d4rl", "minari"]


@dataclass(frozen=True)
class CollectResult:
    """What :func:`collect_dataset` recorded and where it went."""

    dataset: OfflineDataset
    """The recorded transitions (N = ``steps`` rows; the last episode usually partial)."""
    written: str
    """The HDF5 path written, or ``Minari dataset <id> (<directory>)``."""
    policy_name: str
    """``random`` or the policy file's path, as the dataset's metadata records it."""


def check_output(out: str, fmt: Format) -> None:
    """:class:`DatasetError` unless ``out`` can be written: a well-formed Minari id that does not exist yet, or
    an HDF5 path that is not a directory."""
    if fmt == "minari":
        check_dataset_id(out)
        if (minari_root() / out).exists():
            raise DatasetError(f"minari:{out}", f"a Minari dataset with this id already exists under "
                               f"{minari_root()}; choose another id")
    elif Path(out).is_dir():
        raise DatasetError(str(out), "is a directory; --out names the HDF5 file to write")


def collect_dataset(env: str, steps: int, out: str, *, policy: str = "random", seed: int = 0, noise: float = 0.0,
                    fmt: Format = "d4rl", progress: bool = False) -> CollectResult:
    """Record ``steps`` transitions of ``policy`` (``random``, or a policy file of :mod:`dromo_ray.data.policy_io`
    acting deterministically, plus Gaussian noise of std ``noise``) in ``env``'s real environment, seeded with
    ``seed``, and write them to ``out`` (an HDF5 path for ``fmt='d4rl'``, a dataset id for ``fmt='minari'``).

    Bad arguments raise :class:`ConfigError`; an unusable output or policy file :class:`DatasetError`, before
    anything is collected; a failed write :class:`DatasetError` with nothing left behind.
    """
    spec = env_spec(env)
    if steps < 1:
        raise ConfigError(f"steps: must be >= 1, got {steps}")
    if noise < 0:
        raise ConfigError(f"noise: must be >= 0, got {noise}")
    if fmt not in ("d4rl", "minari"):
        raise ConfigError(f"fmt: must be 'd4rl' or 'minari', got {fmt!r}")
    check_output(out, fmt)

    act: ActFn | Literal["random"]
    if policy == "random":
        act, policy_name = "random", "random"
    else:
        try:
            loaded = load_policy(policy, deterministic=True, seed=seed)
        except DatasetError as e:  # torch's unpickling messages run over many lines: keep the first
            raise DatasetError(e.source, e.problem.splitlines()[0], e.key) from None
        if (loaded.actor.obs_dim, loaded.actor.act_dim) != (spec.obs_dim, spec.act_dim):
            got = f"{loaded.actor.obs_dim} -> {loaded.actor.act_dim}"
            raise DatasetError(str(policy), f"policy maps {got} dims but {spec.gym_id} has "
                               f"{spec.obs_dim} -> {spec.act_dim}", "obs_dim")
        act, policy_name = loaded, str(Path(policy))

    ds = collect_transitions(spec.key, act, steps=steps, seed=seed, noise=noise, progress=progress,
                             policy_name=policy_name)
    try:
        if fmt == "minari":
            written = f"Minari dataset {out} ({write_minari(ds, out)})"
        else:
            written = str(write_d4rl(ds, out))
    except OSError as e:  # unwritable directory, full disk, ...: nothing was left behind
        raise DatasetError(str(out), f"cannot write ({type(e).__name__}: {e.strerror or e})") from None
    return CollectResult(ds, written, policy_name)

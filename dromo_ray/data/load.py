"""Finding a dataset by path or name, and loading it: the one place that knows what a dataset spec means.

A dataset spec (``data.dataset`` in a config, the argument of ``dromo-ray data info``) is one of

- a path to a D4RL-format HDF5 file (:mod:`dromo_ray.data.d4rl_io`);
- a D4RL name (``hopper-medium-v2``), looked up in the local D4RL cache (:func:`d4rl_dataset_dir`) under D4RL's
  file names (:func:`d4rl_filenames`);
- ``minari:<dataset id>``, a dataset in the local Minari root (:mod:`dromo_ray.data.minari_io`).

Nothing is ever downloaded. :func:`load_dataset` loads a spec; :func:`resolve_dataset` only checks that it points
at something and makes a relative path absolute, for callers (a sweep) whose workers load it elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dromo_ray.data.d4rl_io import read_d4rl
from dromo_ray.data.dataset import OfflineDataset
from dromo_ray.data.minari_io import load_minari
from dromo_ray.errors import DatasetError

MINARI_PREFIX = "minari:"
"""A spec that starts so names a Minari dataset id."""


def d4rl_dataset_dir() -> Path:
    """``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets`` (D4RL's own cache location)."""
    return Path(os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets").expanduser()


_D4RL_NAME = re.compile(r"^(?P<base>[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*?)-v(?P<version>\d+)$")


def d4rl_filenames(name: str) -> list[str]:
    """Candidate file names of a D4RL name, D4RL's naming first.

    ``hopper-medium-v2`` -> ``hopper_medium-v2.hdf5``; ``hopper-medium-replay-v2`` ->
    ``hopper_medium_replay-v2.hdf5``; v0 files were named without the version (``hopper_medium.hdf5``).
    """
    m = _D4RL_NAME.match(name)
    if not m:
        return [name + ".hdf5"]
    base = m["base"].replace("-", "_")
    return [f"{base}-v{m['version']}.hdf5", f"{base}.hdf5", f"{name}.hdf5"]


def d4rl_cache_file(name: str) -> Path | None:
    """The first of :func:`d4rl_filenames` that exists in :func:`d4rl_dataset_dir`, else None."""
    root = d4rl_dataset_dir()
    return next((root / f for f in d4rl_filenames(name) if (root / f).exists()), None)


def looks_like_path(spec: str) -> bool:
    """Whether a (non-Minari) spec is meant as a file path rather than a D4RL name: it has a directory separator,
    an HDF5 suffix or a leading dot, or it exists."""
    if os.sep in spec or "/" in spec or spec.endswith((".hdf5", ".h5")) or spec.startswith("."):
        return True
    try:
        return Path(spec).exists()
    except OSError:  # e.g. permission denied: a path, which read_d4rl reports
        return True


def resolve_dataset(spec: str, base_dir: str | os.PathLike | None = None) -> str:
    """``spec`` as a process in another working directory can load it, checked to point at something.

    A local file (``spec`` as given, then relative to ``base_dir``) becomes its absolute path; a D4RL name whose
    file is in the local cache and a ``minari:`` id are returned unchanged. Otherwise :class:`DatasetError`
    (source ``spec``), whose ``problem`` reads ``no such dataset file ...`` for a path and ``no D4RL dataset ...
    in <cache>`` for a name.
    """
    spec = str(spec)
    if spec.startswith(MINARI_PREFIX):
        return spec
    candidates = [Path(spec).expanduser()] + ([Path(base_dir) / spec] if base_dir is not None else [])
    for cand in candidates:
        if cand.exists():
            return str(cand.resolve())
    if looks_like_path(spec):
        raise DatasetError(spec, f"no such dataset file {spec!r}")
    if d4rl_cache_file(spec) is not None:
        return spec
    raise DatasetError(spec, f"no D4RL dataset {spec!r} in {d4rl_dataset_dir()} (nothing is downloaded; place the "
                       "file there or set $D4RL_DATASET_DIR)")


def load_dataset(spec: str, env: str | None = None, allow_unbounded_actions: bool = False) -> OfflineDataset:
    """Load a dataset from a D4RL-format HDF5 path, a D4RL name or ``minari:<dataset id>``.

    D4RL names (``hopper-medium-v2``) are looked up as ``hopper_medium-v2.hdf5`` in ``$D4RL_DATASET_DIR``
    or ``~/.d4rl/datasets``; Minari ids in ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``. Nothing is
    downloaded. ``env`` (a registry key or Gymnasium id) overrides the environment otherwise inferred from
    the file's metadata or name. Actions outside [-1, 1] are an error unless ``allow_unbounded_actions``
    (:func:`~dromo_ray.data.dataset.check_action_box`). Every problem raises one :class:`DatasetError`.
    """
    spec = str(spec)
    if spec.startswith(MINARI_PREFIX):
        return load_minari(spec[len(MINARI_PREFIX):], env=env, allow_unbounded_actions=allow_unbounded_actions)
    if looks_like_path(spec):
        return read_d4rl(spec, env=env, allow_unbounded_actions=allow_unbounded_actions)
    path = d4rl_cache_file(spec)
    if path is not None:
        return read_d4rl(path, env=env, name=spec, allow_unbounded_actions=allow_unbounded_actions)
    root = d4rl_dataset_dir()
    tried = ", ".join(dict.fromkeys(d4rl_filenames(spec)))
    raise DatasetError(spec, f"no such file, and no D4RL dataset named so in {root} (looked for {tried}); "
                       "nothing is downloaded: place the file there or set $D4RL_DATASET_DIR")

"""D4RL-format HDF5: read with validation, write atomically.

Layout (D4RL's)::

    observations (N, D_o)   actions (N, D_a)   rewards (N,)   terminals (N,)   timeouts (N,)
    next_observations (N, D_o)       optional; written by dromo_ray
    infos/<name> (N, ...)            optional per-row arrays (qpos, qvel, next_qpos, next_qvel, ...)
    metadata/<name>                  optional scalars and strings (nested groups become ``a/b`` keys)

Episodes are contiguous; one ends after a row flagged in ``terminals`` or ``timeouts``. A row flagged both is
read as terminal (no bootstrap; :func:`dromo_ray.data.dataset.terminal_wins`), with a warning.

Next observations at episode ends. With ``next_observations`` in the file it is used as is (and checked
against ``observations[i + 1]`` inside episodes). Without it, the next observation of row i is
``observations[i + 1]`` only *inside* an episode: the last row of an episode (terminal, timeout, or the
last row of the file) has no recorded successor, because ``observations[i + 1]`` is the first state of the
next episode. Such rows are dropped rather than paired with another episode's start, and the row before a
dropped terminal/timeout row is marked as a timeout (the episode, as kept, was cut there).
``metadata['dropped_rows']`` counts them.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dromo_ray.core.files import atomic_path
from dromo_ray.data.dataset import OfflineDataset, check_action_box, check_dims, resolve_env, terminal_wins
from dromo_ray.errors import DatasetError

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
NEXT_OBS_ATOL = 1e-4
"""Absolute part of the tolerance of the ``next_observations[i] == observations[i + 1]`` check."""
NEXT_OBS_RTOL = 1e-4
"""Relative part of the same tolerance."""
_CHUNK = 1 << 18


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_d4rl(path: str | os.PathLike, env: str | None = None, name: str | None = None,
              allow_unbounded_actions: bool = False) -> OfflineDataset:
    """Read and validate a D4RL-format HDF5 file.

    ``env`` names the environment (registry key or Gymnasium id); when None it is inferred from
    ``metadata/env_key`` (or ``env``/``env_id``), then from ``name`` or the file name. Every problem raises
    one :class:`DatasetError` naming the file, the key and the problem: among them a file this user may not
    read, arrays larger than the memory available (checked from their declared shapes before any is read),
    actions outside [-1, 1] unless ``allow_unbounded_actions``
    (:func:`~dromo_ray.data.dataset.check_action_box`). Rows flagged both terminal and timeout are read as
    terminal (:func:`~dromo_ray.data.dataset.terminal_wins`).
    """
    path = Path(path)
    src = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DatasetError(src, "file does not exist") from None
    except PermissionError:
        raise DatasetError(src, "permission denied: a directory on the path cannot be searched by this user "
                           "(check its permissions)") from None
    if path.is_dir():
        raise DatasetError(src, "is a directory, expected a D4RL-format HDF5 file")
    if not os.access(path, os.R_OK):
        raise DatasetError(src, "permission denied: the file is not readable by this user (check its "
                           "permissions)")
    if st.st_size == 0:
        raise DatasetError(src, "file is empty (0 bytes)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if e.errno == errno.EACCES or "Permission denied" in str(e):
            raise DatasetError(src, "permission denied: the file is not readable by this user") from None
        raise DatasetError(src, f"not an HDF5 file, or truncated/corrupt ({_short(e)})") from None
    with f:
        objs = {k: _array(f, k, src) for k in REQUIRED_KEYS}
        has_next = "next_observations" in f
        if has_next:
            objs["next_observations"] = _array(f, "next_observations", src)
        n = int(objs["observations"].shape[0]) if objs["observations"].ndim else 0
        info_objs = _info_arrays(f, n)
        check_fits_in_memory({**objs, **{f"infos/{k}": v for k, v in info_objs.items()}}, src)
        arrays = {k: _read(obj, k, src) for k, obj in objs.items()}
        metadata = _read_metadata(f, src)
        infos = {k: _read(v, f"infos/{k}", src) for k, v in info_objs.items()}

    obs, act = arrays["observations"], arrays["actions"]
    for key in ("observations", "actions") + (("next_observations",) if has_next else ()):
        if arrays[key].ndim != 2:
            raise DatasetError(src, f"must be 2-D (N, D), has shape {arrays[key].shape}", key)
    for key in ("rewards", "terminals", "timeouts"):
        a = arrays[key]
        if a.ndim == 2 and a.shape[1] == 1:
            arrays[key] = a = a[:, 0]
        if a.ndim != 1:
            raise DatasetError(src, f"must be 1-D (N,), has shape {a.shape}", key)
    if n == 0:
        raise DatasetError(src, "has no rows", "observations")
    for key, a in arrays.items():
        if a.shape[0] != n:
            raise DatasetError(src, f"has {a.shape[0]} rows but observations has {n}", key)
    if has_next and arrays["next_observations"].shape != obs.shape:
        raise DatasetError(src, f"shape {arrays['next_observations'].shape} differs from observations "
                           f"{obs.shape}", "next_observations")
    for key in ("observations", "actions", "rewards") + (("next_observations",) if has_next else ()):
        _check_finite(arrays[key], key, src)
    terminals = _boolean(arrays["terminals"], "terminals", src)
    timeouts, both = terminal_wins(terminals, _boolean(arrays["timeouts"], "timeouts", src), src)
    if both:
        metadata = {**metadata, "terminal_and_timeout_rows": both}

    hints = [metadata.get(k) for k in ("env_key", "env", "env_id", "env_name")] + [name, path.stem]
    spec = resolve_env(env, *hints, obs_dim=obs.shape[1], source=src)
    check_dims(spec, obs.shape[1], act.shape[1], src)
    check_action_box(act, spec, src, allow_unbounded_actions)

    ends = terminals | timeouts
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    starts[1:] = ends[:-1]
    rewards = arrays["rewards"]
    if has_next:
        next_obs = arrays["next_observations"]
        check_next_observations(obs, next_obs, ends, src)
        keep = None
    else:
        next_obs = np.empty_like(obs, dtype=np.float32)
        next_obs[:-1] = obs[1:]
        next_obs[-1] = obs[-1]  # placeholder: this row is dropped below
        # The last row of every episode, and the last row of the file, has no recorded successor.
        unknown = ends.copy()
        unknown[-1] = True
        keep = ~unknown
        # The kept row before a dropped terminal/timeout row now ends its episode: mark it cut.
        before = np.flatnonzero(ends[1:] & ~starts[1:])  # i such that row i+1 is a flagged end, not a start
        timeouts = timeouts.copy()
        timeouts[before] = True
        metadata = dict(metadata)
        metadata["dropped_rows"] = int(unknown.sum())
        dropped_terminals = int((unknown & terminals).sum())
        metadata["dropped_terminal_rows"] = dropped_terminals
        if dropped_terminals:
            warnings.warn(f"{src}: no next_observations; dropped {dropped_terminals} terminal rows whose "
                          "next observation is unknown (their done signal is lost)", stacklevel=2)
    ds = OfflineDataset(
        observations=obs, actions=act, rewards=rewards, next_observations=next_obs,
        terminals=terminals, timeouts=timeouts, episode_starts=starts, env_id=spec.key, source=src,
        metadata=metadata, infos=infos,
    )
    if keep is not None:
        ds = ds.subset(np.flatnonzero(keep))
        if len(ds) == 0:
            raise DatasetError(src, "no transition has a known next observation (one-row episodes and no "
                               "next_observations)", "next_observations")
    return ds


def check_next_observations(obs: np.ndarray, next_obs: np.ndarray, ends: np.ndarray, src: str) -> None:
    """Inside an episode (row i not an episode end), ``next_obs[i]`` must equal ``obs[i + 1]`` within
    ``NEXT_OBS_ATOL + NEXT_OBS_RTOL * |obs[i + 1]|``. Checked on every row, vectorised in chunks."""
    n = obs.shape[0]
    for lo in range(0, n - 1, _CHUNK):
        hi = min(lo + _CHUNK, n - 1)
        a, b = next_obs[lo:hi], obs[lo + 1:hi + 1]
        bad_row = np.any(np.abs(a - b) > NEXT_OBS_ATOL + NEXT_OBS_RTOL * np.abs(b), axis=1) & ~ends[lo:hi]
        if bad_row.any():
            i = lo + int(np.argmax(bad_row))
            diff = float(np.max(np.abs(next_obs[i] - obs[i + 1])))
            raise DatasetError(src, f"next_observations[{i}] differs from observations[{i + 1}] by up to "
                               f"{diff:.3g} although row {i} does not end an episode (terminals and timeouts "
                               "are both 0 there)", "next_observations")


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _array(f: h5py.File, key: str, src: str) -> h5py.Dataset:
    """The numeric dataset ``key`` (not read yet)."""
    if key not in f:
        raise DatasetError(src, "missing required key", key)
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(src, "is a group, expected an array", key)
    if obj.dtype.kind not in "biuf":
        raise DatasetError(src, f"has non-numeric dtype {obj.dtype}, expected numbers", key)
    return obj


def _read(obj: h5py.Dataset, key: str, src: str) -> np.ndarray:
    try:
        return np.asarray(obj[()])
    except (OSError, ValueError, RuntimeError) as e:
        raise DatasetError(src, f"cannot be read; truncated or corrupt file? ({_short(e)})", key) from None


def available_memory() -> int | None:
    """Bytes of memory this process can still get: Linux ``MemAvailable`` (capped by a cgroup v2 limit when
    there is one), else free physical pages; None when the system does not say."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    try:
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cg / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def check_fits_in_memory(arrays: dict[str, h5py.Dataset], src: str, available: int | None = None) -> None:
    """DatasetError, before anything is read, when the declared arrays need more bytes than are available
    (``available``: default :func:`available_memory`). Loading copies some of them: this is a lower bound."""
    sizes = {k: int(np.prod(a.shape, dtype=np.float64)) * a.dtype.itemsize for k, a in arrays.items()}
    total = sum(sizes.values())
    avail = available_memory() if available is None else available
    if avail is None or total <= avail:
        return
    big = max(sizes, key=lambda k: sizes[k])
    a = arrays[big]
    raise DatasetError(src, f"too large for this machine: {big} alone declares shape {tuple(a.shape)} "
                       f"{a.dtype} = {_gb(sizes[big])}, the arrays together {_gb(total)}, but only {_gb(avail)} "
                       "of memory is available", big)


def _check_finite(a: np.ndarray, key: str, src: str) -> None:
    if a.dtype.kind != "f":
        return
    finite = np.isfinite(a)
    if not finite.all():
        row = int(np.argmax(~finite.reshape(a.shape[0], -1).all(axis=1)))
        raise DatasetError(src, f"contains NaN or inf (first at row {row})", key)


def _boolean(a: np.ndarray, key: str, src: str) -> np.ndarray:
    if a.dtype == np.bool_:
        return a
    ok = (a == 0) | (a == 1)
    if not ok.all():
        row = int(np.argmax(~ok))
        raise DatasetError(src, f"must be boolean (0/1), found {a[row]!r} at row {row}", key)
    return a.astype(bool)


def _info_arrays(f: h5py.File, n: int) -> dict[str, h5py.Dataset]:
    """Every numeric ``infos/...`` array with N rows (not read yet); others are ignored."""
    out: dict[str, h5py.Dataset] = {}
    if "infos" not in f or not isinstance(f["infos"], h5py.Group):
        return out

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biuf" and obj.shape[:1] == (n,):
            out[name] = obj

    f["infos"].visititems(visit)
    return out


def _read_metadata(f: h5py.File, src: str) -> dict[str, Any]:
    """Scalars and strings under ``metadata/`` (D4RL also stores policy weights there: arrays are skipped)."""
    out: dict[str, Any] = {}
    if "metadata" not in f or not isinstance(f["metadata"], h5py.Group):
        return out

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.shape == ():
            try:
                out[name] = _plain(obj[()])
            except (OSError, ValueError, RuntimeError):
                pass  # unreadable provenance is not worth failing the load

    f["metadata"].visititems(visit)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_d4rl(ds: OfflineDataset, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``ds`` in D4RL layout (with ``next_observations``, ``infos/*`` and ``metadata/*``).

    Atomic: written to a temporary file in the same directory, then renamed over ``path``; on any failure
    (Ctrl-C and SIGTERM included; :mod:`dromo_ray.core.files`) the temporary file is removed and ``path`` is untouched.
    ``metadata/env_key`` records the registry key so that the file names its environment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**ds.metadata, **(metadata or {}), "env_key": ds.env_id}
    meta.pop("dropped_rows", None)
    meta.pop("dropped_terminal_rows", None)
    meta.pop("terminal_and_timeout_rows", None)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("observations", data=ds.observations)
        f.create_dataset("actions", data=ds.actions)
        f.create_dataset("rewards", data=ds.rewards)
        f.create_dataset("next_observations", data=ds.next_observations)
        f.create_dataset("terminals", data=ds.terminals)
        f.create_dataset("timeouts", data=ds.timeouts)
        for k, v in ds.infos.items():
            f.create_dataset(f"infos/{k}", data=v)
        for k, v in meta.items():
            f.create_dataset(f"metadata/{k}", data=_h5_scalar(v))
    return path


def _h5_scalar(v: Any) -> Any:
    v = _plain(v)
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)

"""Minari datasets in the local Minari root (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).

Writing uses ``minari.create_dataset_from_buffers`` (DataCollector needs jax). Minari stores episodes:
``observations`` has T + 1 rows (the last is the real final observation, also at a truncation),
``actions``/``rewards``/``terminations``/``truncations`` T rows. Per-row ``infos`` of an
:class:`OfflineDataset` that come in pairs (``qpos`` + ``next_qpos``) are stored the Minari way, T + 1 rows
per episode. Loading inverts both. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dromo_ray.data.dataset import OfflineDataset, check_action_box, check_dims, resolve_env, terminal_wins
from dromo_ray.errors import DatasetError

_ID = re.compile(r"^(?:[-_\w][-_\w/]*[-_\w]/)?[-_\w]+?-v\d+$")


def minari_root() -> Path:
    """``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets`` (Minari's own rule)."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return (Path(env).expanduser() if env else Path.home() / ".minari" / "datasets").resolve()


def check_dataset_id(dataset_id: str) -> None:
    """Minari ids look like ``dromo/hopper-random-v0`` (namespace optional, version required)."""
    if not _ID.match(dataset_id) or "//" in dataset_id:
        raise DatasetError(f"minari:{dataset_id}", "malformed Minari dataset id; ids look like "
                           "dromo/hopper-random-v0 (namespace optional, -v<version> required)")


def write_minari(ds: OfflineDataset, dataset_id: str, max_episode_steps: int | None = None) -> Path:
    """Write ``ds`` as the local Minari dataset ``dataset_id``; returns its directory.

    Atomic: the dataset is built under a hidden temporary root inside the Minari root, then its directory
    is renamed into place; on any failure (KeyboardInterrupt included) nothing is left behind. An existing
    dataset with the same id is an error (Minari datasets are immutable). Minari finds its root through
    ``$MINARI_DATASETS_PATH`` only, so that variable points at the temporary root while Minari writes: do
    not write Minari datasets from several threads of one process at once.
    """
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.namespace import create_namespace, list_local_namespaces

    from dromo_ray.data.gym_env import make_env, package_versions

    check_dataset_id(dataset_id)
    src = f"minari:{dataset_id}"
    root = minari_root()
    final = root / dataset_id
    if final.exists():
        raise DatasetError(src, f"a Minari dataset with this id already exists at {final}; "
                           "choose another id (or -v<next version>) or delete it")
    steps = max_episode_steps or int(ds.metadata.get("max_episode_steps", 1000))
    env = make_env(ds.env_id, max_episode_steps=steps)
    obs_dtype = env.observation_space.dtype
    act_dtype = env.action_space.dtype
    paired = [k for k in ds.infos if not k.startswith("next_") and f"next_{k}" in ds.infos]
    starts = ds.episode_start_indices
    ends = np.append(starts[1:], len(ds))
    buffers = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        if not np.array_equal(ds.observations[s + 1:e], ds.next_observations[s:e - 1]):
            raise DatasetError(ds.source or src, f"episode starting at row {s} is not a chain "
                               "(next_observations[i] != observations[i + 1])", "next_observations")
        ep_obs = np.concatenate([ds.observations[s:e], ds.next_observations[e - 1:e]])
        buffers.append(EpisodeBuffer(
            observations=ep_obs.astype(obs_dtype),
            actions=ds.actions[s:e].astype(act_dtype),
            rewards=ds.rewards[s:e].astype(np.float64),
            terminations=ds.terminals[s:e],
            truncations=ds.timeouts[s:e],
            infos={k: np.concatenate([ds.infos[k][s:e], ds.infos[f"next_{k}"][e - 1:e]]) for k in paired},
        ))

    root.mkdir(parents=True, exist_ok=True)
    tmp_root = root / f".dromo-tmp-{uuid.uuid4().hex}"
    saved = os.environ.get("MINARI_DATASETS_PATH")
    versions = package_versions()
    spec = ds.env_spec
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(tmp_root)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                created = minari.create_dataset_from_buffers(
                    dataset_id=dataset_id, buffer=buffers, env=env, eval_env=env.spec,
                    algorithm_name=str(ds.metadata.get("policy", "unknown")),
                    author="dromo_ray", author_email="n/a",
                    code_permalink=f"dromo_ray {versions['dromo_ray']}",
                    ref_min_score=spec.ref_min_score, ref_max_score=spec.ref_max_score,
                    description=f"{spec.gym_id} transitions collected by dromo_ray ({ds.source})",
                    requirements=[f"gymnasium=={versions['gymnasium']}", f"mujoco=={versions['mujoco']}"],
                )
                created.storage.update_metadata({"dromo_ray": _jsonable(ds.metadata),
                                                 "dromo_ray_env": ds.env_id})
        finally:
            if saved is None:
                os.environ.pop("MINARI_DATASETS_PATH", None)
            else:
                os.environ["MINARI_DATASETS_PATH"] = saved
        namespace = dataset_id.rpartition("/")[0]
        if namespace and namespace not in list_local_namespaces():
            create_namespace(namespace)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp_root / dataset_id, final)
    finally:
        env.close()
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def load_minari(dataset_id: str, env: str | None = None, allow_unbounded_actions: bool = False) -> OfflineDataset:
    """Load the local Minari dataset ``dataset_id`` into an :class:`OfflineDataset` (validated as
    :func:`~dromo_ray.data.d4rl_io.read_d4rl` validates: actions in [-1, 1] unless ``allow_unbounded_actions``,
    a step both terminated and truncated read as terminated)."""
    src = f"minari:{dataset_id}"
    check_dataset_id(dataset_id)
    path = minari_root() / dataset_id
    if not (path / "data").is_dir():
        raise DatasetError(src, f"no local Minari dataset at {path} (root: $MINARI_DATASETS_PATH or "
                           "~/.minari/datasets); nothing is downloaded")
    import minari

    try:
        mds = minari.load_dataset(dataset_id, download=False)
        meta = dict(mds.storage.metadata)
        episodes = list(mds.iterate_episodes())
    except Exception as e:  # noqa: BLE001 - whatever Minari raises, the dataset is unusable
        raise DatasetError(src, f"cannot read the Minari dataset ({type(e).__name__}: {e})") from None
    if not episodes:
        raise DatasetError(src, "has no episodes")
    env_spec = mds.spec.env_spec
    hints = [meta.get("dromo_ray_env"), env_spec.id if env_spec is not None else None,
             *dataset_id.split("/")]
    obs_l, act_l, rew_l, next_l, term_l, trunc_l, start_l = [], [], [], [], [], [], []
    info_keys: set[str] | None = None
    for ep in episodes:
        o, a = ep.observations, ep.actions
        if not isinstance(o, np.ndarray) or not isinstance(a, np.ndarray) or o.ndim != 2 or a.ndim != 2:
            raise DatasetError(src, f"episode {ep.id}: only flat Box observations and actions are supported",
                               "observations")
        t = len(ep.rewards)
        if o.shape[0] != t + 1 or a.shape[0] != t or len(ep.terminations) != t or len(ep.truncations) != t:
            raise DatasetError(src, f"episode {ep.id}: {o.shape[0]} observations for {t} steps "
                               "(expected T + 1 observations, T actions/rewards/flags)", "observations")
        obs_l.append(o[:-1])
        next_l.append(o[1:])
        act_l.append(a)
        rew_l.append(np.asarray(ep.rewards))
        term_l.append(np.asarray(ep.terminations))
        trunc_l.append(np.asarray(ep.truncations))
        start = np.zeros(t, dtype=bool)
        start[:1] = True
        start_l.append(start)
        ep_infos = ep.infos or {}
        keys = {k for k, v in ep_infos.items() if isinstance(v, np.ndarray) and v.shape[:1] == (t + 1,)}
        info_keys = keys if info_keys is None else info_keys & keys
    obs = np.concatenate(obs_l)
    act = np.concatenate(act_l)
    for key, arr in (("observations", obs), ("actions", act), ("rewards", np.concatenate(rew_l))):
        if not np.isfinite(arr).all():
            raise DatasetError(src, "contains NaN or inf", key)
    spec = resolve_env(env, *hints, obs_dim=obs.shape[1], source=src)
    check_dims(spec, obs.shape[1], act.shape[1], src)
    check_action_box(act, spec, src, allow_unbounded_actions)
    terminals = np.concatenate(term_l).astype(bool)
    timeouts, both = terminal_wins(terminals, np.concatenate(trunc_l).astype(bool), src)
    infos: dict[str, np.ndarray] = {}
    for k in sorted(info_keys or ()):
        infos[k] = np.concatenate([ep.infos[k][:-1] for ep in episodes])
        infos[f"next_{k}"] = np.concatenate([ep.infos[k][1:] for ep in episodes])
    metadata = dict(meta.get("dromo_ray") or {})
    metadata.update(minari_dataset_id=dataset_id, minari_version=str(meta.get("minari_version", "")))
    if both:
        metadata["terminal_and_timeout_rows"] = both
    return OfflineDataset(
        observations=obs, actions=act, rewards=np.concatenate(rew_l),
        next_observations=np.concatenate(next_l), terminals=terminals,
        timeouts=timeouts, episode_starts=np.concatenate(start_l),
        env_id=spec.key, source=src, metadata=metadata, infos=infos,
    )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))

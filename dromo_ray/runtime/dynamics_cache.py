"""Trained ensembles kept by content, so that runs on the same data share one (runtime layer).

Alg. 1 line 1 does not depend on the agent: every algorithm of a comparison (DROMO, COMBO, MOPO, MBPO, MOBILE) on
one dataset and seed fits the same ensemble. On 1M transitions that fit takes longer than the learner does
(about 13k rows/s on one core: an epoch per ~75 s, dozens of epochs to MOPO's early stop), so a sweep of several
algorithms would spend most of its time refitting one model. With ``dynamics.cache_dir`` set, stage 1 stores the
merged ensemble under a key of everything that determines it and a later run with the same key loads it instead:

    key = sha256(format, env, dataset rows (obs, act, rew, next_obs, terminals), the train/holdout split,
                 every dynamics.* setting except cache_dir, seed, runtime.torch_threads)

so a hit is the ensemble that run would have trained itself (the trainers' seeds are ``seed * 7919 + i`` over
``dynamics.num_trainers``, both in the key), and the comparison then differs in the objective only, as published
reproductions that load one pretrained model per task also arrange (OfflineRL-Kit ``--load-dynamics-path``).
What is stored is the merged state before appendix A's recalibration, its members' holdout losses and the
training metrics; calibration is recomputed from it (cheap and deterministic). Files are written atomically and
read with ``weights_only=True``; a file whose key or format does not match is refused with one error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dromo_ray.core.config import ExperimentConfig
from dromo_ray.core.files import atomic_path
from dromo_ray.errors import CheckpointError

FORMAT = "dromo_ray.dynamics_cache/1"


def cache_key(cfg: ExperimentConfig, env_key: str, arrays: Any, holdout_idx: np.ndarray) -> str:
    """The hex sha256 of everything that determines stage 1's ensemble (module docstring)."""
    h = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(cfg.dynamics).items() if k != "cache_dir"}
    head = {"format": FORMAT, "env": env_key, "dynamics": settings, "seed": cfg.seed,
            "torch_threads": cfg.runtime.torch_threads}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in ("obs", "act", "rew", "next_obs", "done"):
        a = np.ascontiguousarray(getattr(arrays, name))
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(np.ascontiguousarray(holdout_idx, dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_file(cache_dir: str | Path, key: str) -> Path:
    """``<cache_dir>/dynamics_<first 24 hex of key>.pt``."""
    return Path(cache_dir).expanduser() / f"dynamics_{key[:24]}.pt"


def load_cached(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The stored ``{"state", "holdout_losses", "metrics"}`` for ``key``, or None when there is none."""
    path = cache_file(cache_dir, key)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, never train over it silently
        raise CheckpointError(f"{path}: not a readable dynamics cache file ({type(e).__name__}: {e}); "
                              "delete it to retrain") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("key") != key:
        raise CheckpointError(f"{path}: not a {FORMAT} file for this key; delete it to retrain")
    return blob


def store(cache_dir: str | Path, key: str, state: dict[str, torch.Tensor], holdout_losses: list[list[float]],
          metrics: dict[str, float]) -> Path:
    """Write the merged ensemble's state (CPU tensors) under ``key``, atomically; returns the file."""
    path = cache_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "key": key, "state": {k: v.detach().cpu().clone() for k, v in state.items()},
            "holdout_losses": [[float(x) for x in h] for h in holdout_losses],
            "metrics": {k: float(v) for k, v in metrics.items()}}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(blob, tmp)
    return path

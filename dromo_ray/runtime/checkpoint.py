"""Checkpoints: everything needed to continue a run, written atomically, loaded with ``weights_only=True``.

Layout of a run directory::

    run_dir/
      config.yaml                 the validated config of the run (written by the edge that starts it)
      checkpoints/step_000100/    one directory per checkpoint
        state.pt                  torch.save of plain dicts of tensors, numbers and strings
      checkpoints/latest          the name of the newest complete checkpoint
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dromo_ray.core.config import ExperimentConfig, to_dict
from dromo_ray.core.envs import get_env_spec
from dromo_ray.core.files import write_text_atomic
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.errors import CheckpointError, ConfigError

STATE_FILE = "state.pt"
REQUIRED = {"driver": dict, "config": dict, "env": str, "dynamics": dict, "learner": dict, "replay": dict}
"""Top-level keys of every runtime checkpoint and their types (runtime/loop.py ``LearnerLoop.checkpoint``)."""
CONFIG_SECTIONS = ("agent", "dynamics", "runtime")
CONTINUE_KEYS = (("agent", "algorithm"), ("agent", "hidden_dims"), ("dynamics", "ensemble_size"),
                 ("dynamics", "hidden_dims"), ("runtime", "synchronous"))
"""Config keys a resumed run must share with its checkpoint (networks, ensemble, loop mode)."""


def _numpy_to_torch(obj: Any) -> Any:
    """weights_only loading accepts tensors and plain containers; store numpy arrays as tensors."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(obj, copy=True, order="C")), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy_to_torch(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _torch_to_numpy(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj and len(obj) == 2:
            return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=False)
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_torch_to_numpy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_torch_to_numpy(v) for v in obj)
    return obj


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` to ``run_dir/checkpoints/step_<step>`` atomically; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:09d}.", dir=root))
    try:
        torch.save(_numpy_to_torch(state), tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name)
    old = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, its state.pt, a run dir or a run dir's checkpoints/ dir."""
    p = Path(path)
    candidates = [p / STATE_FILE, p]
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.exists():
            candidates.insert(0, root / latest.read_text().strip() / STATE_FILE)
    for c in candidates:
        if c.is_file() and c.name == STATE_FILE:
            return c
    raise CheckpointError(f"{path}: no checkpoint found (expected a run dir, a checkpoint dir or {STATE_FILE})")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    f = resolve_checkpoint(path)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means an unusable file
        raise CheckpointError(f"{f}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "driver" not in state:
        raise CheckpointError(f"{f}: not a dromo_ray checkpoint")
    bad = [k for k, tp in REQUIRED.items() if not isinstance(state.get(k), tp)]
    if "config" not in bad:
        bad += [f"config.{s}" for s in CONFIG_SECTIONS if not isinstance(state["config"].get(s), dict)]
    if bad:
        raise CheckpointError(f"{f}: not a complete dromo_ray checkpoint (missing or malformed: {', '.join(bad)})")
    state = _torch_to_numpy(state)
    state["path"] = str(f.parent)
    return state


def check_compatible(cfg: ExperimentConfig, ckpt: dict[str, Any]) -> None:
    """ConfigError naming the key when ``cfg`` cannot continue ``ckpt`` (:data:`CONTINUE_KEYS`)."""
    old, new = ckpt["config"], to_dict(cfg)
    for section, key in CONTINUE_KEYS:
        a, b = _plain(old[section][key]), _plain(new[section][key])
        if a != b:
            raise ConfigError(f"{section}.{key}: checkpoint has {a!r}, config has {b!r}")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def load_policy_from_checkpoint(path: str | Path) -> tuple[TanhGaussianActor, str, dict[str, Any]]:
    """The current policy of a checkpoint (for ``dromo-ray evaluate``), its env key and the whole state."""
    state = load_checkpoint(path)
    try:
        spec = get_env_spec(state["env"])
        hidden = tuple(state["config"]["agent"]["hidden_dims"])
        actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, hidden)
        actor.load_state_dict(state["learner"]["agent"]["actor"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a well-formed file with the wrong contents
        what = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise CheckpointError(f"{state['path']}: no policy in this checkpoint ({what})") from None
    return actor.eval(), state["env"], state

"""Policy files: a small torch file that ``dromo-ray collect --policy PATH`` and evaluators load safely.

Format (``torch.save`` of plain containers, loaded with ``weights_only=True``)::

    {"format": "dromo_ray.policy/1", "obs_dim": int, "act_dim": int, "hidden": [int, ...],
     "state_dict": TanhGaussianActor state dict, "obs_mean": tensor | None, "obs_std": tensor | None,
     "meta": {str: str | int | float},
     "critic": None | {"hidden": [int, ...], "num_q": int, "state_dict": TwinCritic state dict,
                       "gamma": float, "entropy_coef": float, "soft_backup": bool}}

``critic`` (optional; files without it load as before) is the run's Q_1..Q_num_q on the actor's inputs, so that
``dromo-ray evaluate --values`` can check a policy file's Q against its Monte-Carlo return (RLlib CQL runs, whose
checkpoint is this file, write it).

Any policy (a DROMO actor, an RLlib SAC module converted to a TanhGaussianActor) travels in this one form.

A behaviour run (``dromo-ray behavior train``, either backend: :mod:`dromo_ray.data.online_sac` or
:mod:`dromo_ray.rllib.sac`) lists its policy files, each with its evaluated returns, in ``index.json``
(:data:`INDEX_FORMAT`); :func:`load_index` reads it for the suite maker, which so never needs the trainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dromo_ray.core.files import atomic_path
from dromo_ray.core.nets import TanhGaussianActor, TwinCritic
from dromo_ray.errors import DatasetError

FORMAT = "dromo_ray.policy/1"
INDEX_FORMAT = "dromo_ray.behavior_index/1"
"""``format`` of a behaviour run's ``index.json`` (a file format on disk: the name stays as runs wrote it)."""
PolicyFn = Callable[[np.ndarray], np.ndarray]


CRITIC_INFO = {"gamma": float, "entropy_coef": float, "soft_backup": bool}
"""What a policy file's ``critic`` says beside its weights: the discount and the entropy coefficient of the backup
that trained it (a soft backup makes Q count the entropy bonus of later steps)."""


def save_policy(path: str | os.PathLike, actor: TanhGaussianActor, obs_mean: np.ndarray | None = None,
                obs_std: np.ndarray | None = None, meta: dict[str, Any] | None = None,
                critic: TwinCritic | None = None, critic_info: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file, then rename); ``critic`` needs ``critic_info`` (:data:`CRITIC_INFO`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT,
        "obs_dim": actor.obs_dim,
        "act_dim": actor.act_dim,
        "hidden": list(actor.hidden),
        "state_dict": {k: v.detach().cpu().clone() for k, v in actor.state_dict().items()},
        "obs_mean": None if obs_mean is None else torch.as_tensor(obs_mean, dtype=torch.float32),
        "obs_std": None if obs_std is None else torch.as_tensor(obs_std, dtype=torch.float32),
        "meta": dict(meta or {}),
        "critic": None,
    }
    if critic is not None:
        info = dict(critic_info or {})
        missing = sorted(set(CRITIC_INFO) - set(info))
        if missing:
            raise ValueError(f"save_policy: critic_info lacks {missing}")
        blob["critic"] = {"hidden": [int(layer.out_features) for layer in critic.net.layers],
                          "num_q": int(critic.num_q),
                          "state_dict": {k: v.detach().cpu().clone() for k, v in critic.state_dict().items()},
                          **{k: tp(info[k]) for k, tp in CRITIC_INFO.items()}}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


class LoadedPolicy:
    """obs (B, D_o) float -> actions (B, D_a) in [-1, 1] as numpy; stochastic unless deterministic."""

    def __init__(self, actor: TanhGaussianActor, obs_mean: torch.Tensor | None, obs_std: torch.Tensor | None,
                 meta: dict[str, Any], deterministic: bool = True, seed: int = 0,
                 critic: TwinCritic | None = None, critic_info: dict[str, Any] | None = None) -> None:
        self.actor = actor.eval()
        self.obs_mean, self.obs_std, self.meta = obs_mean, obs_std, meta
        self.critic = None if critic is None else critic.eval()
        self.critic_info = dict(critic_info or {})
        self.deterministic = deterministic
        self.generator = torch.Generator().manual_seed(seed)

    def inputs(self, obs: np.ndarray) -> torch.Tensor:
        """What the networks see: ``obs`` (B, D_o) as float32, normalised when the file says how."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        if self.obs_mean is not None and self.obs_std is not None:
            x = (x - self.obs_mean) / self.obs_std
        return x

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        a, _ = self.actor.sample(self.inputs(obs), generator=self.generator, deterministic=self.deterministic)
        return a.numpy()


def load_policy(path: str | os.PathLike, deterministic: bool = True, seed: int = 0) -> LoadedPolicy:
    """Load a policy file; a bad file raises :class:`DatasetError` naming it."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(str(path), "policy file does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
        raise DatasetError(str(path), f"not a dromo_ray policy file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DatasetError(str(path), f"not a dromo_ray policy file (expected format {FORMAT})", key="format")
    actor = TanhGaussianActor(int(blob["obs_dim"]), int(blob["act_dim"]), tuple(int(h) for h in blob["hidden"]))
    try:
        actor.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise DatasetError(str(path), f"weights do not match the stated sizes: {e}", key="state_dict") from None
    critic, info = None, None
    c = blob.get("critic")
    if c is not None:
        try:
            critic = TwinCritic(actor.obs_dim, actor.act_dim, tuple(int(h) for h in c["hidden"]), int(c["num_q"]))
            critic.load_state_dict(c["state_dict"])
            info = {k: tp(c[k]) for k, tp in CRITIC_INFO.items()}
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise DatasetError(str(path), f"malformed critic ({type(e).__name__}: {e})", key="critic") from None
    return LoadedPolicy(actor, blob.get("obs_mean"), blob.get("obs_std"), dict(blob.get("meta") or {}),
                        deterministic=deterministic, seed=seed, critic=critic, critic_info=info)


def load_index(policies_dir: str | os.PathLike) -> dict[str, Any]:
    """``index.json`` of a finished behaviour run, checked. Policy paths in it are relative to ``policies_dir``.

    A missing or malformed index, one without checkpoints, or one of a run that did not finish raises
    :class:`DatasetError` naming the file and the key.
    """
    path = Path(policies_dir) / "index.json"
    if not path.exists():
        raise DatasetError(str(path), "no behaviour index here; run `dromo-ray behavior train` first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(str(path), f"not JSON ({e})") from None
    if index.get("format") != INDEX_FORMAT:
        raise DatasetError(str(path), f"not a behaviour index (format {index.get('format')!r})", "format")
    if not index.get("checkpoints"):
        raise DatasetError(str(path), "has no checkpoints", "checkpoints")
    if not index.get("complete"):
        raise DatasetError(str(path), "the behaviour run did not finish (complete = false)", "complete")
    return index

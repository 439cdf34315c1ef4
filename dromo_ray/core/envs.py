"""Environment registry: Gymnasium ids, sizes, pure termination functions and D4RL reference returns.

Termination functions take next observations ``(B, obs_dim)`` (numpy or torch) and return a boolean
``(B,)`` array of the same library. They restate Gymnasium v5's health rules on the observation
(``exclude_current_positions_from_observation=True``, so obs[0] is the torso height z and obs[1] its angle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dromo_ray.core.config import ENV_KEYS

Array = Any  # np.ndarray | torch.Tensor


def _lib(x: Array):
    return torch if isinstance(x, torch.Tensor) else np


def hopper_termination(next_obs: Array) -> Array:
    """Hopper-v5: healthy iff |state[1:]| < 100, z > 0.7 and |angle| < 0.2 (strict, as Gymnasium)."""
    lib = _lib(next_obs)
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy_state = lib.all((next_obs[:, 1:] > -100.0) & (next_obs[:, 1:] < 100.0), **_axis(lib))
    healthy = healthy_state & (z > 0.7) & (angle > -0.2) & (angle < 0.2)
    return ~healthy


def walker2d_termination(next_obs: Array) -> Array:
    """Walker2d-v5: healthy iff 0.8 < z < 2.0 and -1 < angle < 1."""
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
    return ~healthy


def halfcheetah_termination(next_obs: Array) -> Array:
    """HalfCheetah never terminates."""
    lib = _lib(next_obs)
    if lib is torch:
        return torch.zeros(next_obs.shape[0], dtype=torch.bool, device=next_obs.device)
    return np.zeros(next_obs.shape[0], dtype=bool)


def _axis(lib) -> dict[str, int]:
    return {"dim": 1} if lib is torch else {"axis": 1}


@dataclass(frozen=True)
class EnvSpec:
    key: str
    gym_id: str
    obs_dim: int
    act_dim: int
    termination_fn: Callable[[Array], Array]
    ref_min_score: float
    """D4RL's random-policy return."""
    ref_max_score: float
    """D4RL's expert return."""
    xml_file: str | None = None
    """MuJoCo model file (a name among Gymnasium's assets) given to ``gym.make(gym_id, xml_file=...)``; None
    keeps the v5 default. Walker2d uses ``walker2d.xml``, the v2-v4 model, whose right foot has friction 0.9
    and left foot 1.9; ``walker2d_v5.xml`` (v5's default) gives both feet 1.9 (Gymnasium's v5 changelog).
    D4RL's walker2d data and every published walker2d number come from the v2-v4 model."""

    @property
    def model(self) -> str:
        """The MDP in words, for dataset metadata and MLflow tags: ``Walker2d-v5 (walker2d.xml)``."""
        return f"{self.gym_id} ({self.xml_file or 'default model'})"

    def normalized_score(self, ret: float | np.ndarray) -> float | np.ndarray:
        """D4RL normalized score: 100 (return - random) / (expert - random)."""
        return 100.0 * (ret - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


ENVS: dict[str, EnvSpec] = {
    "hopper": EnvSpec("hopper", "Hopper-v5", 11, 3, hopper_termination, -20.272305, 3234.3),
    "halfcheetah": EnvSpec("halfcheetah", "HalfCheetah-v5", 17, 6, halfcheetah_termination, -280.178953, 12135.0),
    "walker2d": EnvSpec("walker2d", "Walker2d-v5", 17, 6, walker2d_termination, 1.629008, 4592.3,
                        xml_file="walker2d.xml"),
}


assert tuple(ENVS) == ENV_KEYS, "core/config.py ENV_KEYS names the environments of ENVS, in order"


def get_env_spec(name: str) -> EnvSpec:
    """Look up by key (``hopper``), Gymnasium id (``Hopper-v5``) or dataset name (``hopper-medium-v2``)."""
    low = name.lower()
    for spec in ENVS.values():
        if low == spec.key or low == spec.gym_id.lower():
            return spec
    for spec in ENVS.values():
        head = low.replace("_", "-").split("/")[-1].split("-")[0]
        if head == spec.key or head == spec.gym_id.lower().split("-")[0]:
            return spec
    raise KeyError(f"unknown environment {name!r}; known: {', '.join(ENVS)}")

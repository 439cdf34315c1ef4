"""An RLlib Algorithm built the platform's way: the real environment registered under a dromo_ray name, the
Algorithm's log directory inside the run's own directory. Used by :mod:`dromo_ray.rllib.sac` and
:mod:`dromo_ray.rllib.cql`."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from dromo_ray.data.gym_env import env_spec, gym_make
from dromo_ray.rllib.replay_log import MujocoStateInfo


def env_name(gym_id: str) -> str:
    """The name a Gymnasium id is registered under with ``ray.tune.registry`` (``dromo_ray-Hopper-v5``)."""
    return f"dromo_ray-{gym_id}"


def register_env(gym_id: str) -> str:
    """Register the real environment of ``gym_id`` (its registry model, MuJoCo state in ``info``) with Ray and
    return the registered name. ``env_config['max_episode_steps']`` (default 1000) sets the time limit."""
    from ray.tune.registry import register_env as ray_register_env

    spec = env_spec(gym_id)

    def creator(env_config: dict[str, Any]):
        return MujocoStateInfo(gym_make(spec, int(env_config.get("max_episode_steps", 1000))))

    name = env_name(gym_id)
    ray_register_env(name, creator)
    return name


def build_algo_in(config: Any, log_dir: str | os.PathLike) -> Any:
    """``config.build_algo()``, with the Algorithm's log directory at ``log_dir`` (created).

    An RLlib Algorithm built outside Tune makes its log directory with ray.tune's ``Trainable._setup_logdir``: a
    fresh ``~/ray_results/<date>...`` per Algorithm, left behind (empty, with the new API stack) by every run.
    The built Algorithm is of a subclass of ``config.algo_class`` that only overrides that method, so that what
    RLlib writes there stays in the run's own directory.
    """
    base = config.algo_class
    if isinstance(base, str):
        from ray.tune.registry import get_trainable_cls

        base = get_trainable_cls(base)
    directory = str(Path(log_dir).resolve())

    class InRunDir(base):  # type: ignore[misc, valid-type]
        def _setup_logdir(self) -> None:
            os.makedirs(directory, exist_ok=True)
            self._logdir = directory

    InRunDir.__name__ = base.__name__  # (RLlib names metrics and logs after the class)
    return InRunDir(config=copy.deepcopy(config))

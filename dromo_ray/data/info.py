"""Transitions, episodes, returns and D4RL normalized score of a dataset (``dromo-ray data info``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dromo_ray.data.dataset import OfflineDataset


def dataset_info(ds: OfflineDataset) -> dict[str, Any]:
    """Summary figures of ``ds``. Returns are over complete episodes (a partial last episode is left
    out); the normalized score is D4RL's, of the mean return. Return fields are None without a complete
    episode."""
    spec = ds.env_spec
    returns = ds.episode_returns()
    mean = float(returns.mean()) if returns.size else None
    info: dict[str, Any] = {
        "source": ds.source,
        "env": ds.env_id,
        "gym_id": spec.gym_id,
        "transitions": len(ds),
        "episodes": ds.num_episodes,
        "complete_episodes": int(returns.size),
        "partial_last_episode": ds.last_episode_partial,
        "terminals": int(ds.terminals.sum()),
        "timeouts": int(ds.timeouts.sum()),
        "return_min": float(returns.min()) if returns.size else None,
        "return_mean": mean,
        "return_max": float(returns.max()) if returns.size else None,
        "normalized_score": float(spec.normalized_score(mean)) if mean is not None else None,
        "obs_dim": ds.obs_dim,
        "act_dim": ds.act_dim,
    }
    # The behaviour policy's own evaluated figures, where the file records them (suite parts do).
    meta = ds.metadata
    for prefix in ("policy", "medium_policy", "expert_policy"):
        if f"{prefix}_stochastic_return_mean" in meta:
            info[f"behavior_{prefix}_checkpoint"] = str(meta.get(f"{prefix}_checkpoint", ""))
            info[f"behavior_{prefix}_return_sampled"] = float(meta[f"{prefix}_stochastic_return_mean"])
            info[f"behavior_{prefix}_normalized_sampled"] = float(meta[f"{prefix}_stochastic_normalized_score"])
    for k in ("suite_part", "env_model", "behavior_algorithm"):
        if k in meta:
            info[k] = str(meta[k])
    if "dropped_rows" in ds.metadata:
        info["dropped_rows"] = int(ds.metadata["dropped_rows"])
    return info


def format_info(info: dict[str, Any]) -> str:
    """A two-column table."""
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if isinstance(v, float):
            v = f"{v:.2f}" if np.isfinite(v) else str(v)
        lines.append(f"{k:<{width}}  {'-' if v is None else v}")
    return "\n".join(lines)

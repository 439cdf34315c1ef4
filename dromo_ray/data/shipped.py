"""Behaviour policies shipped inside the package, so that a D4RL-v2-style suite needs no behaviour run.

    from dromo_ray.data.shipped import shipped_policy, manifest
    entry = shipped_policy("hopper", "medium")      # the manifest entry; entry["path"] is the policy file

Files live in ``dromo_ray/data/shipped/``: ``manifest.json``, one policy file per (env, part)
(:mod:`dromo_ray.data.policy_io` format, loaded with ``weights_only=True``) and, for each medium policy, the
compact replay log of the training run up to that checkpoint (``<env>_medium_replay_actions.npz``: the actions
and the run's seed; :func:`dromo_ray.data.online_sac.replay_actions` regenerates every transition, and the
manifest's ``replay_observations_sha256`` checks that the regeneration is bitwise the run's own data).

A manifest entry records: env and MuJoCo model, part, recipe, the behaviour run's env steps and seed, the command
that trained it, the evaluated return mean ± std in both action modes (sampled: how the suite collects;
deterministic: tanh(mu)), their D4RL normalized scores, the evaluation's episodes and seed, library versions.
``dromo-ray behavior ship`` writes entries from a finished (or stopped) ``behavior train`` run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dromo_ray.core.files import write_text_atomic
from dromo_ray.errors import DatasetError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
MANIFEST_FORMAT = "dromo_ray.shipped_policies/1"
PARTS = ("medium", "expert")

D4RL_V2_BEHAVIOR = {
    # D4RL normalized score of the behaviour in D4RL v2's medium datasets (mean episode return of the data), the
    # targets medium policies are chosen against; figures as the project's behaviour-policy issue (#11) states
    # them (hopper ≈ 44, halfcheetah ≈ 41, walker2d ≈ 62). Experts have a return threshold instead (below).
    ("hopper", "medium"): 44.0, ("halfcheetah", "medium"): 41.0, ("walker2d", "medium"): 62.0,
}
MEDIUM_BAND = 10.0
"""A medium policy's sampled-action normalized score must lie within ± this of D4RL v2's medium behaviour."""
EXPERT_MIN_RETURN = {"hopper": 3000.0, "halfcheetah": 9000.0, "walker2d": 4000.0}
"""An expert policy's sampled-action return must reach this (10 episodes)."""
RECIPES = {
    "medium": "SAC checkpoint whose sampled-action D4RL normalized score is closest to D4RL v2's medium behaviour",
    "expert": "SAC checkpoint with the highest sampled-action return, at least the expert threshold",
}


def manifest(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The shipped manifest (an empty one when nothing is shipped yet)."""
    path = Path(directory or SHIPPED_DIR) / "manifest.json"
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "policies": {}}
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise DatasetError(str(path), f"not a shipped-policy manifest (format {MANIFEST_FORMAT})", "format")
    return data


def key(env: str, part: str) -> str:
    return f"{env}-{part}"


def shipped_policy(env: str, part: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest entry of the shipped ``part`` policy of ``env``, with ``path`` (and ``replay_path``) absolute."""
    directory = Path(directory or SHIPPED_DIR)
    entries = manifest(directory)["policies"]
    entry = entries.get(key(env, part))
    if entry is None:
        have = ", ".join(sorted(entries)) or "none"
        raise DatasetError(str(directory / "manifest.json"), f"no shipped {part} policy for {env} (shipped: {have}); "
                           f"train one with `dromo-ray behavior train --env {env}` and pass --policies", key(env, part))
    out = dict(entry, path=str(directory / entry["file"]))
    if entry.get("replay_actions"):
        out["replay_path"] = str(directory / entry["replay_actions"])
    return out


def observations_digest(obs: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(obs, dtype=np.float32).tobytes()).hexdigest()


def medium_replay(env: str, directory: str | os.PathLike | None = None, verify: bool = True) -> Any:
    """Regenerate the medium-replay transitions from the shipped actions; ``verify`` checks them bitwise against
    the digest the manifest recorded from the training run's own buffer."""
    from dromo_ray.data.online_sac import load_replay_actions, replay_actions

    entry = shipped_policy(env, "medium", directory)
    if "replay_path" not in entry:
        raise DatasetError(entry["path"], f"the shipped {env} medium policy has no replay log", "replay_actions")
    actions, meta = load_replay_actions(entry["replay_path"])
    ds = replay_actions(env, actions, seed=int(meta["seed"]), ends=np.asarray(meta["ends"], dtype=np.int64),
                        source=f"shipped:{env}-medium-replay")
    if verify and observations_digest(ds.observations) != entry["replay_observations_sha256"]:
        raise DatasetError(entry["replay_path"], "regenerated observations differ from the training run's "
                           "(another MuJoCo build?); the medium-replay part would not be the run's data",
                           "replay_observations_sha256")
    return ds


# ---------------------------------------------------------------------------------------------------------
# Shipping a checkpoint of a behaviour run


def choose_checkpoint(index: dict[str, Any], env: str, part: str) -> dict[str, Any]:
    """Medium: the checkpoint whose sampled normalized score is closest to D4RL v2's medium (it must lie in the
    band); expert: the one with the highest sampled return (it must reach the threshold)."""
    ckpts = index["checkpoints"]
    if not ckpts:
        raise DatasetError("index.json", "the behaviour run has no evaluated checkpoints", "checkpoints")
    if part == "medium":
        target = D4RL_V2_BEHAVIOR[(env, "medium")]
        best = min(ckpts, key=lambda c: (abs(c["stochastic_normalized_score"] - target), c["env_steps"]))
        if abs(best["stochastic_normalized_score"] - target) > MEDIUM_BAND:
            raise DatasetError("index.json", f"no checkpoint within ±{MEDIUM_BAND:g} of D4RL v2's {env} medium "
                               f"({target}); closest {best['name']} at {best['stochastic_normalized_score']:.1f}")
        return best
    if part == "expert":
        best = max(ckpts, key=lambda c: (c["stochastic_return_mean"], -c["env_steps"]))
        if best["stochastic_return_mean"] < EXPERT_MIN_RETURN[env]:
            raise DatasetError("index.json", f"no checkpoint reaches the {env} expert threshold "
                               f"{EXPERT_MIN_RETURN[env]:g} (best {best['name']}: "
                               f"{best['stochastic_return_mean']:.0f})")
        return best
    raise DatasetError("index.json", f"unknown part {part!r} (one of {', '.join(PARTS)})")


def ship_checkpoint(run_dir: str | os.PathLike, part: str, checkpoint: str | None = None, episodes: int = 10,
                    eval_seed: int = 2_000_000, directory: str | os.PathLike | None = None,
                    command: str = "") -> dict[str, Any]:
    """Copy a behaviour run's checkpoint into the shipped directory, evaluate it afresh (``episodes`` per mode,
    seeds disjoint from training and from the run's own evaluations), and record it in the manifest."""
    import torch

    from dromo_ray.data.online_sac import evaluate_policy_file, save_replay_actions, versions

    run_dir = Path(run_dir)
    directory = Path(directory or SHIPPED_DIR)
    index = json.loads((run_dir / "index.json").read_text())
    env = index["env"]
    if checkpoint:
        matches = [c for c in index["checkpoints"] if c["name"] == checkpoint]
        if not matches:
            raise DatasetError(str(run_dir / "index.json"), f"no checkpoint {checkpoint!r}", "checkpoints")
        ckpt = matches[0]
    else:
        ckpt = choose_checkpoint(index, env, part)
    st = None
    if part == "medium":  # the replay log must reach the checkpoint before anything is written
        st = torch.load(run_dir / "state" / "state.pt", map_location="cpu", weights_only=True)
        if int(st["size"]) < int(ckpt["env_steps"]):
            raise DatasetError(str(run_dir / "state" / "state.pt"), f"the saved state holds {st['size']} rows, the "
                               f"checkpoint needs {ckpt['env_steps']} (the run saves every few minutes: ship again "
                               "after its next save)")
    directory.mkdir(parents=True, exist_ok=True)
    fname = f"{env}_{part}.pt"
    ev = evaluate_policy_file(run_dir / ckpt["policy"], env, episodes, eval_seed)
    shutil.copyfile(run_dir / ckpt["policy"], directory / fname)
    cfg = index["config"]
    entry: dict[str, Any] = {
        "env": env, "part": part, "gym_id": index["gym_id"], "env_model": index.get("env_model", index["gym_id"]),
        "file": fname, "recipe": RECIPES[part], "algorithm": index.get("algorithm", "dromo_ray_sac"),
        "checkpoint": ckpt["name"], "env_steps": int(ckpt["env_steps"]), "updates": int(ckpt.get("updates", 0)),
        "seed": int(index["seed"]), "train_config": cfg,
        "command": command or (f"dromo-ray behavior train --env {env} --steps {cfg['steps']} --seed {index['seed']} "
                               f"--batch-size {cfg['batch_size']} --out {run_dir.name}"),
        "eval_episodes": episodes, "eval_seed": eval_seed,
        **{k: float(v) for k, v in ev.items()},
        "d4rl_v2_behavior": D4RL_V2_BEHAVIOR.get((env, part)),
        "expert_min_return": EXPERT_MIN_RETURN[env] if part == "expert" else None,
        "run_eval": {k: ckpt[k] for k in ("return_mean", "return_std", "stochastic_return_mean",
                                          "stochastic_return_std", "eval_episodes", "eval_seed")},
        "versions": versions(),
    }
    if st is not None:
        rows = int(ckpt["env_steps"])
        buf = st["buffer"]
        done = buf["done"][:rows].numpy() > 0.5
        ends = np.flatnonzero(done | buf["timeout"][:rows].numpy())
        rname = f"{env}_medium_replay_actions.npz"
        save_replay_actions(directory / rname, env, buf["act"][:rows].numpy(), int(index["seed"]),
                            meta={"ends": ends.tolist(), "rows": rows, "checkpoint": ckpt["name"]})
        entry.update(replay_actions=rname, replay_rows=rows,
                     replay_observations_sha256=observations_digest(buf["obs"][:rows].numpy()))
    data = manifest(directory)
    data["policies"][key(env, part)] = entry
    write_text_atomic(directory / "manifest.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    return entry

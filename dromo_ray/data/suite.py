"""A D4RL-v2-style dataset suite on Gymnasium v5 (``dromo-ray suite make``), from the shipped policies or a
behaviour run.

    make_suite("hopper", 1_000_000, "suite/hopper")                               # the shipped policies
    make_suite("hopper", 1_000_000, "suite/hopper", policies="behavior/hopper")   # a `behavior train` run

A behaviour run is read as files: its ``index.json`` (:func:`dromo_ray.data.policy_io.load_index`), the policy
files it lists (:mod:`dromo_ray.data.policy_io`) and its ``replay.hdf5`` (D4RL layout). Both backends of
``behavior train`` write exactly these (the rllib one exports RLlib's module into a policy file at every
checkpoint, parity checked), so the suite never imports RLlib, nor Ray.

D4RL's recipes (Fu et al. 2020, section 5 "MuJoCo"), applied to the checkpoints of ``behavior train``:

===============  ==========================================================================================
random           ``size`` transitions of uniformly random actions
medium           ``size`` transitions of the checkpoint whose return is closest to one third of the expert's
medium-replay    the replay log of SAC training up to (and including) that checkpoint: every transition it
                 collected, in order (its size is the checkpoint's env steps, not ``size``)
expert           ``size`` transitions of the final checkpoint (the policy "trained to completion"; with
                 ``--expert best``, the checkpoint with the highest return: for runs too short to converge)
medium-expert    medium's rows followed by expert's rows (2 ``size`` transitions)
===============  ==========================================================================================

Policies act by sampling from their tanh-Gaussian, as D4RL's SAC policies did (its v2 files carry
``infos/action_log_probs``; so do these); ``--deterministic`` uses ``tanh(mu)`` instead. "Return" when
choosing medium is the evaluated return of the same mode (``index.json``: ``stochastic_return_mean`` or
``return_mean``). Part ``i`` (in the order above) is collected with seed ``seed + i``.

One deliberate difference inside medium-expert: collection stops in the middle of an episode, so medium's
last row carries neither flag; in medium-expert that row is flagged as a timeout (the episode was cut
there), because otherwise the D4RL layout would run medium's last episode into expert's first.
Every other value of every row is medium's, then expert's (``metadata/boundary_row``).

Outputs under ``--out``::

    d4rl/<env>_<part>-v5.hdf5     D4RL layout; ``load_dataset('<env>-<part>-v5')`` with
                                  ``D4RL_DATASET_DIR=<out>/d4rl``, or load the path
    minari/dromo/<env>-<part>-v5  Minari datasets; ``minari:dromo/<env>-<part>-v5`` with
                                  ``MINARI_DATASETS_PATH=<out>/minari``
    suite_<env>.json              how each part was made and its behaviour return / normalized score

One ``--out`` can hold the suites of several envs (one manifest each), so that a single
``D4RL_DATASET_DIR=<out>/d4rl`` finds every env's files.

Resumable: a part whose files exist (written atomically) is skipped after checking it was made with the
same settings (``metadata/suite_fingerprint``); different settings are an error, never a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from dromo_ray.core.files import write_text_atomic
from dromo_ray.data import shipped
from dromo_ray.data.d4rl_io import read_d4rl, write_d4rl
from dromo_ray.data.dataset import OfflineDataset
from dromo_ray.data.gym_env import collect_transitions, env_spec, host_kind, package_versions
from dromo_ray.data.info import dataset_info
from dromo_ray.data.minari_io import write_minari
from dromo_ray.data.policy_io import LoadedPolicy, load_index, load_policy
from dromo_ray.errors import DatasetError

PARTS = ("random", "medium", "medium-replay", "expert", "medium-expert")
SUITE_TAG = "v5"
"""Version suffix of the suite's dataset names: the Gymnasium v5 environments it is made with."""
MINARI_NAMESPACE = "dromo"
MANIFEST_FORMAT = "dromo_ray.suite/1"
RECIPES = {
    "random": "uniformly random actions in the action box",
    "medium": "the SAC checkpoint whose return is closest to 1/3 of the expert's",
    "medium-replay": "every transition SAC collected up to and including the medium checkpoint",
    "expert": "the final SAC checkpoint",
    "medium-expert": "medium's rows followed by expert's rows",
}


def dataset_name(env: str, part: str) -> str:
    """D4RL-style name: ``hopper-medium-replay-v5``."""
    return f"{env}-{part}-{SUITE_TAG}"


def d4rl_path(out: str | os.PathLike, env: str, part: str) -> Path:
    """D4RL's file name for :func:`dataset_name` (``hopper_medium_replay-v5.hdf5``)."""
    return Path(out) / "d4rl" / f"{env}_{part.replace('-', '_')}-{SUITE_TAG}.hdf5"


def minari_id(env: str, part: str) -> str:
    return f"{MINARI_NAMESPACE}/{dataset_name(env, part)}"


def versions() -> dict[str, str]:
    """Library versions every part records: the data packages', Ray's (from its installed metadata: the suite
    imports no Ray) and torch's."""
    try:
        ray_version = version("ray")
    except PackageNotFoundError:
        ray_version = "unknown"
    return {**package_versions(), "ray": ray_version, "torch": torch.__version__.split("+")[0]}


@dataclass(frozen=True)
class Selection:
    """The checkpoints the suite is made from."""

    medium: dict[str, Any]
    expert: dict[str, Any]
    return_key: str
    target_return: float


def select_checkpoints(index: dict[str, Any], deterministic: bool = False, expert_rule: str = "final") -> Selection:
    """Expert = the final checkpoint (D4RL's rule; ``expert_rule='best'``: the one with the highest return);
    medium = the earlier checkpoint whose return (of the collection mode) is closest to a third of the
    expert's (the earliest on ties). With one checkpoint, medium = expert."""
    key = "return_mean" if deterministic else "stochastic_return_mean"
    ckpts = index["checkpoints"]
    if expert_rule == "final":
        expert = next(c for c in ckpts if c["name"] == index.get("final", ckpts[-1]["name"]))
    elif expert_rule == "best":
        expert = max(ckpts, key=lambda c: (float(c[key]), c["env_steps"]))
    else:
        raise ValueError(f"expert_rule must be 'final' or 'best', got {expert_rule!r}")
    target = float(expert[key]) / 3.0
    earlier = [c for c in ckpts if c["env_steps"] < expert["env_steps"]] or [expert]
    medium = min(earlier, key=lambda c: (abs(float(c[key]) - target), c["env_steps"]))
    return Selection(medium=medium, expert=expert, return_key=key, target_return=target)


class _RecordingPolicy:
    """A loaded policy as an ``ActFn`` that also keeps the log-density of every action it samples."""

    def __init__(self, loaded: LoadedPolicy) -> None:
        self.loaded = loaded
        self.log_probs: list[np.ndarray] = []

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        p = self.loaded
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
            if p.obs_mean is not None and p.obs_std is not None:
                x = (x - p.obs_mean) / p.obs_std
            a, logp = p.actor.sample(x, generator=p.generator, deterministic=p.deterministic)
        self.log_probs.append(logp.numpy().astype(np.float32))
        return a.numpy()


def _fingerprint(env: str, size: int, seed: int, deterministic: bool, index: dict[str, Any],
                 sel: Selection) -> str:
    blob = json.dumps({"env": env, "size": size, "seed": seed, "deterministic": deterministic,
                       "return_key": sel.return_key,
                       "behavior_seed": index.get("seed"), "behavior_env_steps": index.get("env_steps"),
                       "medium": sel.medium["name"], "expert": sel.expert["name"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def _minari_root(root: Path):
    saved = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = saved


def concat_datasets(first: OfflineDataset, second: OfflineDataset, source: str = "") -> OfflineDataset:
    """``first``'s rows then ``second``'s, as one dataset; ``first``'s last row becomes an episode end
    (timeout) when it was neither terminal nor timeout. Infos present in both are kept."""
    timeouts = np.concatenate([first.timeouts, second.timeouts])
    if len(first) and not (first.terminals[-1] or first.timeouts[-1]):
        timeouts[len(first) - 1] = True
    starts = np.concatenate([first.episode_starts, second.episode_starts])
    if len(second):
        starts[len(first)] = True
    keys = [k for k in first.infos if k in second.infos]
    return OfflineDataset(
        observations=np.concatenate([first.observations, second.observations]),
        actions=np.concatenate([first.actions, second.actions]),
        rewards=np.concatenate([first.rewards, second.rewards]),
        next_observations=np.concatenate([first.next_observations, second.next_observations]),
        terminals=np.concatenate([first.terminals, second.terminals]), timeouts=timeouts, episode_starts=starts,
        env_id=first.env_id, source=source, metadata={},
        infos={k: np.concatenate([first.infos[k], second.infos[k]]) for k in keys},
    )


INFO_KEYS = ("transitions", "episodes", "complete_episodes", "terminals", "timeouts", "return_mean", "return_min",
             "return_max", "normalized_score")


def _part_info(ds: OfflineDataset) -> dict[str, Any]:
    info = dataset_info(ds)
    return {k: info[k] for k in INFO_KEYS}


def _h5_fingerprint(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            v = f.get("metadata/suite_fingerprint")
            v = None if v is None else v[()]
    except OSError:
        return None
    return v.decode() if isinstance(v, bytes) else (None if v is None else str(v))


def _minari_dromo_metadata(directory: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((directory / "data" / "metadata.json").read_text()).get("dromo_ray") or {})
    except (OSError, ValueError):
        return {}


def shipped_index(env: str, directory: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[str]]:
    """The shipped policies of ``env`` as a behaviour index (medium, and expert when shipped) and the parts that
    cannot be made from them (expert and medium-expert while no expert is shipped)."""
    entries = shipped.manifest(directory)["policies"]
    ckpts, missing = [], []
    for part in ("medium", "expert"):
        if shipped.key(env, part) not in entries:
            missing.append(part)
            continue
        e = shipped.shipped_policy(env, part, directory)
        digest = hashlib.sha256(Path(e["path"]).read_bytes()).hexdigest()[:12]
        ckpts.append({"name": f"shipped:{env}-{part}@{digest}", "policy": e["path"], "env_steps": e["env_steps"],
                      "replay_rows": e.get("replay_rows", 0), "part": part,
                      **{k: e[k] for k in ("return_mean", "normalized_score", "stochastic_return_mean",
                                           "stochastic_normalized_score")}})
    if "medium" in missing:
        shipped.shipped_policy(env, "medium", directory)  # raises the one-line "nothing shipped" error
    index = {"format": "shipped", "env": env, "seed": entries[shipped.key(env, "medium")]["seed"],
             "env_steps": max(c["env_steps"] for c in ckpts), "checkpoints": ckpts, "complete": True,
             "final": ckpts[-1]["name"], "shipped": True}
    unavailable = ["expert", "medium-expert"] if "expert" in missing else []
    return index, unavailable


def make_suite(env: str, size: int, out: str | os.PathLike, policies: str | os.PathLike | None = None,
               seed: int = 0,
               parts: tuple[str, ...] = PARTS, deterministic: bool = False, minari: bool = True,
               progress: bool = True, log: Callable[[str], None] | None = None, expert_rule: str = "final",
               shipped_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Make (or finish making) the suite; returns the manifest also written to ``out/suite_<env>.json``.

    ``policies`` is a behaviour run's directory (module doc); without it the suite comes from the shipped
    policies (``shipped_dir``, default the package's). ``parts`` is a subset of :data:`PARTS`; part ``i`` is
    collected with seed ``seed + i``. ``deterministic`` collects with ``tanh(mu)``; ``expert_rule`` is
    ``final`` or ``best`` (:func:`select_checkpoints`); ``minari=False`` writes the HDF5 files only.
    ``log`` receives one line per part. Every problem raises :class:`DatasetError`.
    """
    spec = env_spec(env)
    if size < 1:
        raise DatasetError(str(out), f"--size must be >= 1, got {size}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise DatasetError(str(out), f"unknown part {unknown[0]!r}; parts are {', '.join(PARTS)}")
    out = Path(out)
    if "medium-expert" in parts:  # refuse before writing any part, not after the first ones
        for need in ("medium", "expert"):
            if need not in parts and not d4rl_path(out, spec.key, need).exists():
                raise DatasetError(str(out), f"medium-expert needs the {need} part; add it to --parts "
                                   f"(or make it first)")
    unavailable: list[str] = []
    if policies is None:  # the policies shipped with the package
        index, unavailable = shipped_index(spec.key, shipped_dir)
        policies = Path("/")  # shipped checkpoint paths are absolute
        asked = [p for p in parts if p in unavailable]
        if asked and tuple(parts) != PARTS:
            raise DatasetError(str(out), f"{', '.join(asked)}: no shipped {spec.key} expert policy yet; pass "
                               "--policies with a behaviour run that has one")
        parts = tuple(p for p in parts if p not in unavailable)
    else:
        policies = Path(policies)
        index = load_index(policies)
    if index["env"] != spec.key:
        raise DatasetError(str(policies / "index.json"), f"behaviour run is for {index['env']}, not {spec.key}",
                           "env")
    if expert_rule not in ("final", "best"):
        raise DatasetError(str(out), f"expert rule must be 'final' or 'best', got {expert_rule!r}")
    if index.get("shipped"):
        by_part = {c["part"]: c for c in index["checkpoints"]}
        key = "return_mean" if deterministic else "stochastic_return_mean"
        sel = Selection(medium=by_part["medium"], expert=by_part.get("expert", by_part["medium"]), return_key=key,
                        target_return=float(by_part["medium"][key]))
    else:
        sel = select_checkpoints(index, deterministic, expert_rule)
    fingerprint = _fingerprint(spec.key, size, seed, deterministic, index, sel)
    vers = versions()
    sampling = "deterministic" if deterministic else "stochastic"
    manifest_path = out / f"suite_{spec.key}.json"
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "env": spec.key, "gym_id": spec.gym_id, "size": size, "seed": seed,
        "sampling": sampling, "policies": str(policies), "suite_fingerprint": fingerprint, "versions": vers,
        "host": host_kind(),
        "behavior": {"env_steps": index.get("env_steps"), "seed": index.get("seed"),
                     "checkpoints": len(index["checkpoints"]), "stopped_early": index.get("stopped_early", "")},
        "selection": {"expert_rule": expert_rule, "return_key": sel.return_key, "target_return": sel.target_return,
                      "medium": sel.medium["name"], "expert": sel.expert["name"]},
        "parts": {},
    }
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("suite_fingerprint") != fingerprint:
            raise DatasetError(str(manifest_path), "a suite made with other settings (size, seed, sampling or "
                               "behaviour run) is already here; use a fresh --out", "suite_fingerprint")
        manifest["parts"] = old.get("parts", {})
    out.mkdir(parents=True, exist_ok=True)

    def policy_meta(prefix: str, c: dict[str, Any]) -> dict[str, Any]:
        return {f"{prefix}_checkpoint": c["name"], f"{prefix}_env_steps": int(c["env_steps"]),
                f"{prefix}_return_mean": float(c["return_mean"]),
                f"{prefix}_normalized_score": float(c["normalized_score"]),
                f"{prefix}_stochastic_return_mean": float(c["stochastic_return_mean"]),
                f"{prefix}_stochastic_normalized_score": float(c["stochastic_normalized_score"])}

    common = {"suite": f"dromo_ray D4RL-v2-style suite on {spec.gym_id}", "suite_fingerprint": fingerprint,
              "suite_size": size, "suite_seed": seed, "sampling": sampling, "expert_rule": expert_rule,
              "behavior_run_seed": int(index.get("seed", 0)), "behavior_run_env_steps": int(index.get("env_steps", 0)),
              "behavior_algorithm": index.get("algorithm", "dromo_ray_sac" if index.get("shipped") else "rllib_sac"),
              **{f"{k}_version": v for k, v in vers.items()}, **{f"host_{k}": v for k, v in host_kind().items()}}

    def collect(part: str, ckpt: dict[str, Any] | None) -> tuple[OfflineDataset, dict[str, Any]]:
        part_seed = seed + PARTS.index(part)
        if ckpt is None:
            ds = collect_transitions(spec.key, "random", size, part_seed, progress=progress, policy_name="random")
            return ds, {"collection_seed": part_seed}
        loaded = load_policy(policies / ckpt["policy"], deterministic=deterministic, seed=part_seed)
        rec = _RecordingPolicy(loaded)
        ds = collect_transitions(spec.key, rec, size, part_seed, progress=progress,
                                 policy_name=f"{ckpt['name']} ({policies / ckpt['policy']})")
        if not deterministic:
            ds.infos["action_log_probs"] = np.concatenate(rec.log_probs)[: len(ds)]
        return ds, {"collection_seed": part_seed, **policy_meta("policy", ckpt)}

    def build(part: str) -> tuple[OfflineDataset, dict[str, Any]]:
        if part == "random":
            return collect(part, None)
        if part == "medium":
            return collect(part, sel.medium)
        if part == "expert":
            return collect(part, sel.expert)
        if part == "medium-replay" and index.get("shipped"):
            ds = shipped.medium_replay(spec.key, shipped_dir)  # regenerated from the shipped actions, checked bitwise
            return ds, {"replay_rows": len(ds), "replay_log": "shipped actions (regenerated)",
                        **policy_meta("policy", sel.medium)}
        if part == "medium-replay":
            rows = int(sel.medium["replay_rows"])
            log_ds = read_d4rl(policies / index.get("replay_log", "replay.hdf5"), env=spec.key)
            if len(log_ds) < rows:
                raise DatasetError(str(policies / "replay.hdf5"), f"has {len(log_ds)} rows, the medium "
                                   f"checkpoint needs {rows}")
            ds = log_ds.subset(np.arange(rows))
            return ds, {"replay_rows": rows, "replay_log": str(policies / index.get("replay_log", "replay.hdf5")),
                        **policy_meta("policy", sel.medium)}
        # medium-expert: its parts exist by now (checked on entry; PARTS order builds them first)
        med = read_d4rl(d4rl_path(out, spec.key, "medium"), env=spec.key)
        exp = read_d4rl(d4rl_path(out, spec.key, "expert"), env=spec.key)
        ds = concat_datasets(med, exp, source="suite:medium-expert")
        return ds, {"boundary_row": len(med), "medium_rows": len(med), "expert_rows": len(exp),
                    **policy_meta("medium_policy", sel.medium), **policy_meta("expert_policy", sel.expert)}

    def check_existing(path: Path, what: str, meta: dict[str, Any]) -> None:
        if meta.get("suite_fingerprint") != fingerprint:
            raise DatasetError(str(path), f"{what} exists but was made with other settings "
                               f"(suite_fingerprint {meta.get('suite_fingerprint')!r}, now {fingerprint!r}); "
                               "use a fresh --out", "suite_fingerprint")

    wanted = [p for p in PARTS if p in parts]
    bar = tqdm(wanted, desc=f"suite {spec.key}", unit="part", disable=not progress, position=0)
    t_all = time.perf_counter()
    for part in bar:
        bar.set_postfix(part=part)
        t0 = time.perf_counter()
        path = d4rl_path(out, spec.key, part)
        mid = minari_id(spec.key, part)
        old = manifest["parts"].get(part, {})
        ds = None
        if path.exists():
            # Skipping checks the fingerprint only (reading the metadata, not the rows); the figures come
            # from the manifest when it has them.
            check_existing(path, part, {"suite_fingerprint": _h5_fingerprint(path)})
            status = "skipped (exists)"
            info = {k: old[k] for k in INFO_KEYS} if all(k in old for k in INFO_KEYS) else None
            if info is None:
                ds = read_d4rl(path, env=spec.key)
                info = _part_info(ds)
        else:
            ds, meta = build(part)
            meta = {**common, "suite_part": part, "dataset_name": dataset_name(spec.key, part),
                    "recipe": RECIPES[part], **meta}
            write_d4rl(ds, path, metadata=meta)
            ds = read_d4rl(path, env=spec.key)  # what users will load, validated
            info = _part_info(ds)
            status = "written"
        entry = {"d4rl": str(path), "name": dataset_name(spec.key, part), "recipe": RECIPES[part], **info}
        if minari:
            root = (out / "minari").resolve()
            with _minari_root(root):
                if (root / mid).exists():
                    check_existing(root / mid, f"Minari dataset {mid}", _minari_dromo_metadata(root / mid))
                else:
                    write_minari(ds if ds is not None else read_d4rl(path, env=spec.key), mid)
                    status += " + minari"
            entry.update(minari=mid, minari_root=str(root))
        entry["status"] = status
        if status != "skipped (exists)" or "wall_s" not in old:  # keep the time it took to make
            entry["wall_s"] = round(time.perf_counter() - t0, 2)
        manifest["parts"][part] = {**manifest["parts"].get(part, {}), **entry}
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
        if log is not None:
            log(f"{part:<14} {status:<22} {entry['transitions']:>9} rows  return "
                f"{_fmt(entry['return_mean'])}  normalized {_fmt(entry['normalized_score'])}")
    bar.close()
    manifest["wall_s"] = round(time.perf_counter() - t_all, 2)
    if unavailable:
        manifest["unavailable"] = {p: f"no shipped {spec.key} expert policy yet" for p in unavailable}
        if log is not None:
            log(f"not made: {', '.join(unavailable)} (no shipped {spec.key} expert policy yet)")
    return manifest


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:8.1f}"


def summary_table(manifest: dict[str, Any]) -> str:
    """The manifest as text: the selection, then one row per part made."""
    from dromo_ray.ui import fmt, table

    sel = manifest["selection"]
    expert = "not shipped" if "expert" in manifest.get("unavailable", {}) else sel["expert"]
    title = (f"{manifest['gym_id']} suite ({manifest['sampling']} policies; medium = {sel['medium']}, "
             f"expert = {expert}, target return {sel['target_return']:.1f})")
    rows = [[part, e["transitions"], e["complete_episodes"], fmt(e["return_mean"], 1), fmt(e["normalized_score"], 1)]
            for part in PARTS if (e := manifest["parts"].get(part))]
    return table(["part", "transitions", "episodes", "return", "normalized"], rows, title=title)

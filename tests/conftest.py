"""Shared test setup: one torch thread per process (2-core CI), fixtures for small real datasets."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from dromo_ray.core.threads import set_torch_threads  # noqa: E402

set_torch_threads(1)


# ---- small real datasets (data layer) -------------------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from testkit.sweeps import task_config, write_yaml  # noqa: E402

TINY_HOPPER_STEPS = 1500
"""Transitions of the session's tiny random-policy Hopper-v5 dataset (seed 0)."""


@pytest.fixture(scope="session")
def tiny_hopper_hdf5(tmp_path_factory):
    """Path of a D4RL-format HDF5 with ~1,500 random-policy Hopper-v5 transitions from the real env,
    collected once per session (seed 0; ~70 episodes, the last one partial)."""
    from dromo_ray.data.d4rl_io import write_d4rl
    from dromo_ray.data.gym_env import collect_transitions

    ds = collect_transitions("hopper", "random", TINY_HOPPER_STEPS, seed=0, progress=False)
    return write_d4rl(ds, tmp_path_factory.mktemp("tiny_hopper") / "hopper_random-tiny.hdf5")


@pytest.fixture(scope="session")
def tiny_hopper_dataset(tiny_hopper_hdf5):
    """The :class:`~dromo_ray.data.dataset.OfflineDataset` loaded from ``tiny_hopper_hdf5`` (shared:
    do not mutate its arrays)."""
    from dromo_ray.data.load import load_dataset

    return load_dataset(str(tiny_hopper_hdf5))


# ---- the sweep tests' inputs (edges and slow tiers) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "hopper_random.hdf5"
    subprocess.run([sys.executable, "-m", "dromo_ray.cli", "collect", "--env", "hopper", "--policy", "random",
                    "--steps", "1500", "--out", str(out)], check=True, capture_output=True, cwd=out.parent)
    return out


@pytest.fixture
def arms_doc(tmp_path: Path) -> dict:
    tiny = yaml.safe_load(task_config("tiny_hopper_dromo").read_text())
    tiny["data"] = {"dataset": ""}  # the datasets: entries set it
    write_yaml(tmp_path / "tiny_hopper.yaml", tiny)
    (tmp_path / "data.hdf5").write_bytes(b"")
    return {"name": "mini", "arms": {"dromo": {"base": "tiny_{env}.yaml"},
                                     "combo": {"base": "tiny_{env}.yaml", "set": {"agent.algorithm": "combo"}}},
            "datasets": [{"env": "hopper", "dataset": str(tmp_path / "data.hdf5")}],
            "common": {"tracking.experiment": "mini", "train.total_steps": 60}, "seeds": [0]}

"""dynamics.cache_dir: stage 1 stores the merged ensemble by content key; a run with the same key loads it (the same
ensemble it would have trained, bitwise), any other key trains, a damaged file is one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from dromo_ray.config import load_config
from dromo_ray.errors import CheckpointError
from dromo_ray.runtime.pipeline import train_dynamics_stage

TINY = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"
pytestmark = pytest.mark.ray


def _stage(dataset_path: Path, *overrides: str):
    from dromo_ray.data.load import load_dataset

    cfg = load_config(TINY, [f"data.dataset={dataset_path}", *overrides])
    ds = load_dataset(str(dataset_path))
    rng = np.random.default_rng(cfg.seed)
    stage = train_dynamics_stage(cfg, ray.put(ds), ds, "hopper", rng)
    return stage, rng


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_hit_is_the_ensemble_the_run_would_train(ray_local, tiny_hopper_hdf5, tmp_path):
    cache = tmp_path / "cache"
    first, rng1 = _stage(tiny_hopper_hdf5, f"dynamics.cache_dir={cache}")
    assert first["metrics"]["dynamics/cached"] == 0.0 and "dynamics/train_s" in first["metrics"]
    files = sorted(cache.glob("dynamics_*.pt"))
    assert len(files) == 1 and not list(cache.glob(".*"))  # written atomically: no temporary left

    again, rng2 = _stage(tiny_hopper_hdf5, f"dynamics.cache_dir={cache}")
    assert again["metrics"]["dynamics/cached"] == 1.0
    assert _same_state(first["dynamics"], again["dynamics"])
    for k in ("dynamics/holdout_mse", "dynamics/holdout_mse_elites", "dynamics/calibration_error_before"):
        assert again["metrics"][k] == first["metrics"][k], k
    assert rng1.bit_generator.state == rng2.bit_generator.state  # the driver's stream continues the same way
    assert again["behavior"] is not None  # pi^beta is still fitted (DROMO needs it); only the ensemble is cached

    plain, _ = _stage(tiny_hopper_hdf5)  # no cache: the same training, so the same ensemble
    assert "dynamics/cached" not in plain["metrics"]
    assert _same_state(first["dynamics"], plain["dynamics"])

    other, _ = _stage(tiny_hopper_hdf5, f"dynamics.cache_dir={cache}", "seed=1")  # another key: trains
    assert other["metrics"]["dynamics/cached"] == 0.0
    assert len(list(cache.glob("dynamics_*.pt"))) == 2
    assert not _same_state(first["dynamics"], other["dynamics"])

    files[0].write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=files[0].name):
        _stage(tiny_hopper_hdf5, f"dynamics.cache_dir={cache}")

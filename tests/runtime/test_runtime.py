"""Runtime tests on a local Ray with tiny configs: a tracked run, exact resume, faults, NaN handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from dromo_ray.config import load_config
from dromo_ray.runtime.checkpoint import load_checkpoint
from dromo_ray.runtime.driver import RunFailed, run_experiment

TINY = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"
pytestmark = pytest.mark.ray


def tiny_cfg(dataset: Path, tmp: Path, *extra: str):
    return load_config(TINY, [f"data.dataset={dataset}", f"out_dir={tmp}", *extra])


def _mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def _flat(state) -> dict[str, torch.Tensor]:
    out = {}

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("", state)
    return out


def test_tracked_run_end_to_end(ray_local, tiny_hopper_hdf5, tmp_path):
    from dromo_ray.train import train

    cfg = tiny_cfg(tiny_hopper_hdf5, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(cfg, tracking_uri=uri, progress=False)
    assert summary.steps == cfg.train.total_steps
    assert np.isfinite(summary.final_normalized_score)
    assert summary.num_evaluations == 2
    client, runs = _mlflow_runs(uri, "tiny")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == summary.mlflow_run_id
    assert run.data.tags["algorithm"] == "dromo" and run.data.tags["seed"] == "0"
    assert run.data.tags["env"] == "hopper"
    assert run.data.params["agent.alpha"] == "1.0"
    for key in ("train/critic_loss", "dynamics/holdout_mse", "eval/normalized_score", "perf/learner_updates_per_s"):
        assert key in run.data.metrics, key
    hist = client.get_metric_history(run.info.run_id, "eval/normalized_score")
    assert [m.step for m in hist] == [50, 100]
    # The reported score is the mean of the last N evaluations, not the max.
    assert summary.final_normalized_score == pytest.approx(np.mean([m.value for m in hist]))
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curve.png", "checkpoint"} <= arts


def test_resume_is_bitwise_exact_in_synchronous_mode(ray_local, tiny_hopper_hdf5, tmp_path):
    full = run_experiment(tiny_cfg(tiny_hopper_hdf5, tmp_path / "a", "train.checkpoint_interval=50"),
                          _load(tiny_hopper_hdf5), tmp_path / "a", progress=False)
    half = run_experiment(tiny_cfg(tiny_hopper_hdf5, tmp_path / "b", "train.total_steps=50"),
                          _load(tiny_hopper_hdf5), tmp_path / "b", progress=False)
    assert half.steps == 50
    resumed = run_experiment(tiny_cfg(tiny_hopper_hdf5, tmp_path / "b"), _load(tiny_hopper_hdf5), tmp_path / "b",
                             resume=half.checkpoint, progress=False)
    assert resumed.steps == full.steps == 100
    a = _flat(load_checkpoint(full.checkpoint)["learner"])
    b = _flat(load_checkpoint(resumed.checkpoint)["learner"])
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = load_checkpoint(full.checkpoint)["replay"]
    rb = load_checkpoint(resumed.checkpoint)["replay"]
    assert np.array_equal(ra["buffer"]["obs"], rb["buffer"]["obs"])


def test_killed_rollout_worker_is_restarted(ray_local, tiny_hopper_hdf5, tmp_path):
    cfg = tiny_cfg(tiny_hopper_hdf5, tmp_path, "runtime.synchronous=false", "train.total_steps=150",
                   "runtime.num_evaluators=0")
    handles: dict = {}
    sizes: list[float] = []

    def report(metrics, step, checkpoint=None):
        if "replay/size" in metrics:
            sizes.append(metrics["replay/size"])
        if step == 50 and "replay/size" in metrics and "killed" not in handles:
            ray.kill(handles["workers"][0], no_restart=False)
            handles["killed"] = True

    res = run_experiment(cfg, _load(tiny_hopper_hdf5), tmp_path, reporter=report, progress=False,
                         on_start=handles.update)
    assert res.steps == 150 and handles.get("killed")
    # FIFO D_model far from full: its contents only grow, across the kill.
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


def test_learner_failure_ends_run_with_checkpoint_that_resumes(ray_local, tiny_hopper_hdf5, tmp_path):
    cfg = tiny_cfg(tiny_hopper_hdf5, tmp_path, "train.total_steps=150")
    handles: dict = {}

    def report(metrics, step, checkpoint=None):
        if checkpoint is not None and step == 50:
            ray.kill(handles["learner"], no_restart=True)

    with pytest.raises(RunFailed) as e:
        run_experiment(cfg, _load(tiny_hopper_hdf5), tmp_path, reporter=report, progress=False,
                       on_start=handles.update)
    assert e.value.checkpoint is not None and "died" in str(e.value) and "--resume" in str(e.value)
    res = run_experiment(cfg, _load(tiny_hopper_hdf5), tmp_path, resume=e.value.checkpoint, progress=False)
    assert res.steps == 150


def test_non_finite_loss_stops_cleanly_and_marks_mlflow_failed(ray_local, tiny_hopper_hdf5, tmp_path):
    """Rewards of 1e30 overflow the squared Bellman error in float32: the run must stop, not train on inf."""
    import h5py

    from dromo_ray.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    good = train(tiny_cfg(tiny_hopper_hdf5, tmp_path, "train.total_steps=50", "tracking.experiment=nan"),
                 tracking_uri=uri, progress=False)
    poisoned = tmp_path / "poisoned.hdf5"
    poisoned.write_bytes(Path(tiny_hopper_hdf5).read_bytes())
    with h5py.File(poisoned, "r+") as f:
        f["rewards"][...] = 1e30
    cfg = tiny_cfg(poisoned, tmp_path, "tracking.experiment=nan")
    with pytest.raises(RunFailed) as e:
        train(cfg, tracking_uri=uri, progress=False, resume=good.checkpoint)
    assert "non-finite" in str(e.value)
    assert Path(e.value.checkpoint) == Path(good.checkpoint)  # the last good checkpoint is kept
    assert load_checkpoint(good.checkpoint)["driver"]["step"] == 50
    _, runs = _mlflow_runs(uri, "nan")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "non-finite" in runs[0].data.tags["failure_reason"]


def _load(path):
    from dromo_ray.data.load import load_dataset

    return load_dataset(str(path))

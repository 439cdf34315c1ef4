"""``algorithm: cql_rllib``: RLlib's CQL on an offline dataset, evaluated and tracked like DROMO. Tiny."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

ray = pytest.importorskip("ray")

TRAIN_KEYS = {"train/critic_loss", "train/actor_loss", "train/cql_loss", "train/entropy_coef", "train/q_data",
              "train/q_policy"}
EVAL_KEYS = {"eval/return_mean", "eval/return_std", "eval/normalized_score", "eval/episode_length"}


@pytest.fixture(autouse=True)
def _no_ray_left():
    yield
    ray.shutdown()
    assert not ray.is_initialized()


def _cfg(dataset: str, out_dir, total: int = 40):
    from dromo_ray.core.config import config_from_dict

    return config_from_dict({
        "seed": 1, "out_dir": str(out_dir), "data": {"dataset": dataset},
        "agent": {"algorithm": "cql_rllib", "hidden_dims": [32, 32], "batch_size": 64, "num_actions": 4},
        "train": {"total_steps": total, "eval_interval": 20, "log_interval": 10, "eval_episodes": 2,
                  "final_score_last_n": 2},
        "tracking": {"experiment": "cql_rllib_test"},
    })


def test_parquet_conversion_is_row_for_row(tiny_hopper_dataset, tmp_path):
    import pyarrow.parquet as pq

    from dromo_ray.rllib.cql import dataset_to_parquet

    ds = tiny_hopper_dataset
    t = pq.read_table(dataset_to_parquet(ds, tmp_path / "pq") / "data.parquet")
    assert t.num_rows == len(ds)
    np.testing.assert_array_equal(np.stack(t["obs"].to_numpy(zero_copy_only=False)), ds.observations)
    np.testing.assert_array_equal(np.stack(t["new_obs"].to_numpy(zero_copy_only=False)), ds.next_observations)
    np.testing.assert_array_equal(np.stack(t["actions"].to_numpy(zero_copy_only=False)), ds.actions)
    np.testing.assert_array_equal(t["rewards"].to_numpy(), ds.rewards)
    np.testing.assert_array_equal(t["terminateds"].to_numpy(), ds.terminals)
    np.testing.assert_array_equal(t["truncateds"].to_numpy(), ds.timeouts)
    eps = t["eps_id"].to_numpy()
    assert eps[0] == 0 and len(np.unique(eps)) == ds.num_episodes


def test_cql_rllib_trains_evaluates_and_logs_to_mlflow(tiny_hopper_hdf5, tiny_hopper_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from dromo_ray.data.policy_io import load_policy
    from dromo_ray.rllib.cql import run_cql_rllib
    from dromo_ray.tracking import MlflowTracker, run_tags

    cfg = _cfg(str(tiny_hopper_hdf5), tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, cfg.tracking.experiment, run_name="cql", tags=run_tags(cfg, "hopper"))
    reports = []

    def reporter(metrics, step, checkpoint=None):
        reports.append((step, dict(metrics), checkpoint))
        if metrics:
            tracker.log_metrics(metrics, step)

    res = run_cql_rllib(cfg, tiny_hopper_dataset, tmp_path / "run", reporter=reporter, progress=False)
    tracker.end("FINISHED")
    assert res.steps == 40 and len(res.evaluations) == 2
    assert np.isfinite(res.final_score) and np.isfinite(res.final_return)
    assert res.final_score == pytest.approx(np.mean([e["eval/normalized_score"] for e in res.evaluations]))
    keys = set().union(*(m for _, m, _ in reports))
    assert TRAIN_KEYS | EVAL_KEYS <= keys
    last_rows = [m["train/rows_trained"] for _, m, _ in reports if "train/rows_trained" in m][-1]
    assert last_rows >= 0.8 * 40 * 64  # 40 learner updates of ~64 rows happened
    pol = load_policy(res.checkpoint)
    assert pol.meta["algorithm"] == "cql_rllib" and pol.meta["learner_updates"] == 40
    # the learner's twin critic travels in the policy file, so `evaluate --values` can check CQL's lower bound
    assert pol.critic is not None and pol.critic_info["soft_backup"] and pol.critic_info["gamma"] == cfg.agent.gamma
    assert pol.critic_info["entropy_coef"] == pytest.approx(
        [m["train/entropy_coef"] for _, m, _ in reports if "train/entropy_coef" in m][-1])
    from dromo_ray.train import value_check

    # train/q_data: the exported critic's mean Q at the 256 probe rows of the dataset, at the last evaluation
    probe = np.linspace(0, len(tiny_hopper_dataset) - 1, min(256, len(tiny_hopper_dataset))).astype(int)
    import torch

    with torch.no_grad():
        q = pol.critic(torch.as_tensor(tiny_hopper_dataset.observations[probe]),
                       torch.as_tensor(tiny_hopper_dataset.actions[probe]))
    assert [m["train/q_data"] for _, m, _ in reports if "train/q_data" in m][-1] == pytest.approx(float(q.mean()))
    v = value_check(tmp_path / "run", episodes=1, seed=0, tail=0)
    assert v["algorithm"] == "cql_rllib" and v["step"] == 40 and v["states"] > 0
    assert np.isfinite(v["q_min_mean"]) and np.isfinite(v["mc_return_mean"])
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert EVAL_KEYS <= set(run.data.metrics) and run.data.tags["algorithm"] == "cql_rllib"


def test_cql_rllib_through_dromo_train(tiny_hopper_hdf5, tmp_path):
    import dromo_ray.train as dtrain

    if "cql_rllib" not in inspect.getsource(dtrain.train):
        pytest.skip("dromo_ray.train.train has no cql_rllib hook yet")
    from mlflow.tracking import MlflowClient

    cfg = _cfg(str(tiny_hopper_hdf5), tmp_path, total=20)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = dtrain.train(cfg, tracking_uri=uri, progress=False)
    assert summary.algorithm == "cql_rllib" and summary.steps == 20
    assert np.isfinite(summary.final_normalized_score)
    run = MlflowClient(uri).get_run(summary.mlflow_run_id)
    assert {"eval/normalized_score", "final/normalized_score", "train/critic_loss"} <= set(run.data.metrics)
    assert run.data.tags["algorithm"] == "cql_rllib" and run.info.status == "FINISHED"

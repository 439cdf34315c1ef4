"""Slow sweeps: the tiny sweep straight through (progress table and ranking on stdout), and an RLlib CQL arm inside
a Tune trial. The interrupted-and-resumed tiny sweep and the miniature arms sweep are the fast versions
(tests/edges/test_sweep.py, tests/edges/test_sweep_evidence.py)."""

from __future__ import annotations

import json

import pytest

from testkit.sweeps import check_report, check_trial_runs, run_cli, sweep_runs, tiny_sweep_file, write_yaml


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_sweep_straight_through(tmp_path, tiny_dataset):
    """The tiny sweep without interruption, with the progress table and the final ranking on stdout."""
    import ray

    try:
        sweep = tiny_sweep_file(tmp_path, tiny_dataset, [0, 1])
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        code, stdout, stderr = run_cli(["sweep", str(sweep), "--tracking-uri", uri],
                                       env={"DROMO_SWEEP_PRINT_S": "1"}, cwd=tmp_path)
        assert code == 0, stderr[-3000:]
        assert "sweep progress" in stdout and "rank  algorithm" in stdout
        client, parents, trials = sweep_runs(uri, "sweep_tiny")
        check_trial_runs(client, parents, trials, ["dromo", "combo"], [0, 1], tiny_dataset)
        check_report(tmp_path, uri, "sweep_tiny", client, parents, trials)
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_cql_arm_runs_in_a_sweep_trial(tmp_path, arms_doc, tiny_hopper_hdf5):
    """An RLlib CQL arm trains, evaluates and finishes inside a Tune trial (its data pipeline beside the trial's
    placement group) and reports its final score. About 30 s on 2 idle CPUs."""
    import ray

    doc = {**arms_doc, "arms": {"cql": {"base": "tiny_{env}.yaml", "set": {"agent.algorithm": "cql_rllib"}}},
           "datasets": [{"env": "hopper", "dataset": str(tiny_hopper_hdf5)}], "storage_path": str(tmp_path / "sw"),
           "resources": {"driver_cpus": 0.05}}
    doc["common"] = {**doc["common"], "out_dir": str(tmp_path / "runs"), "train.total_steps": 40,
                     "train.eval_interval": 20, "train.log_interval": 10, "train.final_score_last_n": 2}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        code, stdout, stderr = run_cli(["sweep", str(write_yaml(tmp_path / "cql.yaml", doc)), "--tracking-uri", uri,
                                         "--json"], cwd=tmp_path)
        assert code == 0, stderr[-3000:]
        rep = json.loads(stdout)
        assert [(t["status"], t["step"]) for t in rep["trials"]] == [("finished", 40)]
        assert rep["ranking"][0]["algorithm"] == "cql_rllib" and rep["ranking"][0]["mean"] is not None
        client, parents, trials = sweep_runs(uri, "mini")
        assert len(trials) == 1 and trials[0].info.status == "FINISHED"
        assert trials[0].data.tags["algorithm"] == "cql_rllib" and "final/normalized_score" in trials[0].data.metrics
    finally:
        ray.shutdown()

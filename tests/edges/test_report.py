"""``dromo-ray report``: the protocol's table (mean ± std over seeds of final/normalized_score), CSV, learning-curve
PNGs, and artifacts on the sweep's parent run -- against a real (sqlite) MLflow store filled with known numbers."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dromo_ray.cli import main
from dromo_ray.report import build_report, curve_stats

SCORES = {("dromo", "hopper_medium-v2"): [40.0, 50.0, 60.0], ("combo", "hopper_medium-v2"): [30.0, 35.0],
          ("dromo", "walker2d_medium-v2"): [70.0]}


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _log_run(client: MlflowClient, exp_id: str, algo: str, dataset: str, seed: int, score: float, parent: str | None,
             status: str = "FINISHED", variant: str | None = None, dataset_path: str | None = None) -> str:
    tags = {"algorithm": algo, "dataset": dataset, "env": dataset.split("_")[0], "seed": str(seed)}
    if parent:
        tags |= {"mlflow.parentRunId": parent, "sweep.role": "trial"}
    if variant is not None:
        tags["sweep.variant"] = variant
    run_id = client.create_run(exp_id, tags=tags, run_name=f"{algo}-{dataset}-s{seed}").info.run_id
    client.log_param(run_id, "train.final_score_last_n", "2")
    ts = int(time.time() * 1000)
    # evaluations at 100, 200, 300; the curve ends at score; step 200 is logged twice (a resumed run replays the
    # updates after its last checkpoint): the later value (timestamp) must win.
    evals = [(100, score - 20.0, ts), (200, -999.0, ts), (200, score - 10.0, ts + 5), (300, score, ts + 10)]
    client.log_batch(run_id, metrics=[Metric("eval/normalized_score", v, t, s) for s, v, t in evals])
    if algo == "dromo":  # Eq. 13's variance term over the Bellman term, at every logged update
        client.log_batch(run_id, metrics=[Metric("train/variance_to_bellman", v, ts, s)
                                          for s, v in [(50, 8.0), (150, 4.0), (250, 2.0), (300, 1.0)]])
    if dataset_path is not None:
        client.log_param(run_id, "data.dataset", dataset_path)
    client.set_tag(run_id, "learner_device", "cpu")
    if status == "FINISHED":
        client.log_metric(run_id, "final/normalized_score", score, step=300)
        client.log_metric(run_id, "final/return", 10.0 * score, step=300)
        client.log_metric(run_id, "perf/total_wall_s", 60.0 * (seed + 1), step=300)
    client.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture
def store(tmp_path, tiny_hopper_hdf5):
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    exp_id = client.create_experiment("bench", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp_id, tags={"sweep.role": "parent"}, run_name="sweep-bench").info.run_id
    for (algo, ds), scores in SCORES.items():
        for seed, sc in enumerate(scores):
            # the hopper runs name a dataset file on this machine (its behaviour score is read from it); the
            # walker2d run's file is elsewhere
            path = str(tiny_hopper_hdf5) if ds.startswith("hopper") else "/nowhere/walker2d_medium-v2.hdf5"
            _log_run(client, exp_id, algo, ds, seed, sc, parent, dataset_path=path)
    # not counted: still running, killed by a scheduler, failed
    _log_run(client, exp_id, "dromo", "hopper_medium-v2", 9, 99.0, parent, status="RUNNING")
    _log_run(client, exp_id, "combo", "hopper_medium-v2", 8, 99.0, parent, status="KILLED")
    client.set_terminated(parent, status="FINISHED")
    return client, exp_id, parent


def test_table_csv_and_curves_match_the_runs(tmp_path, store, tiny_hopper_hdf5):
    client, _, parent = store
    rep = build_report("bench", _uri(tmp_path), tmp_path / "out")
    rows = {(r["algorithm"], r["dataset"]): r for r in rep["rows"]}
    assert set(rows) == set(SCORES)
    for key, scores in SCORES.items():
        assert rows[key]["mean"] == pytest.approx(np.mean(scores))
        assert rows[key]["std"] == pytest.approx(np.std(scores))  # population std over seeds (documented)
        assert rows[key]["n"] == len(scores) and rows[key]["seeds"] == [str(s) for s in range(len(scores))]
        assert rows[key]["last_n"] == "2"
    assert len(rep["excluded"]) == 2 and {e["reason"] for e in rep["excluded"]} == {"status RUNNING", "status KILLED"}

    with open(rep["files"]["csv"]) as f:
        csv_rows = {(r["algorithm"], r["dataset"]): r for r in csv.DictReader(f)}
    for key, scores in SCORES.items():
        assert float(csv_rows[key]["mean"]) == pytest.approx(np.mean(scores), abs=1e-12)
        assert float(csv_rows[key]["std"]) == pytest.approx(np.std(scores), abs=1e-12)
        assert [float(x) for x in csv_rows[key]["scores"].split()] == scores

    # beside the score: the return, the dataset's own behaviour score, the updates, the wall time, the device
    from dromo_ray.data.info import dataset_info
    from dromo_ray.data.load import load_dataset

    behavior = dataset_info(load_dataset(str(tiny_hopper_hdf5)))["normalized_score"]
    assert rows[("dromo", "hopper_medium-v2")]["behavior_score"] == pytest.approx(behavior)
    assert np.isnan(rows[("dromo", "walker2d_medium-v2")]["behavior_score"])  # its file is not here
    assert rows[("dromo", "hopper_medium-v2")]["return_mean"] == pytest.approx(500.0)
    assert rows[("dromo", "hopper_medium-v2")]["wall_s_mean"] == pytest.approx(120.0)  # 60, 120, 180 s
    assert {r["updates"] for r in rows.values()} == {"300"} and {r["device"] for r in rows.values()} == {"cpu"}

    md = Path(rep["files"]["markdown"]).read_text()
    assert (f"| dromo | hopper_medium-v2 | - | 3 | 0, 1, 2 | 2 | 50.00 ± 8.16 | 500.0 | {behavior:.2f} | 300 | "
            "2.0 | cpu | 40.00 | 60.00 |") in md
    assert "| combo | hopper_medium-v2 | - | 2 | 0, 1 | 2 | 32.50 ± 2.50 | 325.0 |" in md
    assert "| dromo | walker2d_medium-v2 | - | 1 | 0 | 2 | 70.00 ± 0.00 | 700.0 | - | 300 |" in md
    # DROMO's variance / Bellman ratio at the first, middle and last logged update, and its plot
    assert "| dromo | hopper_medium-v2 | 0 | 50: 8, 250: 2, 300: 1 |" in md
    assert sorted(Path(p).name for p in rep["files"]["variance"]) == ["variance_hopper_medium-v2.png",
                                                                       "variance_walker2d_medium-v2.png"]
    assert "last N evaluations" in md and "ddof=0" in md and "Excluded runs (2)" in md

    pngs = sorted(Path(p).name for p in rep["files"]["curves"])
    assert pngs == ["curves_hopper_medium-v2.png", "curves_walker2d_medium-v2.png"]
    assert all(Path(p).stat().st_size > 1000 for p in rep["files"]["curves"])

    # artifacts on the sweep's parent run
    assert rep["artifacts_run_id"] == parent
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/results.md", "report/results.csv", "report/curves_hopper_medium-v2.png",
                      "report/curves_walker2d_medium-v2.png", "report/variance_hopper_medium-v2.png",
                      "report/variance_walker2d_medium-v2.png"}


def test_curves_dedupe_steps_and_aggregate(tmp_path, store):
    from dromo_ray.report import collect_runs

    client, exp_id, _ = store
    records, _ = collect_runs(client, exp_id)
    for r in records:
        assert [s for s, _ in r.curve] == [100, 200, 300]
        assert r.curve[1][1] == pytest.approx(r.score - 10.0)  # the replayed step keeps its latest value
    steps, mean, std, n = curve_stats([r.curve for r in records if r.algorithm == "dromo"
                                       and r.dataset == "hopper_medium-v2"])
    assert steps == [100, 200, 300] and n == [3, 3, 3]
    assert mean[-1] == pytest.approx(50.0) and std[-1] == pytest.approx(np.std([40.0, 50.0, 60.0]))


def test_variants_are_separate_rows(tmp_path):
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    exp_id = client.create_experiment("alpha", artifact_location=(tmp_path / "artifacts").as_uri())
    for seed, (variant, sc) in enumerate([("agent.alpha=0.1", 10.0), ("agent.alpha=0.1", 20.0),
                                          ("agent.alpha=1", 30.0)]):
        _log_run(client, exp_id, "dromo", "hopper_medium-v2", seed, sc, None, variant=variant)
    rep = build_report("alpha", _uri(tmp_path), tmp_path / "out")
    got = sorted((r["variant"], r["n"], r["mean"]) for r in rep["rows"])
    assert got == [("agent.alpha=0.1", 2, 15.0), ("agent.alpha=1", 1, 30.0)]
    assert rep["artifacts_run_id"] is None  # plain runs: no parent to log to


def test_cli_json_and_errors(tmp_path, store, capsys):
    assert main(["report", "--experiment", "bench", "--tracking-uri", _uri(tmp_path), "--out",
                 str(tmp_path / "o"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {Path(out["files"]["markdown"]).name, Path(out["files"]["csv"]).name} == {"results.md", "results.csv"}
    assert main(["report", "--experiment", "nope", "--tracking-uri", _uri(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no experiment 'nope'" in err[0] and "bench" in err[0]
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    client.create_experiment("empty", artifact_location=(tmp_path / "artifacts").as_uri())
    assert main(["report", "--experiment", "empty", "--tracking-uri", _uri(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_behaviour_score_of_a_d4rl_name_found_in_the_dataset_dir(tmp_path, tiny_hopper_hdf5, monkeypatch):
    from dromo_ray.data.info import dataset_info
    from dromo_ray.data.load import load_dataset
    from dromo_ray.report import RunRecord, behavior_scores

    (tmp_path / "d4rl").mkdir()
    (tmp_path / "d4rl" / "hopper_medium-v2.hdf5").symlink_to(tiny_hopper_hdf5)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    rec = [RunRecord("a", "dromo", "hopper-medium-v2", "", "0", 1.0, "4", None, dataset_path="hopper-medium-v2"),
           RunRecord("b", "dromo", "walker2d-medium-v2", "", "0", 1.0, "4", None, dataset_path="walker2d-medium-v2")]
    expected = dataset_info(load_dataset(str(tiny_hopper_hdf5)))["normalized_score"]
    assert behavior_scores(rec) == {"hopper-medium-v2": pytest.approx(expected)}  # walker2d's is not here

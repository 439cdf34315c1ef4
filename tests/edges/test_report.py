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
             status: str = "FINISHED", variant: str | None = None) -> str:
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
    if status == "FINISHED":
        client.log_metric(run_id, "final/normalized_score", score, step=300)
    client.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture
def store(tmp_path):
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    exp_id = client.create_experiment("bench", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp_id, tags={"sweep.role": "parent"}, run_name="sweep-bench").info.run_id
    for (algo, ds), scores in SCORES.items():
        for seed, sc in enumerate(scores):
            _log_run(client, exp_id, algo, ds, seed, sc, parent)
    # not counted: still running, killed by a scheduler, failed
    _log_run(client, exp_id, "dromo", "hopper_medium-v2", 9, 99.0, parent, status="RUNNING")
    _log_run(client, exp_id, "combo", "hopper_medium-v2", 8, 99.0, parent, status="KILLED")
    client.set_terminated(parent, status="FINISHED")
    return client, exp_id, parent


def test_table_csv_and_curves_match_the_runs(tmp_path, store):
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

    md = Path(rep["files"]["markdown"]).read_text()
    assert "| dromo | hopper_medium-v2 | - | 3 | 0, 1, 2 | 2 | 50.00 ± 8.16 |" in md
    assert "| combo | hopper_medium-v2 | - | 2 | 0, 1 | 2 | 32.50 ± 2.50 |" in md
    assert "last N evaluations" in md and "ddof=0" in md and "Excluded runs (2)" in md

    pngs = sorted(Path(p).name for p in rep["files"]["curves"])
    assert pngs == ["curves_hopper_medium-v2.png", "curves_walker2d_medium-v2.png"]
    assert all(Path(p).stat().st_size > 1000 for p in rep["files"]["curves"])

    # artifacts on the sweep's parent run
    assert rep["artifacts_run_id"] == parent
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/results.md", "report/results.csv", "report/curves_hopper_medium-v2.png",
                      "report/curves_walker2d_medium-v2.png"}


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

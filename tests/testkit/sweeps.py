"""Helpers of the sweep tests in several tiers (tests/edges/test_sweep*.py, tests/slow/test_sweeps.py): the CLI in a
fresh process, the runs of a sweep in MLflow, the tiny sweep file, and the checks every tiny sweep must pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TUNE = ROOT / "tune_configs"
SWEEPS = TUNE / "sweeps"
TINY = TUNE / "tasks" / "tiny_hopper_dromo.yaml"


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def task_config(name: str) -> Path:
    """A per-task config, in tune_configs/tasks/ (the base: layout) or, before that move, in tune_configs/."""
    for p in (TUNE / "tasks" / f"{name}.yaml", TUNE / f"{name}.yaml"):
        if p.exists():
            return p
    raise FileNotFoundError(name)


def run_cli(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    """The CLI in a fresh process, as a user runs it (its Ray instance ends with it)."""
    proc = subprocess.run([sys.executable, "-m", "dromo_ray.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def sweep_runs(uri: str, experiment: str):
    """(client, parent runs, trial runs) of an experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    return client, parents, [r for r in runs if r.data.tags.get("sweep.role") != "parent"]


def tiny_sweep_file(tmp_path: Path, dataset: Path, seeds: list[int], **train) -> Path:
    doc = yaml.safe_load((SWEEPS / "sweep_tiny.yaml").read_text())
    doc["base"] = str(TINY)
    doc["data"] = {"dataset": str(dataset)}
    doc["storage_path"] = str(tmp_path / "sweeps")
    doc["seeds"] = seeds
    doc["max_concurrent_trials"] = 1
    doc["out_dir"] = str(tmp_path / "runs")
    if train:
        doc["train"] = train
    return write_yaml(tmp_path / "sweep_tiny.yaml", doc)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """Metric history by step; a step logged twice (replayed after a resume) keeps its latest value."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(s, v) for s, (_, v) in sorted(latest.items())]


def check_trial_runs(client, parents, trials, algorithms: list[str], seeds: list[int], dataset: Path) -> None:
    from dromo_ray.config import load_config
    from dromo_ray.tracking import config_params

    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert len(trials) == len(algorithms) * len(seeds)
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert len({r.data.tags["sweep.trial_id"] for r in trials}) == len(trials)
    assert sorted((r.data.tags["algorithm"], int(r.data.tags["seed"])) for r in trials) == sorted(
        (a, s) for a in algorithms for s in seeds)
    for r in trials:
        tags, params = r.data.tags, r.data.params
        assert r.info.status == "FINISHED" and "failure_reason" not in tags
        assert tags["dataset"] == dataset.stem and tags["env"] == "hopper" and "learner_device" in tags
        # the params of a single `train` run: the flattened config of this trial
        cfg = load_config(TINY, {"agent.algorithm": tags["algorithm"], "seed": int(tags["seed"]),
                                 "data.dataset": str(dataset)})
        expected = config_params(cfg)
        assert set(params) == set(expected)
        for k in ("agent.algorithm", "seed", "agent.alpha", "agent.beta", "rollout.horizon", "train.total_steps",
                  "data.dataset"):
            assert params[k] == expected[k], k
        # metric histories: dynamics once (at step 0), evaluations at every eval_interval, the protocol score
        assert len(client.get_metric_history(r.info.run_id, "dynamics/holdout_mse")) == 1
        evals = history(client, r.info.run_id, "eval/normalized_score")
        total, every, last_n = cfg.train.total_steps, cfg.train.eval_interval, cfg.train.final_score_last_n
        assert [s for s, _ in evals] == list(range(every, total + 1, every))
        final = r.data.metrics["final/normalized_score"]
        assert final == pytest.approx(np.mean([v for _, v in evals][-last_n:]))
        assert any(k.startswith("train/") for k in r.data.metrics)


def check_report(tmp_path: Path, uri: str, experiment: str, client, parents, trials) -> None:
    import csv

    out = tmp_path / "report"
    code, stdout, stderr = run_cli(["report", "--experiment", experiment, "--tracking-uri", uri, "--out",
                                     str(out), "--json"], cwd=tmp_path)
    assert code == 0, stderr
    rep = json.loads(stdout)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["algorithm"] for r in rows} == {r.data.tags["algorithm"] for r in trials}
    for row in rows:
        scores = [r.data.metrics["final/normalized_score"] for r in trials if r.data.tags["algorithm"] ==
                  row["algorithm"]]
        assert int(row["runs"]) == len(scores)
        assert float(row["mean"]) == pytest.approx(np.mean(scores), abs=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(scores), abs=1e-12)
        assert f"{np.mean(scores):.2f} ± {np.std(scores):.2f}" in (out / "results.md").read_text()
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts next to the embedded store, not in ./mlruns
    pngs = sorted(out.glob("curves_*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert rep["artifacts_run_id"] == parents[0].info.run_id
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/results.md", "report/results.csv"} <= logged and any(p.endswith(".png") for p in logged)

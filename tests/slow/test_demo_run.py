"""The demo as a newcomer runs it (`dromo-ray demo`), on a short budget: the steps, the scores, the MLflow run, and
nothing of Ray's own on the console. The full 15,000-update demo and its rising curve are the README's figures."""

from __future__ import annotations

import re

import pytest

from testkit.sweeps import run_cli


@pytest.mark.ray
@pytest.mark.slow
def test_demo_prints_its_steps_and_scores_and_logs_the_curve(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(["demo", "--out", str(out), "--steps", "300"], cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    lines = stdout.splitlines()
    assert [ln[:5] for ln in lines if ln.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    behaviour = re.search(r"behaviour data: shipped hopper medium policy .*normalized score ([\d.]+)", stdout)
    assert behaviour and 30 < float(behaviour.group(1)) < 60, stdout
    curve = re.search(r"score by update:\s+(.*)", stdout).group(1)
    points = re.findall(r"(\d+): (-?[\d.]+)", curve)
    assert [int(s) for s, _ in points][-1] == 300 and len(points) >= 15
    run_id = re.search(r"mlflow run id: (\w+)", stdout).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "eval/normalized_score")
    assert sorted(m.step for m in history) == [int(s) for s, _ in points]
    assert (out / "demo_config.yaml").exists()
    # a newcomer reads only the steps and the result: no Ray internals on either stream
    for noise in ("constructor arguments in the object store", "token", "(raylet)", "WARNING", "Traceback"):
        assert noise not in stdout + stderr, noise
    # a second run reuses the collected data
    code, stdout, _ = run_cli(["demo", "--out", str(out), "--steps", "30"], cwd=tmp_path)
    assert code == 0 and "[1/4] reusing" in stdout

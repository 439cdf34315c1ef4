"""The GPU check and the learner/pipeline benches' typed functions, on CPU (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from dromo_ray.cli import main
from dromo_ray.core.config import AGENT_ALGORITHMS


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("argv", [["bench", "gpu"], ["bench", "pipeline", "--device", "cuda"],
                                  ["bench", "learner", "--device", "cuda", "--update-mode", "captured"]])
def test_cuda_benches_without_a_gpu_say_so_in_one_line(argv, capsys):
    assert main(argv) == 2
    assert "no usable CUDA GPU" in _one_line(capsys)


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "gpu", "--device", "tpu"], "--device tpu: unknown device"),
    (["bench", "gpu", "--device", "cpu"], "--device cpu: the GPU check runs on CUDA"),
    (["bench", "gpu", "--budget", "0", "--quick", "--device", "cpu"], "--budget: must be > 0"),
    (["bench", "pipeline", "--device", "tpu"], "--device tpu: unknown device"),
])
def test_gpu_check_arguments_that_cannot_work(argv, message, capsys):
    assert main(argv) == 2
    assert message in _one_line(capsys)


def test_measure_learner_reports_both_modes_on_cpu():
    from dromo_ray.bench.learner import measure_learner

    r = measure_learner(algo="combo", device="cpu", batch=16, steps=2, threads=1, hidden=(16,), warmup=1,
                        rounds=1, peak=False)
    for mode in ("eager", "captured"):
        assert r[f"{mode}_updates_per_s"] > 0 and 0 <= r[f"{mode}_wait_fraction"] < 1
    assert r["update_mode"] == "eager" and r["updates_per_s"] == r["eager_updates_per_s"]
    assert r["captured_vs_eager"] > 0 and r["captured_graph"] is False and r["gflop_per_update"] > 0


def test_bench_gpu_quick_on_cpu_runs_every_stage(tmp_path, capsys):
    """The GPU check's code path with tiny sizes on CPU: every algorithm's captured == eager check holds, every
    learner bench and the learner-side pipeline ran, the JSON file says so."""
    out = tmp_path / "gpu_check.json"
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["quick"]
    assert set(report["equality"]) == set(report["learner"]) == set(AGENT_ALGORITHMS)
    for algo, r in report["equality"].items():
        assert r["ok"] and not r["graph"] and r["max_abs_diff"] <= r["tolerance"], (algo, r)
    for algo, r in report["learner"].items():
        assert r["eager_updates_per_s"] > 0 and r["captured_updates_per_s"] > 0 and "captured_vs_eager" in r, algo
    learner_mode = report["pipeline"]["learner"]
    assert learner_mode["rollout_mode"] == "learner" and learner_mode["learner_updates_per_s"] > 0
    assert 0 < learner_mode["learner_wait_fraction"] < 1 and learner_mode["rollout_transitions"] > 0
    assert report["pipeline"]["workers"] == {"skipped": "quick mode"}
    printed = capsys.readouterr().out
    assert "graphed == eager" in printed and str(out) in printed

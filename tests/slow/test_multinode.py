"""A real multi-node Ray cluster on this machine: head (learner_node) + two rollout nodes, an MLflow server on
127.0.0.1, ``ray job submit`` of a tiny ``dromo-ray train``; actors land where their resources say; a rollout
node removed mid-run leaves the run to finish on what remains.

Teardown stops what this test started by its own ids, never by name (never ``ray stop``, which would kill other
Ray instances on the machine): every process it starts is a session leader with a marker in its environment
that all descendants inherit (Ray's daemons, workers and job drivers, MLflow's workers; also one that leaves the
session). Every step is bounded in time, a failing step does not stop the next, and the fixture asserts that no
process of the test survives. The whole test is bounded by pytest-timeout (``signal`` method, so the teardown
still runs).

Slow (several minutes on 2 cores): ``pytest -m slow tests/slow/test_multinode.py``. The harness lives in
``tests/testkit/cluster.py``; its teardown mechanism is checked by the fast ``tests/runtime/test_process_teardown.py``.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from testkit.cluster import Cluster

TINY = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    # A slow or dead MLflow server must not stall the test: short requests, few retries (MLflow reads these at
    # each request).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        survivors = c.teardown()
    assert not survivors, f"processes of the test survived its teardown: {survivors}"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1800, method="signal")  # the whole test, fixture setup and teardown included
def test_job_on_three_node_cluster_survives_losing_a_rollout_node(cluster, tiny_hopper_hdf5):
    uri = cluster.start_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("multinode") is None, "a stale MLflow server answers on this port"
    overrides = [
        f"data.dataset={tiny_hopper_hdf5}", f"out_dir={cluster.root / 'runs'}", "tracking.experiment=multinode",
        "runtime.synchronous=false", "train.total_steps=30000", "train.eval_interval=10000",
        "train.checkpoint_interval=10000", "train.log_interval=1000", "runtime.learner_resources={learner_node: 0.01}",
        "runtime.rollout_worker_resources={rollout_node: 0.01}", "runtime.num_rollout_workers=2",
        "runtime.max_worker_restarts=5",
    ]
    entry = ["dromo-ray", "train", str(TINY), *[a for o in overrides for a in ("--set", o)], "--tracking-uri", uri,
             "--json"]
    job_id = "dromo-multinode-" + secrets.token_hex(4)
    cluster.ray_cli("job", "submit", "--address", f"http://127.0.0.1:{cluster.dash}", "--submission-id", job_id,
                    "--no-wait", "--", *entry)

    # Wait for the rollout workers and the learner to be alive, then check where they are.
    node_res = {}
    deadline = time.time() + 300
    placed: dict[str, list[str]] = {}
    dash = f"http://127.0.0.1:{cluster.dash}"
    while time.time() < deadline:
        status = cluster.job_status(job_id)
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            raise AssertionError(status + cluster.ray_cli("job", "logs", "--address", dash, job_id)[-4000:])
        acts = [a for a in cluster.actors() if a["state"] == "ALIVE"]
        placed = {cls: [a["node_id"] for a in acts if a["class_name"] == cls]
                  for cls in ("RolloutActor", "LearnerActor")}
        if len(placed["RolloutActor"]) == 2 and len(placed["LearnerActor"]) == 1:
            break
        time.sleep(2)
    assert len(placed["RolloutActor"]) == 2 and len(placed["LearnerActor"]) == 1, placed
    for n in cluster.nodes():
        node_res[n["node_id"]] = n.get("resources_total", {})
    assert "learner_node" in node_res[placed["LearnerActor"][0]]
    assert all("rollout_node" in node_res[nid] for nid in placed["RolloutActor"])

    # Remove a rollout node that hosts a worker, mid-run.
    victim = next(name for name in ("rollout_a", "rollout_b")
                  if cluster.node_of_session(name) in placed["RolloutActor"])
    cluster.kill_session(cluster.sessions.pop(victim))
    killed_at = time.time()

    # After a node loss the Ray CLI can hang on the dead node's agents, so the end of the run is read from the
    # MLflow server and from the job driver's log on the head, not from `ray job status`.
    deadline = time.time() + 900
    runs: list = []
    while time.time() < deadline:
        exp = client.get_experiment_by_name("multinode")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].info.status in ("FINISHED", "FAILED", "KILLED"):
            break
        time.sleep(3)
    driver_logs = sorted(cluster.ray_tmp.glob(f"head/session_*/logs/job-driver-{job_id}.log"))
    logs = driver_logs[-1].read_text() if driver_logs else ""
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", logs[-3000:]
    summary, _ = json.JSONDecoder().raw_decode(logs[logs.rindex("{\n"):])
    assert summary["steps"] == 30000 and summary["mlflow_run_id"] == runs[0].info.run_id

    # Rollouts went on after the node was removed: the workers that lived there were restarted on the remaining
    # rollout node (the only other node with `rollout_node`), and D_model kept growing to the end of the run.
    hist = client.get_metric_history(runs[0].info.run_id, "replay/added")
    after = [m.value for m in hist if m.timestamp / 1000.0 > killed_at + 5]
    before = [m.value for m in hist if m.timestamp / 1000.0 <= killed_at]
    assert before and after and max(after) > max(before), (before, after)

"""A real multi-node Ray cluster on this machine: head (learner_node) + two rollout nodes, an MLflow server on
127.0.0.1, ``ray job submit`` of a tiny ``dromo-ray train``; actors land where their resources say; a rollout
node removed mid-run leaves the run to finish on what remains. Everything is torn down by the session ids this
test started (never ``ray stop``, which would kill other Ray instances on the machine).

Slow (several minutes on 2 cores): ``pytest -m slow tests/test_multinode.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
TINY = Path(__file__).resolve().parents[1] / "tune_configs" / "tiny_hopper_dromo.yaml"


def _free_port_block(n: int = 220) -> int:
    """A base port with n free ports above it (best effort)."""
    for base in range(21000, 60000, 1000):
        ok = True
        for p in (base, base + 1, base + 2, base + 3, base + 10, base + 11, base + 20, base + 100, base + 200,
                  base + 400, base + 600):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


class Cluster:
    def __init__(self, root: Path) -> None:
        import ray  # noqa: F401  (puts Ray's vendored psutil on the path)
        from ray._private.services import get_node_ip_address

        self.root = root
        # Ray's socket paths must stay under 107 bytes: its temp dirs live under a short /tmp name.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="drmn", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1"}
        self.ip = get_node_ip_address()
        self.base = _free_port_block()
        self.gcs = self.base
        self.dash = self.base + 10
        self.address = f"{self.ip}:{self.gcs}"
        self.sessions: dict[str, int] = {}
        self.mlflow: subprocess.Popen | None = None

    def _ports(self, base: int) -> list[str]:
        return ["--node-manager-port", str(base), "--object-manager-port", str(base + 1),
                "--dashboard-agent-listen-port", str(base + 2), "--dashboard-agent-grpc-port", str(base + 3),
                "--runtime-env-agent-port", str(base + 4), "--metrics-export-port", str(base + 5),
                "--min-worker-port", str(base + 100), "--max-worker-port", str(base + 199)]

    def start_node(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen(["ray", "start", "--temp-dir", str(self.ray_tmp / name), "--object-store-memory",
                              "100000000", "--disable-usage-stats", *args], env=self.env, cwd=self.root,
                             start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        rc = p.wait(timeout=180)
        self.sessions[name] = p.pid
        assert rc == 0, (self.root / f"{name}.log").read_text()[-2000:]

    def start(self) -> None:
        self.start_node("head", ["--head", "--port", str(self.gcs), "--num-cpus", "1", "--num-gpus", "0",
                                 "--resources", json.dumps({"learner_node": 1}), "--dashboard-host", "127.0.0.1",
                                 "--dashboard-port", str(self.dash), "--ray-client-server-port",
                                 str(self.base + 11), *self._ports(self.base + 200)])
        for i, name in enumerate(("rollout_a", "rollout_b")):
            # A marker resource per node tells the nodes apart in `ray list nodes` (same IP, same host).
            self.start_node(name, ["--address", self.address, "--num-cpus", "1", "--resources",
                                   json.dumps({"rollout_node": 2, f"marker_{name}": 1}),
                                   *self._ports(self.base + 400 + 200 * i)])

    def start_mlflow(self) -> str:
        port = self.base + 20
        self.mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, start_new_session=True, stdout=open(self.root / "mlflow.log", "w"),
            stderr=subprocess.STDOUT)
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return uri
            except OSError:
                time.sleep(1)
        raise AssertionError("mlflow server did not come up:\n" + (self.root / "mlflow.log").read_text()[-2000:])

    def ray_cli(self, *args: str, timeout: float = 120) -> str:
        """Run a ``ray`` CLI command; on timeout its whole process group is killed (no hung pipes)."""
        p = subprocess.Popen(["ray", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
        assert p.returncode == 0, out + err
        return out

    def job_status(self, job_id: str) -> str:
        try:
            return self.ray_cli("job", "status", "--address", f"http://127.0.0.1:{self.dash}", job_id, timeout=60)
        except subprocess.TimeoutExpired:
            return "TIMEOUT"

    def nodes(self) -> list[dict]:
        return json.loads(self.ray_cli("list", "nodes", "--address", self.address, "--format", "json",
                                       "--detail"))

    def actors(self) -> list[dict]:
        return json.loads(self.ray_cli("list", "actors", "--address", self.address, "--format", "json",
                                       "--detail", "--limit", "1000"))

    def node_of_session(self, name: str) -> str:
        for n in self.nodes():
            if f"marker_{name}" in (n.get("resources_total") or {}):
                return n["node_id"]
        raise AssertionError(f"node {name} not found")

    def kill_session(self, sid: int, grace: float = 10) -> None:
        import psutil

        procs = set()
        for q in psutil.process_iter():
            try:
                if os.getsid(q.pid) == sid:
                    procs.add(q)
                    procs.update(q.children(recursive=True))
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        for q in procs:
            try:
                q.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for q in alive:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def teardown(self) -> None:
        if self.mlflow is not None:
            self.kill_session(self.mlflow.pid)
        for name in list(self.sessions)[::-1]:
            self.kill_session(self.sessions[name])
        import psutil

        # Anything of this cluster that left its session (none expected) is found by its temp dir.
        for q in psutil.process_iter(["cmdline"]):
            try:
                if str(self.ray_tmp) in " ".join(q.info["cmdline"] or []):
                    q.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.teardown()


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
        placed = {cls: [a["node_id"] for a in acts if a["class_name"] == cls] for cls in ("RolloutWorker", "Learner")}
        if len(placed["RolloutWorker"]) == 2 and len(placed["Learner"]) == 1:
            break
        time.sleep(2)
    assert len(placed["RolloutWorker"]) == 2 and len(placed["Learner"]) == 1, placed
    for n in cluster.nodes():
        node_res[n["node_id"]] = n.get("resources_total", {})
    assert "learner_node" in node_res[placed["Learner"][0]]
    assert all("rollout_node" in node_res[nid] for nid in placed["RolloutWorker"])

    # Remove a rollout node that hosts a worker, mid-run.
    victim = next(name for name in ("rollout_a", "rollout_b")
                  if cluster.node_of_session(name) in placed["RolloutWorker"])
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

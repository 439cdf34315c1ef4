"""A real multi-node Ray cluster on this machine: head (learner_node) + two rollout nodes, an MLflow server on
127.0.0.1, ``ray job submit`` of a tiny ``dromo-ray train``; actors land where their resources say; a rollout
node removed mid-run leaves the run to finish on what remains.

Teardown stops what this test started by its own ids, never by name (never ``ray stop``, which would kill other
Ray instances on the machine): every process it starts is a session leader with a marker in its environment
that all descendants inherit (Ray's daemons, workers and job drivers, MLflow's workers; also one that leaves the
session). Every step is bounded in time, a failing step does not stop the next, and the fixture asserts that no
process of the test survives. The whole test is bounded by pytest-timeout (``signal`` method, so the teardown
still runs).

Slow (several minutes on 2 cores): ``pytest -m slow tests/runtime/test_multinode.py``. The teardown mechanism itself is
checked by a fast test.
"""

from __future__ import annotations

import contextlib
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

TINY = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"


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


MARK = "DROMO_TEST_PROCESSES"
"""Environment variable that marks the processes of one test (its value is the test's token)."""


class Processes:
    """The processes one test started, found by its own id (Linux ``/proc``): :data:`MARK` with the test's token
    in the environment, which every descendant inherits, also one that calls ``setsid`` (``also``: or a command
    line containing one of these strings). Each :meth:`popen` is a session leader, so that one node's processes
    can be told apart (``find(session=...)``). A pid alone is never trusted: it may have been reused."""

    def __init__(self, token: str, also: tuple[str, ...] = ()) -> None:
        self.token = token
        self._mark = f"{MARK}={token}".encode()
        self.also = tuple(a.encode() for a in also)
        self.children: list[subprocess.Popen] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), MARK: self.token}

    def popen(self, args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start ``args`` in a new session, marked; recorded before anything can fail."""
        p = subprocess.Popen(args, env=self.env(env), start_new_session=True, **kwargs)
        self.children.append(p)
        return p

    def find(self, session: int | None = None) -> list[int]:
        """Live (not zombie) pids of this test; of one session only when ``session`` is given."""
        self._reap()
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                state, _, _, sid = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[:4]
                if state in ("Z", "X") or (session is not None and int(sid) != session):
                    continue
                if (self._mark in Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
                        or any(a in Path(f"/proc/{d}/cmdline").read_bytes() for a in self.also)):
                    out.append(int(d))
            except (OSError, ValueError):  # gone meanwhile, or not ours to read
                continue
        return out

    def _reap(self) -> None:
        self.children = [p for p in self.children if p.poll() is None]  # exited children: zombies until reaped

    def stop(self, pids: list[int], grace: float = 10.0) -> list[int]:
        """SIGTERM ``pids``, SIGKILL what is left after ``grace`` s; returns what is still alive 5 s later."""
        def alive(ps: list[int]) -> list[int]:
            self._reap()
            live = []
            for pid in ps:
                try:
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                        live.append(pid)
                except (OSError, IndexError):
                    pass
            return live

        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in alive(pids):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while alive(pids) and time.monotonic() < deadline:
                time.sleep(0.1)
        return alive(pids)

    def stop_all(self, budget: float = 60.0, grace: float = 10.0) -> list[str]:
        """Stop every process of the test within about ``budget`` s (rounds, for processes started meanwhile;
        ``grace`` s between SIGTERM and SIGKILL); returns a description of the survivors (empty: none)."""
        deadline = time.monotonic() + budget
        interrupted: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                pids = self.find()
                if not pids:
                    break
                self.stop(pids, grace=max(0.5, min(grace, deadline - time.monotonic() - 6)))
            except BaseException as e:  # noqa: BLE001 - e.g. pytest-timeout firing now: finish stopping first
                interrupted = interrupted or e
        survivors = [describe(pid) for pid in self.find()]
        if interrupted is not None:
            raise interrupted
        return survivors


def describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = "?"
    return f"{pid} {cmd[:200]}"


class Cluster:
    def __init__(self, root: Path) -> None:
        from ray._private.services import get_node_ip_address

        self.root = root
        # Ray's socket paths must stay under 107 bytes: its temp dirs live under a short /tmp name.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="drmn", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.procs = Processes(self.token[:16], also=(f"{self.ray_tmp}/",))
        self.env = self.procs.env({**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                                   "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1"})
        self.ip = get_node_ip_address()
        self.base = _free_port_block()
        self.gcs = self.base
        self.dash = self.base + 10
        self.address = f"{self.ip}:{self.gcs}"
        self.sessions: dict[str, int] = {}

    def _ports(self, base: int) -> list[str]:
        return ["--node-manager-port", str(base), "--object-manager-port", str(base + 1),
                "--dashboard-agent-listen-port", str(base + 2), "--dashboard-agent-grpc-port", str(base + 3),
                "--runtime-env-agent-port", str(base + 4), "--metrics-export-port", str(base + 5),
                "--min-worker-port", str(base + 100), "--max-worker-port", str(base + 199)]

    def start_node(self, name: str, args: list[str]) -> None:
        with open(self.root / f"{name}.log", "w") as log:
            p = self.procs.popen(["ray", "start", "--temp-dir", str(self.ray_tmp / name), "--object-store-memory",
                                  "100000000", "--disable-usage-stats", *args], env=self.env, cwd=self.root,
                                 stdout=log, stderr=subprocess.STDOUT)
        self.sessions[name] = p.pid  # (the teardown stops it whatever happens next)
        rc = p.wait(timeout=180)
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
        with open(self.root / "mlflow.log", "w") as log:
            self.procs.popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                 "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
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
        p = self.procs.popen(["ray", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(self.procs.find(session=p.pid), grace=0)
            with contextlib.suppress(subprocess.TimeoutExpired):  # a grandchild elsewhere may hold the pipes
                p.communicate(timeout=10)
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
        """Stop one node: the processes of the session its ``ray start`` began (daemons, workers)."""
        left = self.procs.stop(self.procs.find(session=sid), grace=grace)
        assert not left, [describe(pid) for pid in left]

    def teardown(self, budget: float = 90.0) -> list[str]:
        """Stop every process this test started (all nodes, MLflow, Ray CLI calls, job drivers), whatever state
        they are in, within about ``budget`` s; returns the survivors (none expected)."""
        survivors = self.procs.stop_all(budget)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return survivors


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


@pytest.mark.skipif(not Path("/proc/self/environ").exists() or shutil.which("setsid") is None,
                    reason="reads Linux /proc; needs setsid")
def test_teardown_stops_every_process_the_test_started():
    """Fast check of the teardown: a child that ignores SIGTERM and a grandchild that left the session (and
    ignores SIGTERM too) are both found by the marker and stopped, within the budget; other processes are not."""
    procs = Processes(secrets.token_hex(8))
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        leader = procs.popen(["sh", "-c", 'trap "" TERM; setsid sleep 300 & sleep 300 & wait'])
        deadline = time.monotonic() + 20
        while len(procs.find()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = procs.find()
        assert len(found) == 3 and leader.pid in found and bystander.pid not in found, [describe(p) for p in found]
        outside = [pid for pid in found if pid not in procs.find(session=leader.pid)]
        assert len(outside) == 1  # the setsid'd sleep: not in the session, found by the marker
        t0 = time.monotonic()
        assert procs.stop_all(budget=30, grace=1) == []
        assert time.monotonic() - t0 < 30
        for pid in found:  # gone, or a zombie waiting for whoever adopted it
            with contextlib.suppress(OSError):
                assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"), describe(pid)
        assert leader.poll() is not None and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


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

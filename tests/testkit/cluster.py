"""A real multi-node Ray cluster on this machine for the tests: head (learner_node) + rollout nodes and an
MLflow server, every process found again by a marker in its environment and stopped by its own ids
(never ``ray stop``). Used by ``tests/slow/test_multinode.py``; the teardown itself is checked by
``tests/runtime/test_process_teardown.py``."""

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

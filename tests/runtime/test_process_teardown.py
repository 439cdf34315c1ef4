"""The teardown of the multi-node test harness (``tests/testkit/cluster.py``): every process a test started is
found by its marker and stopped, also one that left the session; other processes are left alone."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from testkit.cluster import Processes, describe


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

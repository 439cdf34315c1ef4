"""Reliability (issue 15): resume writes only where it was pointed, nothing hangs, every bad input is one line.

Most tests drive the decision functions (resume planning, store checks, the cluster-fit rule) or stop before Ray;
three start Ray: the loopback-only check, the infeasible ``train``, and one SIGTERM-then-resume run.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dromo_ray.cli import main
from dromo_ray.config import dump_config, load_config
from dromo_ray.core.config import to_dict
from dromo_ray.core.messages import plain_message
from dromo_ray.errors import ConfigError
from dromo_ray.runtime.checkpoint import CheckpointError
from dromo_ray.runtime.cluster import Cluster, check_run_fits, start_ray
from dromo_ray.tracking import TrackingError, check_tracking_store
from dromo_ray.train import plan_resume

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"


def _cfg(dataset, out, *extra):
    return load_config(TINY, [f"data.dataset={dataset}", f"out_dir={out}", *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _fake_state(cfg, run_dir: Path | None = None) -> dict:
    state = {"driver": {"step": 50, "round": 1, "evals": [], "rng": {}}, "config": to_dict(cfg), "env": "hopper",
             "dynamics": {}, "behavior": None, "density": None, "learner": {}, "replay": {}}
    if run_dir is not None:
        state["run_dir"] = str(run_dir.resolve())
    return state


def _fake_run(cfg, run_dir: Path, run_id: str = "0123") -> Path:
    """A run directory laid out as train() writes it, with one checkpoint."""
    ck = run_dir / "checkpoints" / "step_000000050"
    ck.mkdir(parents=True)
    torch.save(_fake_state(cfg, run_dir), ck / "state.pt")
    (run_dir / "checkpoints" / "latest").write_text(ck.name)
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "mlflow_run_id").write_text(run_id)
    return ck


def _tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


# ---- C: non-finite numbers are config errors (core/config.py _coerce) --------------------------------------

@pytest.mark.parametrize("override, key", [("agent.batch_size=.inf", "agent.batch_size"),
                                           ("rollout.horizon=.nan", "rollout.horizon"),
                                           ("agent.actor_lr=.nan", "agent.actor_lr"),
                                           ("agent.alpha=-.inf", "agent.alpha")])
def test_non_finite_numbers_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TINY, [override])


def test_non_finite_int_in_yaml_is_one_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(TINY.read_text().replace("total_steps: 100", "total_steps: .inf"))
    assert main(["train", str(f)]) == 2
    assert "train.total_steps" in _one_line(capsys)


# ---- A: resume resolves its run directory from the checkpoint and writes nothing when it refuses -------------

def test_stray_checkpoint_never_makes_its_surroundings_a_run(tiny_hopper_hdf5, tmp_path, capsys):
    cfg = _cfg(tiny_hopper_hdf5, tmp_path / "runs")
    home = tmp_path / "home"
    ck = home / "some" / "dir" / "ckpt"
    ck.mkdir(parents=True)
    torch.save(_fake_state(cfg), ck / "state.pt")
    (home / "config.yaml").write_text("mine: true\n")
    before = _tree(home)
    with pytest.raises(CheckpointError, match="not inside the run directory"):
        plan_resume(cfg, ck / "state.pt")
    cfg_file = tmp_path / "c.yaml"
    dump_config(cfg, cfg_file)
    assert main(["train", str(cfg_file), "--resume", str(ck / "state.pt")]) == 2
    assert "not inside the run directory" in _one_line(capsys)
    assert _tree(home) == before and not (tmp_path / "runs").exists()


def test_resume_by_run_name_and_by_any_path_of_the_run(tiny_hopper_hdf5, tmp_path):
    out = tmp_path / "runs"
    cfg = _cfg(tiny_hopper_hdf5, out)
    ck = _fake_run(cfg, out / "run1")
    for target in ("run1", out / "run1", out / "run1" / "checkpoints", ck, ck / "state.pt"):
        plan = plan_resume(cfg, target)
        assert plan.run_dir.resolve() == (out / "run1").resolve() and plan.mlflow_run_id == "0123"
        assert plan.checkpoint["driver"]["step"] == 50


def test_moved_run_directory_still_resumes_in_place(tiny_hopper_hdf5, tmp_path):
    cfg = _cfg(tiny_hopper_hdf5, tmp_path)
    _fake_run(cfg, tmp_path / "a" / "run1")
    (tmp_path / "a" / "run1").rename(tmp_path / "run1")
    assert plan_resume(cfg, tmp_path / "run1").run_dir == tmp_path / "run1"


def test_rejected_resume_changes_neither_files_nor_mlflow(tiny_hopper_hdf5, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("tiny"))
    client.set_terminated(run.info.run_id, "FINISHED")
    cfg = _cfg(tiny_hopper_hdf5, tmp_path / "runs")
    _fake_run(cfg, tmp_path / "runs" / "run1", run.info.run_id)
    cfg_file = tmp_path / "c.yaml"
    dump_config(cfg, cfg_file)
    before = _tree(tmp_path / "runs")
    capsys.readouterr()
    code = main(["train", str(cfg_file), "--resume", "run1", "--tracking-uri", uri,
                 "--set", "agent.hidden_dims=[64,64]"])
    assert code == 2 and "agent.hidden_dims" in _one_line(capsys)
    assert _tree(tmp_path / "runs") == before
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_failed_resume_with_default_store_leaves_no_out_dir(tiny_hopper_hdf5, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_file = tmp_path / "c.yaml"
    dump_config(_cfg(tiny_hopper_hdf5, tmp_path / "fresh_out"), cfg_file)
    assert main(["train", str(cfg_file), "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint found" in _one_line(capsys)
    assert not (tmp_path / "fresh_out").exists()


# ---- C: bad out_dir, bad tracking stores, bad evaluate input: one line, nothing created -----------------------

def test_out_dir_that_cannot_be_created(tiny_hopper_hdf5, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    cfg_file = tmp_path / "c.yaml"
    dump_config(_cfg(tiny_hopper_hdf5, tmp_path / "a_file" / "runs"), cfg_file)
    assert main(["train", str(cfg_file), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "out_dir: cannot create" in _one_line(capsys)
    assert not (tmp_path / "m.db").exists()


def test_sqlite_store_that_is_not_a_database(tiny_hopper_hdf5, tmp_path, capsys):
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n")
    cfg_file = tmp_path / "c.yaml"
    dump_config(_cfg(tiny_hopper_hdf5, tmp_path / "runs"), cfg_file)
    assert main(["train", str(cfg_file), "--tracking-uri", f"sqlite:///{junk}"]) == 2
    assert "not an SQLite database" in _one_line(capsys)
    assert main(["report", "--experiment", "x", "--tracking-uri", f"sqlite:///{junk}"]) == 2
    assert "not an SQLite database" in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_report_on_a_missing_store_creates_nothing(tmp_path, capsys):
    db = tmp_path / "nope.db"
    assert main(["report", "--experiment", "x", "--tracking-uri", f"sqlite:///{db}", "--out",
                 str(tmp_path / "rep")]) == 2
    assert "no MLflow store" in _one_line(capsys)
    assert not db.exists() and not (tmp_path / "rep").exists()


def test_unreachable_tracking_server_fails_fast_naming_the_uri():
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="http://127.0.0.1:9"):
        check_tracking_store("http://127.0.0.1:9")
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("n", ["0", "-3"])
def test_evaluate_needs_a_positive_episode_count(n, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--episodes", n]) == 2
    assert "--episodes" in _one_line(capsys)


def test_evaluate_on_a_safe_but_wrong_checkpoint(tmp_path, capsys):
    torch.save({"driver": {"step": 1}}, tmp_path / "state.pt")
    assert main(["evaluate", str(tmp_path)]) == 2
    line = _one_line(capsys)
    assert "not a complete dromo_ray checkpoint" in line and "env" in line


# ---- B + C: one feasibility rule for train and sweep, GPU requests included -----------------------------------

def test_run_that_cannot_fit_names_the_key(tmp_path):
    two = Cluster(total={"CPU": 2.0}, max_node={"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"runtime.dynamics_trainer_cpus: one run needs 192 CPUs but the cluster "
                                          r"has 2"):
        check_run_fits(load_config(TINY, ["runtime.dynamics_trainer_cpus=64"]), two)
    with pytest.raises(ConfigError, match="device: cuda is requested but the cluster has no GPU"):
        check_run_fits(load_config(TINY, ["device=cuda"]), two)
    check_run_fits(load_config(TINY), two)  # the tiny config fits two CPUs


@pytest.mark.ray
def test_train_refuses_a_run_the_cluster_cannot_hold(tiny_hopper_hdf5, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg_file = tmp_path / "c.yaml"
    dump_config(_cfg(tiny_hopper_hdf5, tmp_path / "runs"), cfg_file)
    code = main(["train", str(cfg_file), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 "--set", "runtime.dynamics_trainer_cpus=64"])
    err = capsys.readouterr().err  # (Ray prints its own start-up banner)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("dromo-ray train: error: runtime.dynamics_trainer_cpus: one run "
                                                   "needs 192 CPUs but the cluster has")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


# ---- E: a local Ray listens on loopback only -----------------------------------------------------------------

def _listening_sockets(pids: set[int]) -> list[tuple[str, str]]:
    """(process name, address) of every listening TCP socket of ``pids`` (Linux /proc)."""
    inodes: dict[str, str] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = name
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(f[1].split(":")[0])
                addr = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
                out.append((inodes[f[9]], str(ipaddress.ip_address(addr))))
    return out


def _descendants(root: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in found and p not in found}
        found |= new
        grew = bool(new)
    return found


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.is_loopback or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
def test_local_ray_listens_on_loopback_only(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized() and start_ray(num_cpus=1)
    try:
        @ray.remote(num_cpus=0.1)
        class Probe:
            def pid(self) -> int:
                return os.getpid()

        probe = Probe.remote()
        ray.get(probe.pid.remote())  # a worker with its own gRPC server exists
        socks = _listening_sockets(_descendants(os.getpid()))
    finally:
        ray.shutdown()
    names = {n for n, _ in socks}
    assert any("gcs" in n for n in names) and any("raylet" in n for n in names), socks
    assert all(_loopback(a) for _, a in socks), [s for s in socks if not _loopback(s[1])]
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"  # set by `import dromo_ray`


# ---- C + D: SIGTERM stops cleanly and keeps the checkpoint; resuming by name clears the kill ------------------

def test_plain_messages():
    assert plain_message("\x1b[31mray::Learner\x1b[0m loss np.float32(nan) at np.int64(3)") == \
        "ray::Learner loss nan at 3"


@pytest.mark.ray
def test_sigterm_is_a_clean_kill_and_resume_by_name_finishes(tiny_hopper_hdf5, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg_file = tmp_path / "c.yaml"
    dump_config(_cfg(tiny_hopper_hdf5, out, "tracking.run_name=r1", "train.total_steps=100000",
                     "train.checkpoint_interval=25", "train.eval_interval=100000"), cfg_file)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dromo_ray.cli", "train", str(cfg_file), "--tracking-uri", uri,
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 400
        while not (out / "r1" / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dromo-ray train: terminated; checkpoint ") and "--resume" in last, err
    assert "Traceback" not in err
    # the console shows the run, not Ray's internals: no restartable actor has an object-store constructor argument
    assert "constructor arguments in the object store" not in err, err
    client = MlflowClient(tracking_uri=uri)
    run_id = (out / "r1" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "failure_reason" in run.data.tags
    step = int((out / "r1" / "checkpoints" / "latest").read_text().split("_")[1])

    capsys.readouterr()
    assert main(["train", str(cfg_file), "--resume", "r1", "--tracking-uri", uri,
                 "--set", f"train.total_steps={step + 25}"]) == 0
    done = capsys.readouterr().out.splitlines()[0]
    assert f"{step + 25} updates (25 in this session, resumed at step {step}" in done, done
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags


def test_a_kill_stays_a_kill_when_the_store_cannot_mark_it(caplog):
    """SIGTERM inside one of MLflow's SQLite transactions leaves the store locked for this process; marking the run
    KILLED then fails, and that failure must not replace the kill (exit 143, checkpoint kept) by another error."""
    from dromo_ray.train import _end_interrupted

    class LockedTracker:
        calls: list[tuple[str, str]] = []

        def end(self, status, reason):
            self.calls.append((status, reason))
            raise RuntimeError("(sqlite3.OperationalError) database is locked\n(Background on this error ...)")

    tracker = LockedTracker()
    with caplog.at_level("WARNING", logger="dromo_ray.train"):
        _end_interrupted(tracker, "KILLED", "Terminated")  # returns: the caller re-raises the kill itself
    assert tracker.calls == [("KILLED", "Terminated")]
    assert "could not mark the MLflow run KILLED" in caplog.text and "database is locked" in caplog.text
    assert "Background" not in caplog.text  # one line, not the store's traceback


def test_driver_tag_write_survives_the_trial_writing_the_same_tag(tmp_path):
    """The sweep's driver and the trial's own process both set ``failure_reason`` when a sweep stops; the second
    insert of the same (key, run) row can fail in MLflow's SQL store. The driver sets it again, and its value
    stays; a store that keeps failing still raises."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dromo_ray.tracking import mark_killed, set_tag_racing

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("race")).info.run_id
    calls = []

    class Racing:
        """A client whose first set_tag loses the race (the trial inserted the row first)."""

        def __getattr__(self, name):
            return getattr(client, name)

        def set_tag(self, rid, key, value):
            calls.append(key)
            if len(calls) == 1:
                client.set_tag(rid, key, "the trial's own reason")
                raise MlflowException("UNIQUE constraint failed: tags.key, tags.run_uuid")
            client.set_tag(rid, key, value)

    mark_killed(Racing(), run_id, "sweep interrupted")
    run = client.get_run(run_id)
    assert calls == ["failure_reason", "failure_reason"]
    assert run.data.tags["failure_reason"] == "sweep interrupted" and run.info.status == "KILLED"

    class Broken:
        def set_tag(self, rid, key, value):
            raise MlflowException("database is locked")

    with pytest.raises(MlflowException, match="locked"):
        set_tag_racing(Broken(), run_id, "k", "v")

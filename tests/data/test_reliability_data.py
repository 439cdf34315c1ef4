"""Reliability (issue 15, second half): interrupted writes leave nothing, every bad input is one line.

Unit-level: tiny files, no training. Three kinds of subprocess: ``collect`` sent SIGTERM mid-write, and a command
sent Ctrl-C / SIGTERM while it is still importing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dromo_ray.cli import Terminated, main
from dromo_ray.data.dataset import OfflineDataset
from dromo_ray.errors import DatasetError

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _hidden(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*"))


def _tiny_ds(n: int = 6, actions: np.ndarray | None = None) -> OfflineDataset:
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((n + 1, 11)).astype(np.float32)
    term = np.zeros(n, bool)
    term[-1] = True
    starts = np.zeros(n, bool)
    starts[0] = True
    return OfflineDataset(obs[:-1], rng.uniform(-1, 1, (n, 3)) if actions is None else actions,
                          rng.standard_normal(n), obs[1:], term, np.zeros(n, bool), starts, "hopper", "tiny")


# ---- 1: an interrupted atomic write leaves no temporary file, whatever the writer -----------------------------

def _write_d4rl(d: Path) -> Path:
    from dromo_ray.data.d4rl_io import write_d4rl

    write_d4rl(_tiny_ds(), d / "x.hdf5")
    return d / "x.hdf5"


def _save_policy(d: Path) -> Path:
    from dromo_ray.core.nets import TanhGaussianActor
    from dromo_ray.data.policy_io import save_policy

    save_policy(d / "p.pt", TanhGaussianActor(11, 3, (4,)))
    return d / "p.pt"


def _online_sac_json(d: Path) -> Path:
    from dromo_ray.data.online_sac import _write_json

    _write_json(d / "index.json", {"a": 1})
    return d / "index.json"


def _replay_actions(d: Path) -> Path:
    from dromo_ray.data.online_sac import save_replay_actions

    save_replay_actions(d / "r.npz", "hopper", np.zeros((3, 3), np.float32), 0)
    return d / "r.npz"


def _behavior_json(d: Path) -> Path:
    from dromo_ray.rllib.sac import _write_json

    _write_json(d / "index.json", {"a": 1})
    return d / "index.json"


def _parquet(d: Path) -> Path:
    from dromo_ray.rllib.cql import dataset_to_parquet

    dataset_to_parquet(_tiny_ds(), d)
    return d / "data.parquet"


def _checkpoint(d: Path) -> Path:
    from dromo_ray.runtime.checkpoint import save_checkpoint

    save_checkpoint(d, 5, {"driver": {"step": 5}})
    return d / "checkpoints" / "latest"


@pytest.mark.parametrize("write", [_write_d4rl, _save_policy, _online_sac_json, _replay_actions, _behavior_json,
                                   _parquet, _checkpoint], ids=lambda f: f.__name__.strip("_"))
def test_sigterm_at_the_rename_leaves_no_temporary_file(write, tmp_path, monkeypatch):
    """SIGTERM (as ``cli.Terminated``) lands after the temporary file is complete, just before it is renamed
    over the target: the worst moment. Every atomic writer of the package removes it."""
    real = os.replace
    (tmp_path / "ok").mkdir()
    (tmp_path / "cut").mkdir()
    target = write(tmp_path / "ok")  # the writer works, and names its target
    hit = []

    def replace(src, dst):
        if Path(dst).name == target.name:
            hit.append(src)
            raise Terminated()
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Terminated):
        write(tmp_path / "cut")
    monkeypatch.undo()
    assert hit, "the writer did not rename a temporary file over its target"
    assert _hidden(tmp_path / "cut") == [] and not (tmp_path / "cut" / target.relative_to(tmp_path / "ok")).exists()


_SLOW_WRITE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import h5py
    real = h5py.Group.create_dataset
    def create_dataset(self, name, *a, **k):  # the file is half-written; tell the test, then take long
        out = real(self, name, *a, **k)
        if name == "observations":
            Path(sys.argv[2]).write_text("writing")
            time.sleep(60)
        return out
    h5py.Group.create_dataset = create_dataset
    from dromo_ray.cli import main
    sys.exit(main(["collect", "--env", "hopper", "--steps", "20", "--out", sys.argv[1]]))
""")


def test_sigterm_while_collect_writes_removes_the_temp_file_and_exits_143(tmp_path):
    out, flag = tmp_path / "out" / "h.hdf5", tmp_path / "writing"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(out), str(flag)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists() and _hidden(out.parent), proc.communicate(timeout=5)  # mid-write: a temp file
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["dromo-ray collect: terminated"], err
    assert os.listdir(out.parent) == []


# ---- 5: Ctrl-C or SIGTERM while the command is still importing: one line, 130 / 143 ---------------------------

_STARTING = textwrap.dedent("""
    import sys
    import dromo_ray.cli as cli  # light: what the dromo-ray script imports before main()
    print("ready", flush=True)
    sys.exit(cli.main(["bench", "dynamics", "--seconds", "30"]))
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_the_first_imports_is_one_line(sig, code, word):
    # (a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: give the
    # child the default disposition, as a terminal's foreground process has)
    proc = subprocess.Popen([sys.executable, "-c", _STARTING], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # main() runs; torch and the command's modules are being imported
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    lines = err.strip().splitlines()  # (on a busy machine the signal can land while the parser is built)
    assert lines in ([f"dromo-ray bench: {word}"], [f"dromo-ray: {word}"]), err


# ---- 3: a dataset that cannot fit in memory is refused from its declared shapes, before reading --------------

def test_a_dataset_larger_than_memory_says_how_big_it_is(tmp_path, capsys):
    from dromo_ray.data.d4rl_io import available_memory, read_d4rl

    rows = max(10**9, 4 * (available_memory() or 0) // 44)  # 44 bytes per row of observations: > 4x memory
    path = tmp_path / "huge.hdf5"
    with h5py.File(path, "w") as f:  # chunked and never written: a few KB on disk
        for key, width, dtype in (("observations", 11, "f4"), ("actions", 3, "f4"), ("rewards", 0, "f4"),
                                  ("terminals", 0, "bool"), ("timeouts", 0, "bool")):
            shape = (rows, width) if width else (rows,)
            f.create_dataset(key, shape=shape, dtype=dtype, chunks=(4096, width) if width else (4096,))
    assert path.stat().st_size < 1e6
    with pytest.raises(DatasetError, match=rf"\[observations\]: too large for this machine: observations alone "
                                           rf"declares shape \({rows}, 11\) float32 = [0-9.]+ GB, the arrays "
                                           r"together [0-9.]+ GB, but only [0-9.]+ [GM]B of memory is available"):
        read_d4rl(path)
    assert main(["data", "info", str(path)]) == 2
    assert "too large for this machine" in _one_line(capsys)


# ---- 4: benchmark arguments that cannot work are one line, exit 2 -------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["bench", "learner", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["bench", "learner", "--batch", "1"], "--batch: must be >= 2"),
    (["bench", "learner", "--device", "tpu"], "--device tpu: unknown device"),
    (["bench", "learner", "--device", "cuda:abc"], "--device cuda:abc: unknown device"),
    (["bench", "dynamics", "--seconds", "-1"], "--seconds: must be > 0, got -1"),
    (["bench", "dynamics", "--seconds", "nan"], "--seconds: must be > 0, got nan"),
    (["bench", "dynamics", "--threads", "-2"], "--threads: must be >= 0"),
    (["bench", "behavior", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["bench", "behavior", "--rllib-fragment", "0"], "--rllib-fragment: must be >= 1"),
    (["bench", "pipeline", "--steps", "0"], "--steps: must be >= 1, got 0"),
])
def test_bench_rejects_arguments_that_cannot_work(argv, flag, capsys):
    assert main(argv) == 2
    assert _one_line(capsys).startswith(f"dromo-ray bench: error: {flag}")


# ---- 6: accepted silently before: tau 0, unbounded actions, terminal + timeout rows, unreadable files ----------

def test_tau_zero_is_a_config_error():
    from dromo_ray.config import load_config
    from dromo_ray.errors import ConfigError

    tiny = ROOT / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"
    with pytest.raises(ConfigError, match="agent.tau: must be > 0"):
        load_config(tiny, ["agent.tau=0"])
    assert load_config(tiny, ["agent.tau=1"]).agent.tau == 1.0


def test_actions_outside_the_box_are_refused_unless_allowed(tmp_path, capsys):
    from dromo_ray.config import dump_config, load_config
    from dromo_ray.data.d4rl_io import read_d4rl, write_d4rl
    from dromo_ray.data.load import load_dataset

    act = np.zeros((6, 3), np.float32)
    act[2, 1] = 1.5
    path = write_d4rl(_tiny_ds(actions=act), tmp_path / "hopper_wide.hdf5")
    with pytest.raises(DatasetError, match=r"\[actions\]: actions leave the action box \[-1, 1\] of Hopper-v5: "
                                           r"\|a\| reaches 1.5 \(1 rows, the first is row 2, dim 1\)"):
        read_d4rl(path)
    assert load_dataset(str(path), allow_unbounded_actions=True).actions[2, 1] == 1.5
    edge = np.full((6, 3), -1.0, np.float32)  # exactly on the box: D4RL's clipped actions load
    assert len(read_d4rl(write_d4rl(_tiny_ds(actions=edge), tmp_path / "hopper_edge.hdf5"))) == 6

    assert main(["data", "info", str(path)]) == 2
    assert "data.allow_unbounded_actions" in _one_line(capsys)
    assert main(["data", "info", str(path), "--allow-unbounded-actions", "--json"]) == 0
    capsys.readouterr()
    # train: refused with the dataset's line; with data.allow_unbounded_actions it gets past the dataset (and stops
    # at the next check, an out_dir that cannot be created, before Ray or MLflow start)
    (tmp_path / "a_file").write_text("x")
    cfg = tmp_path / "c.yaml"
    dump_config(load_config(ROOT / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml",
                            [f"data.dataset={path}", f"out_dir={tmp_path / 'a_file' / 'runs'}"]), cfg)
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main(["train", str(cfg), *uri]) == 2
    assert "action box" in _one_line(capsys)
    assert main(["train", str(cfg), *uri, "--set", "data.allow_unbounded_actions=true"]) == 2
    assert "out_dir: cannot create" in _one_line(capsys)


def test_a_row_both_terminal_and_timeout_is_terminal(tmp_path):
    from dromo_ray.data.d4rl_io import read_d4rl, write_d4rl

    ds = _tiny_ds()
    timeouts = ds.terminals.copy()  # the last row: terminal and timeout
    both = OfflineDataset(ds.observations, ds.actions, ds.rewards, ds.next_observations, ds.terminals, timeouts,
                          ds.episode_starts, "hopper", "tiny")
    path = write_d4rl(both, tmp_path / "hopper_both.hdf5")
    with pytest.warns(UserWarning, match="1 rows are flagged both terminal and timeout .*read as terminal"):
        got = read_d4rl(path)
    assert got.terminals[-1] and not got.timeouts[-1] and got.metadata["terminal_and_timeout_rows"] == 1
    assert got.as_numpy_batch(slice(None)).done[-1] == 1.0  # no bootstrap
    again = read_d4rl(write_d4rl(got, tmp_path / "hopper_again.hdf5"))  # resolved once, written resolved
    assert "terminal_and_timeout_rows" not in again.metadata and not (again.terminals & again.timeouts).any()


def test_an_unreadable_dataset_says_permission_denied(tmp_path):
    from dromo_ray.data.d4rl_io import write_d4rl

    path = write_d4rl(_tiny_ds(), tmp_path / "hopper_locked.hdf5")
    path.chmod(0)
    try:
        prefix: list[str] = []
        if os.access(path, os.R_OK):  # root: chmod does not stop it; drop the capabilities that let it read
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root and no setpriv to drop CAP_DAC_OVERRIDE")
            prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
        proc = subprocess.run([*prefix, sys.executable, "-m", "dromo_ray.cli", "data", "info", str(path)], env=ENV,
                              capture_output=True, text=True, timeout=120)
    finally:
        path.chmod(0o644)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"dromo-ray data: error: {path}: permission denied: the file is "
                                                "not readable by this user (check its permissions)"], proc.stderr


# ---- 2: RLlib writes inside the run's directory, never ~/ray_results; the rllib backend wants a fresh --out ----

def test_rllib_algorithms_log_inside_the_run_directory(tmp_path, monkeypatch):
    import ray.tune.trainable.trainable as trainable_mod
    from ray.tune import Trainable

    from dromo_ray.rllib.algo import build_algo_in

    default = tmp_path / "home" / "ray_results"
    monkeypatch.setattr(trainable_mod, "DEFAULT_STORAGE_PATH", str(default))  # where RLlib would write

    class Probe(Trainable):
        def setup(self, config):
            self.seen = dict(config)

        def step(self):
            return {}

    class Config(dict):  # the two things build_algo_in reads of an AlgorithmConfig
        algo_class = Probe

    Probe(config={}).stop()  # RLlib's default: a new directory under ~/ray_results
    assert len(list(default.iterdir())) == 1
    algo = build_algo_in(Config(lr=1), tmp_path / "run" / "rllib_logs")
    assert isinstance(algo, Probe) and type(algo).__name__ == "Probe" and algo.seen == {"lr": 1}
    assert algo.logdir == str((tmp_path / "run" / "rllib_logs").resolve()) and Path(algo.logdir).is_dir()
    algo.stop()
    assert len(list(default.iterdir())) == 1  # nothing new there


def test_rllib_backend_refuses_an_out_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["behavior", "train", "--backend", "rllib", "--env", "hopper", "--steps", "10", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "is not an empty directory; choose a fresh --out" in _one_line(capsys)
    assert os.listdir(tmp_path) == ["notes.txt"]

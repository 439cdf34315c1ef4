"""Every bad dataset input is one DatasetError naming file, key and problem; the CLI prints one line and
exits 2; collect leaves nothing behind when it fails or is interrupted."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dromo_ray.cli import main
from dromo_ray.data.load import load_dataset
from dromo_ray.errors import DatasetError

ROWS = 200


@pytest.fixture(scope="module")
def base(tiny_hopper_hdf5) -> dict[str, np.ndarray]:
    """The first ROWS rows of the tiny Hopper file (ends with a partial episode: still valid)."""
    with h5py.File(tiny_hopper_hdf5, "r") as f:
        return {k: f[k][:ROWS] for k in ("observations", "actions", "rewards", "next_observations",
                                        "terminals", "timeouts")}


def _write(path: Path, data: dict) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    return path


def _interior_row(data) -> int:
    ends = data["terminals"] | data["timeouts"]
    return int(np.flatnonzero(~ends[:-1])[3])


def _mutated(name: str, data: dict) -> dict:
    d = {k: v.copy() for k, v in data.items()}
    if name == "missing_key":
        del d["rewards"]
    elif name == "length_mismatch":
        d["actions"] = d["actions"][:-1]
    elif name == "wrong_rank":
        d["rewards"] = np.stack([d["rewards"], d["rewards"]], axis=1)
    elif name == "obs_rank":
        d["observations"] = d["observations"][:, :, None]
    elif name == "non_numeric":
        d["terminals"] = np.array([b"no"] * ROWS)
    elif name == "nan_obs":
        d["observations"][7, 2] = np.nan
    elif name == "inf_actions":
        d["actions"][9, 0] = np.inf
    elif name == "non_boolean_terminals":
        d["terminals"] = d["terminals"].astype(np.float32)
        d["terminals"][11] = 2.0
    elif name == "non_boolean_timeouts":
        d["timeouts"] = d["timeouts"].astype(np.int64)
        d["timeouts"][4] = -1
    elif name == "action_dims":
        d["actions"] = np.concatenate([d["actions"], d["actions"][:, :1]], axis=1)
    elif name == "inconsistent_next_obs":
        d["next_observations"][_interior_row(d), 0] += 0.5
    elif name == "no_rows":
        d = {k: v[:0] for k, v in d.items()}
    elif name == "group_not_array":
        d["rewards"] = None
    return d


CASES = [
    # (case, key named in the error, words of the problem)
    ("missing_key", "rewards", "missing required key"),
    ("length_mismatch", "actions", "rows but observations has"),
    ("wrong_rank", "rewards", "must be 1-D"),
    ("obs_rank", "observations", "must be 2-D"),
    ("non_numeric", "terminals", "non-numeric dtype"),
    ("nan_obs", "observations", "NaN or inf (first at row 7)"),
    ("inf_actions", "actions", "NaN or inf (first at row 9)"),
    ("non_boolean_terminals", "terminals", "must be boolean (0/1)"),
    ("non_boolean_timeouts", "timeouts", "must be boolean (0/1)"),
    ("action_dims", "actions", "hopper (Hopper-v5) actions have 3"),
    ("inconsistent_next_obs", "next_observations", "differs from observations"),
    ("no_rows", "observations", "has no rows"),
    ("group_not_array", "rewards", "is a group"),
]


def _assert_cli_one_line(capsys, spec: str, *extra: str) -> str:
    capsys.readouterr()
    assert main(["data", "info", spec, *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("dromo-ray data: error: ")
    return lines[0]


@pytest.mark.parametrize("case,key,problem", CASES, ids=[c[0] for c in CASES])
def test_bad_arrays(base, tmp_path, capsys, case, key, problem):
    data = _mutated(case, base)
    path = tmp_path / f"hopper_{case}.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if v is None:
                f.create_group(k).create_dataset("x", data=np.zeros(3))
            else:
                f.create_dataset(k, data=v)
    with pytest.raises(DatasetError) as e:
        load_dataset(str(path))
    assert e.value.key == key and problem in e.value.problem and e.value.source == str(path)
    line = _assert_cli_one_line(capsys, str(path))
    assert str(path) in line and f"[{key}]" in line and problem in line


def test_observation_size_of_named_env(base, tmp_path, capsys):
    path = _write(tmp_path / "hopper_ok.hdf5", base)
    assert len(load_dataset(str(path))) == ROWS
    with pytest.raises(DatasetError, match=r"rows have 11 dims but walker2d \(Walker2d-v5\)") as e:
        load_dataset(str(path), env="walker2d")
    assert e.value.key == "observations"
    _assert_cli_one_line(capsys, str(path), "--env", "walker2d")
    with pytest.raises(DatasetError, match="unknown environment 'ant'"):
        load_dataset(str(path), env="ant")


def test_bad_files(tiny_hopper_hdf5, tmp_path, capsys):
    missing = tmp_path / "nope.hdf5"
    empty = tmp_path / "empty.hdf5"
    empty.touch()
    text = tmp_path / "text.hdf5"
    text.write_text("observations,actions\n1,2\n")
    truncated = tmp_path / "truncated.hdf5"
    blob = Path(tiny_hopper_hdf5).read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    directory = tmp_path / "adir.hdf5"
    directory.mkdir()
    cases = [(missing, "does not exist"), (empty, "file is empty"), (text, "not an HDF5 file"),
             (truncated, "truncated"), (directory, "is a directory")]
    for path, problem in cases:
        with pytest.raises(DatasetError, match=problem) as e:
            load_dataset(str(path))
        assert e.value.source == str(path)
        assert problem in _assert_cli_one_line(capsys, str(path))


def test_missing_names(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert "hopper_medium-v2.hdf5" in _assert_cli_one_line(capsys, "hopper-medium-v2")
    assert "no local Minari dataset" in _assert_cli_one_line(capsys, "minari:dromo/hopper-medium-v0")
    assert "malformed" in _assert_cli_one_line(capsys, "minari:not an id")
    bad = tmp_path / "minari" / "dromo" / "broken-v0" / "data"
    bad.mkdir(parents=True)
    (bad / "metadata.json").write_text("{not json")
    assert "cannot read the Minari dataset" in _assert_cli_one_line(capsys, "minari:dromo/broken-v0")


def test_unwritable_output(tmp_path, capsys):
    args = ["collect", "--env", "hopper", "--steps", "10", "--out"]
    assert main(args + [str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(args + [str(blocker / "out.hdf5")]) == 2  # parent is a file
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write" in err


def test_bad_policy_file(tmp_path, capsys):
    policy = tmp_path / "policy.pt"
    policy.write_bytes(b"not torch")
    out = tmp_path / "out.hdf5"
    args = ["collect", "--env", "hopper", "--steps", "10", "--policy", str(policy), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a dromo_ray policy file" in err
    assert not out.exists()


# ---- nothing left behind ----------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("simulated MuJoCo failure")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_collect_failure_leaves_no_file(tmp_path, monkeypatch, capsys):
    from gymnasium.envs.mujoco.hopper_v5 import HopperEnv

    out = tmp_path / "out" / "hopper.hdf5"
    args = ["collect", "--env", "hopper", "--steps", "50", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(HopperEnv, "step", _boom)
        with pytest.raises(RuntimeError, match="simulated"):
            main(args)
    with monkeypatch.context() as m:
        m.setattr(HopperEnv, "step", _interrupt)
        assert main(args) == 130
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "hopper.hdf5"
    calls = {"n": 0}
    real = h5py.Group.create_dataset

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", flaky)
    assert main(["collect", "--env", "hopper", "--steps", "50", "--out", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_interrupted_minari_write_leaves_nothing(tmp_path, monkeypatch):
    from minari.dataset._storages.hdf5_storage import HDF5Storage

    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setattr(HDF5Storage, "update_episodes", _interrupt)
    assert main(["collect", "--env", "hopper", "--steps", "50", "--format", "minari",
                 "--out", "dromo/hopper-random-v0"]) == 130
    assert not root.exists() or list(root.iterdir()) == []

"""Offline datasets: collect -> load round trips (D4RL HDF5 and Minari), data info, episode ends, names."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from dromo_ray.cli import main
from dromo_ray.core.types import NumpyBatch
from dromo_ray.data.d4rl_io import read_d4rl, write_d4rl
from dromo_ray.data.dataset import STD_FLOOR, OfflineDataset
from dromo_ray.data.gym_env import collect_transitions, make_env
from dromo_ray.data.info import dataset_info
from dromo_ray.data.load import d4rl_filenames, load_dataset
from dromo_ray.errors import DatasetError

ARRAYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts",
          "episode_starts")


def _raw(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                      "next_observations")}


def _rewrite(src, dst, drop=(), **replace) -> None:
    """Copy the top-level arrays of ``src`` to ``dst``, minus ``drop``, with ``replace`` substituted."""
    with h5py.File(src, "r") as f:
        data = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
    data.update(replace)
    with h5py.File(dst, "w") as f:
        for k, v in data.items():
            if k not in drop:
                f.create_dataset(k, data=v)


# ---- round trips through the CLI --------------------------------------------------------------------------


def test_collect_roundtrip_both_formats(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    out = tmp_path / "hop.hdf5"
    common = ["collect", "--env", "hopper", "--steps", "400", "--seed", "3", "--noise", "0.1"]
    assert main(common + ["--out", str(out)]) == 0
    assert main(common + ["--out", "dromo/hopper-random-v0", "--format", "minari"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 400 transitions of Hopper-v5" in printed and str(out) in printed

    a = load_dataset(str(out))
    b = load_dataset("minari:dromo/hopper-random-v0")
    assert len(a) == len(b) == 400 and a.env_id == b.env_id == "hopper"
    for k in ARRAYS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert set(a.infos) == set(b.infos) == {"qpos", "qvel", "next_qpos", "next_qvel"}
    for k in a.infos:
        np.testing.assert_array_equal(a.infos[k], b.infos[k], err_msg=k)
    for meta in (a.metadata, b.metadata):
        assert meta["env_id"] == "Hopper-v5" and meta["seed"] == 3 and meta["steps"] == 400
        assert meta["policy"] == "random" and meta["noise"] == pytest.approx(0.1)
        assert {"gymnasium_version", "mujoco_version", "dromo_ray_version"} <= set(meta)
    # The same seed gives the same data: collection is deterministic.
    again = collect_transitions("hopper", "random", 400, seed=3, noise=0.1, progress=False)
    for k in ARRAYS:
        np.testing.assert_array_equal(getattr(a, k), getattr(again, k), err_msg=k)
    # No temp files left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hop.hdf5", "minari"]


def test_minari_id_must_be_new_and_wellformed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    args = ["collect", "--env", "halfcheetah", "--steps", "30", "--format", "minari"]
    assert main(args + ["--out", "dromo/cheetah-v0"]) == 0
    capsys.readouterr()
    assert main(args + ["--out", "dromo/cheetah-v0"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--out", "dromo/no-version"]) == 2
    assert "malformed Minari dataset id" in capsys.readouterr().err
    assert load_dataset("minari:dromo/cheetah-v0").env_id == "halfcheetah"


# ---- data info --------------------------------------------------------------------------------------------


def test_data_info_matches_hand_computation(tiny_hopper_hdf5, tiny_hopper_dataset, capsys):
    raw = _raw(tiny_hopper_hdf5)
    ends = np.flatnonzero(raw["terminals"] | raw["timeouts"])
    bounds = np.concatenate([[0], ends + 1])
    returns = [raw["rewards"][s:e].sum(dtype=np.float64)
               for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    partial = bounds[-1] < len(raw["rewards"])

    assert main(["data", "info", str(tiny_hopper_hdf5), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["transitions"] == len(raw["rewards"])
    assert info["episodes"] == len(returns) + int(partial)
    assert info["complete_episodes"] == len(returns)
    assert info["partial_last_episode"] == bool(partial)
    assert info["return_min"] == pytest.approx(min(returns))
    assert info["return_mean"] == pytest.approx(np.mean(returns))
    assert info["return_max"] == pytest.approx(max(returns))
    random_ret, expert_ret = -20.272305, 3234.3  # D4RL's Hopper references
    expected = 100 * (np.mean(returns) - random_ret) / (expert_ret - random_ret)
    assert info["normalized_score"] == pytest.approx(expected)
    assert (info["obs_dim"], info["act_dim"], info["env"]) == (11, 3, "hopper")
    assert info == json.loads(json.dumps(dataset_info(tiny_hopper_dataset)))

    assert main(["data", "info", str(tiny_hopper_hdf5)]) == 0
    table = capsys.readouterr().out
    assert "normalized_score" in table and f"{np.mean(returns):.2f}" in table


def test_dataset_api(tiny_hopper_dataset):
    ds = tiny_hopper_dataset
    batch = ds.sample(np.random.default_rng(0), 64)
    assert isinstance(batch, NumpyBatch) and batch.size == 64
    assert batch.obs.shape == (64, 11) and batch.act.shape == (64, 3) and batch.rew.shape == (64,)
    assert batch.done.dtype == np.float32 and set(np.unique(batch.done)) <= {0.0, 1.0}
    assert not batch.unc.any()
    again = ds.sample(np.random.default_rng(0), 64)
    np.testing.assert_array_equal(batch.obs, again.obs)
    idx = np.array([0, 5, 7])
    b = ds.as_numpy_batch(idx)
    np.testing.assert_array_equal(b.next_obs, ds.next_observations[idx])
    np.testing.assert_array_equal(b.done, ds.terminals[idx].astype(np.float32))
    assert ds.obs_mean.dtype == np.float32 and ds.obs_std.shape == (11,)
    np.testing.assert_allclose(ds.obs_mean, ds.observations.mean(0), rtol=1e-5, atol=1e-6)
    # a partial last episode is left out of episode_returns unless asked for
    assert ds.last_episode_partial
    assert len(ds.episode_returns()) == ds.num_episodes - 1
    assert len(ds.episode_returns(include_partial=True)) == ds.num_episodes
    assert ds.episode_returns(include_partial=True).sum() == pytest.approx(ds.rewards.sum(dtype=np.float64))


def test_dataset_pickles_for_the_object_store(tiny_hopper_dataset):
    import pickle

    ds = pickle.loads(pickle.dumps(tiny_hopper_dataset, protocol=5))
    for k in ARRAYS:
        np.testing.assert_array_equal(getattr(ds, k), getattr(tiny_hopper_dataset, k), err_msg=k)
    assert ds.env_id == "hopper" and ds.metadata == tiny_hopper_dataset.metadata


def test_obs_std_is_floored():
    n = 10
    obs = np.zeros((n, 11), np.float32)
    obs[:, 0] = np.arange(n)
    ds = OfflineDataset(obs, np.zeros((n, 3)), np.zeros(n), obs, np.zeros(n, bool), np.zeros(n, bool),
                        np.eye(1, n, dtype=bool)[0], "hopper")
    assert ds.obs_std[1] == pytest.approx(STD_FLOOR) and ds.obs_std[0] > 1.0


# ---- episode ends -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cheetah_timeouts(tmp_path_factory):
    """HalfCheetah (never terminates) with 20-step episodes: timeouts at rows 19, 39; partial 40..49."""
    ds = collect_transitions("halfcheetah", "random", 50, seed=1, progress=False, max_episode_steps=20)
    return ds, write_d4rl(ds, tmp_path_factory.mktemp("cheetah") / "halfcheetah_random-tiny.hdf5")


def _obs_from_state(env, qpos, qvel):
    env.unwrapped.set_state(qpos, qvel)
    return env.unwrapped._get_obs().astype(np.float32)


def test_timeout_next_observation_is_the_real_last_observation(cheetah_timeouts):
    collected, path = cheetah_timeouts
    ds = load_dataset(str(path))
    assert np.flatnonzero(ds.timeouts).tolist() == [19, 39]
    assert np.flatnonzero(ds.episode_starts).tolist() == [0, 20, 40]
    assert not ds.terminals.any() and ds.last_episode_partial
    env = make_env("halfcheetah")
    # infos are aligned: qpos/qvel is the state of observations[i], next_* of next_observations[i].
    for i in range(len(ds)):
        np.testing.assert_allclose(_obs_from_state(env, ds.infos["qpos"][i], ds.infos["qvel"][i]),
                                   ds.observations[i], atol=1e-6)
        np.testing.assert_allclose(_obs_from_state(env, ds.infos["next_qpos"][i], ds.infos["next_qvel"][i]),
                                   ds.next_observations[i], atol=1e-6)
    # The timeout row's successor is the state reached by its action, not the next episode's reset state.
    assert not np.allclose(ds.next_observations[19], ds.observations[20])
    # Inside an episode rows chain; no transition crosses an episode boundary.
    inside = ~(ds.terminals | ds.timeouts)[:-1]
    np.testing.assert_array_equal(ds.next_observations[:-1][inside], ds.observations[1:][inside])


def test_file_without_next_observations(cheetah_timeouts, tmp_path):
    full, path = cheetah_timeouts
    bare = tmp_path / "halfcheetah_bare.hdf5"
    _rewrite(path, bare, drop=("next_observations",))
    ds = read_d4rl(bare)
    # Rows whose successor is unknown are dropped: each episode's last row and the file's last row.
    kept = np.setdiff1d(np.arange(50), [19, 39, 49])
    assert len(ds) == 47 and ds.metadata["dropped_rows"] == 3
    np.testing.assert_array_equal(ds.observations, full.observations[kept])
    np.testing.assert_array_equal(ds.next_observations, full.next_observations[kept])  # the real successors
    np.testing.assert_array_equal(ds.rewards, full.rewards[kept])
    assert np.flatnonzero(ds.episode_starts).tolist() == [0, 19, 38]
    assert np.flatnonzero(ds.timeouts).tolist() == [18, 37]  # the kept episodes were cut there
    assert ds.last_episode_partial
    # What a naive q-learning conversion does: pair every row with observations[i + 1]. At the timeout
    # rows that is the first observation of the next episode, not the real successor.
    obs = full.observations
    naive_next = obs[1:]
    for t in (19, 39):
        assert not np.allclose(naive_next[t], full.next_observations[t])
        assert not any(np.array_equal(naive_next[t], row) for row in ds.next_observations)


def test_terminal_rows_without_next_observations(tiny_hopper_dataset, tiny_hopper_hdf5, tmp_path):
    bare = tmp_path / "hopper_bare.hdf5"
    _rewrite(tiny_hopper_hdf5, bare, drop=("next_observations",))
    with pytest.warns(UserWarning, match="terminal rows"):
        ds = read_d4rl(bare)
    full = tiny_hopper_dataset
    ends = full.terminals | full.timeouts
    ends[-1] = True
    assert len(ds) == len(full) - ends.sum()
    np.testing.assert_array_equal(ds.next_observations, full.next_observations[~ends])
    assert not ds.terminals.any() and ds.metadata["dropped_terminal_rows"] == full.terminals.sum()


# ---- names and environments -------------------------------------------------------------------------------


def test_d4rl_names(tiny_hopper_hdf5, tmp_path, monkeypatch):
    assert d4rl_filenames("hopper-medium-v2")[0] == "hopper_medium-v2.hdf5"
    assert d4rl_filenames("walker2d-medium-replay-v2")[0] == "walker2d_medium_replay-v2.hdf5"
    assert d4rl_filenames("halfcheetah-medium-expert-v2")[0] == "halfcheetah_medium_expert-v2.hdf5"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    # No env in the file's metadata: the D4RL name says hopper.
    _rewrite(tiny_hopper_hdf5, tmp_path / "hopper_medium-v2.hdf5")
    ds = load_dataset("hopper-medium-v2")
    assert ds.env_id == "hopper" and len(ds) == 1500
    with pytest.raises(DatasetError, match="nothing is downloaded"):
        load_dataset("hopper-expert-v2")


def test_env_inference(cheetah_timeouts, tmp_path):
    _, path = cheetah_timeouts
    assert read_d4rl(path).env_id == "halfcheetah"  # from metadata/env_key
    anon = tmp_path / "data.hdf5"
    shutil.copy(path, anon)
    with h5py.File(anon, "a") as f:
        del f["metadata"]
    # 17 observation dims fit both halfcheetah and walker2d: the user must say which.
    with pytest.raises(DatasetError, match="pass --env") as e:
        read_d4rl(anon)
    assert e.value.key == "env"
    assert read_d4rl(anon, env="HalfCheetah-v5").env_id == "halfcheetah"

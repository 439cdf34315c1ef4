"""Online SAC behaviour training: a tiny real run, exact resume, replay by actions, shipping, the shipped policies."""

from __future__ import annotations

import json

import mujoco
import numpy as np
import pytest
import torch

from dromo_ray.data.online_sac import OnlineSAC, OnlineSACConfig, episode_seed, replay_actions

TINY = dict(env="hopper", steps=1200, learning_starts=300, batch_size=32, hidden=(32, 32), eval_every=600,
            eval_episodes=2, log_every=200)


def _state(out):
    return torch.load(out / "state" / "state.pt", map_location="cpu", weights_only=True)


def _equal_states(a, b) -> None:
    for net in ("actor", "critic", "target_actor", "target_critic"):
        for k in a["agent"][net]:
            assert torch.equal(a["agent"][net][k], b["agent"][net][k]), (net, k)
    assert torch.equal(a["agent"]["log_ent_coef"], b["agent"]["log_ent_coef"])
    for k in a["buffer"]:
        assert torch.equal(a["buffer"][k], b["buffer"][k]), k
    for k in ("env_steps", "episodes", "updates", "size", "ptr", "rng"):
        assert a[k] == b[k], k


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sac") / "straight"
    OnlineSAC(OnlineSACConfig(out=str(out), **TINY)).run()
    return out


def test_tiny_run_trains_checkpoints_and_exports(straight_run):
    index = json.loads((straight_run / "index.json").read_text())
    assert index["complete"] and index["env_steps"] == 1200
    assert [c["env_steps"] for c in index["checkpoints"]] == [600, 1200]
    st = _state(straight_run)
    assert st["updates"] == 1200 - 300 + 1  # one update per env step from the learning_starts-th on
    assert st["size"] == 1200
    # Updates moved the actor away from its initialisation.
    fresh = OnlineSAC(OnlineSACConfig(out=str(straight_run.parent / "unused"), **TINY))
    w0 = fresh.agent.actor.state_dict()["trunk.0.weight"]
    assert not torch.equal(w0, st["agent"]["actor"]["trunk.0.weight"])
    # Exported policy files load safely and act in the action box.
    from dromo_ray.data.policy_io import load_policy

    pol = load_policy(straight_run / index["checkpoints"][-1]["policy"], deterministic=False, seed=0)
    a = pol(np.zeros((4, 11), np.float32))
    assert a.shape == (4, 3) and np.all(np.abs(a) <= 1)
    assert index["env_model"] == "Hopper-v5 (default model)"


def test_interrupted_and_resumed_run_is_bitwise_the_straight_run(straight_run, tmp_path):
    out = tmp_path / "resumed"
    # Stops at the first episode boundary after the time limit, wherever that is; twice.
    first = OnlineSAC(OnlineSACConfig(out=str(out), time_limit_s=1e-9, **TINY))
    idx = first.run()
    assert not idx["complete"] and "resumable" in idx["stopped_early"]
    stopped_at = idx["env_steps"]
    second = OnlineSAC.resume(out, time_limit_s=2.0)
    second.run()
    third = OnlineSAC.resume(out)
    third.run()
    assert stopped_at < 1200
    _equal_states(_state(straight_run), _state(out))
    a = json.loads((straight_run / "index.json").read_text())["checkpoints"]
    b = json.loads((out / "index.json").read_text())["checkpoints"]
    assert [c["stochastic_return_mean"] for c in a] == [c["stochastic_return_mean"] for c in b]


def test_replay_by_actions_is_bitwise_the_runs_transitions(straight_run):
    st = _state(straight_run)
    buf = {k: v.numpy() for k, v in st["buffer"].items()}
    ends = np.flatnonzero((buf["done"] > 0.5) | buf["timeout"])
    ds = replay_actions("hopper", buf["act"], seed=0, ends=ends)
    assert np.array_equal(ds.observations, buf["obs"])
    assert np.array_equal(ds.next_observations, buf["next_obs"])
    assert np.array_equal(ds.rewards, buf["rew"])
    assert np.array_equal(ds.terminals, buf["done"] > 0.5)
    assert episode_seed(0, 1) != episode_seed(0, 2) and episode_seed(0, 1) == episode_seed(0, 1)


def test_ship_and_make_suite_from_shipped_policies(straight_run, tmp_path):
    from dromo_ray.data.shipped import medium_replay, ship_checkpoint
    from dromo_ray.data.suite import make_suite

    shipdir = tmp_path / "shipped"
    e = ship_checkpoint(straight_run, "medium", "step_00000600", episodes=2, directory=shipdir)
    assert e["replay_rows"] == 600 and e["env_steps"] == 600 and e["seed"] == 0
    for k in ("return_mean", "return_std", "stochastic_return_mean", "stochastic_return_std", "normalized_score",
              "stochastic_normalized_score", "command", "versions", "recipe", "env_model"):
        assert k in e
    assert torch.load(shipdir / e["file"], weights_only=True)["format"] == "dromo_ray.policy/1"
    ds = medium_replay("hopper", shipdir)
    buf = _state(straight_run)["buffer"]
    assert np.array_equal(ds.observations, buf["obs"][:600].numpy())
    m = make_suite("hopper", 500, tmp_path / "suite", None, parts=("random", "medium", "medium-replay"),
                   shipped_dir=shipdir, progress=False, minari=False)
    assert m["parts"]["medium-replay"]["transitions"] == 600
    assert m["parts"]["medium"]["transitions"] == 500
    with pytest.raises(Exception, match="no shipped hopper expert"):
        make_suite("hopper", 500, tmp_path / "suite2", None, parts=("expert",), shipped_dir=shipdir,
                   progress=False, minari=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from dromo_ray.cli import main

    assert main(["behavior", "train", "--env", "hopper", "--hidden", "abc", "--out", str(tmp_path / "x")]) == 2
    assert "--hidden" in capsys.readouterr().err
    assert main(["behavior", "train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no resumable" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    assert main(["behavior", "train", "--env", "hopper", "--steps", "10", "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


def test_walker2d_has_the_d4rl_foot_friction():
    """D4RL's walker2d (v2-v4 model): right foot friction 0.9, left 1.9; v5's default model gives both 1.9."""
    from dromo_ray.data.gym_env import make_env

    env = make_env("walker2d")
    model = env.unwrapped.model

    def friction(name):
        return float(model.geom_friction[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, name)][0])

    assert friction("foot_geom") == pytest.approx(0.9)
    assert friction("foot_left_geom") == pytest.approx(1.9)
    env.close()
    import gymnasium as gym

    v5 = gym.make("Walker2d-v5").unwrapped.model
    assert float(v5.geom_friction[mujoco.mj_name2id(v5, mujoco.mjtObj.mjOBJ_GEOM, "foot_geom")][0]) == \
        pytest.approx(1.9)


def test_collected_data_records_the_mujoco_model():
    from dromo_ray.data.gym_env import collect_transitions

    ds = collect_transitions("walker2d", "random", 5, seed=0, progress=False)
    assert ds.metadata["env_model"] == "Walker2d-v5 (walker2d.xml)"


def test_mlflow_tags_name_the_mujoco_model():
    from dromo_ray.core.config import config_from_dict
    from dromo_ray.tracking import run_tags

    cfg = config_from_dict({"data": {"dataset": "walker2d-medium-v2"}})
    assert run_tags(cfg, "walker2d")["env_model"] == "Walker2d-v5 (walker2d.xml)"


def test_mujoco_warnings_go_to_logging_not_the_console_or_cwd(tmp_path, monkeypatch, capfd):
    from dromo_ray.data.gym_env import make_env

    monkeypatch.chdir(tmp_path)
    env = make_env("halfcheetah")  # MuJoCo 4 warns about half_cheetah.xml's settotalmass attribute
    assert float(env.unwrapped.model.body_mass.sum()) == pytest.approx(14.0)  # the attribute still applies
    env.close()
    assert "settotalmass" not in capfd.readouterr().err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


# ---- the policies shipped inside the package ------------------------------------------------------------


def _shipped():
    from dromo_ray.data.shipped import manifest

    return sorted(manifest()["policies"].items())


@pytest.mark.parametrize("name,entry", _shipped(), ids=[k for k, _ in _shipped()])
def test_shipped_policy_loads_and_scores_in_its_band(name, entry):
    """A short sampled-action evaluation (3 episodes, the manifest's own evaluation seed) lands inside the band of
    the manifest's 10-episode figure: fails if the file, the environment or MuJoCo changed."""
    from dromo_ray.data.gym_env import evaluate_policy
    from dromo_ray.data.policy_io import load_policy
    from dromo_ray.data.shipped import D4RL_V2_BEHAVIOR, MEDIUM_BAND, shipped_policy

    e = shipped_policy(entry["env"], entry["part"])
    blob = torch.load(e["path"], map_location="cpu", weights_only=True)
    assert blob["format"] == "dromo_ray.policy/1" and blob["meta"]["env_key"] == entry["env"]
    for k in ("env_steps", "seed", "command", "versions", "recipe", "return_std", "stochastic_return_std"):
        assert k in entry
    if entry["part"] == "medium":
        target = D4RL_V2_BEHAVIOR[(entry["env"], "medium")]
        assert abs(entry["stochastic_normalized_score"] - target) <= MEDIUM_BAND
        assert entry["replay_rows"] == entry["env_steps"]
    res = evaluate_policy(load_policy(e["path"], deterministic=False, seed=entry["eval_seed"]), entry["env"],
                          episodes=3, seed=entry["eval_seed"])
    band = max(3.0 * entry["stochastic_return_std"], 0.05 * abs(entry["stochastic_return_mean"]))
    assert abs(res.mean_return - entry["stochastic_return_mean"]) <= band


@pytest.mark.parametrize("key,v4", [("hopper", "Hopper-v4"), ("halfcheetah", "HalfCheetah-v4"),
                                    ("walker2d", "Walker2d-v4")])
def test_every_env_is_built_with_the_v4_mujoco_model(key, v4):
    """The MDP D4RL's data came from: our v5 envs carry the v2-v4 model arrays exactly (walker2d through
    walker2d.xml). What v5 still changes is in the reward code: hopper and walker2d pay no healthy bonus on the
    terminal step (Gymnasium's v5 changelog), documented in SUITE.md."""
    import gymnasium as gym

    from dromo_ray.data.gym_env import make_env

    ours, ref = make_env(key).unwrapped.model, gym.make(v4).unwrapped.model
    for field in ("geom_friction", "body_mass", "body_inertia", "dof_damping", "actuator_gear", "geom_size"):
        assert np.array_equal(getattr(ours, field), getattr(ref, field)), field
    assert ours.opt.timestep == ref.opt.timestep

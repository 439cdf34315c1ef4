"""The real Gymnasium v5 environments: registry termination functions, evaluation, policy collection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dromo_ray.cli import main
from dromo_ray.core.envs import ENVS
from dromo_ray.data.gym_env import collect_transitions, evaluate_policy
from dromo_ray.data.load import load_dataset


def _assert_termination_agrees(ds) -> None:
    predicted = np.asarray(ENVS[ds.env_id].termination_fn(ds.next_observations))
    mismatch = np.flatnonzero(predicted != ds.terminals)
    assert mismatch.size == 0, f"{ds.env_id}: termination_fn disagrees with the env at rows {mismatch[:10]}"


def test_termination_fn_agrees_with_hopper(tiny_hopper_dataset):
    assert tiny_hopper_dataset.terminals.sum() > 20  # random Hopper falls often: the test has teeth
    _assert_termination_agrees(tiny_hopper_dataset)
    torch_pred = ENVS["hopper"].termination_fn(torch.as_tensor(tiny_hopper_dataset.next_observations))
    np.testing.assert_array_equal(torch_pred.numpy(), tiny_hopper_dataset.terminals)


def test_termination_fn_agrees_with_walker2d():
    ds = collect_transitions("walker2d", "random", 1000, seed=0, progress=False)
    assert ds.terminals.sum() > 10
    _assert_termination_agrees(ds)


def test_halfcheetah_never_terminates():
    ds = collect_transitions("halfcheetah", "random", 300, seed=0, progress=False, max_episode_steps=100)
    assert not ds.terminals.any() and ds.timeouts.sum() == 3
    _assert_termination_agrees(ds)


def _linear_policy(obs: np.ndarray) -> np.ndarray:
    w = np.linspace(-0.5, 0.5, obs.shape[1] * 3, dtype=np.float32).reshape(obs.shape[1], 3)
    return np.tanh(obs @ w)


@pytest.mark.parametrize("episodes,num_envs", [(5, None), (5, 2), (1, None)])
def test_evaluate_policy_counts_and_determinism(episodes, num_envs):
    a = evaluate_policy(_linear_policy, "hopper", episodes, seed=7, max_episode_steps=60, num_envs=num_envs)
    b = evaluate_policy(_linear_policy, "hopper", episodes, seed=7, max_episode_steps=60, num_envs=num_envs)
    assert a.returns.shape == a.lengths.shape == a.normalized.shape == (episodes,)
    assert (a.lengths >= 1).all() and (a.lengths <= 60).all()
    np.testing.assert_array_equal(a.returns, b.returns)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert a.mean_return == pytest.approx(a.returns.mean())
    assert a.mean_normalized == pytest.approx(ENVS["hopper"].normalized_score(a.returns.mean()))


def test_evaluate_policy_seed_matters():
    rand = np.random.default_rng(0)
    fixed = rand.uniform(-1, 1, (200, 6)).astype(np.float32)
    step = {"t": 0}

    def open_loop(obs: np.ndarray) -> np.ndarray:  # same action sequence every run: only the seed differs
        a = np.repeat(fixed[step["t"] % 200][None], obs.shape[0], axis=0)
        step["t"] += 1
        return a

    a = evaluate_policy(open_loop, "walker2d", 3, seed=1, max_episode_steps=40)
    step["t"] = 0
    b = evaluate_policy(open_loop, "walker2d", 3, seed=2, max_episode_steps=40)
    assert not np.array_equal(a.returns, b.returns)


def test_collect_with_policy_file(tmp_path, capsys):
    from dromo_ray.core.nets import TanhGaussianActor
    from dromo_ray.data.policy_io import save_policy

    torch.manual_seed(0)
    policy = save_policy(tmp_path / "actor.pt", TanhGaussianActor(11, 3, (16,)))
    outs = [tmp_path / "a.hdf5", tmp_path / "b.hdf5"]
    for out in outs:
        assert main(["collect", "--env", "hopper", "--policy", str(policy), "--noise", "0.2",
                     "--steps", "120", "--seed", "4", "--out", str(out)]) == 0
    a, b = (load_dataset(str(o)) for o in outs)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.metadata["policy"] == str(policy) and a.metadata["noise"] == pytest.approx(0.2)
    assert np.abs(a.actions).max() <= 1.0
    # wrong environment for the policy: one clear error
    capsys.readouterr()
    assert main(["collect", "--env", "walker2d", "--policy", str(policy), "--steps", "10",
                 "--out", str(tmp_path / "c.hdf5")]) == 2
    assert "policy maps 11 -> 3 dims but Walker2d-v5" in capsys.readouterr().err

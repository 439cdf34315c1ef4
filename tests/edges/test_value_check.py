"""`dromo-ray evaluate --values` / `--model-error`: a checkpoint's critic against the Monte-Carlo return of its policy
in the real env (the lower-bound check of issue 13), and its dynamics ensemble against the real env on the states
that policy visits. The checkpoints are built by hand (a constant critic, a model that predicts no change), so
every figure the checks print has a hand computation beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dromo_ray.cli import main
from dromo_ray.config import load_config
from dromo_ray.core.config import to_dict
from dromo_ray.core.nets import TanhGaussianActor, TwinCritic
from dromo_ray.core.scores import discounted_tail_returns
from dromo_ray.data.gym_env import record_episodes
from dromo_ray.runtime.checkpoint import save_checkpoint
from dromo_ray.train import model_error, value_check

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"


def test_discounted_tail_returns_by_hand():
    # G_2 = 3, G_1 = 2 + 0.5 * 3 = 3.5, G_0 = 1 + 0.5 * 3.5 = 2.75
    assert discounted_tail_returns([1.0, 2.0, 3.0], 0.5) == [2.75, 3.5, 3.0]
    assert discounted_tail_returns([], 0.9) == []
    with pytest.raises(ValueError, match="gamma"):
        discounted_tail_returns([1.0], 1.5)


def test_record_episodes_shapes_and_determinism():
    def act(obs):
        return np.tanh(obs[:, :3])  # hopper: 3 actions from 11 observations, deterministic

    a = record_episodes(act, "hopper", episodes=2, seed=7)
    b = record_episodes(act, "hopper", episodes=2, seed=7)
    assert len(a) == 2
    for x, y in zip(a, b, strict=True):
        t = len(x.rewards)
        assert x.observations.shape == (t, 11) and x.actions.shape == (t, 3) and x.rewards.shape == (t,)
        assert np.array_equal(x.observations, y.observations) and np.array_equal(x.rewards, y.rewards)
        assert x.terminated or t == 1000
    with pytest.raises(ValueError, match="episodes"):
        record_episodes(act, "hopper", episodes=0, seed=0)


def _checkpoint(tmp_path: Path, q_value: float, log_ent_coef: float, deterministic_backup: bool,
                dynamics: dict | None = None) -> Path:
    cfg = load_config(TINY, [f"agent.deterministic_backup={str(deterministic_backup).lower()}"])
    hidden = tuple(cfg.agent.hidden_dims)
    torch.manual_seed(0)
    actor = TanhGaussianActor(11, 3, hidden)
    critic = TwinCritic(11, 3, hidden)
    with torch.no_grad():  # Q(s, a) = q_value everywhere: zero weights, the last layer's bias = q_value
        for p in critic.parameters():
            p.zero_()
        last = [p for name, p in critic.named_parameters() if "bias" in name][-1]
        last.fill_(q_value)
    state = {"driver": {"step": 40, "evals": []}, "config": to_dict(cfg), "env": "hopper", "dynamics": dynamics or {},
             "replay": {}, "learner": {"agent": {"actor": actor.state_dict(), "critic": critic.state_dict(),
                                                 "log_ent_coef": torch.tensor(log_ent_coef)}}}
    return save_checkpoint(tmp_path / "run", 40, state)


def test_value_check_against_hand_computed_returns(tmp_path):
    ckpt = _checkpoint(tmp_path, q_value=-5.0, log_ent_coef=math.log(0.2), deterministic_backup=False)
    out = value_check(ckpt, episodes=2, seed=3, tail=0)
    assert (out["env"], out["step"], out["episodes"]) == ("hopper", 40, 2)
    assert out["q_min_mean"] == pytest.approx(-5.0) and out["q_mean_mean"] == pytest.approx(-5.0)

    # the same episodes again, and their returns by hand
    from dromo_ray.runtime.checkpoint import load_policy_from_checkpoint

    actor, _, state = load_policy_from_checkpoint(ckpt)
    gamma = state["config"]["agent"]["gamma"]
    eps = record_episodes(lambda o: actor(torch.as_tensor(o)).detach().numpy(), "hopper", episodes=2, seed=3)
    returns = [g for ep in eps for g in discounted_tail_returns(ep.rewards, gamma)]
    assert out["states"] == len(returns) == sum(len(e.rewards) for e in eps)
    assert out["mc_return_mean"] == pytest.approx(float(np.mean(returns)))

    # soft backup: Q also counts gamma / (1 - gamma) * alpha * H of the later steps
    assert out["soft_backup"] and out["entropy_coef"] == pytest.approx(0.2)
    assert out["entropy_bonus"] == pytest.approx(gamma / (1 - gamma) * 0.2 * out["policy_entropy"])
    assert out["q_min_minus_bonus"] == pytest.approx(-5.0 - out["entropy_bonus"])
    assert out["lower_bound_holds"] == (out["q_min_minus_bonus"] <= out["mc_return_mean"])


def test_value_check_flags_an_overestimating_critic(tmp_path):
    ckpt = _checkpoint(tmp_path, q_value=1.0e6, log_ent_coef=0.0, deterministic_backup=True)
    out = value_check(ckpt, episodes=1, seed=0, tail=0)
    assert not out["soft_backup"] and out["entropy_bonus"] == 0.0
    assert out["q_min_mean"] == pytest.approx(1.0e6) and out["lower_bound_holds"] is False


def test_evaluate_values_cli(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, q_value=-5.0, log_ent_coef=0.0, deterministic_backup=True)
    assert main(["evaluate", str(ckpt.parent), "--episodes", "1", "--values", "--tail", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["values"]["q_min_mean"] == pytest.approx(-5.0) and out["values"]["states"] > 0
    assert main(["evaluate", str(ckpt.parent), "--episodes", "1", "--values", "--tail", "0"]) == 0
    text = capsys.readouterr().out
    assert "Q(s, mu(s)) min -5.0" in text and "lower bound" in text
    assert main(["evaluate", str(ckpt.parent), "--values", "--tail", "-1"]) == 2
    assert "--tail" in capsys.readouterr().err


def test_model_error_of_a_model_that_predicts_no_change(tmp_path):
    from dromo_ray.core.dynamics import EnsembleDynamics

    cfg = load_config(TINY)
    model = EnsembleDynamics(11, 3, cfg.dynamics)
    with torch.no_grad():  # every member predicts s' - s = 0 and r = 0: zero weights, zero output mean
        for p in model.parameters():
            p.zero_()
        model.in_std.fill_(2.0)  # the dataset's per-dimension std the error is measured in
    ckpt = _checkpoint(tmp_path, 0.0, 0.0, True, dynamics={k: v.clone() for k, v in model.state_dict().items()})
    out = model_error(ckpt, episodes=1, seed=5, horizon=3)
    assert (out["env"], out["horizon"], [e["h"] for e in out["per_h"]]) == ("hopper", 3, [1, 2, 3])

    from dromo_ray.runtime.checkpoint import load_policy_from_checkpoint

    actor, _, _ = load_policy_from_checkpoint(ckpt)
    (ep,) = record_episodes(lambda o: actor(torch.as_tensor(o)).detach().numpy(), "hopper", episodes=1, seed=5)
    n = len(ep.rewards) - 3
    assert out["starts"] == n
    for h in (1, 2, 3):  # the model stays at s_t: its error at h is RMS((s_t - s_{t+h}) / 2), its reward error |r|
        obs_err = np.sqrt((((ep.observations[:n] - ep.observations[h:n + h]) / 2.0) ** 2).mean(-1)).mean()
        assert out["per_h"][h - 1]["obs_rmse_std_units"] == pytest.approx(obs_err, rel=1e-4)
        assert out["per_h"][h - 1]["reward_mae"] == pytest.approx(np.abs(ep.rewards[h - 1:n + h - 1]).mean(),
                                                                  rel=1e-4)


def test_model_error_needs_a_model(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, 0.0, 0.0, True)
    assert main(["evaluate", str(ckpt.parent), "--episodes", "1", "--model-error"]) == 2
    assert "no dynamics ensemble" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt.parent), "--model-error", "--horizon", "0"]) == 2
    assert "--horizon" in capsys.readouterr().err


def _policy_file(tmp_path: Path, q_value: float | None, ent_coef: float = 0.2, soft: bool = True) -> Path:
    """A run directory holding only ``policy.pt`` (as an RLlib CQL run leaves it), critic Q = q_value or none."""
    from dromo_ray.data.policy_io import save_policy

    torch.manual_seed(0)
    actor = TanhGaussianActor(11, 3, (16, 16))
    critic, info = None, None
    if q_value is not None:
        critic = TwinCritic(11, 3, (16, 16))
        with torch.no_grad():
            for p in critic.parameters():
                p.zero_()
            critic.net.out.bias.fill_(q_value)
        info = {"gamma": 0.99, "entropy_coef": ent_coef, "soft_backup": soft}
    run = tmp_path / "cql_run"
    save_policy(run / "policy.pt", actor, meta={"env_key": "hopper", "algorithm": "cql_rllib",
                                                "learner_updates": 60}, critic=critic, critic_info=info)
    return run


def test_value_check_of_a_policy_file_with_its_critic(tmp_path):
    run = _policy_file(tmp_path, q_value=-3.0, ent_coef=0.2)
    for target in (run, run / "policy.pt"):  # the run directory finds its policy.pt
        out = value_check(target, episodes=1, seed=4, tail=0)
        assert (out["env"], out["algorithm"], out["step"]) == ("hopper", "cql_rllib", 60)
        assert out["q_min_mean"] == pytest.approx(-3.0) and out["gamma"] == 0.99
        from dromo_ray.data.policy_io import load_policy

        pol = load_policy(run / "policy.pt")
        (ep,) = record_episodes(pol, "hopper", episodes=1, seed=4)
        assert out["mc_return_mean"] == pytest.approx(float(np.mean(discounted_tail_returns(ep.rewards, 0.99))))
        assert out["entropy_bonus"] == pytest.approx(0.99 / 0.01 * 0.2 * out["policy_entropy"])


def test_evaluate_a_policy_file_and_its_errors(tmp_path, capsys):
    run = _policy_file(tmp_path, q_value=None)
    assert main(["evaluate", str(run), "--episodes", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["env"] == "hopper"
    assert main(["evaluate", str(run), "--episodes", "1", "--values"]) == 2
    assert "no critic" in capsys.readouterr().err
    assert main(["evaluate", str(run / "policy.pt"), "--episodes", "1", "--model-error"]) == 2
    assert "no dynamics ensemble" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert main(["evaluate", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt" in capsys.readouterr().err

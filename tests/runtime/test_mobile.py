"""MOBILE (Sun et al., ICML 2023): the Bellman-inconsistency penalty against hand computations, model rows only,
bitwise resume, the learner's wiring, the published presets and the tiny sweep file."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dromo_ray.core import losses
from dromo_ray.core.agents import make_agent, restore_agent
from dromo_ray.core.agents.mobile import BellmanInconsistencyPenalty, bellman_inconsistency, ensemble_from_state
from dromo_ray.core.config import AgentConfig, DynamicsConfig, config_from_dict
from dromo_ray.core.dynamics import EnsembleDynamics
from dromo_ray.core.types import Batch, MixedBatch
from dromo_ray.errors import ConfigError

OBS, ACT = 4, 2
TUNE = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks"
SWEEPS = TUNE.parent / "sweeps"
TINY = dict(hidden_dims=(32, 32), batch_size=16, critic_lr=1e-3, actor_lr=1e-3)


def ensemble(seed: int = 0, members: int = 3, elites: tuple[int, ...] = (0, 2)) -> EnsembleDynamics:
    cfg = DynamicsConfig(ensemble_size=members, num_elites=len(elites), hidden_dims=(16,))
    m = EnsembleDynamics(OBS, ACT, cfg, generator=torch.Generator().manual_seed(seed))
    m.set_elites(list(elites))
    return m


def constant_ensemble(deltas: list[float], rewards: list[float]) -> EnsembleDynamics:
    """Member i predicts s' = s + delta_i (every dim) and r = r_i exactly: zero weights, the output bias is the
    prediction, and var_scale = 0 makes every sample the mean."""
    m = ensemble(members=len(deltas), elites=tuple(range(len(deltas))))
    with torch.no_grad():
        for layer in m.linear_layers():
            layer.weight.zero_()
            layer.bias.zero_()
        for i, (d, r) in enumerate(zip(deltas, rewards, strict=True)):
            m.net.out.bias[i, 0, :OBS] = d
            m.net.out.bias[i, 0, OBS] = r
        m.var_scale.zero_()
    return m


def batch(seed: int, n_real: int = 6, n_model: int = 10) -> MixedBatch:
    g = torch.Generator().manual_seed(seed)

    def part(n: int) -> Batch:
        obs = torch.randn(n, OBS, generator=g)
        return Batch(obs=obs, act=torch.rand(n, ACT, generator=g) * 2 - 1, rew=torch.randn(n, generator=g),
                     next_obs=obs + 0.1 * torch.randn(n, OBS, generator=g),
                     done=(torch.rand(n, generator=g) < 0.1).float(), unc=torch.zeros(n))

    return MixedBatch(part(n_real), part(n_model))


def agent_for(dyn: EnsembleDynamics, seed: int = 0, **overrides):
    cfg = AgentConfig(**{**TINY, "algorithm": "mobile", "mobile_num_samples": 3, **overrides})
    cfg.validate()
    return make_agent(cfg, OBS, ACT, seed=seed, dynamics=dyn), cfg


def sum_value(next_obs: torch.Tensor) -> torch.Tensor:
    """A stand-in V(s') = Σ_d s'_d: known by hand."""
    return next_obs.sum(-1)


# ------------------------------------------------------------------------------------------------------------
# The penalty against hand computations


def test_penalty_matches_hand_computation_on_a_deterministic_ensemble():
    gamma = 0.9
    deltas, rewards = [0.0, 0.5, 1.0], [1.0, 0.0, 2.0]
    pen = BellmanInconsistencyPenalty(constant_ensemble(deltas, rewards), beta=2.0, num_samples=4, gamma=gamma)
    obs = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.5]])
    act = torch.zeros(2, ACT)
    u = pen.uncertainty(obs, act, sum_value, torch.Generator().manual_seed(0))
    for row in range(2):
        # T_i = r_i + γ V(s + δ_i) = r_i + γ (Σ s + 4 δ_i); U = unbiased std over the 3 members.
        t = [r + gamma * (float(obs[row].sum()) + OBS * d) for d, r in zip(deltas, rewards, strict=True)]
        mean = sum(t) / 3
        expected = math.sqrt(sum((x - mean) ** 2 for x in t) / 2)
        assert float(u[row]) == pytest.approx(expected, rel=1e-5)
    p, rec = pen.penalty(obs, act, sum_value, torch.Generator().manual_seed(0))
    assert torch.allclose(p, 2.0 * u) and float(rec["mobile_penalty"]) == pytest.approx(2.0 * float(u.mean()))

    # the authors' form: Std_i[V(s'_i)] only, no reward, no γ
    nv = BellmanInconsistencyPenalty(constant_ensemble(deltas, rewards), beta=1.0, num_samples=4, gamma=gamma,
                                     form="next_value")
    u_nv = nv.uncertainty(obs, act, sum_value, torch.Generator().manual_seed(0))
    v = [OBS * d for d in deltas]
    assert float(u_nv[0]) == pytest.approx(float(np.std(v, ddof=1)), rel=1e-5)


def test_penalty_with_noise_matches_a_loop_over_members_and_samples():
    """Sampled (s', r): the vectorised U equals an explicit loop over elites i and samples j drawing the same noise
    (the elites are members 0 and 2; member 1 must not count)."""
    dyn = ensemble(seed=3, members=3, elites=(2, 0))
    gamma, n = 0.99, 5
    pen = BellmanInconsistencyPenalty(dyn, beta=1.0, num_samples=n, gamma=gamma)
    g = torch.Generator().manual_seed(0)
    obs, act = torch.randn(7, OBS, generator=g), torch.rand(7, ACT, generator=g) * 2 - 1
    u = pen.uncertainty(obs, act, sum_value, torch.Generator().manual_seed(11))

    mean, var = dyn.predict(obs, act)  # (E, B, D_t), all members
    eps = torch.randn((n, 2, 7, OBS + 1), generator=torch.Generator().manual_seed(11))
    for b in range(7):
        member_estimates = []
        for pos, i in enumerate((2, 0)):  # elite order
            t = []
            for j in range(n):
                y = mean[i, b] + var[i, b].sqrt() * eps[j, pos, b]
                t.append(float(y[OBS]) + gamma * float((obs[b] + y[:OBS]).sum()))
            member_estimates.append(sum(t) / n)
        assert float(u[b]) == pytest.approx(float(np.std(member_estimates, ddof=1)), rel=1e-4, abs=1e-5)


def test_zero_penalty_when_all_members_agree():
    pen = BellmanInconsistencyPenalty(constant_ensemble([0.3, 0.3, 0.3], [1.0, 1.0, 1.0]), beta=5.0, num_samples=3,
                                      gamma=0.99)
    obs = torch.randn(9, OBS)
    u = pen.uncertainty(obs, torch.zeros(9, ACT), sum_value, torch.Generator().manual_seed(0))
    assert torch.equal(u, torch.zeros(9))
    # In the agent V(s') is itself sampled (a' ~ π per s'_ij, as in the authors' code), so agreeing members keep a
    # Monte Carlo disagreement: small next to a disagreeing ensemble's.
    same = agent_for(constant_ensemble([0.3, 0.3, 0.3], [1.0, 1.0, 1.0]))[0].update(batch(0))
    apart = agent_for(constant_ensemble([-0.5, 0.3, 1.0], [1.0, 0.0, 2.0]))[0].update(batch(0))
    assert 0 <= same["train/mobile_uncertainty"] < 0.1 * apart["train/mobile_uncertainty"]


def test_bellman_inconsistency_shapes_and_errors():
    est = torch.tensor([[[1.0, 2.0], [3.0, 2.0]], [[3.0, 2.0], [5.0, 2.0]]])  # (N=2, K=2, B=2)
    # member means: [2, 2] and [4, 2] -> std over K: [sqrt(2), 0]
    assert torch.allclose(bellman_inconsistency(est), torch.tensor([math.sqrt(2.0), 0.0]))
    with pytest.raises(AssertionError, match="K>=2"):
        bellman_inconsistency(torch.zeros(3, 1, 4))


# ------------------------------------------------------------------------------------------------------------
# In the agent


def _targets(monkeypatch, agent, b: MixedBatch) -> tuple[torch.Tensor, dict]:
    seen = []
    real = losses.bellman_error

    def spy(q, target):
        seen.append(target.detach().clone())
        return real(q, target)

    monkeypatch.setattr(losses, "bellman_error", spy)
    m = agent.update(b)
    monkeypatch.setattr(losses, "bellman_error", real)
    return seen[0], m


def test_penalty_lowers_the_target_of_model_rows_only(monkeypatch):
    b = batch(0, n_real=6, n_model=10)
    t0, m0 = _targets(monkeypatch, agent_for(ensemble(), mobile_beta=0.0)[0], b)
    t2, m2 = _targets(monkeypatch, agent_for(ensemble(), mobile_beta=2.0)[0], b)
    diff = t0 - t2
    assert torch.equal(diff[:6], torch.zeros(6))  # dataset rows: untouched
    assert (diff[6:] > 0).all()  # model rows: lowered by β U > 0 (a random ensemble disagrees)
    assert float(diff[6:].mean()) == pytest.approx(m2["train/mobile_penalty"], rel=1e-5)
    assert m2["train/mobile_penalty"] == pytest.approx(2.0 * m2["train/mobile_uncertainty"], rel=1e-6)
    assert m0["train/mobile_penalty"] == 0.0 and m0["train/mobile_uncertainty"] == m2["train/mobile_uncertainty"]
    assert m2["train/mobile_uncertainty_max"] >= m2["train/mobile_uncertainty"] > 0


def test_deterministic_backup_drops_the_entropy_term(monkeypatch):
    """With deterministic_backup the target does not depend on the temperature; with the soft backup it does."""
    b = batch(1)
    for det in (True, False):
        targets = [_targets(monkeypatch, agent_for(ensemble(), deterministic_backup=det, auto_entropy=False,
                                                   init_entropy_coef=c)[0], b)[0] for c in (1.0, 0.1)]
        assert torch.equal(targets[0], targets[1]) == det


def test_bitwise_continuation_through_a_saved_file_and_the_ensemble_travels():
    agent, cfg = agent_for(ensemble(seed=0))
    for i in range(2):
        agent.update(batch(i))
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    twin, _ = agent_for(ensemble(seed=5), seed=9)  # another ensemble and seed: the state overwrites both
    twin.load_state_dict(state)
    restored = restore_agent(cfg, OBS, ACT, state)
    for i in range(2, 5):
        ma, mb, mc = agent.update(batch(i)), twin.update(batch(i)), restored.update(batch(i))
        assert ma == mb == mc
    for x, y in zip(agent.state_dict()["actor"].values(), twin.state_dict()["actor"].values(), strict=True):
        assert torch.equal(x, y)
    dyn_a = agent.target_penalty.dynamics.state_dict()
    assert all(torch.equal(v, twin.target_penalty.dynamics.state_dict()[k]) for k, v in dyn_a.items())


def test_agent_keeps_its_own_frozen_copy_of_the_ensemble():
    dyn = ensemble()
    agent, _ = agent_for(dyn)
    own = agent.target_penalty.dynamics
    assert own is not dyn and not any(p.requires_grad for p in own.parameters())
    with torch.no_grad():
        dyn.net.out.bias.add_(1.0)
    assert not torch.equal(own.net.out.bias, dyn.net.out.bias)
    rebuilt = ensemble_from_state(own.state_dict())
    assert (rebuilt.num_members, rebuilt.hidden, rebuilt.elite_idx.tolist()) == (3, (16,), [0, 2])


def test_clear_errors():
    cfg = AgentConfig(**TINY, algorithm="mobile")
    with pytest.raises(ValueError, match="needs the trained dynamics"):
        make_agent(cfg, OBS, ACT)
    with pytest.raises(ValueError, match="1 elite"):
        make_agent(cfg, OBS, ACT, dynamics=ensemble(elites=(1,)))
    base = {"data": {"dataset": "x"}, "agent": {"algorithm": "mobile"}}
    with pytest.raises(ConfigError, match="dynamics.num_elites"):
        config_from_dict({**base, "dynamics": {"num_elites": 1}})
    for key, value in (("mobile_penalty_form", "max"), ("mobile_num_samples", 0), ("mobile_beta", -1.0)):
        with pytest.raises(ConfigError, match=f"agent.{key}"):
            config_from_dict({**base, "agent": {"algorithm": "mobile", key: value}})


class _Data:
    """The fields of a dataset the learner reads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.observations, self.next_observations = np.zeros((n, 11)), np.zeros((n, 11))
        self.actions, self.rewards, self.terminals = np.zeros((n, 3)), np.zeros(n), np.zeros(n)

    def __len__(self) -> int:
        return self.n


def test_learner_hands_the_trained_ensemble_to_the_agent():
    """runtime.actors.LearnerActor (a plain class; Ray only wraps it) gives MOBILE's agent the driver's ensemble
    state."""
    from dromo_ray.runtime.actors import LearnerActor

    cfg = config_from_dict({"data": {"dataset": "x", "env": "hopper"}, "device": "cpu",
                            "dynamics": {"ensemble_size": 3, "num_elites": 2, "hidden_dims": [8]},
                            "agent": {"algorithm": "mobile", "hidden_dims": [16], "batch_size": 8}})
    dyn = EnsembleDynamics(11, 3, cfg.dynamics, generator=torch.Generator().manual_seed(0))
    dyn.set_elites([2, 1])
    learner = LearnerActor(cfg, "hopper", _Data(20), None, None, None, 0.0, dynamics_state=dyn.state_dict())
    got = learner.agent.target_penalty.dynamics.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in dyn.state_dict().items())
    assert learner.agent.target_penalty.dynamics.elite_idx.tolist() == [2, 1]


# ------------------------------------------------------------------------------------------------------------
# Presets and the sweep file

PUBLISHED = {  # github.com/yihaosun1124/mobile configs/gym/<env>_medium.py over configs/gym/default.py
    "hopper": dict(beta=1.5, horizon=5, auto_entropy=False, entropy=0.2, max_epochs=0),
    "halfcheetah": dict(beta=0.5, horizon=5, auto_entropy=True, entropy=1.0, max_epochs=0),
    "walker2d": dict(beta=0.5, horizon=5, auto_entropy=True, entropy=1.0, max_epochs=30),
}


@pytest.mark.parametrize("env", list(PUBLISHED))
def test_presets_hold_the_published_settings(env: str):
    from dromo_ray.config import load_config

    cfg = load_config(TUNE / f"mobile_{env}.yaml")
    want = PUBLISHED[env]
    a, d, r = cfg.agent, cfg.dynamics, cfg.rollout
    assert (cfg.data.dataset, cfg.data.env, a.algorithm) == (f"{env}-medium-v2", env, "mobile")
    assert (a.mobile_beta, r.horizon, a.auto_entropy, a.init_entropy_coef) == (
        want["beta"], want["horizon"], want["auto_entropy"], want["entropy"])
    assert (a.mobile_num_samples, a.f, a.deterministic_backup, a.hidden_dims) == (10, 0.05, True, (256, 256))
    assert (a.actor_lr, a.critic_lr, a.entropy_lr, a.gamma, a.tau, a.batch_size) == (1e-4, 3e-4, 1e-4, 0.99, 0.005,
                                                                                      256)
    assert (a.effective_alpha(), a.effective_beta()) == (0.0, 0.0)
    assert (a.mobile_penalty_form, a.actor_lr_schedule) == ("next_value", "cosine")
    assert d.weight_decay == (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4) and d.recalibrate is False
    assert (d.ensemble_size, d.num_elites, d.hidden_dims, d.learning_rate) == (7, 5, (200, 200, 200, 200), 1e-3)
    assert (d.holdout_ratio, d.max_holdout, d.bootstrap, d.max_epochs, d.max_epochs_since_update) == (
        0.2, 1000, True, want["max_epochs"], 5)
    assert (r.batch_size, r.interval, r.model_buffer_size) == (50_000, 1000, 50_000 * want["horizon"] * 5)
    assert cfg.train.total_steps == 3_000_000


def test_tiny_mobile_sweep_file_validates(tmp_path, monkeypatch):
    from dromo_ray.sweep import load_sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hopper_random-v5.hdf5").write_bytes(b"")
    spec = load_sweep(SWEEPS / "sweep_tiny_mobile.yaml")
    assert spec.expected_trials() == 4 and spec.seeds == [0, 1]
    assert spec.search["agent.algorithm"].candidates() == ["mobile", "mopo"]
    cfg = spec.config_obj({"agent.algorithm": "mobile", "seed": 1})
    assert (cfg.agent.algorithm, cfg.agent.mobile_num_samples, cfg.dynamics.num_elites) == ("mobile", 2, 2)


def test_report_groups_mobile_runs(tmp_path):
    """``dromo-ray report`` groups by the algorithm tag: mobile runs form their own row next to another algorithm."""
    from mlflow.tracking import MlflowClient

    from dromo_ray.report import build_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("m", artifact_location=(tmp_path / "artifacts").as_uri())
    for algo, scores in (("mobile", [70.0, 80.0]), ("mopo", [50.0])):
        for seed, score in enumerate(scores):
            tags = {"algorithm": algo, "dataset": "hopper_medium-v2", "env": "hopper", "seed": str(seed)}
            run = client.create_run(exp, tags=tags).info.run_id
            client.log_param(run, "train.final_score_last_n", "1")
            client.log_metric(run, "eval/normalized_score", score, step=100)
            client.log_metric(run, "final/normalized_score", score, step=100)
            client.set_terminated(run, status="FINISHED")
    rows = {r["algorithm"]: r for r in build_report("m", uri, tmp_path / "out")["rows"]}
    assert set(rows) == {"mobile", "mopo"} and rows["mobile"]["mean"] == pytest.approx(75.0)
    assert rows["mobile"]["n"] == 2

"""Fidelity of the dynamics model, the model env and the MOPO / MOPO-auto baselines to their published form.

Issue 10: the ±100 model blow-up rule, MOPO-auto's u and δ (on a real trained Hopper ensemble), the published
MOPO presets, the max over all members, bootstrap and per-layer decay defaults, recalibration off for baselines.

Run as a script for the figures of the report: ``PYTHONPATH=$PWD python tests/runtime/test_fidelity_model_mopo.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dromo_ray.config import load_config
from dromo_ray.core.agents.mopo import DualPenalty
from dromo_ray.core.config import MBPO_WEIGHT_DECAY, DynamicsConfig, config_from_dict
from dromo_ray.core.dynamics import DynamicsTrainer, EnsembleDynamics, make_inputs_targets, train_ensemble
from dromo_ray.core.envs import ENVS, halfcheetah_termination
from dromo_ray.core.model_env import ModelEnv, entropy_reference, model_blowup
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.rollout import rollout, rollout_stats
from dromo_ray.errors import ConfigError

TUNE = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks"

# ---------------------------------------------------------------------------------------------------------
# 1. Model blow-up: every env stops a row whose predicted s' leaves (-100, 100)


def _constant_model(obs_dim: int, act_dim: int, delta: float) -> EnsembleDynamics:
    """Every member predicts s' - s = ``delta`` in every coordinate, reward 1, tiny variance."""
    cfg = DynamicsConfig(ensemble_size=3, num_elites=2, hidden_dims=(8,))
    m = EnsembleDynamics(obs_dim, act_dim, cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.net.out.weight.zero_()
        m.net.out.bias.zero_()
        m.net.out.bias[..., :obs_dim] = delta
        m.net.out.bias[..., obs_dim] = 1.0
        m.net.out.bias[..., obs_dim + 1:] = -12.0
    return m


def test_model_blowup_rule_numpy_and_torch():
    x = np.array([[0.0, 99.9], [0.0, 100.0], [-100.0, 0.0], [np.nan, 0.0], [np.inf, 0.0], [-99.0, 5.0]])
    want = [False, True, True, True, True, False]
    assert model_blowup(x).tolist() == want
    assert model_blowup(torch.as_tensor(x)).tolist() == want


def test_blown_up_halfcheetah_rollouts_stop():
    obs_dim, act_dim = ENVS["halfcheetah"].obs_dim, ENVS["halfcheetah"].act_dim
    env = ModelEnv(_constant_model(obs_dim, act_dim, 20.0), halfcheetah_termination)
    start = torch.zeros(100, obs_dim)
    start[50:, 3] = 90.0  # half of the rows leave (-100, 100) on their first step
    torch.manual_seed(0)
    actor = TanhGaussianActor(obs_dim, act_dim, (8,))
    batch = rollout(env, actor, start, 4, torch.Generator().manual_seed(0), deterministic_model=True)
    # 50 rows x 4 steps (0 -> 80, never blown up) + 50 rows that stop after their first, blown-up step
    assert batch.size == 50 * 4 + 50
    stats = rollout_stats(batch, 100)
    assert stats["rollout/frac_blown_up"] == pytest.approx(0.5)
    assert stats["rollout/frac_terminated"] == pytest.approx(0.5)
    first = batch.done[:100]
    assert first[:50].sum() == 0 and first[50:].sum() == 50  # stored, with done = 1
    st = env.step(start, torch.zeros(100, act_dim), deterministic=True)
    assert st.blown_up.tolist() == [False] * 50 + [True] * 50 and torch.equal(st.done, st.blown_up)


# ---------------------------------------------------------------------------------------------------------
# 2. MOPO-auto on a real trained Hopper ensemble: u >= 0 in normalised space, δ from D, λ settles

SIGMAS = (0.0, 0.3, 1.0)
"""Action noise around the dataset's actions: the 'policies' of the λ experiment (0 = the behaviour policy)."""


def _narrow_policy(obs: np.ndarray) -> np.ndarray:
    return np.zeros((1, 3), np.float32)  # with noise 0.1: actions concentrated near 0, so noisier ones are OOD


def trained_hopper(steps: int = 3000, epochs: int = 20, seed: int = 0):
    from dromo_ray.data.gym_env import collect_transitions

    ds = collect_transitions("hopper", _narrow_policy, steps, seed=seed, noise=0.1, progress=False)
    x, y = make_inputs_targets(ds.observations, ds.actions, ds.next_observations, ds.rewards)
    cfg = DynamicsConfig(ensemble_size=7, num_elites=5, hidden_dims=(64, 64), max_epochs=epochs)
    model = EnsembleDynamics(11, 3, cfg, generator=torch.Generator().manual_seed(seed))
    train_ensemble(model, x, y, np.random.default_rng(seed), torch.Generator().manual_seed(seed + 1))
    return model.eval(), ds


@pytest.fixture(scope="module")
def hopper():
    return trained_hopper()


def old_entropy_signal(model: EnsembleDynamics, obs: torch.Tensor, act: torch.Tensor,
                       member: torch.Tensor) -> torch.Tensor:
    """Today's (before issue 10) u: sum over the D_t raw outputs of 1/2 (1 + log 2 pi sigma^2) of the row's member."""
    _, var = model.predict(obs, act)
    v = var[member, torch.arange(obs.shape[0])]
    return (0.5 * (1.0 + torch.log(2.0 * math.pi * v))).sum(-1)


def rollout_pools(model: EnsembleDynamics, ds, entropy_ref: float, n: int = 4000, seed: int = 0):
    """One model step from n dataset states with the dataset's action plus noise sigma, for each sigma in SIGMAS:
    {sigma: {"new": u >= 0, "old": today's u, "rew": r}} (n,) tensors."""
    g = torch.Generator().manual_seed(seed)
    obs_all = torch.as_tensor(np.asarray(ds.observations, np.float32))
    act_all = torch.as_tensor(np.asarray(ds.actions, np.float32))
    idx = torch.randint(obs_all.shape[0], (n,), generator=g)
    obs, act = obs_all[idx], act_all[idx]
    env = ModelEnv(model, ENVS["hopper"].termination_fn, penalty="entropy", all_members=False,
                   entropy_ref=entropy_ref)
    pools = {}
    for s in SIGMAS:
        a = (act + s * torch.randn(act.shape, generator=g)).clamp(-1.0, 1.0)
        st = env.step(obs, a, g)
        pools[s] = {"new": st.unc, "old": old_entropy_signal(model, obs, a, st.member), "rew": st.rew}
    return pools


def lambda_trajectory(pools, key: str, target: float, lam0: float, temptation: float = 0.1,
                      updates: int = 5000, batch: int = 256, seed: int = 0) -> tuple[list[float], float]:
    """λ at 0, 1k, ..., ``updates`` updates of the real :class:`DualPenalty` (Adam on log λ, lr 1e-3).

    Each update the 'policy' is the best response to the current λ among SIGMAS, maximising
    temptation * sigma - λ E[u | sigma] (temptation stands in for the value a policy gains by leaving the data,
    the exploitation MOPO's penalty exists to stop); the dual step sees a batch of that policy's u. Returns the
    trajectory and the final policy's sigma."""
    pen = DualPenalty(lam0, target, 1e-3, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    means = {s: float(pools[s][key].mean()) for s in SIGMAS}
    lams, sigma = [], SIGMAS[0]
    for t in range(updates + 1):
        lam = float(pen.log_lambda.detach().exp())
        if t % 1000 == 0:
            lams.append(lam)
        if t == updates:
            break
        sigma = max(SIGMAS, key=lambda s: temptation * s - lam * means[s])
        u = pools[sigma][key]
        pen.update(u[torch.randint(u.shape[0], (batch,), generator=g)])
    return lams, sigma


def test_entropy_penalty_and_delta_from_data_on_trained_hopper(hopper):
    model, ds = hopper
    ref = entropy_reference(model, ds.observations, ds.actions, quantile=0.9)
    # H_ref is the 0.9 quantile of H over D; delta = E_D[max(0, H - H_ref)] > 0, a small excess
    env = ModelEnv(model, ENVS["hopper"].termination_fn, penalty="entropy", all_members=False)
    obs = torch.as_tensor(np.asarray(ds.observations, np.float32))
    act = torch.as_tensor(np.asarray(ds.actions, np.float32))
    h = env.step(obs, act).signals["entropy"].double()
    assert ref.entropy_ref == pytest.approx(float(torch.quantile(h, 0.9)), abs=1e-5)
    assert ref.target == pytest.approx(float((h - ref.entropy_ref).clamp_min(0).mean()), abs=1e-5)
    assert 0.0 < ref.target < 0.5
    # normalised and per dimension: H lies in the scale of a unit-variance Gaussian's 1.42 nats, not ~-30
    assert -5.0 < float(h.mean()) < 1.42

    pools = rollout_pools(model, ds, ref.entropy_ref)
    # off-data actions are more uncertain than the data: u rises with the action noise
    assert float(pools[1.0]["new"].mean()) > 3 * float(pools[0.0]["new"].mean())
    lams, sigma = lambda_trajectory(pools, "new", ref.target, lam0=1.0)
    # λ rises to where the best response leaves the data no more than the data itself, then stays there
    assert 1.0 < lams[-1] < 30.0 and 0.5 < lams[-1] / lams[-2] < 2.0 and 0.5 < lams[-2] / lams[-3] < 2.0
    u, r = pools[sigma]["new"], pools[sigma]["rew"]
    assert (u >= 0).all()
    penalty = -lams[-1] * u
    assert float(penalty.mean()) < 0.0 and float((r + penalty).mean()) < float(r.mean())
    # today's formula on the same rows: u ~ -30 nats, so -λu is a bonus and λ only ever falls
    assert float(pools[0.0]["old"].mean()) < -5.0


def test_driver_fills_entropy_reference_from_trained_ensemble(hopper):
    from dromo_ray.runtime.pipeline import with_entropy_reference

    model, ds = hopper
    cfg = config_from_dict({"data": {"dataset": "x"}, "agent": {"algorithm": "mopo_auto"},
                            "dynamics": {"ensemble_size": 7, "num_elites": 5, "hidden_dims": [64, 64]}})
    assert cfg.agent.mopo_target_entropy is None and cfg.agent.mopo_entropy_ref is None
    stage = {"dynamics": model.state_dict(), "metrics": {}}
    out = with_entropy_reference(cfg, stage, ds, "hopper")
    want = entropy_reference(model, ds.observations, ds.actions, cfg.agent.mopo_entropy_quantile)
    assert out.agent.mopo_entropy_ref == pytest.approx(want.entropy_ref, abs=1e-5)
    assert out.agent.mopo_target_entropy == pytest.approx(want.target, abs=1e-5)
    assert stage["metrics"]["dynamics/entropy_target"] == out.agent.mopo_target_entropy
    assert cfg.agent.mopo_target_entropy is None  # the given config is not mutated
    mopo = config_from_dict({"data": {"dataset": "x"}, "agent": {"algorithm": "mopo"}})
    assert with_entropy_reference(mopo, stage, ds, "hopper") is mopo  # max sigma needs no reference


def test_make_agent_needs_delta():
    from dromo_ray.core.agents import make_agent

    cfg = config_from_dict({"data": {"dataset": "x"}, "agent": {"algorithm": "mopo_auto"}}).agent
    with pytest.raises(ValueError, match="mopo_target_entropy"):
        make_agent(cfg, 11, 3)


# ---------------------------------------------------------------------------------------------------------
# 3. The MOPO presets say what MOPO / its reproduction ran

# (h, λ) per dataset: OfflineRL-Kit run_example/run_mopo.py "suggested hypers" for the -v2 datasets.
PUBLISHED_H_LAMBDA = {"halfcheetah": (5, 0.5), "hopper": (5, 5.0), "walker2d": (5, 0.5)}


@pytest.mark.parametrize("env", sorted(PUBLISHED_H_LAMBDA))
def test_mopo_presets_are_published_mopo(env):
    cfg = load_config(TUNE / f"mopo_{env}.yaml")
    a, r, d = cfg.agent, cfg.rollout, cfg.dynamics
    h, lam = PUBLISHED_H_LAMBDA[env]
    assert cfg.data.dataset == f"{env}-medium-v2" and a.algorithm == "mopo"
    assert (r.horizon, a.mopo_lambda, a.mopo_uncertainty) == (h, lam, "max_aleatoric")
    assert a.f == 0.05 and a.hidden_dims == (256, 256) and a.batch_size == 256
    assert (a.actor_lr, a.critic_lr, a.entropy_lr) == (3e-4, 3e-4, 3e-4)
    assert a.auto_entropy and a.target_entropy == -3.0
    assert (a.gamma, a.tau, a.alpha, a.beta) == (0.99, 0.005, 0.0, 0.0)
    assert cfg.train.total_steps == 3_000_000
    assert (r.batch_size, r.interval, r.model_buffer_size) == (50_000, 1000, 50_000 * h * 5)
    assert (d.ensemble_size, d.num_elites, d.hidden_dims) == (7, 5, (200, 200, 200, 200))
    assert d.layer_weight_decays() == MBPO_WEIGHT_DECAY and d.bootstrap and not d.recalibrate
    assert (d.learning_rate, d.batch_size, d.holdout_ratio, d.max_holdout) == (1e-3, 256, 0.2, 1000)
    assert (d.max_epochs_since_update, d.logvar_loss_coef) == (5, 0.01)

    aligned = load_config(TUNE / f"mopo_{env}_aligned.yaml")
    # the aligned variant: the SAC settings every algorithm shares (COMBO appendix C), MOPO's model and penalty
    assert aligned.agent.hidden_dims == (256, 256, 256) and aligned.agent.f == 0.5
    assert (aligned.agent.actor_lr, aligned.agent.target_entropy, aligned.train.total_steps) == (1e-4, None, 1_000_000)
    assert (aligned.rollout.horizon, aligned.agent.mopo_lambda) == (h, lam) and aligned.dynamics == d


@pytest.mark.parametrize("env", sorted(PUBLISHED_H_LAMBDA))
def test_mopo_auto_presets(env):
    for name in (f"mopo_auto_{env}.yaml", f"mopo_auto_{env}_aligned.yaml"):
        cfg = load_config(TUNE / name)
        mopo = load_config(TUNE / name.replace("mopo_auto", "mopo"))
        a = cfg.agent
        assert a.algorithm == "mopo_auto" and a.mopo_uncertainty == "entropy"
        assert a.mopo_target_entropy is None and a.mopo_entropy_ref is None and a.mopo_entropy_quantile == 0.9
        # everything else as the MOPO preset it modifies (appendix B.1: "under the setup of MOPO")
        assert cfg.dynamics == mopo.dynamics and cfg.rollout == mopo.rollout and cfg.train == mopo.train
        for k in ("hidden_dims", "actor_lr", "critic_lr", "entropy_lr", "f", "target_entropy"):
            assert getattr(a, k) == getattr(mopo.agent, k), k


# ---------------------------------------------------------------------------------------------------------
# 4. The max over all members; bootstrap and per-layer decay by default; 5. recalibration off


def test_max_aleatoric_runs_over_all_members_not_only_elites():
    cfg = DynamicsConfig(ensemble_size=7, num_elites=5, hidden_dims=(8,))
    m = EnsembleDynamics(11, 3, cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.net.out.bias[6, ..., 12:] += 4.0  # member 6 (not an elite) is far more uncertain
    m.set_elites([0, 1, 2, 3, 4])
    obs, act = torch.randn(32, 11), torch.rand(32, 3) * 2 - 1
    _, var = m.predict(obs, act)
    st = ModelEnv(m, halfcheetah_termination).step(obs, act, torch.Generator().manual_seed(0))
    torch.testing.assert_close(st.unc, var.sqrt().norm(dim=-1).amax(0))
    assert (st.unc == var[6].sqrt().norm(dim=-1)).all()  # the max is member 6's
    elites_only = ModelEnv(m, halfcheetah_termination, all_members=False).step(obs, act)
    assert (elites_only.unc < st.unc).all()
    assert set(st.member.tolist()) <= {0, 1, 2, 3, 4}  # rows are still drawn from the elites only


@pytest.mark.parametrize("algorithm, all_members", [("mopo", True), ("dromo", False), ("mbpo", False)])
def test_rollout_worker_uses_all_members_for_mopo(algorithm, all_members):
    from dromo_ray.runtime.actors import RolloutActor

    cfg = config_from_dict({"data": {"dataset": "x"}, "agent": {"algorithm": algorithm, "hidden_dims": [8]},
                            "dynamics": {"ensemble_size": 3, "num_elites": 2, "hidden_dims": [8]}})
    model = EnsembleDynamics(11, 3, cfg.dynamics, generator=torch.Generator().manual_seed(0))
    actor = TanhGaussianActor(11, 3, (8,))
    w = RolloutActor(0, "hopper", {"dynamics": model.state_dict(), "policy": actor.state_dict(),
                                   "dataset": SimpleNamespace(observations=np.zeros((4, 11)))},
                     agent=cfg.agent, dynamics=cfg.dynamics, rollout=cfg.rollout, seed=cfg.seed)
    assert w.model_env.all_members is all_members and w.model_env.penalty == "max_aleatoric"
    import ray

    assert not ray.is_initialized()  # building a worker outside Ray starts no Ray instance


def test_model_defaults_are_mbpo_mopo():
    d = DynamicsConfig()
    assert (d.ensemble_size, d.num_elites, d.hidden_dims, d.learning_rate) == (7, 5, (200,) * 4, 1e-3)
    assert d.bootstrap and not d.recalibrate and (d.holdout_ratio, d.max_holdout) == (0.2, 1000)
    assert d.layer_weight_decays() == (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    assert DynamicsConfig(weight_decay=1e-4, hidden_dims=(8, 8)).layer_weight_decays() == (1e-4,) * 3
    assert DynamicsConfig(hidden_dims=(8, 8)).layer_weight_decays() == (2.5e-5, 5e-5, 1e-4)


def test_per_layer_weight_decay_reaches_the_optimizer_and_is_validated():
    cfg = DynamicsConfig(ensemble_size=2, num_elites=1, hidden_dims=(8, 8, 8, 8))
    m = EnsembleDynamics(4, 2, cfg, generator=torch.Generator().manual_seed(0))
    groups = DynamicsTrainer(m, cfg).optimizer.param_groups
    by_param = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert [by_param[id(layer.weight)] for layer in m.linear_layers()] == list(MBPO_WEIGHT_DECAY)
    assert all(by_param[id(layer.bias)] == 0.0 for layer in m.linear_layers())
    assert by_param[id(m.max_logvar)] == by_param[id(m.min_logvar)] == 0.0
    with pytest.raises(ConfigError, match="dynamics.weight_decay: 2 values for a net of 5 linear layers"):
        config_from_dict({"data": {"dataset": "x"}, "dynamics": {"weight_decay": [1e-4, 1e-4]}})
    with pytest.raises(ConfigError, match="dynamics.weight_decay: must be >= 0"):
        config_from_dict({"data": {"dataset": "x"}, "dynamics": {"weight_decay": -1.0}})
    ok = config_from_dict({"data": {"dataset": "x"}, "dynamics": {"weight_decay": list(MBPO_WEIGHT_DECAY)}})
    assert ok.dynamics.layer_weight_decays() == MBPO_WEIGHT_DECAY
    with pytest.raises(AssertionError, match="weight_decay"):
        DynamicsTrainer(m, DynamicsConfig(weight_decay=(1e-4, 1e-4)))


# ---------------------------------------------------------------------------------------------------------
# Figures for the report


def _figures() -> None:
    torch.set_num_threads(1)
    model, ds = trained_hopper()
    ref = entropy_reference(model, ds.observations, ds.actions, quantile=0.9)
    pools = rollout_pools(model, ds, ref.entropy_ref)
    print(f"hopper ensemble: H_ref (q=0.9) = {ref.entropy_ref:.3f} nats/dim, delta = E_D[u] = {ref.target:.4f}")
    for s in SIGMAS:
        p = pools[s]
        print(f"  action noise {s}: E[u new] = {float(p['new'].mean()):.3f}, E[u old] = {float(p['old'].mean()):.2f}, "
              f"E[r] = {float(p['rew'].mean()):.3f}")
    for lam0 in (0.1, 1.0, 5.0):
        old, s_old = lambda_trajectory(pools, "old", 0.0, lam0)
        new, s_new = lambda_trajectory(pools, "new", ref.target, lam0)
        print(f"lambda0={lam0}: updates 0,1k,..,5k")
        print("  old (sum of raw entropies, delta=0):", " ".join(f"{v:.4g}" for v in old), f"(policy noise {s_old})")
        print("  new (excess per-dim entropy, delta from D):", " ".join(f"{v:.4g}" for v in new),
              f"(policy noise {s_new})")
        u_old, r_old = pools[s_old]["old"], pools[s_old]["rew"]
        u_new, r_new = pools[s_new]["new"], pools[s_new]["rew"]
        print(f"  at 5k: old E[-lam u] = {float(-old[-1] * u_old.mean()):+.3f} (E[r] {float(r_old.mean()):.3f}); "
              f"new E[-lam u] = {float(-new[-1] * u_new.mean()):+.3f} (E[r] {float(r_new.mean()):.3f})")

    # HalfCheetah: a model trained on 2,000 random-policy transitions, rolled out 100 steps by a random policy
    from dromo_ray.data.gym_env import collect_transitions

    hc = collect_transitions("halfcheetah", "random", 2000, seed=0, progress=False)
    x, y = make_inputs_targets(hc.observations, hc.actions, hc.next_observations, hc.rewards)
    cfg = DynamicsConfig(ensemble_size=7, num_elites=5, hidden_dims=(64, 64), max_epochs=10)
    m = EnsembleDynamics(17, 6, cfg, generator=torch.Generator().manual_seed(0))
    train_ensemble(m, x, y, np.random.default_rng(0), torch.Generator().manual_seed(1))
    env = ModelEnv(m.eval(), halfcheetah_termination)
    torch.manual_seed(0)
    actor = TanhGaussianActor(17, 6, (8,))  # an untrained, random policy
    for h in (5, 100, 400):
        start = torch.as_tensor(np.asarray(hc.observations[:1000], np.float32))
        b = rollout(env, actor, start, h, torch.Generator().manual_seed(0))
        st = rollout_stats(b, 1000)
        print(f"halfcheetah h={h}: frac stopped by the +-100 rule = {st['rollout/frac_blown_up']:.3f}, "
              f"transitions {int(st['rollout/transitions'])} of {1000 * h}")


if __name__ == "__main__":
    _figures()

"""One conformance test every algorithm passes, plus the algorithm-specific behaviours (tiny networks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dromo_ray.core.agents import AGENT_ALGORITHMS, make_agent, restore_agent
from dromo_ray.core.agents.fused import twin_q
from dromo_ray.core.config import AgentConfig, DynamicsConfig
from dromo_ray.core.density import KDEDensity
from dromo_ray.core.dynamics import EnsembleDynamics
from dromo_ray.core.nets import TanhGaussianActor, TwinCritic
from dromo_ray.core.types import Batch, MixedBatch

OBS, ACT, N_REAL, N_MODEL = 4, 2, 12, 12
TINY = dict(hidden_dims=(32, 32), batch_size=N_REAL + N_MODEL, num_actions=4, critic_lr=1e-3, actor_lr=1e-3)

VARIANTS = {
    "dromo-action-constant-logsumexp": dict(algorithm="dromo", variance_form="action", density="constant",
                                            conservative_form="logsumexp"),
    "dromo-action-kde-expectation": dict(algorithm="dromo", variance_form="action", density="kde",
                                         conservative_form="expectation"),
    "dromo-action-kde-logsumexp": dict(algorithm="dromo", variance_form="action", density="kde",
                                       conservative_form="logsumexp"),
    "dromo-strict-expectation": dict(algorithm="dromo", variance_form="strict", conservative_form="expectation"),
    "combo-logsumexp": dict(algorithm="combo", conservative_form="logsumexp"),
    "combo-expectation": dict(algorithm="combo", conservative_form="expectation"),
    # published COMBO's switches: deterministic backup, mixed push-down states, cosine actor lr (T = 6 updates, so
    # the round trip below resumes mid-schedule and the loss-falls check runs past T)
    "combo-published": dict(algorithm="combo", deterministic_backup=True, conservative_states="mixed",
                            actor_lr_schedule="cosine", actor_lr_schedule_steps=6),
    "dromo-deterministic-mixed-cosine": dict(algorithm="dromo", density="kde", deterministic_backup=True,
                                             conservative_states="mixed", conservative_form="expectation",
                                             actor_lr_schedule="cosine", actor_lr_schedule_steps=50),
    "mbpo": dict(algorithm="mbpo"),
    "mbpo-clip-fixed-temperature": dict(algorithm="mbpo", max_grad_norm=1.0, auto_entropy=False),
    "mopo": dict(algorithm="mopo", mopo_lambda=0.5),
    "mopo_auto": dict(algorithm="mopo_auto", mopo_target_entropy=0.2),
    "mobile": dict(algorithm="mobile", mobile_beta=1.0, mobile_num_samples=3),
    "mobile-next_value-deterministic-backup": dict(algorithm="mobile", mobile_penalty_form="next_value",
                                                   deterministic_backup=True, mobile_num_samples=2),
}


def tiny_ensemble(seed: int = 0, members: int = 3, elites: int = 2) -> EnsembleDynamics:
    """A small random ensemble over (OBS, ACT) for MOBILE's penalty."""
    cfg = DynamicsConfig(ensemble_size=members, num_elites=elites, hidden_dims=(16,))
    return EnsembleDynamics(OBS, ACT, cfg, generator=torch.Generator().manual_seed(seed))


def make_batch(seed: int, unc: float | None = None) -> MixedBatch:
    g = torch.Generator().manual_seed(seed)

    def part(n: int, model: bool) -> Batch:
        obs = torch.randn(n, OBS, generator=g)
        u = torch.rand(n, generator=g) if unc is None else torch.full((n,), float(unc))
        return Batch(obs=obs, act=torch.rand(n, ACT, generator=g) * 2 - 1, rew=torch.randn(n, generator=g),
                     next_obs=obs + 0.1 * torch.randn(n, OBS, generator=g),
                     done=(torch.rand(n, generator=g) < 0.1).float(), unc=u if model else torch.zeros(n))

    return MixedBatch(part(N_REAL, False), part(N_MODEL, True))


def build(variant: str, seed: int = 0, **overrides):
    cfg = AgentConfig(**{**TINY, **VARIANTS[variant], **overrides})
    cfg.validate()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        behavior = TanhGaussianActor(OBS, ACT, (16,))
        density = KDEDensity(torch.randn(500, OBS), n_total=500, bandwidth=1.0, subsample=64, floor=1.0,
                             generator=torch.Generator().manual_seed(0))
    agent = make_agent(cfg, OBS, ACT, seed=seed, behavior=behavior,
                       density=density if cfg.density == "kde" else None, dataset_size=500, dynamics=tiny_ensemble())
    return agent, cfg


def params_of(agent) -> list[torch.Tensor]:
    mods = [agent.actor, agent.critic, agent.target_actor, agent.target_critic]
    return [p.detach().clone() for m in mods for p in m.parameters()] + [agent.log_ent_coef.detach().clone()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_every_algorithm_has_a_conformance_variant():
    assert {v["algorithm"] for v in VARIANTS.values()} == set(AGENT_ALGORITHMS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conformance(variant: str):
    agent, cfg = build(variant)
    batches = [make_batch(i) for i in range(4)]

    # metrics: the algorithm's loss record as train/ keys, finite floats; tensors without a sync
    m = agent.update(batches[0])
    fields = {f"train/{f.name}" for f in dataclasses.fields(agent.losses_cls)}
    assert set(m) == fields and {"train/critic_loss", "train/bellman", "train/actor_loss"} <= fields
    assert all(isinstance(v, float) and np.isfinite(v) for v in m.values()), m
    terms = [k for k in ("train/variance_penalty", "train/conservative") if k in m]
    assert m["train/critic_loss"] == pytest.approx(m["train/bellman"] + sum(m[k] for k in terms), rel=1e-5,
                                                   abs=1e-5)
    m_t = agent.update(batches[1], sync_metrics=False)
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in m_t.values())

    # act: shapes and range
    assert agent.act(np.zeros(OBS, np.float32)).shape == (ACT,)
    a = agent.act(np.random.randn(5, OBS).astype(np.float32), deterministic=False)
    assert a.shape == (5, ACT) and np.all(np.abs(a) <= 1)

    # target policy moves by Polyak τ: θ' <- τ θ + (1 - τ) θ'
    before = [p.detach().clone() for p in agent.target_actor.parameters()]
    agent.update(batches[2])
    after = [p.detach().clone() for p in agent.target_actor.parameters()]
    for old, new, cur in zip(before, after, agent.actor.parameters(), strict=True):
        assert torch.allclose(new, old + cfg.tau * (cur.detach() - old), atol=1e-7)
    tps = agent.target_policy_state()
    assert all(t.device.type == "cpu" for t in tps.values())
    assert all(torch.equal(tps[k], v) for k, v in agent.target_actor.state_dict().items())
    next(iter(tps.values())).add_(1.0)  # a copy: the agent is untouched
    assert torch.equal(next(iter(agent.target_actor.parameters())), after[0])

    # save/load round trip continues bitwise-identically (the restored agent starts from another seed)
    state = agent.state_dict()
    twin, _ = build(variant, seed=99)
    twin.load_state_dict(state)
    assert same(params_of(twin), params_of(agent))
    for i in range(3):
        ma = agent.update(batches[(i + 3) % 4])
        mb = twin.update(batches[(i + 3) % 4])
        assert ma == mb
    assert same(params_of(twin), params_of(agent))
    assert torch.equal(twin.generator.get_state(), agent.generator.get_state())
    restored = restore_agent(cfg, OBS, ACT, agent.state_dict())
    assert same(params_of(restored), params_of(agent))

    # determinism under a seed; another seed differs
    runs = []
    for seed in (7, 7, 8):
        ag, _ = build(variant, seed=seed)
        for b in batches[:3]:
            ag.update(b, sync_metrics=False)
        runs.append(params_of(ag))
    assert same(runs[0], runs[1]) and not same(runs[0], runs[2])

    # the critic loss falls on a fixed batch
    fresh, _ = build(variant, seed=1)
    losses = [fresh.update(batches[0])["train/critic_loss"] for _ in range(100)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_mopo_auto_lambda_follows_uncertainty_vs_target():
    for unc, rises in ((2.0, True), (0.0, False)):
        agent, cfg = build("mopo_auto", mopo_target_entropy=0.5, mopo_lambda=1.0, mopo_lambda_lr=0.05)
        b = make_batch(0, unc=unc)
        lams = [agent.update(b)["train/mopo_lambda"] for _ in range(10)]
        assert lams[0] == pytest.approx(1.0)
        assert (lams[-1] > 1.05) if rises else (lams[-1] < 0.95), lams


def test_mopo_penalises_model_rewards_only():
    agent, _ = build("mopo", mopo_lambda=2.0)
    b = make_batch(0, unc=0.25)
    m = agent.update(b)
    assert m["train/reward_penalty"] == pytest.approx(0.5) and m["train/mopo_lambda"] == pytest.approx(2.0)
    assert torch.allclose(agent.penalty.reward(b.model.rew, b.model.unc), b.model.rew - 0.5)


def test_make_agent_requires_behaviour_and_density_for_dromo_variance():
    cfg = AgentConfig(**TINY, algorithm="dromo", density="kde")
    with pytest.raises(ValueError, match="KDEDensity"):
        make_agent(cfg, OBS, ACT, behavior=TanhGaussianActor(OBS, ACT, (8,)))
    cfg = AgentConfig(**TINY, algorithm="dromo", density="constant")
    with pytest.raises(ValueError, match="behaviour"):
        make_agent(cfg, OBS, ACT)
    # combo and the strict variant need neither
    make_agent(AgentConfig(**TINY, algorithm="combo"), OBS, ACT)
    make_agent(AgentConfig(**TINY, algorithm="dromo", variance_form="strict"), OBS, ACT)


def test_fused_twin_q_matches_the_module_and_its_gradients():
    torch.manual_seed(0)
    critic = TwinCritic(OBS, ACT, (16, 8)).double()
    obs = torch.randn(6, 3, OBS, dtype=torch.double)
    act = torch.randn(6, 3, ACT, dtype=torch.double, requires_grad=True)
    q_ref, q = critic(obs, act), twin_q(critic, obs, act)
    assert q.shape == (2, 6, 3) and torch.allclose(q, q_ref)
    g_ref = torch.autograd.grad(q_ref.square().sum(), [act, *critic.parameters()])
    g = torch.autograd.grad(q.square().sum(), [act, *critic.parameters()])
    assert all(torch.allclose(x, y) for x, y in zip(g, g_ref, strict=True))
    assert torch.autograd.gradcheck(lambda a: twin_q(critic, obs[:2], a), (act[:2].detach().requires_grad_(),))


def test_workspace_reuse_is_safe_or_loud():
    from dromo_ray.core.agents.fused import Workspace

    torch.manual_seed(0)
    critic = TwinCritic(OBS, ACT, (16, 16))
    ws = Workspace()
    obs, act = torch.randn(5, OBS), torch.randn(5, ACT)
    grads = []
    for _ in range(2):  # forward, backward, forward, backward: buffers reused, same gradients
        critic.zero_grad()
        twin_q(critic, obs, act, ws).sum().backward()
        grads.append([p.grad.clone() for p in critic.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    first = twin_q(critic, obs, act, ws).sum()
    twin_q(critic, obs + 1, act, ws)  # overwrites the buffers the first graph saved
    with pytest.raises(RuntimeError, match="inplace"):
        first.backward()


@pytest.mark.parametrize("variant", ["dromo-action-kde-logsumexp", "combo-expectation", "mopo", "mopo_auto",
                                     "mobile"])
def test_update_without_model_rows(variant: str):
    """A d_f batch with no D_model rows yet (f rounding, or an empty buffer): finite metrics, no conservative term."""
    agent, _ = build(variant)
    b = make_batch(0)
    m = agent.update(MixedBatch(b.real, Batch(*(t[:0] for t in b.model))))
    assert all(np.isfinite(v) for v in m.values()), m
    assert m.get("train/conservative", 0.0) == 0.0 and m["train/q_model"] == 0.0

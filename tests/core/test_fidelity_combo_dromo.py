"""COMBO and DROMO as published: β's convention, the published switches, α's normalisation, the presets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dromo_ray.config import load_config
from dromo_ray.core import losses
from dromo_ray.core.agents import make_agent, restore_agent
from dromo_ray.core.agents.dromo import DromoTerms
from dromo_ray.core.agents.fused import twin_q
from dromo_ray.core.agents.sac import PolicyDist, UpdateInputs, cosine_lr
from dromo_ray.core.behavior import fit_behavior_policy
from dromo_ray.core.config import AgentConfig, config_from_dict
from dromo_ray.core.density import ConstantDensity, KDEDensity, density_from_state
from dromo_ray.core.types import Batch, MixedBatch
from dromo_ray.errors import ConfigError

TUNE = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks"
SWEEPS = TUNE.parent / "sweeps"
ENVS = ("halfcheetah", "hopper", "walker2d")
PUBLISHED = {  # env: (β, rollout length h) — COMBO appendix C and OfflineRL-Kit run_combo.py's suggested hypers
    "halfcheetah": (0.5, 5), "hopper": (5.0, 5), "walker2d": (5.0, 1),
}
OBS, ACT = 4, 2
TINY = dict(hidden_dims=(16, 16), batch_size=16, num_actions=3, critic_lr=1e-3, actor_lr=1e-3)


def _mixed(seed: int, n_real: int = 6, n_model: int = 6) -> MixedBatch:
    g = torch.Generator().manual_seed(seed)

    def part(n: int) -> Batch:
        obs = torch.randn(n, OBS, generator=g)
        return Batch(obs, torch.rand(n, ACT, generator=g) * 2 - 1, torch.randn(n, generator=g),
                     obs + 0.1 * torch.randn(n, OBS, generator=g), (torch.rand(n, generator=g) < 0.3).float(),
                     torch.zeros(n))

    return MixedBatch(part(n_real), part(n_model))


# ---- 1. β: Eq. 13's ½·MSE with β = β_published / 2 has the reference's gradient ratio ------------------------


@pytest.mark.parametrize("env", ENVS)
def test_preset_beta_has_the_published_ratio_of_conservative_to_bellman_gradient(env: str):
    """Our critic loss with the preset's β is exactly half the reference loss (CQL/OfflineRL-Kit: plain MSE +
    β_pub·(logsumexp - E_D Q)) on every parameter gradient, so conservative : Bellman is the reference's."""
    beta_pub = PUBLISHED[env][0]
    betas = {name: load_config(TUNE / name).agent.beta
             for name in (f"combo_{env}.yaml", f"combo_{env}_aligned.yaml", f"dromo_{env}.yaml")}
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)  # a tiny "critic": Q(x) = x · w
    x_data, x_rho = torch.randn(2, 5, 3), torch.randn(2, 4, 6, 3)  # (E, B, ·), (E, B_ρ, K, ·)
    log_prop = torch.randn(4, 6)
    y = torch.randn(5)
    for name, beta in betas.items():
        q, q_rho = x_data @ w, x_rho @ w
        ours_b = losses.bellman_error(q, y).sum()
        ours_c = losses.conservative_logsumexp(q_rho, log_prop, q[:, :3], beta).sum()
        # the reference, written out: per critic mean (q - y)² + β_pub (E_s logsumexp(q_k - log q_k) - E_D q)
        ref_b = ((q - y) ** 2).mean(-1).sum()
        ref_c = (beta_pub * (torch.logsumexp(q_rho - log_prop, -1).mean(-1) - q[:, :3].mean(-1))).sum()
        g = {k: torch.autograd.grad(v, w, retain_graph=True)[0]
             for k, v in dict(ob=ours_b, oc=ours_c, rb=ref_b, rc=ref_c).items()}
        ratio_ours = g["oc"].norm() / g["ob"].norm()
        ratio_ref = g["rc"].norm() / g["rb"].norm()
        assert ratio_ours.item() == pytest.approx(ratio_ref.item(), rel=1e-5), (name, beta)
        assert torch.allclose(g["ob"] + g["oc"], 0.5 * (g["rb"] + g["rc"]), atol=1e-6), name


# ---- 2. the published switches ----------------------------------------------------------------------------------


def _agent(seed: int = 0, **kw):
    cfg = AgentConfig(**{**TINY, "algorithm": "combo", **kw})
    cfg.validate()
    return make_agent(cfg, OBS, ACT, seed=seed), cfg


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_backup_target_is_reward_plus_discounted_min_target_q(deterministic: bool):
    agent, cfg = _agent(deterministic_backup=deterministic)
    b = _mixed(0).joined()
    pi_next = PolicyDist(*agent.actor.dist_params(b.next_obs))
    pi_next = PolicyDist(pi_next.mu.detach(), pi_next.log_std.detach())
    c = torch.tensor(0.37)
    state = agent.generator.get_state()
    y = agent.bellman_target(b.rew, b.done, b.next_obs, pi_next, c)
    agent.generator.set_state(state)
    with torch.no_grad():
        a_next, logp = pi_next.sample(agent.generator)
        q1, q2 = agent.target_critic(b.next_obs, a_next)
        min_q = torch.minimum(q1, q2)
        expected = b.rew + cfg.gamma * (1.0 - b.done) * (min_q if deterministic else min_q - c * logp)
    if deterministic:
        assert torch.equal(y, expected)  # exactly r + γ(1 - d)·min Q', no entropy term
    else:
        assert torch.allclose(y, expected, atol=1e-6)
        assert not torch.allclose(y, b.rew + cfg.gamma * (1.0 - b.done) * min_q)


def test_deterministic_backup_helper_matches_hand_computation():
    rew, done = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    next_q = torch.tensor([[3.0, 5.0], [4.0, 1.0]])
    assert torch.equal(losses.deterministic_bellman_target(rew, done, next_q, 0.5),
                       torch.tensor([1.0 + 0.5 * 3.0, 2.0]))


@pytest.mark.parametrize("form", ["logsumexp", "expectation"])
@pytest.mark.parametrize("states", ["model", "mixed"])
def test_push_down_rows_are_exactly_the_chosen_states(form: str, states: str):
    m, n_real, b = 3, 5, 9
    terms = DromoTerms(alpha=0.0, beta=1.0, f=0.5, num_actions=m, act_dim=ACT, conservative_form=form,
                       conservative_states=states, report_variance=False)
    obs, next_obs = torch.randn(b, OBS), torch.randn(b, OBS)
    pi = PolicyDist(torch.randn(b, ACT), torch.zeros(b, ACT))
    pi_next = PolicyDist(torch.randn(b, ACT), torch.zeros(b, ACT))
    plan = terms.plan(UpdateInputs(obs, next_obs, n_real, pi, pi_next, torch.Generator().manual_seed(0)))
    chosen = obs[n_real:] if states == "model" else obs
    k = 3 * m if form == "logsumexp" else 1
    assert plan.n_var == 0 and plan.rho_per_state == k and plan.n_rho == chosen.shape[0] * k
    assert torch.equal(plan.obs, chosen.repeat_interleave(k, 0))
    if form == "logsumexp":
        assert plan.log_proposal.shape == (chosen.shape[0], k)
        # the M actions "from π(·|s')" come from the chosen rows' own next states
        rows = slice(n_real, None) if states == "model" else slice(None)
        g = torch.Generator().manual_seed(5)
        a_next, logp_next = pi_next[rows].sample(g, m)
        assert torch.isfinite(logp_next).all() and a_next.shape == (chosen.shape[0], m, ACT)
    # the push-up term stays on the dataset rows: E_D Q of the real rows only
    q = torch.randn(2, b)
    q_extra = torch.randn(2, plan.n_rho)
    out = terms.losses(q, q_extra, plan, n_real)["conservative"]
    q_rho = q_extra.reshape(2, -1, k)
    push_down = (q_rho[..., 0].mean(-1) if form == "expectation" else
                 (torch.logsumexp(q_rho - plan.log_proposal, -1) - math.log(k)).mean(-1))
    assert torch.allclose(out, push_down - q[:, :n_real].mean(-1))


def test_make_agent_passes_the_push_down_states():
    agent, _ = _agent(conservative_states="mixed")
    assert agent.terms.conservative_states == "mixed"
    with pytest.raises(ConfigError, match="conservative_states"):
        AgentConfig(conservative_states="dataset").validate()


def test_cosine_actor_lr_at_start_half_and_end_and_in_the_optimiser():
    lr, t = 1e-3, 10
    assert cosine_lr(lr, 0, t) == lr
    assert cosine_lr(lr, t // 2, t) == pytest.approx(lr / 2, rel=1e-12)
    assert cosine_lr(lr, t, t) == 0.0 and cosine_lr(lr, 3 * t, t) == 0.0  # held at 0 past T
    agent, cfg = _agent(actor_lr_schedule="cosine", actor_lr_schedule_steps=t)
    assert agent.actor_lr() == lr
    for i in range(t // 2):
        agent.update(_mixed(i))
        assert agent.actor_opt.param_groups[0]["lr"] == cosine_lr(lr, i, t)  # update i used lr(i)
    assert agent.actor_lr() == pytest.approx(lr / 2, rel=1e-12)
    assert agent.critic_opt.param_groups[0]["lr"] == cfg.critic_lr  # the critic's lr is not scheduled
    # constant: untouched
    const, _ = _agent()
    const.update(_mixed(0))
    assert const.actor_opt.param_groups[0]["lr"] == cfg.actor_lr and const.actor_lr_steps == 0


def test_cosine_period_defaults_to_the_runs_total_steps_and_travels_in_the_state():
    cfg = AgentConfig(**{**TINY, "algorithm": "combo", "actor_lr_schedule": "cosine"})
    cfg.validate()
    with pytest.raises(ValueError, match="total_steps"):
        make_agent(cfg, OBS, ACT)
    agent = make_agent(cfg, OBS, ACT, total_steps=8)
    assert agent.actor_lr_steps == 8
    for i in range(3):
        agent.update(_mixed(i))
    state = agent.state_dict()
    assert state["actor_lr_steps"] == 8
    twin = restore_agent(cfg, OBS, ACT, state)  # no total_steps given: T comes from the state
    assert twin.actor_lr_steps == 8 and twin.actor_lr() == agent.actor_lr()
    assert agent.update(_mixed(9)) == twin.update(_mixed(9))
    with pytest.raises(ConfigError, match="actor_lr_schedule"):
        AgentConfig(actor_lr_schedule="linear").validate()
    with pytest.raises(ConfigError, match="actor_lr_schedule_steps"):
        AgentConfig(actor_lr_schedule_steps=-1).validate()


# ---- 3. α means the same for both estimators and moves the critic -----------------------------------------------


def test_relative_density_is_one_for_constant_and_count_over_loo_mean_for_kde():
    const = ConstantDensity(10**6)
    assert torch.equal(const.relative_count(torch.randn(3, 2)), torch.ones(3))
    states = torch.tensor([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0]])
    kde = KDEDensity(states, n_total=300, bandwidth=1.0, subsample=10, floor=0.0)
    c = kde.centres
    k = torch.exp(-torch.cdist(c, c).square() / 2)
    loo = 300 * (k.sum() - 3) / (3 * 2)  # leave-one-out mean count over the centres
    assert kde.reference.item() == pytest.approx(loo.item(), rel=1e-5)
    x = torch.randn(4, 2)
    assert torch.allclose(kde.relative_count(x), kde.count(x) / loo, rtol=1e-5)
    # N_ref is derived: checkpoints keep their keys, and a restored estimator has the same reference
    assert "reference" not in kde.state_dict()
    restored = density_from_state(kde.state_dict())
    assert torch.equal(restored.reference, kde.reference)
    assert torch.equal(restored.relative_count(x), kde.relative_count(x))


def _hopper_setup(ds, density_kind: str, dataset_size: int | None = None, **kw):
    obs = ds.observations
    beh, _ = fit_behavior_policy(obs, ds.actions, hidden=(32,), steps=50, seed=0)
    if density_kind == "kde":
        density = KDEDensity(obs, n_total=dataset_size, bandwidth=1.0, subsample=512, floor=1.0,
                             generator=torch.Generator().manual_seed(0))
    else:
        density = ConstantDensity(dataset_size or obs.shape[0])
    cfg = AgentConfig(algorithm="dromo", hidden_dims=(64, 64), beta=0.0, density=density_kind,
                      deterministic_backup=True, **kw)
    cfg.validate()
    return cfg, beh, density


def _hopper_batch(ds, n: int = 256, seed: int = 0) -> MixedBatch:
    idx = np.random.default_rng(seed).choice(ds.observations.shape[0], n, replace=False)

    def t(a):
        return torch.as_tensor(np.asarray(a)[idx])

    b = Batch(t(ds.observations), t(ds.actions), t(ds.rewards), t(ds.next_observations),
              t(ds.terminals.astype(np.float32)), torch.zeros(n))
    h = n // 2
    return MixedBatch(Batch(*(x[:h] for x in b)), Batch(*(x[h:] for x in b)))


def _critic_gradients(agent, batch: MixedBatch) -> tuple[float, float, float]:
    """(‖∇ Bellman‖, ‖∇ variance term‖, variance term / Bellman term) on one batch, the agent's own plan."""
    b, n_real = batch.joined(), batch.real.obs.shape[0]
    with torch.no_grad():
        pi = PolicyDist(*agent.actor.dist_params(b.obs))
        pi_next = PolicyDist(*agent.actor.dist_params(b.next_obs))
        y = agent.bellman_target(b.rew, b.done, b.next_obs, pi_next, agent.log_ent_coef.exp())
        plan = agent.terms.plan(UpdateInputs(b.obs, b.next_obs, n_real, pi, pi_next, agent.generator))
    params = list(agent.critic.parameters())
    q = twin_q(agent.critic, b.obs, b.act)
    bell = losses.bellman_error(q, y).sum()
    var = agent.terms.losses(q, twin_q(agent.critic, plan.obs, plan.act), plan, n_real)["variance_penalty"].sum()
    gb = torch.cat([g.flatten() for g in torch.autograd.grad(bell, params, retain_graph=True)])
    gv = torch.cat([g.flatten() for g in torch.autograd.grad(var, params)])
    return gb.norm().item(), gv.norm().item(), (var / bell).item()


@pytest.mark.parametrize("density_kind", ["constant", "kde"])
def test_alpha_one_moves_the_critic_visibly_on_real_hopper_transitions(tiny_hopper_dataset, density_kind: str):
    """Real Hopper-v5 transitions; |D| = 1e6 as on D4RL (Eq. 13's raw |D(s)| made the term about α·std/1000).
    At α = 1 the variance term's critic gradient is a visible fraction of the Bellman term's, the logged
    train/variance_to_bellman says so, and the updated Q-values differ from α = 0's."""
    ds = tiny_hopper_dataset
    batch = _hopper_batch(ds)
    qs = {}
    for alpha in (0.0, 1.0):
        cfg, beh, density = _hopper_setup(ds, density_kind, dataset_size=10**6, alpha=alpha)
        agent = make_agent(cfg, ds.observations.shape[1], ds.actions.shape[1], seed=0, behavior=beh,
                           density=density, dataset_size=10**6)
        if alpha > 0:
            g_bell, g_var, ratio = _critic_gradients(agent, batch)
            assert g_var > 0.05 * g_bell, (density_kind, g_var, g_bell)
        m = {}
        for _ in range(5):
            m = agent.update(batch)
        if alpha > 0:
            assert m["train/variance_to_bellman"] > 0.02, m
            assert m["train/variance_to_bellman"] == pytest.approx(
                m["train/variance_penalty"] / m["train/bellman"], rel=1e-4)
        else:
            assert m["train/variance_to_bellman"] == 0.0
        b = batch.joined()
        with torch.no_grad():
            qs[alpha] = twin_q(agent.critic, b.obs, b.act)
    # the variance term changes what the critic learns: visibly different Q on the batch after 5 updates
    assert (qs[1.0] - qs[0.0]).abs().mean() > 0.01 * qs[0.0].abs().mean(), density_kind


def test_sweep_arms_both_sweep_a_real_alpha(tiny_hopper_dataset):
    """Each density arm of sweep_dromo_alpha_hopper.yaml, at its largest α, makes the variance gradient at least
    half the Bellman gradient, and at its smallest α at most a tenth of it (|D| = 1e6 as on D4RL)."""
    spec = yaml.safe_load((SWEEPS / "sweep_dromo_alpha_hopper.yaml").read_text())
    lo, hi = spec["search"]["agent.alpha"]["loguniform"]
    arms = spec["search"]["agent.density"]["grid"]
    assert sorted(arms) == ["constant", "kde"] and hi / lo >= 100
    ds = tiny_hopper_dataset
    batch = _hopper_batch(ds, seed=1)
    for kind in arms:
        fractions = []
        for alpha in (lo, hi):
            cfg, beh, density = _hopper_setup(ds, kind, dataset_size=10**6, alpha=alpha)
            agent = make_agent(cfg, ds.observations.shape[1], ds.actions.shape[1], seed=0, behavior=beh,
                               density=density, dataset_size=10**6)
            g_bell, g_var, _ = _critic_gradients(agent, batch)
            fractions.append(g_var / g_bell)
        assert fractions[0] < 0.1 and fractions[1] > 0.5, (kind, fractions)


# ---- 4. the strict variant is an ablation, labelled so ------------------------------------------------------------


def test_strict_variant_is_labelled_an_ablation():
    import dromo_ray.core.agents as agents_pkg
    import dromo_ray.core.config as config_mod

    cfg_src = Path(config_mod.__file__).read_text()
    i = cfg_src.index("variance_form: str")
    assert "ABLATION" in cfg_src[i:i + 600]  # the field's docstring
    assert "ABLATION" in losses.strict_variance_penalty.__doc__
    assert "ablation" in agents_pkg.__doc__  # the table of variants


# ---- 5. the presets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVS)
def test_combo_preset_is_the_published_configuration(env: str):
    beta_pub, h = PUBLISHED[env]
    cfg = load_config(TUNE / f"combo_{env}.yaml")
    a, r, d = cfg.agent, cfg.rollout, cfg.dynamics
    assert (cfg.data.dataset, cfg.data.env) == (f"{env}-medium-v2", env)
    assert a.algorithm == "combo" and a.effective_alpha() == 0.0
    assert a.beta == beta_pub / 2  # the published β in our ½·MSE convention
    assert r.horizon == h and r.batch_size == 50_000 and r.interval == 1000
    assert r.model_buffer_size == 50_000 * h * 5  # 5 retained rollout rounds
    assert a.f == 0.5
    assert a.hidden_dims == (256, 256, 256) and a.batch_size == 256
    assert (a.actor_lr, a.critic_lr, a.entropy_lr) == (1e-4, 3e-4, 1e-4)
    assert (a.gamma, a.tau) == (0.99, 0.005)
    assert a.auto_entropy and a.init_entropy_coef == 1.0 and a.target_entropy is None
    assert a.deterministic_backup is True
    assert a.conservative_states == "mixed"
    assert a.conservative_form == "logsumexp" and a.num_actions == 10
    assert a.actor_lr_schedule == "cosine" and a.actor_lr_schedule_steps == 0
    assert cfg.train.total_steps == 1_000_000
    assert (d.ensemble_size, d.num_elites, d.hidden_dims, d.learning_rate) == (7, 5, (200,) * 4, 1e-3)
    # every number in the agent and rollout sections has its source beside it
    text = (TUNE / f"combo_{env}.yaml").read_text()
    for src in ("[Kit]", "[COMBO]", "[CQL]", f"cql-weight={beta_pub}", f"rollout-length={h}"):
        assert src in text, src


@pytest.mark.parametrize("env", ENVS)
def test_aligned_combo_is_dromo_without_the_variance_term(env: str):
    combo = load_config(TUNE / f"combo_{env}_aligned.yaml").to_dict()
    dromo = load_config(TUNE / f"dromo_{env}.yaml").to_dict()
    dromo_only = {"algorithm", "alpha", "variance_form", "density", "kde_bandwidth", "kde_subsample",
                  "density_floor"}
    for key in dromo_only:
        combo["agent"].pop(key), dromo["agent"].pop(key)
    assert combo == dromo
    d = load_config(TUNE / f"dromo_{env}.yaml").agent
    assert d.beta == PUBLISHED[env][0] / 2 and d.conservative_states == "model" and d.variance_form == "action"
    assert d.deterministic_backup and d.actor_lr_schedule == "cosine"


def test_bad_switch_values_name_the_key():
    with pytest.raises(ConfigError, match="agent.conservative_states"):
        config_from_dict({"data": {"dataset": "x"}, "agent": {"conservative_states": "rho"}})
    with pytest.raises(ConfigError, match="agent.deterministic_backup"):
        config_from_dict({"data": {"dataset": "x"}, "agent": {"deterministic_backup": "yes"}})

"""The captured update and learner-side rollouts (issue #14).

CPU (CI): the static-buffer step that the CUDA graph records, run eagerly, trains to the same weights as the eager
update for every algorithm variant; the warm-up before a capture is undone bitwise; checkpoints are the same in
both modes; learner-side rollouts fill a device D_model and train end to end. CUDA (skipped without a GPU): the
graphed update equals the eager one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_agents import ACT, OBS, TINY, VARIANTS, build, tiny_ensemble

from dromo_ray.core.agents.captured import CapturedUpdate, resolve_update_mode
from dromo_ray.core.buffer import DeviceReplayBuffer, ReplayBuffer
from dromo_ray.core.config import AgentConfig, RolloutConfig
from dromo_ray.core.learner import DatasetSampler, Learner
from dromo_ray.core.model_env import ModelEnv
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.rollout import LearnerRollouts, rollout, rollout_batch
from dromo_ray.core.types import Batch, NumpyBatch
from dromo_ray.errors import ConfigError

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def rows(n: int, seed: int, unc: bool = True) -> NumpyBatch:
    r = np.random.default_rng(seed)
    o = r.standard_normal((n, OBS)).astype(np.float32)
    return NumpyBatch(o, r.uniform(-1, 1, (n, ACT)).astype(np.float32), r.standard_normal(n).astype(np.float32),
                      o + 0.1 * r.standard_normal((n, OBS)).astype(np.float32),
                      (r.random(n) < 0.1).astype(np.float32),
                      r.random(n).astype(np.float32) if unc else np.zeros(n, np.float32))


def learner(variant: str, mode: str, device: str = "cpu", chunk: int = 4, **overrides) -> Learner:
    """A Learner over a fixed dataset and a fixed D_model; same seeds for every mode."""
    agent, cfg = build_on(variant, device, **overrides)
    buf = ReplayBuffer(1000, OBS, ACT)
    buf.add(rows(500, 1))
    rng = np.random.default_rng(3)
    sampler = DatasetSampler(rows(300, 2, unc=False), torch.device(device), seed=5)
    return Learner(agent, sampler, cfg.batch_size, cfg.f, lambda k, b: buf.sample_chunk(k, b, rng),
                       chunk_batches=chunk, update_mode=mode)


def build_on(variant: str, device: str = "cpu", **overrides):
    """``test_agents.build`` (seed 0) on ``device``."""
    from dromo_ray.core.agents import make_agent
    from dromo_ray.core.density import KDEDensity

    cfg = AgentConfig(**{**TINY, **VARIANTS[variant], **overrides})
    cfg.validate()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        behavior = TanhGaussianActor(OBS, ACT, (16,))
        density = KDEDensity(torch.randn(500, OBS), n_total=500, bandwidth=1.0, subsample=64, floor=1.0,
                             generator=torch.Generator().manual_seed(0))
    agent = make_agent(cfg, OBS, ACT, device=device, seed=0, behavior=behavior,
                       density=density if cfg.density == "kde" else None, dataset_size=500, dynamics=tiny_ensemble())
    return agent, cfg


def agent_tensors(agent) -> dict[str, torch.Tensor]:
    """Every tensor an update writes: weights, targets, temperature, λ and the optimizer moments."""
    state = agent.state_dict()
    out = {}
    for net in ("actor", "critic", "target_actor", "target_critic"):
        out.update({f"{net}.{k}": v for k, v in state[net].items()})
    out["log_ent_coef"] = state["log_ent_coef"]
    for name in ("actor_opt", "critic_opt", "ent_opt"):
        opt = state[name]
        for pid, st in (opt or {}).get("state", {}).items():
            out.update({f"{name}.{pid}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    if "log_lambda" in state["penalty"]:
        out["log_lambda"] = state["penalty"]["log_lambda"]
    return out


def max_diff(a, b) -> float:
    ta, tb = agent_tensors(a), agent_tensors(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


# ---- CPU: the capture-ready step, eagerly ------------------------------------------------------------------


def test_update_modes_resolve_and_validate():
    assert resolve_update_mode("auto", "cpu") == "eager" and resolve_update_mode("auto", "cuda") == "captured"
    assert resolve_update_mode("captured", "cpu") == "captured"
    assert AgentConfig().update_mode == "auto" and RolloutConfig().mode == "workers"
    with pytest.raises(ConfigError, match="agent.update_mode"):
        AgentConfig(update_mode="graph").validate()
    with pytest.raises(ConfigError, match="rollout.mode"):
        RolloutConfig(mode="gpu").validate()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_captured_step_trains_like_the_eager_update(variant: str):
    """Same seed, same batches (chunks of 4, 7 updates: a partial chunk), both modes: the same weights, optimizer
    moments and metrics (bitwise, except a cosine lr, which the captured step holds as a float32 tensor)."""
    eager, captured = learner(variant, "eager"), learner(variant, "captured")
    m_e, m_c = eager.train(7), captured.train(7)
    assert captured.captured is not None and not captured.captured.graph  # no graph on CPU: the step runs eagerly
    assert eager.agent.step == captured.agent.step == 7 and eager.steps == captured.steps == 7
    cosine = VARIANTS[variant].get("actor_lr_schedule") == "cosine"
    assert max_diff(eager.agent, captured.agent) <= (1e-6 if cosine else 0.0)
    assert m_e.keys() == m_c.keys()
    for k in m_e:
        assert m_c[k] == pytest.approx(m_e[k], rel=1e-5, abs=1e-6 if cosine else 0.0), k
    # the next call continues identically (the cursor and the metric sums restart)
    eager.train(3)
    captured.train(3)
    assert max_diff(eager.agent, captured.agent) <= (1e-6 if cosine else 0.0)


@pytest.mark.parametrize("variant", ["dromo-action-kde-logsumexp", "combo-published", "mopo_auto", "mobile"])
def test_warmup_before_a_capture_is_undone(variant: str):
    """The warm-up updates run before a capture leave no trace: weights, moments (fresh Adam state included),
    temperature, λ, generator, cursor and sums come back bitwise, so training continues as without them."""
    a, b = learner(variant, "captured"), learner(variant, "captured")
    a.train(2)
    b.train(2)
    runner = b.captured
    runner.load_chunk(1, b.sampler.draw_indices(b.n_real), Batch(*(t[: b.n_model] for t in runner.model)))
    gen = b.agent.generator.get_state()
    runner.warmup_and_restore()
    assert torch.equal(b.agent.generator.get_state(), gen)
    assert max_diff(a.agent, b.agent) == 0.0
    # and from a fresh optimizer (no Adam state yet): the zeroed state is Adam's initial one
    c, d = learner(variant, "captured"), learner(variant, "captured")
    d._captured().warmup_and_restore()
    c.train(3)
    d.train(3)
    assert max_diff(c.agent, d.agent) == 0.0


def test_checkpoints_are_the_same_in_both_modes():
    """A captured learner's state loads into an eager one (and back) and both continue identically; the state
    holds floats for lr and capturable off whatever the mode."""
    a = learner("combo-published", "captured")  # cosine schedule: a tensor lr inside the captured step
    a.train(5)
    state = a.state_dict()
    groups = state["agent"]["actor_opt"]["param_groups"]
    assert all(isinstance(g["lr"], float) and not g.get("capturable") for g in groups)
    b = learner("combo-published", "eager")
    b.load_state_dict(state)
    c = learner("combo-published", "captured")
    c._captured()  # built and prepared before the load: the load invalidates it
    c.load_state_dict(state)
    assert not c.captured._ready
    b.train(4)  # (b and c draw model rows from equal, fresh D_model streams)
    c.train(4)
    assert max_diff(b.agent, c.agent) <= 1e-6


def test_captured_update_rejects_a_graph_off_cuda():
    agent, _ = build("mbpo")
    data = DatasetSampler(rows(50, 0, unc=False), torch.device("cpu"), 0).data
    with pytest.raises(ValueError, match="CUDA"):
        CapturedUpdate(agent, data, 12, 12, 4, graph=True)


# ---- learner-side rollouts ---------------------------------------------------------------------------------


def tiny_rollouts(buffer_size: int = 5000, seed: int = 0) -> LearnerRollouts:
    model = tiny_ensemble()
    env = ModelEnv(model.eval(), lambda s: s[:, 0] > 3.0, penalty="max_aleatoric")
    actor = TanhGaussianActor(OBS, ACT, (16,))
    return LearnerRollouts(env, actor, rows(200, 4).obs, horizon=3, num_starts=40, buffer_size=buffer_size,
                           device="cpu", seed=seed)


def test_rollout_batch_is_rollout_on_the_device():
    env = ModelEnv(tiny_ensemble().eval(), lambda s: s[:, 0] > 1.0)
    actor = TanhGaussianActor(OBS, ACT, (16,))
    start = torch.as_tensor(rows(30, 5).obs)
    a = rollout(env, actor, start, 4, torch.Generator().manual_seed(1))
    b = rollout_batch(env, actor, start, 4, torch.Generator().manual_seed(1))
    assert isinstance(b, Batch) and b.size == a.size > 30
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y.numpy())


def test_device_replay_buffer_is_a_fifo_with_the_numpy_buffers_state():
    host, dev = ReplayBuffer(50, OBS, ACT), DeviceReplayBuffer(50, OBS, ACT, "cpu")
    for seed, n in ((0, 30), (1, 35), (2, 70)):
        b = rows(n, seed)
        host.add(b)
        dev.add(b.to_torch())
        assert len(dev) == len(host) and dev.total_added == host.total_added
        for k, v in host.state_dict().items():
            w = dev.state_dict()[k]
            assert np.array_equal(v, w) if isinstance(v, np.ndarray) else v == w, k
    twin = DeviceReplayBuffer(50, OBS, ACT, "cpu")
    twin.load_state_dict(host.state_dict())
    chunk = twin.sample_chunk(3, 8, torch.Generator().manual_seed(0))
    assert chunk.obs.shape == (24, OBS) and chunk.act.shape == (24, ACT) and chunk.rew.shape == (24,)


@pytest.mark.parametrize("mode", ["eager", "captured"])
def test_learner_side_rollouts_train_end_to_end(mode: str):
    """rollout.mode learner in core: a round before the first update and every interval, model rows from the
    device D_model, the learner updates; the state round-trips and continues identically."""
    agent, cfg = build("mopo")
    ro = tiny_rollouts()
    ro.actor = agent.target_actor  # the learner rolls out its own target policy
    sampler = DatasetSampler(rows(300, 2, unc=False), torch.device("cpu"), seed=5)
    core = Learner(agent, sampler, cfg.batch_size, cfg.f, None, chunk_batches=4, update_mode=mode,
                       rollouts=ro, rollout_interval=10)
    before = [p.detach().clone() for p in agent.critic.parameters()]
    m = core.train(25)  # rounds at steps 0, 10, 20
    assert ro.rounds == 3 and core.steps == agent.step == 25
    assert 0 < len(ro.buffer) <= 3 * 40 * 3
    data = ro.buffer._data
    assert data["obs"].shape == (5000, OBS) and data["act"].shape == (5000, ACT) and data["rew"].shape == (5000,)
    assert np.isfinite(m["train/critic_loss"]) and m["replay/size"] == len(ro.buffer)
    assert {"rollout/mean_reward", "rollout/transitions"} <= m.keys()
    assert core.rollout_s > 0 and core.data_wait_s >= core.rollout_s
    assert not all(torch.equal(a, b) for a, b in zip(before, agent.critic.parameters(), strict=True))
    # a resumed learner continues bitwise (the round at step 30 included)
    state = core.state_dict()
    agent2, _ = build("mopo", seed=9)
    ro2 = tiny_rollouts(seed=3)
    ro2.actor = agent2.target_actor
    core2 = Learner(agent2, DatasetSampler(rows(300, 2, unc=False), torch.device("cpu"), seed=1), cfg.batch_size,
                        cfg.f, None, chunk_batches=4, update_mode=mode, rollouts=ro2, rollout_interval=10)
    core2.load_state_dict(state)
    core.train(10)
    core2.train(10)
    assert ro.rounds == ro2.rounds == 4  # ro2's counter came from the state
    assert max_diff(agent, agent2) == 0.0


def test_learner_actor_in_learner_rollout_mode(tiny_hopper_dataset):
    """The runtime's Learner (a plain class here, no Ray) with rollout.mode learner: it builds the elite ensemble on
    its device, rolls out itself and trains, without a replay actor."""
    from dromo_ray.core import dynamics
    from dromo_ray.core.config import config_from_dict
    from dromo_ray.runtime import actors

    ds = tiny_hopper_dataset
    cfg = config_from_dict({
        "data": {"dataset": "x", "env": "hopper"}, "device": "cpu",
        "agent": {"algorithm": "mbpo", "hidden_dims": [32, 32], "batch_size": 32, "update_mode": "captured"},
        "dynamics": {"ensemble_size": 3, "num_elites": 2, "hidden_dims": [16]},
        "rollout": {"mode": "learner", "horizon": 2, "batch_size": 64, "interval": 8, "model_buffer_size": 1000},
        "runtime": {"replay_chunk_batches": 4},
    })
    assert actors.learner_needs_dynamics(cfg)
    a = actors.dataset_arrays(ds)
    model = dynamics.EnsembleDynamics(ds.obs_dim, ds.act_dim, cfg.dynamics, generator=torch.Generator().manual_seed(0))
    model.set_normalizer(dynamics.normalizer_stats(*dynamics.make_inputs_targets(a.obs, a.act, a.next_obs, a.rew)))
    learner = actors.LearnerActor(cfg, "hopper", ds, None, None, None, 0.0, model.state_dict())
    out = learner.train(20)
    rollouts = learner.learner.rollouts
    assert out["step"] == 20 and rollouts.rounds == 3 and len(rollouts.buffer) > 64
    assert rollouts.buffer._data["obs"].shape == (1000, ds.obs_dim)
    m = out["metrics"]
    assert np.isfinite(m["train/critic_loss"]) and 0 < m["perf/learner_wait_fraction"] < 1
    assert "rollouts" in learner.state_dict()


@pytest.mark.ray
def test_run_with_learner_side_rollouts_on_ray(tiny_hopper_hdf5, tmp_path):
    """Algorithm 1 on local Ray with rollout.mode learner and the captured update: no rollout worker, the learner's
    own D_model fills, the checkpoint carries it and the replay actor stays empty."""
    import ray
    from test_runtime import TINY as tiny_yaml  # the runtime tests' tiny config, wherever it lives

    from dromo_ray.config import load_config
    from dromo_ray.data.load import load_dataset
    from dromo_ray.runtime.checkpoint import load_checkpoint
    from dromo_ray.runtime.driver import run_experiment

    cfg = load_config(tiny_yaml, [f"data.dataset={tiny_hopper_hdf5}", f"out_dir={tmp_path}", "rollout.mode=learner",
                                  "agent.update_mode=captured", "train.total_steps=50", "train.eval_interval=50",
                                  "train.checkpoint_interval=50", "runtime.num_evaluators=0"])
    started: dict = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        res = run_experiment(cfg, load_dataset(str(tiny_hopper_hdf5)), tmp_path, progress=False,
                             on_start=lambda info: started.update(info))
    finally:
        ray.shutdown()
    assert res.steps == 50 and started["workers"] == []
    ckpt = load_checkpoint(res.checkpoint)
    buffer = ckpt["learner"]["rollouts"]["buffer"]
    assert buffer["size"] > 0 and buffer["obs"].shape == (buffer["size"], 11)
    assert ckpt["replay"]["buffer"]["size"] == 0


# ---- CUDA: graphed == eager --------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graphed_update_equals_eager_on_cuda(variant: str):
    eager, graphed = learner(variant, "eager", "cuda"), learner(variant, "captured", "cuda")
    m_e, m_g = eager.train(9), graphed.train(9)
    assert graphed.captured is not None and graphed.captured._graph is not None
    diff = max_diff(eager.agent, graphed.agent)
    print(f"{variant}: max |graphed - eager| = {diff:.3g}")
    assert diff < 1e-4
    for k in m_e:
        assert m_g[k] == pytest.approx(m_e[k], rel=1e-3, abs=1e-4), k


@needs_cuda
@pytest.mark.parametrize("variant", ["dromo-action-kde-logsumexp", "mopo_auto", "mobile", "combo-published"])
def test_graph_replay_equals_its_step_run_eagerly_on_cuda(variant: str):
    """The recorded graph against the same static-buffer step without a graph (capturable optimizers both)."""
    graphed, plain = learner(variant, "captured", "cuda"), learner(variant, "captured", "cuda")
    plain.captured = CapturedUpdate(plain.agent, plain.sampler.data, plain.n_real, plain.n_model, 4, graph=False)
    for opt in plain.agent.optimizers():
        for g in opt.param_groups:
            g["capturable"] = True
    graphed.train(6)
    plain.train(6)
    assert max_diff(graphed.agent, plain.agent) < 1e-6

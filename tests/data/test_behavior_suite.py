"""Behaviour policies with RLlib SAC and the D4RL-v2-style suite, CI-sized.

One tiny SAC run (Hopper-v5, 2,000 env steps, 32x32 networks) feeds every test of the module; the suite is
made from it with 600 transitions per collected part. The full-size suite is the ``slow`` test at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import h5py
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

STEPS, EVERY, SIZE = 2000, 500, 600
PART_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left():
    yield
    ray.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory):
    from dromo_ray.rllib.sac import BehaviorConfig, train_behavior

    out = tmp_path_factory.mktemp("behavior") / "hopper"
    cfg = BehaviorConfig(env="hopper", steps=STEPS, out=str(out), seed=0, hidden=(32, 32), checkpoint_every=EVERY,
                         eval_episodes=2, learning_starts=300, batch_size=64, updates_every=2, progress=False)
    try:
        res = train_behavior(cfg)
    finally:
        ray.shutdown()
    assert not ray.is_initialized(), "train_behavior must shut down the Ray it started"
    return res


@pytest.fixture(scope="module")
def suite(sac_run, tmp_path_factory):
    from dromo_ray.data.suite import make_suite

    out = tmp_path_factory.mktemp("suite") / "hopper"
    manifest = make_suite("hopper", SIZE, out, sac_run.out, seed=7, progress=False)
    return out, manifest


# ---- SAC run, index, replay log ------------------------------------------------------------------------


def test_index_lists_checkpoints_with_returns(sac_run):
    from dromo_ray.data.policy_io import load_index

    index = load_index(sac_run.out)
    assert index["complete"] and index["env"] == "hopper" and index["env_steps"] == STEPS
    steps = [c["env_steps"] for c in index["checkpoints"]]
    assert steps == list(range(EVERY, STEPS + 1, EVERY))
    assert index["final"] == index["checkpoints"][-1]["name"]
    for c in index["checkpoints"]:
        assert (sac_run.out / c["policy"]).is_file()
        assert c["replay_rows"] == c["env_steps"]
        for key in ("return_mean", "normalized_score", "stochastic_return_mean", "stochastic_normalized_score"):
            assert np.isfinite(c[key])
        assert c["parity"]["det_action"] <= 1e-5 and c["parity"]["log_std"] <= 1e-5
    assert index["versions"]["ray"].startswith("2.")
    assert "qf_loss" in index["checkpoints"][-1]["train"]  # learning started


def test_replay_log_is_every_transition_and_loads(sac_run):
    from dromo_ray.data.load import load_dataset

    log = load_dataset(str(sac_run.out / "replay.hdf5"))
    assert len(log) == STEPS and log.env_id == "hopper"
    assert log.metadata["kind"] == "sac_replay_log" and log.metadata["complete"] == 1
    ends = log.terminals | log.timeouts
    # contiguous episodes: successor of every non-final row is the next row
    np.testing.assert_array_equal(log.next_observations[:-1][~ends[:-1]], log.observations[1:][~ends[:-1]])
    assert log.terminals.sum() > 0  # a tiny hopper falls
    # MuJoCo state matches the observations (Hopper-v5: obs[:5] = qpos[1:])
    assert set(log.infos) >= {"qpos", "qvel", "next_qpos", "next_qvel"}
    np.testing.assert_allclose(log.observations[:, :5], log.infos["qpos"][:, 1:], atol=1e-6)
    np.testing.assert_allclose(log.next_observations[:, :5], log.infos["next_qpos"][:, 1:], atol=1e-6)


def test_policy_files_load_safely_and_act(sac_run):
    from dromo_ray.data.policy_io import load_policy

    c = sac_run.checkpoints[-1]
    blob = torch.load(sac_run.out / c["policy"], weights_only=True)  # no pickle of code
    assert blob["meta"]["source"] == "rllib" and blob["meta"]["stochastic_parity"] == 1
    pol = load_policy(sac_run.out / c["policy"])
    a = pol(np.zeros((5, 11), np.float32))
    assert a.shape == (5, 3) and np.all(np.abs(a) < 1)


def test_behavior_run_refuses_to_overwrite(sac_run):
    from dromo_ray.rllib.sac import BehaviorConfig, train_behavior

    with pytest.raises(FileExistsError):
        train_behavior(BehaviorConfig(env="hopper", steps=10, out=str(sac_run.out), progress=False))
    assert not ray.is_initialized()


# ---- export: RLlib module -> TanhGaussianActor ------------------------------------------------------


def _module(cls, hidden=(16, 16), activation="relu"):
    import gymnasium as gym
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from dromo_ray.rllib.module import model_config

    mc = asdict(model_config(hidden))
    mc.update(fcnet_activation=activation, twin_q=True)
    spec = RLModuleSpec(module_class=cls, observation_space=gym.spaces.Box(-np.inf, np.inf, (11,), np.float32),
                        action_space=gym.spaces.Box(-1.0, 1.0, (3,), np.float32), model_config=mc,
                        inference_only=False)
    module = spec.build()
    torch.manual_seed(0)
    with torch.no_grad():  # spread the outputs: saturated tanh, log-stds on both clamps
        for p in module.parameters():
            p.mul_(4.0)
    return module


def test_export_matches_rllib_distribution(tmp_path):
    from ray.rllib.core.columns import Columns

    from dromo_ray.core.nets import tanh_gaussian_log_prob
    from dromo_ray.data.policy_io import load_policy
    from dromo_ray.rllib.export import check_parity, export_policy
    from dromo_ray.rllib.module import SoftClampSACTorchRLModule

    module = _module(SoftClampSACTorchRLModule)
    obs = np.random.default_rng(0).normal(size=(512, 11)).astype(np.float32) * 3
    path, report = export_policy(module, tmp_path / "p.pt", obs, meta={"env_key": "hopper"})
    assert max(report.values()) < 1e-4
    loaded = load_policy(path, deterministic=True)
    x = torch.as_tensor(obs)
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: x})[Columns.ACTION_DIST_INPUTS]
        dist = module.get_inference_action_dist_cls().from_logits(logits)
        np.testing.assert_allclose(loaded(obs), dist._squash(dist.loc).numpy(), atol=1e-6)
        # RLlib's log-std spans the clamp range here, and the actor reproduces it
        log_std = dist._dist.scale.log()
        assert log_std.min() < -4 and log_std.max() > 1.5
        mu, ls = loaded.actor.dist_params(x)
        np.testing.assert_allclose(ls.numpy(), log_std.numpy(), atol=1e-5)
        # same density for RLlib's own samples
        a, logp = dist.sample_and_logp()
        u = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
        inside = (a.abs() < 0.999).all(-1)
        np.testing.assert_allclose(tanh_gaussian_log_prob(u, mu, ls)[inside].numpy(), logp[inside].numpy(),
                                   rtol=1e-4, atol=1e-3)
        # RLlib's explore=False action is the *unsquashed* loc (clipped by the env runner): documented quirk
        det = dist.to_deterministic().sample()
        assert torch.allclose(det, dist.loc)
    check_parity(module, loaded.actor, obs)


@pytest.mark.parametrize("which", ["sac", "cql"])
def test_q_networks_are_the_published_concat_mlp(which):
    """Each Q network is one ReLU MLP on concat(s, a) then a linear output, as CQL's and SAC's published critic
    and the platform's TwinCritic (not RLlib's multi-stream obs/action/fusion encoder); the targets copy it."""
    from ray.rllib.core.columns import Columns

    from dromo_ray.rllib.module import ConcatQEncoder, SoftClampCQLTorchRLModule, SoftClampSACTorchRLModule

    module = _module(SoftClampCQLTorchRLModule if which == "cql" else SoftClampSACTorchRLModule, hidden=(32, 24))
    module.make_target_networks()
    # (11 + 3) x 32 + 32, 32 x 24 + 24, then the head 24 x 1 + 1: the counts of a 2-layer MLP on (s, a)
    expected = (14 * 32 + 32) + (32 * 24 + 24) + (24 + 1)
    for enc, head in [(module.qf_encoder, module.qf), (module.qf_twin_encoder, module.qf_twin),
                      (module.target_qf_encoder, module.target_qf)]:
        assert isinstance(enc, ConcatQEncoder)
        assert sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in head.parameters()) == expected
    # Q(s, a) by hand from the weights: relu(W2 relu(W1 [s, a] + b1) + b2), then the head
    g = torch.Generator().manual_seed(0)
    s, a = torch.randn(5, 11, generator=g), torch.rand(5, 3, generator=g) * 2 - 1
    lin = [m for m in module.qf_encoder.net if isinstance(m, torch.nn.Linear)]
    h = torch.relu(lin[1](torch.relu(lin[0](torch.cat([s, a], -1)))))
    want = torch.cat([p for p in module.qf.parameters() if p.dim() == 2], 0)
    with torch.no_grad():
        by_hand = h @ want.T + [p for p in module.qf.parameters() if p.dim() == 1][0]
        q = module._qf_forward_train_helper({Columns.OBS: s, Columns.ACTIONS: a}, module.qf_encoder, module.qf)
    torch.testing.assert_close(q, by_hand.squeeze(-1))


def test_critic_export_is_rllibs_twin_q():
    """critic_from_weights gives a TwinCritic whose members compute RLlib's qf and qf_twin, from the module's
    state dict as from the learner's weights; RLlib's stock multi-stream encoder is refused by name."""
    from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule
    from ray.rllib.core.columns import Columns

    from dromo_ray.rllib.export import ExportError, critic_from_weights
    from dromo_ray.rllib.module import SoftClampCQLTorchRLModule

    module = _module(SoftClampCQLTorchRLModule, hidden=(32, 24))
    weights = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    critic = critic_from_weights(weights, 11, 3)
    g = torch.Generator().manual_seed(1)
    s, a = torch.randn(64, 11, generator=g) * 3, torch.rand(64, 3, generator=g) * 2 - 1
    with torch.no_grad():
        q = critic(s, a)
        batch = {Columns.OBS: s, Columns.ACTIONS: a}
        q1 = module._qf_forward_train_helper(batch, module.qf_encoder, module.qf)
        q2 = module._qf_forward_train_helper(batch, module.qf_twin_encoder, module.qf_twin)
    assert q.shape == (2, 64) and q1.abs().max() > 1  # (weights scaled by 4: far from zero)
    torch.testing.assert_close(q[0], q1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q[1], q2, rtol=1e-5, atol=1e-4)
    with pytest.raises(ExportError, match="qf_encoder"):
        critic_from_weights(dict(_module(DefaultSACTorchRLModule).state_dict()), 11, 3)
    with pytest.raises(ExportError, match="expected 11 \\+ 4"):
        critic_from_weights(weights, 11, 4)


def test_policy_file_round_trips_its_critic(tmp_path):
    from dromo_ray.core.nets import TanhGaussianActor, TwinCritic
    from dromo_ray.data.policy_io import load_policy, save_policy
    from dromo_ray.errors import DatasetError

    torch.manual_seed(0)
    actor, critic = TanhGaussianActor(11, 3, (8,)), TwinCritic(11, 3, (8, 8))
    info = {"gamma": 0.99, "entropy_coef": 0.1, "soft_backup": True}
    pol = load_policy(save_policy(tmp_path / "p.pt", actor, meta={"env_key": "hopper"}, critic=critic,
                                  critic_info=info))
    assert pol.critic_info == info
    x, a = torch.randn(5, 11), torch.rand(5, 3)
    torch.testing.assert_close(pol.critic(x, a), critic(x, a))
    assert load_policy(save_policy(tmp_path / "q.pt", actor)).critic is None  # optional
    with pytest.raises(ValueError, match="entropy_coef"):
        save_policy(tmp_path / "r.pt", actor, critic=critic, critic_info={"gamma": 0.99, "soft_backup": True})
    assert not (tmp_path / "r.pt").exists()
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    blob["critic"]["hidden"] = [9, 9]
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(DatasetError, match="critic"):
        load_policy(tmp_path / "bad.pt")


def test_export_of_stock_module_is_deterministic_only(tmp_path):
    from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule

    from dromo_ray.rllib.export import export_policy

    obs = np.random.default_rng(1).normal(size=(64, 11)).astype(np.float32)
    path, report = export_policy(_module(DefaultSACTorchRLModule), tmp_path / "p.pt", obs)
    assert report["det_action"] < 1e-5 and "log_std" not in report
    assert torch.load(path, weights_only=True)["meta"]["stochastic_parity"] == 0


def test_export_refuses_non_relu_networks(tmp_path):
    from dromo_ray.rllib.export import ExportError, export_policy
    from dromo_ray.rllib.module import SoftClampSACTorchRLModule

    with pytest.raises(ExportError, match="Linear/ReLU"):
        export_policy(_module(SoftClampSACTorchRLModule, activation="tanh"), tmp_path / "p.pt",
                      np.zeros((4, 11), np.float32))
    assert not (tmp_path / "p.pt").exists()


# ---- the suite -------------------------------------------------------------------------------------------


def test_suite_parts_load_validated_with_metadata(suite, sac_run, monkeypatch):
    from dromo_ray.data.load import load_dataset
    from dromo_ray.data.suite import PARTS, d4rl_path, dataset_name, minari_id

    out, manifest = suite
    monkeypatch.setenv("D4RL_DATASET_DIR", str(out / "d4rl"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str((out / "minari").resolve()))
    sel = manifest["selection"]
    assert manifest["host"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for part in PARTS:
        by_name = load_dataset(dataset_name("hopper", part))
        assert by_name.source == str(d4rl_path(out, "hopper", part))
        mds = load_dataset(f"minari:{minari_id('hopper', part)}")
        assert len(mds) == len(by_name)
        np.testing.assert_array_equal(mds.actions, by_name.actions)
        m = by_name.metadata
        assert m["suite_part"] == part and m["env_key"] == "hopper" and m["suite_seed"] == 7
        assert m["suite_fingerprint"] == manifest["suite_fingerprint"] and m["sampling"] == "stochastic"
        for v in ("ray_version", "gymnasium_version", "mujoco_version", "torch_version", "dromo_ray_version"):
            assert m[v]
        # the kind of host: rows are bitwise reproducible on one kind, not across kinds (gym_env.host_kind)
        assert m["host_torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["host_cpu"]
        entry = manifest["parts"][part]
        assert entry["transitions"] == len(by_name)
        if part in ("medium", "medium-replay", "expert"):
            ckpt = sel["expert"] if part == "expert" else sel["medium"]
            assert m["policy_checkpoint"] == ckpt
            assert np.isfinite(m["policy_return_mean"]) and np.isfinite(m["policy_stochastic_return_mean"])
    rnd = load_dataset(dataset_name("hopper", "random"))
    assert rnd.metadata["policy"] == "random" and len(rnd) == SIZE and rnd.metadata["collection_seed"] == 7
    med = load_dataset(dataset_name("hopper", "medium"))
    assert len(med) == SIZE and med.metadata["collection_seed"] == 8
    assert med.infos["action_log_probs"].shape == (SIZE,)


def test_suite_selects_medium_by_a_third_of_expert(suite, sac_run):
    out, manifest = suite
    cks = sac_run.checkpoints
    expert = cks[-1]
    target = expert["stochastic_return_mean"] / 3
    best = min(cks[:-1], key=lambda c: (abs(c["stochastic_return_mean"] - target), c["env_steps"]))
    assert manifest["selection"]["expert"] == expert["name"]
    assert manifest["selection"]["medium"] == best["name"]
    assert manifest["selection"]["target_return"] == pytest.approx(target)


def test_select_checkpoints_rules():
    from dromo_ray.data.suite import select_checkpoints

    rets = [10.0, 120.0, 300.0, 900.0, 600.0]
    index = {"final": "c4", "checkpoints": [
        {"name": f"c{i}", "env_steps": 100 * (i + 1), "stochastic_return_mean": r, "return_mean": 2 * r}
        for i, r in enumerate(rets)]}
    final = select_checkpoints(index)
    assert (final.expert["name"], final.medium["name"], final.target_return) == ("c4", "c1", 200.0)
    best = select_checkpoints(index, expert_rule="best")
    assert (best.expert["name"], best.medium["name"]) == ("c3", "c2")  # 300 is closest to 900 / 3
    det = select_checkpoints(index, deterministic=True)
    assert det.return_key == "return_mean" and det.target_return == 400.0
    with pytest.raises(ValueError):
        select_checkpoints(index, expert_rule="median")


def test_medium_expert_is_medium_then_expert_row_for_row(suite):
    from dromo_ray.data.d4rl_io import read_d4rl
    from dromo_ray.data.suite import d4rl_path

    out, _ = suite
    med, exp, me = (read_d4rl(d4rl_path(out, "hopper", p)) for p in ("medium", "expert", "medium-expert"))
    n = len(med)
    assert len(me) == n + len(exp) and me.metadata["boundary_row"] == n
    for key in PART_KEYS:
        np.testing.assert_array_equal(getattr(me, key), np.concatenate([getattr(med, key), getattr(exp, key)]))
    for key in ("qpos", "qvel", "next_qpos", "next_qvel", "action_log_probs"):
        np.testing.assert_array_equal(me.infos[key], np.concatenate([med.infos[key], exp.infos[key]]))
    # timeouts too, except that medium's cut-off last episode ends at the boundary
    expected = np.concatenate([med.timeouts, exp.timeouts])
    expected[n - 1] |= not med.terminals[n - 1]
    np.testing.assert_array_equal(me.timeouts, expected)


def test_medium_replay_is_the_log_up_to_the_medium_checkpoint(suite, sac_run):
    from dromo_ray.data.d4rl_io import read_d4rl
    from dromo_ray.data.suite import d4rl_path

    out, manifest = suite
    medium = next(c for c in sac_run.checkpoints if c["name"] == manifest["selection"]["medium"])
    mr = read_d4rl(d4rl_path(out, "hopper", "medium-replay"))
    with h5py.File(sac_run.out / "replay.hdf5", "r") as f:
        n = medium["replay_rows"]
        assert len(mr) == n == mr.metadata["replay_rows"]
        for key in PART_KEYS + ("timeouts",):
            np.testing.assert_array_equal(getattr(mr, key), f[key][:n])
        for key in ("qpos", "qvel", "next_qpos", "next_qvel"):
            np.testing.assert_array_equal(mr.infos[key], f[f"infos/{key}"][:n])


def test_suite_resumes_and_refuses_other_settings(suite, sac_run):
    from dromo_ray.data.suite import PARTS, d4rl_path, make_suite
    from dromo_ray.errors import DatasetError

    out, manifest = suite
    path = d4rl_path(out, "hopper", "medium")
    mtime = os.stat(path).st_mtime_ns
    again = make_suite("hopper", SIZE, out, sac_run.out, seed=7, progress=False)
    assert all(again["parts"][p]["status"].startswith("skipped") for p in PARTS)
    assert os.stat(path).st_mtime_ns == mtime
    assert json.loads((out / "suite_hopper.json").read_text())["suite_fingerprint"] == manifest["suite_fingerprint"]
    with pytest.raises(DatasetError, match="other settings"):
        make_suite("hopper", SIZE + 1, out, sac_run.out, seed=7, progress=False)


def test_suite_resumes_a_half_made_suite(sac_run, tmp_path):
    from dromo_ray.data.suite import make_suite

    out = tmp_path / "half"
    first = make_suite("hopper", 200, out, sac_run.out, parts=("random",), minari=False, progress=False)
    assert set(first["parts"]) == {"random"}
    rest = make_suite("hopper", 200, out, sac_run.out, parts=("random", "medium-replay"), minari=False,
                      progress=False)
    assert rest["parts"]["random"]["status"].startswith("skipped")
    assert rest["parts"]["medium-replay"]["status"] == "written"
    # the Minari copy of a part whose HDF5 exists is made from that file
    with_minari = make_suite("hopper", 200, out, sac_run.out, parts=("random",), progress=False)
    assert with_minari["parts"]["random"]["status"] == "skipped (exists) + minari"
    assert (out / "minari" / "dromo" / "hopper-random-v5" / "data").is_dir()


def test_cli_parsers_and_suite_make_smoke(suite, sac_run, capsys):
    from dromo_ray.cli import main
    from dromo_ray.cli.parser import build_parser

    args = build_parser().parse_args(["behavior", "train", "--env", "walker2d", "--steps", "5000", "--out", "x",
                                      "--seed", "3"])
    assert (args.env, args.steps, args.out, args.seed) == ("walker2d", 5000, "x", 3)
    out, _ = suite
    code = main(["suite", "make", "--env", "hopper", "--size", str(SIZE), "--out", str(out),
                 "--policies", str(sac_run.out), "--seed", "7"])
    assert code == 0
    text = capsys.readouterr().out
    assert "medium-expert" in text and "skipped" in text
    assert main(["suite", "make", "--env", "walker2d", "--out", str(out), "--policies", str(sac_run.out)]) == 2



def test_medium_expert_without_medium_is_refused_before_anything_is_written(tmp_path):
    from dromo_ray.data.suite import make_suite
    from dromo_ray.errors import DatasetError

    out = tmp_path / "suite"
    with pytest.raises(DatasetError, match="medium-expert needs the medium part; add it to --parts"):
        make_suite("hopper", 100, out, parts=("expert", "medium-expert"), progress=False)
    assert not out.exists() or not any(out.rglob("*"))  # the expert part was not collected first

"""``dromo-ray demo``: its config is a valid run of every actor kind, and its data comes from the shipped policy."""

from __future__ import annotations

import numpy as np
import pytest

from dromo_ray.core.config import config_from_dict
from dromo_ray.demo import DEMO_ENV, DEMO_STEPS, collect_demo_data, demo_config, demo_data_path


def test_demo_config_is_a_synchronous_dromo_run_with_every_actor_kind(tmp_path):
    cfg = config_from_dict(demo_config(str(tmp_path / "d.hdf5"), str(tmp_path / "runs"), seed=0, steps=DEMO_STEPS))
    assert cfg.data.env == DEMO_ENV == "hopper" and cfg.agent.algorithm == "dromo"
    assert cfg.agent.needs_behavior_policy() and cfg.agent.effective_alpha() == 1.0
    # rollout workers, an evaluator and the replay actor all take part; rounds alternate with the learner
    assert cfg.rollout.mode == "workers" and cfg.runtime.num_rollout_workers == 2 and cfg.runtime.num_evaluators == 1
    assert cfg.runtime.synchronous
    # 15 evaluations; the score is the mean of the last 4 (the evidence table's protocol)
    assert cfg.train.total_steps // cfg.train.eval_interval == 15 and cfg.train.final_score_last_n == 4
    # the settings the README's measurements chose (demo.py docstring)
    a = cfg.agent
    assert (a.beta, a.actor_lr, a.actor_lr_schedule, a.critic_lr, a.init_entropy_coef, a.entropy_lr) == (
        5.0, 1e-3, "cosine", 1e-3, 0.1, 3e-4)


@pytest.mark.parametrize("steps", [1, 300, 1000])
def test_demo_config_scales_its_intervals_with_steps(tmp_path, steps):
    cfg = config_from_dict(demo_config(str(tmp_path / "d.hdf5"), str(tmp_path / "runs"), seed=3, steps=steps))
    assert cfg.train.total_steps == steps and cfg.seed == 3
    assert 1 <= cfg.train.eval_interval <= steps and 1 <= cfg.train.checkpoint_interval <= steps


def test_demo_data_comes_from_the_shipped_medium_policy(tmp_path):
    from dromo_ray.data.d4rl_io import read_d4rl
    from dromo_ray.data.shipped import shipped_policy

    path = tmp_path / "demo.hdf5"
    name, score = collect_demo_data(DEMO_ENV, path, rows=1500, seed=0)
    ds = read_d4rl(path, env=DEMO_ENV)
    assert len(ds.observations) == 1500 and ds.metadata["demo_policy"] == name
    assert name == f"shipped {DEMO_ENV} medium policy ({shipped_policy(DEMO_ENV, 'medium')['checkpoint']})"
    assert score > 10  # finished medium episodes (random actions score about 1)
    # rows without a finished episode have no score: NaN, not a crash
    _, none = collect_demo_data(DEMO_ENV, tmp_path / "short.hdf5", rows=20, seed=0)
    assert np.isnan(none)
    # seeded: the same rows again
    again = tmp_path / "again.hdf5"
    collect_demo_data(DEMO_ENV, again, rows=1500, seed=0)
    assert np.array_equal(read_d4rl(again, env=DEMO_ENV).actions, ds.actions)


def test_each_seed_keeps_its_own_demo_data(tmp_path):
    # A second --seed in the same --out must not reuse the first seed's rows (they were collected under it).
    paths = {demo_data_path(tmp_path, seed) for seed in (0, 1, 2)}
    assert len(paths) == 3 and all(p.parent == tmp_path and p.suffix == ".hdf5" for p in paths)
    assert demo_data_path(tmp_path, 1) == demo_data_path(tmp_path, 1)

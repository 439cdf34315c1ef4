"""The one typed config: YAML names = field names, strict validation with the key in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from dromo_ray.config import ConfigError, dump_config, flatten, load_config
from dromo_ray.core.config import ExperimentConfig, config_from_dict

TUNE = Path(__file__).resolve().parents[1] / "tune_configs"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["data.dataset=x.hdf5", "agent.alpha=0.25", "agent.hidden_dims=[64, 64]"])
    assert cfg.agent.alpha == 0.25 and cfg.agent.hidden_dims == (64, 64)
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("data: {dataset: x}\nagent: {alhpa: 1}\n", "agent.alhpa: unknown key"),
        ("data: {dataset: x}\nagent: {gamma: 1.5}\n", "agent.gamma"),
        ("data: {dataset: x}\nagent: {algorithm: sac}\n", "agent.algorithm"),
        ("data: {dataset: x}\nagent: {num_actions: 1}\n", "agent.num_actions"),
        ("data: {dataset: x}\ndynamics: {num_elites: 9}\n", "dynamics.num_elites"),
        ("data: {dataset: x}\nruntime: {synchronous: maybe}\n", "runtime.synchronous"),
        ("data: {dataset: x}\nagent: {density: histogram}\n", "agent.density"),
        ("data: {dataset: x}\ntrain: {total_steps: 0}\n", "train.total_steps"),
        ("data: {dataset: x}\nbogus: 1\n", "bogus: unknown key"),
        ("agent: {alpha: 1}\n", "data.dataset"),
        ("data: [1, 2]\n", "data: expected a section"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, fragment):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and fragment in str(e.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: {dataset: [\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_algorithm_conventions():
    base = {"data": {"dataset": "x"}, "agent": {"alpha": 2.0, "beta": 3.0}}
    for algo, a, b in [("dromo", 2, 3), ("combo", 0, 3), ("mbpo", 0, 0), ("mopo", 0, 0)]:
        cfg = config_from_dict({**base, "agent": {**base["agent"], "algorithm": algo}})
        assert (cfg.agent.effective_alpha(), cfg.agent.effective_beta()) == (a, b)


def test_flatten_keeps_resource_dicts():
    cfg = config_from_dict({"data": {"dataset": "x"}, "runtime": {"rollout_worker_resources": {"rollout_node": 0.1}}})
    flat = flatten(cfg.to_dict())
    assert flat["runtime.rollout_worker_resources"] == {"rollout_node": 0.1}
    assert flat["agent.alpha"] == ExperimentConfig().agent.alpha


def test_every_shipped_config_is_valid():
    files = sorted(TUNE.glob("*.yaml"))
    assert files, "tune_configs/ has no configs"
    for f in files:
        if f.name.startswith("sweep_"):
            continue
        load_config(f)


def test_pi_beta_is_fitted_only_for_the_action_variance_term():
    """One rule (AgentConfig.needs_behavior_policy) decides whether pi^beta is fitted: DROMO with alpha > 0 and
    the Eq. 13 action variance. The Eq. 17 ``strict`` ablation, COMBO and alpha = 0 reserve no fitter bundle."""
    from dromo_ray.core.scores import final_score
    from dromo_ray.runtime.cluster import run_stages

    def cfg(**agent):
        return config_from_dict({"data": {"dataset": "x.hdf5"}, "agent": agent}).validate()

    fitted = cfg(algorithm="dromo", alpha=0.5, variance_form="action")
    n = fitted.dynamics.num_trainers
    assert fitted.agent.needs_behavior_policy() and len(run_stages(fitted, 0)[0]) == n + 1
    for c in (cfg(algorithm="dromo", alpha=0.5, variance_form="strict"), cfg(algorithm="dromo", alpha=0.0),
              cfg(algorithm="combo", alpha=0.5)):
        assert not c.agent.needs_behavior_policy()
        assert len(run_stages(c, 0)[0]) == n
    evals = [{"eval/normalized_score": s, "eval/return_mean": 10 * s} for s in (1.0, 2.0, 4.0, 6.0)]
    assert final_score(evals, 2) == (5.0, 50.0) and final_score(evals, 9) == (3.25, 32.5)

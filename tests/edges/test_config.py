"""The one typed config: YAML names = field names, strict validation with the key in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from dromo_ray.config import dump_config, load_config
from dromo_ray.core.config import ExperimentConfig, config_from_dict, flatten
from dromo_ray.errors import ConfigError

TUNE = Path(__file__).resolve().parents[2] / "tune_configs" / "tasks"


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
    assert files, "tune_configs/tasks/ has no configs"
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


# ---- base: chains (dromo_ray/config.py) ---------------------------------------------------------------------


def _files(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_base_chain_merges_sections_key_by_key(tmp_path):
    root = _files(tmp_path, {
        "base.yaml": "seed: 3\nagent: {alpha: 0.5, beta: 2.0, hidden_dims: [64, 64, 64]}\n"
                     "runtime: {learner_resources: {a: 1.0, b: 1.0}}\ntracking: {experiment: shared}\n",
        "algos/a.yaml": "base: ../base.yaml\nagent: {beta: 3.0, hidden_dims: [32]}\n",
        "tasks/t.yaml": "base: ../algos/a.yaml\ndata: {dataset: x.hdf5}\nagent: {alpha: 0.25}\n"
                        "runtime: {learner_resources: {c: 1.0}}\n",
    })
    cfg = load_config(root / "tasks" / "t.yaml")
    assert cfg.seed == 3 and cfg.tracking.experiment == "shared" and cfg.data.dataset == "x.hdf5"
    assert (cfg.agent.alpha, cfg.agent.beta) == (0.25, 3.0)  # each level overrides only the keys it names
    assert cfg.agent.hidden_dims == (32,)  # a list replaces the base's list
    assert cfg.runtime.learner_resources == {"c": 1.0}  # a resource set is one value, as with --set
    # --set applies after the whole chain; the base files are not touched
    assert load_config(root / "tasks" / "t.yaml", ["agent.beta=4.0"]).agent.beta == 4.0
    assert load_config(root / "algos" / "a.yaml", ["data.dataset=y"]).agent.alpha == 0.5


@pytest.mark.parametrize("files, fragment", [
    ({"c.yaml": "base: missing.yaml\ndata: {dataset: x}\n"}, "base: "),
    ({"c.yaml": "base: 3\ndata: {dataset: x}\n"}, "base: expected the path of a config file, got 3"),
    ({"c.yaml": "base: [a.yaml]\ndata: {dataset: x}\n"}, "base: expected the path of a config file"),
    ({"c.yaml": "base:\ndata: {dataset: x}\n"}, "base: expected the path of a config file, got None"),
    ({"c.yaml": "base: c.yaml\n"}, "closes a cycle"),
    ({"c.yaml": "base: sub/b.yaml\n", "sub/b.yaml": "base: ../c.yaml\n"}, "closes a cycle"),
])
def test_bad_base_is_a_config_error_naming_file_and_key(tmp_path, files, fragment):
    root = _files(tmp_path, files)
    with pytest.raises(ConfigError) as e:
        load_config(root / "c.yaml")
    msg = str(e.value)
    assert fragment in msg and "base: " in msg and (str(root / "c.yaml") in msg or str(root / "sub" / "b.yaml") in msg)
    if "missing" in files["c.yaml"]:
        assert "no such config file" in msg and "missing.yaml" in msg


def test_a_value_error_from_a_base_names_the_loaded_file_and_the_key(tmp_path):
    root = _files(tmp_path, {"base.yaml": "agent: {gamma: 1.5}\n", "t.yaml": "base: base.yaml\ndata: {dataset: x}\n"})
    with pytest.raises(ConfigError, match=r"t\.yaml: agent\.gamma"):
        load_config(root / "t.yaml")


def test_dump_config_writes_the_composed_config_atomically(tmp_path):
    root = _files(tmp_path, {"base.yaml": "agent: {beta: 3.0}\n", "t.yaml": "base: base.yaml\ndata: {dataset: x}\n"})
    cfg = load_config(root / "t.yaml")
    dump_config(cfg, root / "out.yaml")
    assert "base" not in (root / "out.yaml").read_text() and load_config(root / "out.yaml") == cfg
    assert sorted(p.name for p in root.iterdir()) == ["base.yaml", "out.yaml", "t.yaml"]  # no temporary left


# ---- the one coercion (core/config.py _coerce): non-finite numbers, tau -------------------------------------


@pytest.mark.parametrize("item, key", [
    ("agent.alpha=nan", "agent.alpha"), ("agent.alpha=.nan", "agent.alpha"), ("agent.beta=inf", "agent.beta"),
    ("agent.beta=-.inf", "agent.beta"), ("train.total_steps=.inf", "train.total_steps"),
    ("agent.target_entropy=.nan", "agent.target_entropy"),  # float | None
    ("dynamics.weight_decay=[1.0e-5, .nan, 1.0e-5, 1.0e-5, 1.0e-5]", "dynamics.weight_decay[1]"),
    ("runtime.learner_resources={node: .inf}", "runtime.learner_resources.node"),
])
def test_non_finite_numbers_are_config_errors_naming_the_key(item, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.dataset=x", item])
    assert str(e.value).startswith(f"{key}: expected a finite number"), str(e.value)


def test_non_finite_numbers_in_a_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: rollout\.horizon: expected a finite number"):
        load_config(_write(tmp_path, "data: {dataset: x}\nrollout: {horizon: .inf}\n"))


def test_an_exponent_without_a_decimal_point_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as text; the config reads it as the number everyone means, in --set and files."""
    assert load_config(None, ["data.dataset=x", "agent.actor_lr=1e-4"]).agent.actor_lr == 1e-4
    assert load_config(None, ["data.dataset=x", "agent.actor_lr=1.0e-4"]).agent.actor_lr == 1e-4
    assert load_config(None, ["data.dataset=x", "train.total_steps=1e6"]).train.total_steps == 1_000_000
    f = tmp_path / "c.yaml"
    f.write_text("data: {dataset: x}\nagent: {critic_lr: 3e-4}\n")
    assert load_config(f).agent.critic_lr == 3e-4
    with pytest.raises(ConfigError, match=r"agent\.actor_lr: expected a number, got '0.5' \(text"):
        load_config(None, ["data.dataset=x", "agent.actor_lr='0.5'"])


@pytest.mark.parametrize("tau, ok", [(0, False), (0.0, False), (-0.1, False), (1.5, False), (1e-6, True), (1, True)])
def test_tau_must_lie_in_zero_one(tau, ok):
    data = {"data": {"dataset": "x"}, "agent": {"tau": tau}}
    if ok:
        assert config_from_dict(data).agent.tau == tau
    else:
        with pytest.raises(ConfigError, match="agent.tau"):
            config_from_dict(data)


def test_errors_are_imported_from_dromo_ray_errors():
    """dromo_ray.config is the file layer only: nobody imports the dataclasses or an error from it, and errors
    come from dromo_ray.errors (not re-exported through a config module)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    file_layer = {"read_yaml", "compose_yaml", "parse_overrides", "load_config", "dump_config", "BASE_KEY"}
    bad = []
    for f in sorted([*root.joinpath("dromo_ray").rglob("*.py"), *root.joinpath("tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("dromo_ray.config", "dromo_ray.core.config"):
                names = {a.name for a in node.names}
                if node.module == "dromo_ray.config" and names - file_layer:
                    bad.append(f"{f.relative_to(root)}:{node.lineno} {sorted(names - file_layer)}")
                if any(n.endswith("Error") for n in names):
                    bad.append(f"{f.relative_to(root)}:{node.lineno} {sorted(names)}")
    assert not bad, bad


# ---- tune_configs/: base.yaml + algos/ + tasks/ (a few lines each) + sweeps/ ---------------------------------

CONFIGS = TUNE.parent
SNAPSHOT = Path(__file__).resolve().parent / "task_configs_before.json"
TASK_MAX_LINES = 20
"""Every {algo}_{env} task file fits in this many lines, comments included (the longest today: 17)."""
STANDALONE = {"tiny_hopper_dromo"}
"""Task files complete by themselves: the tiny test/laptop run (sizes of no preset; tests copy it as one file)."""


def _snapshot() -> dict:
    import json

    return json.loads(SNAPSHOT.read_text())


def test_every_task_config_has_a_snapshot_and_every_snapshot_a_task():
    """tests/edges/task_configs_before.json holds the composed config of every task YAML before the base: layout,
    keyed by file stem: no task lost, none added without a record."""
    assert {f.stem for f in TUNE.glob("*.yaml")} == set(_snapshot())


FIELDS_ADDED_SINCE_SNAPSHOT = {"agent.update_mode": "auto", "rollout.mode": "workers", "dynamics.cache_dir": ""}
"""Config fields that came after the snapshot (the GPU learner's, issue 14; the dynamics cache, issue 13), with the
default every task keeps."""


@pytest.mark.parametrize("stem", sorted(_snapshot()))
def test_task_config_composes_to_what_the_old_file_said(stem):
    """Values, not text: the composed config of tasks/<stem>.yaml is field for field what the 75-124-line file said,
    int and float alike (compared as JSON too, so 1 and 1.0 differ), so no experiment silently changed."""
    import json

    from dromo_ray.core.config import to_dict

    want = _snapshot()[stem]
    got = json.loads(json.dumps(to_dict(load_config(TUNE / f"{stem}.yaml"))))
    for dotted, default in FIELDS_ADDED_SINCE_SNAPSHOT.items():  # new fields: present at their default, no more
        section, key = dotted.split(".")
        assert key not in want[section] and got[section].pop(key) == default, dotted
    assert got == want
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def _chain(path: Path) -> list[Path]:
    import yaml

    out = [path.resolve()]
    while (base := (yaml.safe_load(out[-1].read_text()) or {}).get("base")) is not None:
        out.append((out[-1].parent / base).resolve())
    return out


def test_task_files_are_a_few_lines_over_an_algorithm_and_the_shared_base():
    """tasks/<algo>_<env>[_aligned].yaml: at most TASK_MAX_LINES lines, a base: chain through algos/<algo>.yaml that
    ends at base.yaml; algos/ holds one file per algorithm of the project's learner (core.config.AGENT_ALGORITHMS)."""
    import yaml

    from dromo_ray.core.config import AGENT_ALGORITHMS, ENV_KEYS

    base_yaml = (CONFIGS / "base.yaml").resolve()
    for f in sorted(TUNE.glob("*.yaml")):
        if f.stem in STANDALONE:
            assert "base" not in yaml.safe_load(f.read_text()), f.name
            continue
        lines = f.read_text().splitlines()
        assert len(lines) <= TASK_MAX_LINES, f"{f.name}: {len(lines)} lines"
        cfg, chain = load_config(f), _chain(f)
        assert chain[-1] == base_yaml, f"{f.name}: its base: chain does not end at base.yaml"
        assert cfg.agent.algorithm in [p.stem for p in chain if p.parent.name == "algos"], f.name
        assert cfg.data.env in ENV_KEYS and f.stem in (f"{cfg.agent.algorithm}_{cfg.data.env}",
                                                       f"{cfg.agent.algorithm}_{cfg.data.env}_aligned"), f.name
    assert sorted(p.stem for p in (CONFIGS / "algos").glob("*.yaml")) == sorted(AGENT_ALGORITHMS)
    for a in AGENT_ALGORITHMS:
        assert load_config(CONFIGS / "algos" / f"{a}.yaml", ["data.dataset=x"]).agent.algorithm == a
        assert _chain(CONFIGS / "algos" / f"{a}.yaml")[-1] == base_yaml, a


def test_every_preset_number_has_a_comment_beside_or_above_it():
    """A number in base.yaml, algos/ or tasks/ carries its source: an inline comment, or a comment above it within
    its section (the section's heading comment included)."""
    import re

    number = re.compile(r"^\s+\w+: (-?[0-9.][0-9.e+-]*|\[[0-9., e+-]+\])\s*(#.*)?$")
    files = [CONFIGS / "base.yaml", *sorted((CONFIGS / "algos").glob("*.yaml")),
             *(f for f in sorted(TUNE.glob("*.yaml")) if f.stem not in STANDALONE)]
    bare = []
    for f in files:
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines):
            m = number.match(line)
            if not m or m.group(2):
                continue
            j = i - 1
            while j >= 0 and not lines[j].lstrip().startswith("#") and lines[j].startswith(" "):
                j -= 1  # up through the section's other keys
            if j >= 0 and not lines[j].lstrip().startswith("#"):
                j -= 1  # the section heading: its comment sits above it
            if j < 0 or not lines[j].lstrip().startswith("#"):
                bare.append(f"{f.relative_to(CONFIGS)}:{i + 1}: {line.strip()}")
    assert not bare, bare

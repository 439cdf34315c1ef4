"""Sweeps over arms (trials with different presets): the evidence sweep of issue 13 validates without its data,
fits 2 cores and composes every arm as its preset plus the common protocol; arms-file errors name their key; a
miniature arms sweep runs, is interrupted, resumes without a duplicate trial or MLflow run, and reports by arm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dromo_ray.errors import ConfigError
from dromo_ray.sweep import ARM_KEY, DATASET_KEY, Cluster, check_resources, load_sweep
from testkit.sweeps import run_cli, sweep_runs, task_config, write_yaml

ROOT = Path(__file__).resolve().parents[2]
TUNE = ROOT / "tune_configs"
EVIDENCE = TUNE / "sweeps" / "evidence_medium.yaml"
ARMS = {"dromo": "dromo", "dromo_alpha_0.1": "dromo", "combo": "combo", "mopo": "mopo", "mbpo": "mbpo",
        "mobile": "mobile", "cql": "cql_rllib"}
DATASETS = {"halfcheetah-medium-v5": "halfcheetah", "hopper-medium-v5": "hopper"}


@pytest.fixture
def evidence(tmp_path: Path) -> Path:
    """The evidence sweep file where its ../tasks/ bases resolve: in place once tune_configs/tasks/ exists, else a
    copy beside links to the task files where they are now."""
    if (TUNE / "tasks").is_dir():
        return EVIDENCE
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "tasks").mkdir()
    for algo in ("dromo", "combo", "mopo", "mbpo", "mobile"):
        for env in DATASETS.values():
            (tmp_path / "tasks" / f"{algo}_{env}.yaml").symlink_to(task_config(f"{algo}_{env}"))
    return Path(shutil.copy(EVIDENCE, tmp_path / "sweeps" / EVIDENCE.name))


# ------------------------------------------------------------------------------------------------------------
# The evidence sweep (no Ray, no datasets)


def test_evidence_sweep_validates_without_its_datasets(evidence, tmp_path, monkeypatch):
    from ray.tune.search.variant_generator import generate_variants

    from dromo_ray.config import load_config

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "no_data_here"))
    spec = load_sweep(evidence, check_datasets=False)
    assert spec.arms == list(ARMS) and spec.datasets == list(DATASETS) and spec.seeds == [0]
    assert spec.expected_trials() == len(ARMS) * len(DATASETS) and spec.max_concurrent_trials == 1
    assert spec.metric == "final/normalized_score" and spec.tracking_experiment == "evidence_medium"
    raw = yaml.safe_load(EVIDENCE.read_text())
    common = raw["common"]
    budgets = set()
    for arm, algo in ARMS.items():
        for ds, env in DATASETS.items():
            cfg = spec.config_obj({ARM_KEY: arm, DATASET_KEY: ds, "seed": 0})
            # what the trial runs is its preset, as `dromo-ray train <task> --set ...` composes it, plus the common
            # protocol and the dataset: nothing else of the published configuration changes
            base = raw["arms"][arm]["base"].replace("{env}", env).replace("../tasks/", "")
            expected = load_config(task_config(Path(base).stem), {**raw["arms"][arm].get("set", {}), **common,
                                                            "data.dataset": ds, "data.env": env})
            expected.out_dir = cfg.out_dir
            # every trial shares one ensemble cache, made absolute from where the sweep starts
            assert cfg.dynamics.cache_dir == str(Path(common["dynamics.cache_dir"]).resolve())
            expected.dynamics.cache_dir = cfg.dynamics.cache_dir
            assert cfg == expected, (arm, ds)
            assert (cfg.agent.algorithm, cfg.data.env, cfg.data.dataset) == (algo, env, ds)
            t = cfg.train
            assert (t.eval_interval, t.eval_episodes, t.final_score_last_n) == (500, 10, 4)
            budgets.add(t.total_steps)
    assert budgets == {common["train.total_steps"]}  # the same learner-update budget for every arm
    alpha = {a: spec.config_obj({ARM_KEY: a, DATASET_KEY: "hopper-medium-v5"}).agent.alpha for a in ARMS}
    assert alpha["dromo_alpha_0.1"] == 0.1 and alpha["dromo"] == load_config(task_config("dromo_hopper")).agent.alpha
    # Tune's grid runs every arm on halfcheetah-medium before any on hopper-medium
    order = [v[DATASET_KEY] for _, v in generate_variants(spec.param_space())]
    assert order == ["halfcheetah-medium-v5"] * len(ARMS) + ["hopper-medium-v5"] * len(ARMS)


def test_evidence_trials_fit_two_cores_and_take_the_gpu(evidence):
    spec = load_sweep(evidence, check_datasets=False)
    two_cpus = Cluster(total={"CPU": 2.0}, max_node={"CPU": 2.0})
    bundles = check_resources(spec, two_cpus)  # every arm on every dataset fits, at once: one at a time
    assert sum(b["CPU"] for b in bundles) <= 2.0 and not any("GPU" in b for b in bundles)
    from dromo_ray.sweep import trial_bundles

    gpu = Cluster(total={"CPU": 16.0, "GPU": 1.0}, max_node={"CPU": 16.0, "GPU": 1.0})
    check_resources(spec, gpu)
    learner = trial_bundles(spec.config_obj({ARM_KEY: "dromo"}), spec.driver_cpus, 1.0)[1]
    assert learner.get("GPU") == 1.0  # the learner of a model-based arm takes the card when there is one


def test_a_missing_dataset_is_one_line_naming_it(evidence, tmp_path, monkeypatch):
    d4rl = tmp_path / "d4rl"
    d4rl.mkdir()
    monkeypatch.setenv("D4RL_DATASET_DIR", str(d4rl))
    (d4rl / "halfcheetah_medium-v5.hdf5").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        load_sweep(evidence)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "datasets[1].dataset" in msg and "'hopper-medium-v5'" in msg
    assert str(d4rl) in msg and "D4RL_DATASET_DIR" in msg
    (d4rl / "hopper_medium-v5.hdf5").write_bytes(b"")  # suite make's file name (behavior/suite.py d4rl_path)
    spec = load_sweep(evidence)
    assert spec.config_obj({ARM_KEY: "cql", DATASET_KEY: "hopper-medium-v5"}).data.dataset == "hopper-medium-v5"


# ------------------------------------------------------------------------------------------------------------
# The arms format: each problem names its key (no Ray)


def test_arms_compose_base_set_common_and_dataset(tmp_path, arms_doc):
    spec = load_sweep(write_yaml(tmp_path / "s.yaml", arms_doc))
    assert spec.arms == ["dromo", "combo"] and spec.datasets == ["data"] and spec.expected_trials() == 2
    assert spec.trial_keys() == [ARM_KEY, DATASET_KEY] and set(spec.param_space()) == {ARM_KEY, DATASET_KEY, "seed"}
    combo = spec.config_obj({ARM_KEY: "combo", DATASET_KEY: "data", "seed": 3})
    assert (combo.agent.algorithm, combo.train.total_steps, combo.seed, combo.data.env) == ("combo", 60, 3, "hopper")
    assert combo.data.dataset == str(tmp_path / "data.hdf5") and combo.rollout.horizon == 3  # from the base
    assert spec.config_obj({ARM_KEY: "dromo"}).agent.algorithm == "dromo"
    assert "cells" in spec.fingerprint() and "config" not in spec.fingerprint()


@pytest.mark.parametrize("change, fragment", [
    ({"base": "tiny_hopper.yaml"}, "base: with arms:, each arm names its own base"),
    ({"agent": {"alpha": 2.0}}, "agent: with arms:, settings for every arm go under common:"),
    ({"arms": {"a": {"base": "tiny_{env}.yaml", "bogus": 1}}}, "arms.a.bogus: unknown key (base, set)"),
    ({"arms": {"a b": {"base": "tiny_{env}.yaml"}}}, "arms: arm name 'a b'"),
    ({"arms": {}}, "arms: expected at least one arm"),
    ({"arms": {"a": {"base": "nope_{env}.yaml"}}}, "arms.a.base: "),
    ({"arms": {"a": {"base": "tiny_{env}.yaml", "set": {"train.total_steps": 5}}}},
     "arms.a.set.train.total_steps: also under common:"),
    ({"arms": {"a": {"base": "tiny_{env}.yaml", "set": {"seed": 5}}}}, "arms.a.set.seed: the seed is the sweep's"),
    ({"arms": {"a": {"base": "tiny_{env}.yaml", "set": {"tracking.experiment": "x"}}}},
     "arms.a.set.tracking.experiment: fixed for the whole sweep"),
    ({"arms": {"a": {"base": "tiny_{env}.yaml", "set": {"data.dataset": "x.hdf5"}}}},
     "arms.a.set.data.dataset: the sweep's datasets: set it"),
    ({"arms": {"a": {"base": "tiny_{env}.yaml", "set": {"agent.alhpa": 1}}}}, "arms.a.set.agent.alhpa: unknown"),
    ({"arms": {"a": {"base": "tiny_{env}.yaml", "set": {"agent.alpha": -1.0}}}}, "arms.a on datasets[0]: agent.alpha"),
    ({"common": {"agent": 3}}, "common.agent: agent is a section"),
    ({"datasets": [{"env": "hopper"}]}, "datasets[0].dataset: field required"),
    ({"datasets": [{"env": "ant", "dataset": "x"}]}, "datasets[0].env"),
    ({"datasets": []}, "datasets: list should have at least 1 item"),
    ({"datasets": None}, "arms.dromo.base: {env} needs datasets:"),
    ({"search": {"data.dataset": {"grid": ["a.hdf5"]}}}, "search.data.dataset: the sweep's datasets: already"),
    ({"searcher": {"type": "optuna"}}, "searcher.type"),
])
def test_bad_arms_files_name_the_key(tmp_path, arms_doc, change, fragment):
    doc = {**arms_doc, **change}
    if doc.get("datasets") is None:
        doc.pop("datasets")
    p = write_yaml(tmp_path / "s.yaml", doc)
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    assert str(p) in str(e.value) and fragment in str(e.value), str(e.value)


def test_arms_must_share_one_experiment_and_datasets_one_tag(tmp_path, arms_doc):
    other = yaml.safe_load((tmp_path / "tiny_hopper.yaml").read_text())
    other["tracking"] = {"experiment": "elsewhere"}
    write_yaml(tmp_path / "other_hopper.yaml", other)
    doc = {**arms_doc, "common": {"train.total_steps": 60}}
    doc["arms"] = {**doc["arms"], "other": {"base": "other_{env}.yaml"}}
    with pytest.raises(ConfigError, match=r"arms\.other: tracking\.experiment 'elsewhere' differs"):
        load_sweep(write_yaml(tmp_path / "s.yaml", doc))
    doc = {**arms_doc, "datasets": arms_doc["datasets"] * 2}
    with pytest.raises(ConfigError, match=r"datasets\[1\]\.dataset: 'data' is already datasets\[0\]"):
        load_sweep(write_yaml(tmp_path / "s2.yaml", doc))


def test_a_cql_trial_holds_its_process_and_counts_its_data_pipeline(tmp_path, arms_doc):
    """RLlib CQL learns in the trial's process; Ray Data's tasks run beside the trial's placement group (Tune does
    not capture them), so the group is one bundle and the feasibility check counts the pipeline's 1.5 CPUs."""
    from dromo_ray.sweep import trial_bundles
    from dromo_ray.sweep.trial import TRIAL_META, _stage_checkpoint

    doc = {**arms_doc, "arms": {"cql": {"base": "tiny_{env}.yaml", "set": {"agent.algorithm": "cql_rllib"}}},
           "resources": {"driver_cpus": 0.05}}
    spec = load_sweep(write_yaml(tmp_path / "s.yaml", doc))
    assert trial_bundles(spec.config_obj({ARM_KEY: "cql"}), 0.05, 0) == [{"CPU": 0.05}]
    check_resources(spec, Cluster(total={"CPU": 2.0}, max_node={"CPU": 2.0}))
    with pytest.raises(ConfigError, match=r"arms\.cql: .*one trial needs 1\.55 CPUs but the cluster has 1"):
        check_resources(spec, Cluster(total={"CPU": 1.0}, max_node={"CPU": 1.0}))
    # its checkpoint is one file (the final policy), staged for Tune like a runtime checkpoint's directory
    policy = tmp_path / "policy.pt"
    policy.write_bytes(b"weights")
    (tmp_path / "staged").mkdir()
    _stage_checkpoint(policy, tmp_path / "staged", {"step": 40})
    assert sorted(f.name for f in (tmp_path / "staged").iterdir()) == sorted([TRIAL_META, "policy.pt"])


def test_rank_is_per_dataset_and_arm():
    import math

    from dromo_ray.sweep import TrialOutcome, rank

    def out(i, arm, ds, seed, score, status="finished"):
        return TrialOutcome(f"t{i}", {ARM_KEY: arm, DATASET_KEY: ds, "seed": seed, "agent.algorithm": "dromo"},
                            status, score, 10, f"r{i}")

    outs = [out(0, "a", "hc", 0, 10.0), out(1, "b", "hc", 0, 30.0), out(2, "a", "hop", 0, 50.0),
            out(3, "b", "hop", 0, 20.0), out(4, "a", "hc", 1, 20.0), out(5, "b", "hop", 1, math.nan, "error")]
    r = rank(outs, "max")
    assert [(x["dataset"], x["arm"], x["rank"], x["mean"], x["n_finished"]) for x in r] == [
        ("hc", "b", 1, 30.0, 1), ("hc", "a", 2, 15.0, 2), ("hop", "a", 1, 50.0, 1), ("hop", "b", 2, 20.0, 1)]
    assert all(x["algorithm"] == "dromo" and x["variant"] == "" for x in r)


# ------------------------------------------------------------------------------------------------------------
# A miniature of the evidence sweep on local Ray: two arms, a tiny budget, interrupted, resumed, reported.


@pytest.mark.ray
def test_miniature_arms_sweep_interrupted_resumed_and_reported(tmp_path, arms_doc, tiny_hopper_hdf5):
    import ray

    doc = {**arms_doc, "datasets": [{"env": "hopper", "dataset": str(tiny_hopper_hdf5)}],
           "storage_path": str(tmp_path / "sweeps"), "max_concurrent_trials": 1,
           "resources": {"driver_cpus": 0.05}}
    doc["common"] = {**doc["common"], "out_dir": str(tmp_path / "runs"), "train.total_steps": 60,
                     "train.eval_interval": 20, "train.checkpoint_interval": 20, "train.final_score_last_n": 2}
    sweep = write_yaml(tmp_path / "mini.yaml", doc)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        code, stdout, stderr = run_cli(["sweep", str(sweep), "--tracking-uri", uri, "--json"],
                                       env={"DROMO_SWEEP_INTERRUPT_AFTER": "trials=1,checkpoints=1"}, cwd=tmp_path)
        assert code == 130, stderr[-3000:]
        first = json.loads(stdout)
        done = [t for t in first["trials"] if t["status"] == "finished"]
        cut = [t for t in first["trials"] if t["status"] == "interrupted"]
        assert first["status"] == "killed" and len(done) == 1 and len(cut) == 1
        assert done[0]["config"][ARM_KEY] == "dromo"  # arms run in file order
        client, parents, trials = sweep_runs(uri, "mini")
        ended = {r.info.run_id: r.info.end_time for r in trials if r.info.status == "FINISHED"}
        assert len(parents) == 1 and len(ended) == 1

        code, stdout, stderr = run_cli(["sweep", str(sweep), "--resume", "--json"], cwd=tmp_path)
        assert code == 0, stderr[-3000:]
        second = json.loads(stdout)
        assert second["status"] == "finished" and [t["status"] for t in second["trials"]] == ["finished"] * 2
        client, parents, trials = sweep_runs(uri, "mini")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        # one run per trial: the finished one untouched, the interrupted one continued in place
        assert len(trials) == 2 and len({r.data.tags["sweep.trial_id"] for r in trials}) == 2
        assert all(client.get_run(i).info.end_time == t for i, t in ended.items())
        resumed = [r for r in trials if r.data.tags["sweep.trial_id"] == cut[0]["trial_id"]]
        assert resumed[0].info.run_id == cut[0]["mlflow_run_id"]
        assert int(resumed[0].data.tags["sweep.resumed_from_step"]) > 0
        tags = {r.data.tags["sweep.arm"]: r.data.tags for r in trials}
        assert set(tags) == {"dromo", "combo"} and tags["combo"]["algorithm"] == "combo"
        assert {t["sweep.variant"] for t in tags.values()} == {"arm=dromo", "arm=combo"}
        assert all(r.info.status == "FINISHED" and r.data.params["train.total_steps"] == "60" for r in trials)
        ranking = second["ranking"]
        assert sorted(r["arm"] for r in ranking) == ["combo", "dromo"] and [r["rank"] for r in ranking] == [1, 2]
        assert all(r["dataset"] == tiny_hopper_hdf5.stem and r["n_finished"] == 1 for r in ranking)

        out = tmp_path / "report"
        code, stdout, stderr = run_cli(["report", "--experiment", "mini", "--tracking-uri", uri, "--out", str(out),
                                         "--json"], cwd=tmp_path)
        assert code == 0, stderr
        rows = json.loads(stdout)["rows"]
        assert sorted((r["algorithm"], r["variant"], r["n"]) for r in rows) == [("combo", "arm=combo", 1),
                                                                               ("dromo", "arm=dromo", 1)]
        assert (out / "results.md").is_file() and list(out.glob("curves_*.png"))
    finally:
        ray.shutdown()

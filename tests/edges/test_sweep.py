"""``dromo-ray sweep``: validation of sweep files before any trial, placement groups, and real tiny sweeps on Ray
with MLflow (one run per trial under one parent, interrupt + ``--resume`` without duplicates)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from dromo_ray.errors import ConfigError
from dromo_ray.sweep import Cluster, check_resources, load_sweep, trial_bundles
from testkit.sweeps import check_report, check_trial_runs, run_cli, sweep_runs, tiny_sweep_file

ROOT = Path(__file__).resolve().parents[2]
TUNE = ROOT / "tune_configs" / "sweeps"
TINY = ROOT / "tune_configs" / "tasks" / "tiny_hopper_dromo.yaml"


def _write(tmp_path: Path, doc: dict, name: str = "sweep_x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture
def fake_data(tmp_path: Path) -> Path:
    """Validation only checks that the dataset exists; an empty file is enough here."""
    f = tmp_path / "data.hdf5"
    f.write_bytes(b"")
    return f


def _doc(fake: Path, **extra) -> dict:
    doc = {"name": "t", "base": str(TINY), "data": {"dataset": str(fake)},
           "search": {"agent.algorithm": {"grid": ["dromo", "combo"]}}, "seeds": [0, 1]}
    doc.update(extra)
    return doc


# ------------------------------------------------------------------------------------------------------------
# Validation (no Ray)


def test_shipped_sweep_files_validate(tmp_path, monkeypatch):
    d4rl = tmp_path / "d4rl"
    d4rl.mkdir()
    for env in ("hopper", "halfcheetah", "walker2d"):
        (d4rl / f"{env}_medium-v2.hdf5").write_bytes(b"")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(d4rl))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hopper_random-v5.hdf5").write_bytes(b"")  # sweep_tiny's relative dataset
    files = sorted(TUNE.glob("sweep_*.yaml"))
    assert any(f.name == "sweep_tiny.yaml" for f in files)
    for f in files:
        spec = load_sweep(f)
        assert spec.seeds and spec.metric.startswith(("final/", "eval/"))
        assert Path(spec.config["data"]["dataset"]).is_absolute() or spec.config["data"]["dataset"].endswith("-v2")
    tiny = load_sweep(TUNE / "sweep_tiny.yaml")
    assert tiny.expected_trials() == 4
    assert tiny.config["data"]["dataset"] == str(tmp_path / "hopper_random-v5.hdf5")
    assert set(tiny.search) == {"agent.algorithm"} and tiny.seeds == [0, 1]


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"agent": {"alhpa": 1.0}}, "agent.alhpa: unknown key"),
        ({"search": {"agent.alhpa": {"grid": [1, 2]}}}, "search.agent.alhpa"),
        ({"search": {"agent": {"grid": [1, 2]}}}, "search.agent"),
        ({"search": {"agent.alpha": {"normal": [0, 1]}}}, "search.agent.alpha: unknown distribution 'normal'"),
        ({"search": {"agent.alpha": {"uniform": [2.0, 1.0]}}}, "search.agent.alpha.uniform: low must be < high"),
        ({"search": {"agent.alpha": {"loguniform": [0.0, 1.0]}}}, "search.agent.alpha.loguniform"),
        ({"search": {"agent.alpha": {"uniform": [0.1]}}}, "search.agent.alpha.uniform"),
        ({"search": {"agent.num_actions": {"uniform": [2.0, 8.0]}}}, "search.agent.num_actions.uniform"),
        ({"search": {"agent.alpha": {"grid": []}}}, "search.agent.alpha.grid"),
        ({"search": {"agent.alpha": [0.1, 1.0]}}, "search.agent.alpha: expected one distribution"),
        ({"search": {"agent.algorithm": {"grid": ["dromo", "sac"]}}}, "search.agent.algorithm: value 'sac'"),
        ({"search": {"agent.gamma": {"uniform": [0.9, 1.5]}}}, "search.agent.gamma: value 1.5"),
        ({"search": {"seed": {"grid": [0, 1]}}}, "search.seed"),
        ({"search": {"tracking.experiment": {"grid": ["a", "b"]}}}, "search.tracking.experiment"),
        ({"search": {"dynamics.ensemble_size": {"grid": [2, 5]}, "dynamics.num_elites": {"grid": [2, 3]},
                     "dynamics.num_trainers": {"grid": [1]}}},
         "search: the combination"),
        ({"seeds": [0, -1]}, "seeds"),
        ({"seeds": [1, 1]}, "seeds: repeated"),
        ({"mode": "maximum"}, "mode"),
        ({"metric": "score"}, "metric"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
        ({"scheduler": {"type": "asha", "patience": 3}}, "scheduler.patience: unknown key"),
        ({"scheduler": {"type": "asha", "grace_period": 500, "max_t": 100}}, "scheduler.grace_period"),
        ({"searcher": {"type": "bayes"}}, "searcher.type"),
        ({"resources": {"gpus": 1}}, "resources.gpus: unknown key"),
        ({"resources": {"driver_cpus": 0}}, "resources.driver_cpus"),
        ({"num_samples": 0}, "num_samples"),
        ({"name": "a b"}, "name"),
        ({"data": {"dataset": "/nonexistent/file.hdf5"}}, "data.dataset: no such dataset file"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, fake_data, change, fragment):
    doc = _doc(fake_data)
    if "search" in change:
        doc["search"] = change.pop("search")
    for k, v in change.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    p = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    assert str(p) in str(e.value) and fragment in str(e.value), str(e.value)


def test_inline_config_and_base_merge(tmp_path, fake_data):
    spec = load_sweep(_write(tmp_path, _doc(fake_data, agent={"beta": 2.5}, train={"total_steps": 50})))
    cfg = spec.config_obj({"agent.algorithm": "combo", "seed": 1})
    assert (cfg.agent.algorithm, cfg.agent.beta, cfg.seed, cfg.train.total_steps) == ("combo", 2.5, 1, 50)
    assert cfg.rollout.horizon == 3  # from the base
    assert Path(cfg.out_dir).is_absolute()
    space = spec.param_space()
    assert set(space) == {"agent.algorithm", "seed"}


def test_cli_prints_one_line_and_exits_2(tmp_path, fake_data, capsys):
    from dromo_ray.cli import main

    p = _write(tmp_path, _doc(fake_data, search={"agent.alpha": {"uniform": [1.0, 0.5]}}))
    assert main(["sweep", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.agent.alpha.uniform" in err[0]


def test_resume_and_name_collisions_are_user_errors(tmp_path, fake_data, capsys):
    from dromo_ray.cli import main

    p = _write(tmp_path, _doc(fake_data, storage_path=str(tmp_path / "sweeps")))
    assert main(["sweep", str(p), "--resume"]) == 2
    assert "--resume: no interrupted sweep 't'" in capsys.readouterr().err
    (tmp_path / "sweeps" / "t").mkdir(parents=True)
    (tmp_path / "sweeps" / "t" / "dromo_sweep.json").write_text("{}")
    assert main(["sweep", str(p)]) == 2
    assert "name: a sweep 't' already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Placement groups (no Ray)


def test_trial_bundles_follow_the_runtime_section(tmp_path, fake_data):
    spec = load_sweep(_write(tmp_path, _doc(fake_data, resources={"driver_cpus": 0.05})))
    cfg = spec.config_obj()
    b = trial_bundles(cfg, 0.05, cluster_gpus=0)
    # driver, learner, 2 rollout workers, 1 evaluator, each with the replay actor's 0.01 CPU as slack; the 3
    # dynamics-stage actors (2 trainers + the behaviour fitter) fit in those
    assert b == [{"CPU": 0.05}, {"CPU": 0.26}, {"CPU": 0.26}, {"CPU": 0.26}, {"CPU": 0.26}]
    # A GPU in the cluster goes to the learner bundle unless the config says cpu; a pinned learner keeps its size.
    gpu_cfg = spec.config_obj({"device": "auto", "runtime.learner_resources": {"big": 1.0},
                               "runtime.rollout_worker_cpus": 1.0})
    b = trial_bundles(gpu_cfg, 0.05, cluster_gpus=2)
    assert b[1] == {"CPU": 0.26, "GPU": 1.0, "big": 1.0} and all("GPU" not in x for x in b[2:])
    assert b[2:] == [{"CPU": 1.01}] * 3  # workers and the evaluator share one size (the largest)
    assert "GPU" not in trial_bundles(spec.config_obj({"device": "cpu"}), 0.05, cluster_gpus=2)[1]
    # An unpinned learner smaller than a worker could take a worker's bundle: its bundle is worker-sized.
    b = trial_bundles(spec.config_obj({"runtime.rollout_worker_cpus": 1.0}), 0.05, 0)
    assert b[1] == {"CPU": 1.01}
    # ... and with workers steered by a custom resource, one worker bundle more is reserved.
    b = trial_bundles(spec.config_obj({"runtime.rollout_worker_resources": {"rn": 0.1}}), 0.05, 0)
    assert sum(1 for x in b if "rn" in x) == 3
    # Dynamics trainers that do not fit in those bundles get bundles of their own.
    big = spec.config_obj({"runtime.dynamics_trainer_cpus": 1.0})
    b = trial_bundles(big, 0.05, 0)
    assert b[5:] == [{"CPU": 1.0}] * 3


def _place(bundles: list[dict[str, float]], actors: list[tuple[str, float, bool]], rng) -> bool:
    """Ray's placement with bundle_index=-1: each actor, in creation order, goes into SOME bundle with room."""
    free = [dict(b) for b in bundles[1:]]  # bundle 0 is the trial driver's, full
    for _name, cpus, gpu in actors:
        ok = [i for i, b in enumerate(free) if b["CPU"] + 1e-9 >= cpus and (not gpu or b.get("GPU", 0) >= 1)]
        if not ok:
            return False
        i = ok[rng.integers(len(ok))]
        free[i]["CPU"] -= cpus
    return True


@pytest.mark.parametrize("runtime", [
    {},
    {"learner_cpus": 1.0, "rollout_worker_cpus": 0.5, "evaluator_cpus": 0.25},
    {"learner_cpus": 0.25, "rollout_worker_cpus": 1.0, "evaluator_cpus": 0.5, "num_rollout_workers": 3},
    {"learner_cpus": 0.5, "rollout_worker_cpus": 0.25, "evaluator_cpus": 1.0, "num_evaluators": 2},
])
def test_bundles_fit_the_runtime_in_any_placement_order(tmp_path, fake_data, runtime):
    """The stage-2 actors of runtime/driver.py (replay, learner, workers, evaluators, in that order) always fit,
    however Ray picks among the bundles with room -- the fragmentation that once left an evaluator unplaced."""
    spec = load_sweep(_write(tmp_path, _doc(fake_data)))
    for gpus in (0, 1):
        cfg = spec.config_obj({"device": "auto", **{f"runtime.{k}": v for k, v in runtime.items()}})
        rt = cfg.runtime
        b = trial_bundles(cfg, 0.05, cluster_gpus=gpus)
        actors = [("replay", 0.01, False), ("learner", rt.learner_cpus, gpus > 0)]
        actors += [("worker", rt.rollout_worker_cpus, False)] * rt.num_rollout_workers
        actors += [("evaluator", rt.evaluator_cpus, False)] * rt.num_evaluators
        rng = np.random.default_rng(0)
        assert all(_place(b, actors, rng) for _ in range(300)), (runtime, gpus, b)
        stage1 = [("trainer", rt.dynamics_trainer_cpus, False)] * (cfg.dynamics.num_trainers + 1)
        assert all(_place(b, stage1, rng) for _ in range(100))


def test_impossible_resources_name_the_key(tmp_path, fake_data):
    two_cpus = Cluster(total={"CPU": 2.0}, max_node={"CPU": 2.0})
    ok = load_sweep(_write(tmp_path, _doc(fake_data, resources={"driver_cpus": 0.05})))
    assert sum(b["CPU"] for b in check_resources(ok, two_cpus)) == pytest.approx(1.09)
    cases = [
        ({"runtime": {"rollout_worker_cpus": 4.0}}, "runtime.rollout_worker_cpus: one trial needs"),
        ({"runtime": {"num_rollout_workers": 12}}, "runtime.num_rollout_workers: one trial needs"),
        ({"runtime": {"learner_gpus": 1.0}, "device": "auto"}, "runtime.learner_gpus"),
        ({"device": "cuda"}, "device: cuda"),
        ({"runtime": {"rollout_worker_resources": {"rollout_node": 0.1}}},
         "runtime.rollout_worker_resources.rollout_node: the cluster has no resource"),
        ({"runtime": {"learner_resources": {"fast": 1.0}}}, "runtime.learner_resources.fast"),
    ]
    for i, (change, fragment) in enumerate(cases):
        doc = _doc(fake_data, resources={"driver_cpus": 0.05}, **change)
        doc["runtime"] = {**yaml.safe_load(TINY.read_text())["runtime"], **change.get("runtime", {})}
        spec = load_sweep(_write(tmp_path, doc, f"s{i}.yaml"))
        with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
            check_resources(spec, two_cpus)
    # A searched runtime key is checked at its largest value.
    doc = _doc(fake_data, resources={"driver_cpus": 0.05})
    doc["search"]["runtime.num_rollout_workers"] = {"grid": [1, 16]}
    with pytest.raises(ConfigError, match="num_rollout_workers"):
        check_resources(load_sweep(_write(tmp_path, doc, "s_search.yaml")), two_cpus)


# ------------------------------------------------------------------------------------------------------------
# Real sweeps: local Ray, embedded MLflow, the tiny config.


def _run_interrupted_then_resumed(tmp_path: Path, dataset: Path, seeds: list[int], **train) -> dict:
    """Interrupt (SIGINT, as Ctrl-C) once the first trial has finished and the second has checkpointed; resume."""
    sweep = tiny_sweep_file(tmp_path, dataset, seeds, **train)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, stdout, stderr = run_cli(["sweep", str(sweep), "--tracking-uri", uri, "--json"],
                                   env={"DROMO_SWEEP_INTERRUPT_AFTER": "trials=1,checkpoints=1"}, cwd=tmp_path)
    assert code == 130, stderr[-3000:]
    first = json.loads(stdout)
    assert first["status"] == "killed"
    done = [t for t in first["trials"] if t["status"] == "finished"]
    cut = [t for t in first["trials"] if t["status"] == "interrupted"]
    assert len(done) == 1 and len(cut) >= 1
    client, parents, trials = sweep_runs(uri, "sweep_tiny")
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    finished_before = {r.info.run_id: r.info.end_time for r in trials if r.info.status == "FINISHED"}
    assert len(finished_before) == 1 and all(r.info.status in ("FINISHED", "KILLED") for r in trials)

    code, stdout, stderr = run_cli(["sweep", str(sweep), "--resume", "--json"], cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    second = json.loads(stdout)
    assert second["status"] == "finished" and len(second["trials"]) == 2 * len(seeds)
    assert all(t["status"] == "finished" for t in second["trials"])
    client, parents, trials = sweep_runs(uri, "sweep_tiny")
    # the finished trial was not rerun: same run, same end time
    for run_id, end in finished_before.items():
        assert client.get_run(run_id).info.end_time == end
    # the interrupted trial continued from its checkpoint in the same run
    resumed = [r for r in trials if r.data.tags["sweep.trial_id"] == cut[0]["trial_id"]]
    assert len(resumed) == 1 and resumed[0].info.run_id == cut[0]["mlflow_run_id"]
    assert int(resumed[0].data.tags["sweep.resumed_from_step"]) > 0
    return {"uri": uri, "client": client, "parents": parents, "trials": trials, "report": second}


@pytest.mark.ray
def test_tiny_sweep_interrupted_resumed_and_reported(tmp_path, tiny_dataset):
    """The shipped tiny sweep (dromo, combo x 2 seeds): interrupted after its first trial finishes, resumed, it ends
    with exactly 4 trial runs under one parent, with the params, tags and metric histories of single train runs;
    the report's table and curves match them. About 2-3 minutes on 2 CPUs."""
    import ray

    try:
        res = _run_interrupted_then_resumed(tmp_path, tiny_dataset, seeds=[0, 1])
        check_trial_runs(res["client"], res["parents"], res["trials"], ["dromo", "combo"], [0, 1], tiny_dataset)
        ranking = res["report"]["ranking"]
        assert {r["algorithm"] for r in ranking} == {"dromo", "combo"} and [r["rank"] for r in ranking] == [1, 2]
        assert all(r["n_finished"] == 2 and r["seeds"] == [0, 1] for r in ranking)
        check_report(tmp_path, res["uri"], "sweep_tiny", res["client"], res["parents"], res["trials"])
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_impossible_resources_fail_before_any_trial(tmp_path, tiny_dataset):
    import ray

    try:
        sweep = tiny_sweep_file(tmp_path, tiny_dataset, [0])
        doc = yaml.safe_load(sweep.read_text())
        doc["runtime"] = {"rollout_worker_cpus": 64.0}
        sweep.write_text(yaml.safe_dump(doc))
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        code, stdout, stderr = run_cli(["sweep", str(sweep), "--tracking-uri", uri], cwd=tmp_path)
        assert code == 2
        lines = [ln for ln in stderr.splitlines() if ln.startswith("dromo-ray sweep: error")]
        assert len(lines) == 1 and "runtime.rollout_worker_cpus" in lines[0] and "cluster has" in lines[0]
        assert not (tmp_path / "sweeps" / "tiny").exists()  # no Tune experiment, no trial
        assert not (tmp_path / "mlflow.db").exists() or not _mlflow_runs(uri)
    finally:
        ray.shutdown()


def _mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_rank_groups_seeds():
    from dromo_ray.sweep import TrialOutcome, rank

    outs = [TrialOutcome("a", {"agent.algorithm": "dromo", "seed": 0}, "finished", 10.0, 100, "r1"),
            TrialOutcome("b", {"agent.algorithm": "dromo", "seed": 1}, "finished", 20.0, 100, "r2"),
            TrialOutcome("c", {"agent.algorithm": "combo", "seed": 0}, "finished", 30.0, 100, "r3"),
            TrialOutcome("d", {"agent.algorithm": "combo", "seed": 1}, "error", math.nan, 50, "r4")]
    r = rank(outs, "max")
    assert [(x["algorithm"], x["mean"], x["n_finished"]) for x in r] == [("combo", 30.0, 1), ("dromo", 15.0, 2)]
    assert rank(outs, "min")[0]["algorithm"] == "dromo"

"""Resources per trial: one placement group, derived from the config's ``runtime`` section (edge layer).

Tune captures the runtime's actors into the trial's group (see :func:`trial_bundles`): bundle 0 for the trial's
own process (``resources.driver_cpus``); a learner bundle (``runtime.learner_cpus``, the learner's GPUs by
:func:`dromo_ray.runtime.cluster.learner_gpus`, ``runtime.learner_resources``); one bundle per rollout worker
(with ``runtime.rollout_worker_resources``) and per evaluator. Whether the bundles fit the cluster is
:func:`dromo_ray.runtime.cluster.check_fits`, the rule ``train`` uses for one run.
"""

from __future__ import annotations

import functools
from typing import Any

from dromo_ray.core.config import ExperimentConfig, config_from_dict
from dromo_ray.errors import ConfigError
from dromo_ray.runtime.cluster import REPLAY_CPUS, Cluster, check_fits, learner_gpus
from dromo_ray.sweep.schema import is_number
from dromo_ray.sweep.spec import ARM_KEY, DATASET_KEY, Cell, SweepSpec, compose_trial

CQL_DATA_CPUS = 1.5
"""What a ``cql_rllib`` trial's Ray Data pipeline takes *outside* the trial's placement group (Ray Data schedules
its tasks with its own strategy, so Tune does not capture them): the 0.5-CPU pre-learner actor of
:func:`dromo_ray.behavior.cql_rllib.build_cql_config` and a Parquet read task (Ray Data's default, 1 CPU).
Reserving them in the group instead would leave the pipeline waiting forever for CPUs the group holds."""


def trial_bundles(cfg: ExperimentConfig, driver_cpus: float, cluster_gpus: float) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: driver, learner, rollout workers, evaluators[, extra].

    Ray places each actor of the trial (Tune captures them into the group) in *some* bundle with room, in no
    order we control, and bundles fragment: a 0.01-CPU replay actor in a 0.25-CPU evaluator bundle leaves the
    evaluator nowhere to go. So every bundle gets the replay's 0.01 CPU as slack, and the bundles that several
    kinds of actor can land in have one size, the largest of those kinds: with as many such bundles as actors,
    each new actor still finds an untouched bundle that fits it, whatever the order. The learner bundle has the
    learner's own size when only the learner fits in it (it holds the GPU or ``runtime.learner_resources``) or when
    the learner is the largest actor (it is created first, after the replay). When rollout workers are steered by
    custom resources and the learner is not, the learner may take a worker bundle: one more is reserved.

    A ``cql_rllib`` trial starts none of Algorithm 1's actors: RLlib's CQL learns in the trial's own process, the
    one bundle of its group; its data pipeline runs beside the group (:func:`outside_group`).
    """
    if cfg.agent.algorithm == "cql_rllib":
        return [{"CPU": round(float(driver_cpus), 4)}]
    rt = cfg.runtime
    g = learner_gpus(cfg, cluster_gpus)
    pinned = g > 0 or bool(rt.learner_resources)
    other = max(rt.rollout_worker_cpus, rt.evaluator_cpus if rt.num_evaluators else 0.0)
    learner: dict[str, float] = {"CPU": (rt.learner_cpus if pinned else max(rt.learner_cpus, other)) + REPLAY_CPUS,
                                 **rt.learner_resources}
    if g > 0:
        learner["GPU"] = g
    bundles = [{"CPU": driver_cpus}, learner]
    workers = rt.num_rollout_workers + (1 if rt.rollout_worker_resources and not pinned else 0)
    bundles += [{"CPU": other + REPLAY_CPUS, **rt.rollout_worker_resources} for _ in range(workers)]
    bundles += [{"CPU": other + REPLAY_CPUS} for _ in range(rt.num_evaluators)]
    # Alg. 1 line 1 runs before any of those actors exists: k trainers (+ the behaviour fitter for DROMO), all of
    # one size, fit into the same bundles; what does not fit gets bundles of its own.
    k = cfg.dynamics.num_trainers + (1 if cfg.agent.needs_behavior_policy() else 0)
    t = rt.dynamics_trainer_cpus
    fits = sum(int((b["CPU"] + 1e-9) // t) for b in bundles[1:])
    bundles += [{"CPU": t} for _ in range(max(0, k - fits))]
    return [{key: round(float(v), 4) for key, v in b.items()} for b in bundles]


def outside_group(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Resources a trial uses beside its placement group, at the same time (:data:`CQL_DATA_CPUS`)."""
    return [{"CPU": CQL_DATA_CPUS}] if cfg.agent.algorithm == "cql_rllib" else []


def placement_group_factory(config: dict[str, Any], *, cells: dict[Cell, dict[str, Any]], driver_cpus: float,
                            cluster_gpus: float, strategy: str) -> Any:
    """``tune.with_resources`` callback: the trial's bundles from its own (searched) config."""
    from ray import tune

    cfg = config_from_dict(compose_trial(cells, dict(config)))
    return tune.PlacementGroupFactory(trial_bundles(cfg, driver_cpus, cluster_gpus), strategy=strategy)


def resources_factory(spec: SweepSpec, cluster_gpus: float) -> Any:
    return functools.partial(placement_group_factory, cells=spec.cells, driver_cpus=spec.driver_cpus,
                             cluster_gpus=cluster_gpus, strategy=spec.strategy)


def _worst_case_config(spec: SweepSpec, cell: Cell) -> ExperimentConfig:
    """The cell's config with every searched runtime/resource key at its largest candidate."""
    ov: dict[str, Any] = {}
    for k, d in spec.search.items():
        if not (k.startswith(("runtime.", "dynamics.num_trainers", "agent.algorithm", "agent.alpha")) or k == "device"):
            continue
        cands = d.candidates()
        if all(isinstance(c, dict) for c in cands):
            merged: dict[str, float] = {}
            for c in cands:
                for rk, rv in c.items():
                    merged[rk] = max(merged.get(rk, 0.0), float(rv))
            ov[k] = merged
        elif k == "agent.algorithm":
            ov[k] = "dromo" if "dromo" in cands else cands[0]
        elif k == "device":
            ov[k] = "cuda" if "cuda" in cands else ("auto" if "auto" in cands else "cpu")
        elif all(is_number(c) for c in cands):
            ov[k] = max(cands)
    return spec.config_obj({ARM_KEY: cell[0], DATASET_KEY: cell[1], **ov})


def check_resources(spec: SweepSpec, cluster: Cluster) -> list[dict[str, float]]:
    """ConfigError naming the key when one trial cannot fit the cluster; returns the largest trial's bundles."""
    largest: list[dict[str, float]] = []
    for cell in spec.cells:
        cfg = _worst_case_config(spec, cell)
        rt = cfg.runtime
        bundles = trial_bundles(cfg, spec.driver_cpus, cluster.total.get("GPU", 0.0))
        layout = ("RLlib CQL in the trial's process, its data pipeline beside it" if cfg.agent.algorithm == "cql_rllib"
                  else f"bundles: driver, learner, {rt.num_rollout_workers} rollout workers, {rt.num_evaluators} "
                  "evaluators[, extra]")
        try:
            check_fits(cfg, cluster, bundles + outside_group(cfg), driver_cpus=spec.driver_cpus, what="one trial",
                       layout=layout)
        except ConfigError as e:
            raise ConfigError(f"arms.{cell[0]}: {e}" if cell[0] else str(e)) from None
        if sum(b.get("CPU", 0.0) for b in bundles) > sum(b.get("CPU", 0.0) for b in largest):
            largest = bundles
    return largest

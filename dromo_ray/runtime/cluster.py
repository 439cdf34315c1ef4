"""Asking whether a run fits the cluster (runtime layer; the one resource rule).

:func:`check_fits` is the feasibility rule shared by ``train`` (one run's actors, :func:`run_stages`) and
``sweep`` (a trial's placement-group bundles): without it Ray waits forever for resources that never come.
The requests it checks are :class:`~dromo_ray.runtime.resources.RoleResources`, the same that create the
actors. ``start_ray``, ``learner_gpus`` and ``REPLAY_CPUS`` live in :mod:`dromo_ray.runtime.resources` and are
importable from here as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from dromo_ray.core.config import ExperimentConfig
from dromo_ray.errors import ConfigError
from dromo_ray.runtime.resources import REPLAY_CPUS, RoleResources, learner_gpus, start_ray

__all__ = ["REPLAY_CPUS", "Cluster", "check_fits", "check_run_fits", "fmt_resources", "learner_gpus", "run_stages",
           "start_ray"]


@dataclass
class Cluster:
    """What the Ray cluster offers: totals and the largest node."""

    total: dict[str, float]
    max_node: dict[str, float]

    @classmethod
    def from_ray(cls) -> Cluster:
        import ray

        total = {k: float(v) for k, v in ray.cluster_resources().items()}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
        max_node = {k: max(float(n.get(k, 0.0)) for n in nodes) for k in total} if nodes else dict(total)
        return cls(total, max_node)


def run_stages(cfg: ExperimentConfig, cluster_gpus: float) -> list[list[dict[str, float]]]:
    """The actors of one ``train`` run outside Tune, as the two sets that exist at the same time.

    Stage 1 (Alg. 1 line 1): the dynamics trainers and, for DROMO, the behaviour fitter. Stage 2 (lines 2-8):
    the replay actor, the learner, the rollout workers and the evaluators (runtime/pipeline.py).
    """
    rt = cfg.runtime
    roles = RoleResources.from_config(cfg, cluster_gpus)
    fit = [roles.dynamics.bundle() for _ in range(cfg.dynamics.num_trainers)]
    if cfg.agent.needs_behavior_policy():
        fit.append(roles.behavior_fit.bundle())
    loop = [roles.replay.bundle(), roles.learner.bundle()]
    loop += [roles.rollout.bundle() for _ in range(rt.num_rollout_workers)]
    loop += [roles.evaluator.bundle() for _ in range(rt.num_evaluators)]
    return [fit, loop]


def check_fits(cfg: ExperimentConfig, cluster: Cluster, bundles: list[dict[str, float]], *, driver_cpus: float = 0.0,
               what: str = "one run", layout: str = "") -> None:
    """ConfigError naming the key when ``bundles`` (resources held at the same time) cannot fit ``cluster``.

    ``what`` names the unit in the message ("one run", "one trial"); ``layout`` says what the bundles are.
    """
    rt = cfg.runtime
    gpus = cluster.total.get("GPU", 0.0)
    if cfg.device == "cuda" and gpus < 1 and rt.learner_gpus != 0:
        raise ConfigError(f"device: cuda is requested but the cluster has no GPU ({fmt_resources(cluster.total)})")
    need_gpu = sum(b.get("GPU", 0.0) for b in bundles)
    if need_gpu > gpus + 1e-9:
        raise ConfigError(f"runtime.learner_gpus: {what} needs {need_gpu:g} GPU but the cluster has {gpus:g}")
    for section, res in (("runtime.learner_resources", rt.learner_resources),
                         ("runtime.rollout_worker_resources", rt.rollout_worker_resources)):
        for name in res:
            if name not in cluster.total:
                raise ConfigError(f"{section}.{name}: the cluster has no resource {name!r} "
                                  f"(it has {fmt_resources(cluster.total)})")
    for name in {k for b in bundles for k in b if k not in ("CPU", "GPU")}:
        need = sum(b.get(name, 0.0) for b in bundles)
        if need > cluster.total[name] + 1e-9:
            section = ("runtime.learner_resources" if name in rt.learner_resources
                       else "runtime.rollout_worker_resources")
            raise ConfigError(f"{section}.{name}: {what} needs {need:g} but the cluster has {cluster.total[name]:g}")
    cpus = cluster.total.get("CPU", 0.0)
    need_cpu = sum(b.get("CPU", 0.0) for b in bundles)
    if need_cpu > cpus + 1e-9:
        parts = {
            "resources.driver_cpus": driver_cpus,
            "runtime.learner_cpus": rt.learner_cpus,
            ("runtime.rollout_worker_cpus" if rt.rollout_worker_cpus >= 1 or rt.num_rollout_workers == 1
             else "runtime.num_rollout_workers"): rt.num_rollout_workers * rt.rollout_worker_cpus,
            ("runtime.evaluator_cpus" if rt.evaluator_cpus >= 1 or rt.num_evaluators <= 1
             else "runtime.num_evaluators"): rt.num_evaluators * rt.evaluator_cpus,
            "runtime.dynamics_trainer_cpus": rt.dynamics_trainer_cpus * cfg.dynamics.num_trainers,
        }
        key = max(parts, key=lambda k: parts[k])
        breakdown = " + ".join(f"{b.get('CPU', 0):g}" for b in bundles)
        raise ConfigError(f"{key}: {what} needs {need_cpu:g} CPUs but the cluster has {cpus:g} ({layout}: "
                          f"{breakdown}; see dromo_ray/runtime/cluster.py); lower the runtime CPUs "
                          "(fractions are fine)")
    biggest = max((b.get("CPU", 0.0) for b in bundles), default=0.0)
    if biggest > cluster.max_node.get("CPU", cpus) + 1e-9:
        raise ConfigError(f"runtime: a single actor needs {biggest:g} CPUs but no node has that many "
                          f"(largest: {cluster.max_node.get('CPU', 0):g})")


def check_run_fits(cfg: ExperimentConfig, cluster: Cluster) -> None:
    """:func:`check_fits` for the actors of one ``train`` run (:func:`run_stages`). A ``cql_rllib`` run starts
    none of Algorithm 1's actors (RLlib's CQL learns in the driver process), so only the device rule applies."""
    if cfg.agent.algorithm == "cql_rllib":
        check_fits(cfg, cluster, [], what="one run", layout="RLlib CQL in the driver")
        return
    gpus = cluster.total.get("GPU", 0.0)
    fit, loop = run_stages(cfg, gpus)
    check_fits(cfg, cluster, fit, what="one run", layout="dynamics trainers and behaviour fitter")
    check_fits(cfg, cluster, loop, what="one run", layout=f"replay, learner, {cfg.runtime.num_rollout_workers} "
               f"rollout workers, {cfg.runtime.num_evaluators} evaluators")


def fmt_resources(res: dict[str, float]) -> str:
    shown = {k: v for k, v in res.items() if not k.startswith(("node:", "memory", "object_store"))}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "nothing"

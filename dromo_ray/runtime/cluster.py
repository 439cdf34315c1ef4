"""Starting Ray and asking whether a run fits the cluster (runtime layer; one place for both rules).

:func:`start_ray` is the only ``ray.init`` of the package. With no address (neither ``address=`` nor
``$RAY_ADDRESS``) it starts a *local* instance that listens on loopback only: Ray resolves a ``127.0.0.1`` node
address to the machine's external IP (and its gRPC servers then bind every interface) unless it treats the
node as a single-machine one, the way it does on macOS and Windows; we ask for that, start no dashboard, and the
metrics agent follows the node address. An explicit cluster address keeps Ray's own behaviour.

:func:`check_fits` is the feasibility rule shared by ``train`` (one run's actors, :func:`run_stages`) and
``sweep`` (a trial's placement-group bundles): without it Ray waits forever for resources that never come.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from dromo_ray.core.config import ExperimentConfig
from dromo_ray.errors import ConfigError

REPLAY_CPUS = 0.01
"""The replay actor's CPU request (runtime/driver.py)."""

_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(address: str | None = None, **kwargs: Any) -> bool:
    """``ray.init`` unless Ray is up; True when this call connected (the caller then owns ``ray.shutdown``).

    A local instance binds loopback only (module docstring). A SIGTERM handler the program set before the call
    stays in place (``ray.init`` replaces it with one that calls ``sys.exit`` from wherever the signal lands).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is None:
        import ray._private.ray_constants as ray_constants

        os.environ[_SINGLE_NODE_ENV] = "0"  # Ray's child processes read it at import
        ray_constants.ENABLE_RAY_CLUSTER = False  # this process already imported it
        opts["_node_ip_address"] = "127.0.0.1"
        # Token auth stays Ray's default for a new local instance (on); only its console notice ("Token
        # authentication is enabled for this Ray cluster...") is kept off the user's screen. Setting RAY_AUTH_MODE
        # here instead would desynchronise this process's cached Ray config from its children's.
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    opts.update(kwargs)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(address=address, **opts)
    if main and callable(previous):
        signal.signal(signal.SIGTERM, previous)
    return True


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


def learner_gpus(cfg: ExperimentConfig, cluster_gpus: float) -> float:
    """The learner's GPUs (``runtime.learner_gpus`` -1: one when the cluster has one and ``device`` allows)."""
    if cfg.device == "cpu":
        return 0.0
    if cfg.runtime.learner_gpus >= 0:
        return cfg.runtime.learner_gpus
    return 1.0 if cluster_gpus >= 1 else 0.0


def run_stages(cfg: ExperimentConfig, cluster_gpus: float) -> list[list[dict[str, float]]]:
    """The actors of one ``train`` run outside Tune, as the two sets that exist at the same time.

    Stage 1 (Alg. 1 line 1): the dynamics trainers and, for DROMO, the behaviour fitter. Stage 2 (lines 2-8):
    the replay actor, the learner, the rollout workers and the evaluators (runtime/driver.py).
    """
    rt = cfg.runtime
    k = cfg.dynamics.num_trainers + (1 if cfg.agent.needs_behavior_policy() else 0)
    fit = [{"CPU": rt.dynamics_trainer_cpus} for _ in range(k)]
    learner: dict[str, float] = {"CPU": rt.learner_cpus, **rt.learner_resources}
    g = learner_gpus(cfg, cluster_gpus)
    if g > 0:
        learner["GPU"] = g
    loop = [{"CPU": REPLAY_CPUS}, learner]
    loop += [{"CPU": rt.rollout_worker_cpus, **rt.rollout_worker_resources} for _ in range(rt.num_rollout_workers)]
    loop += [{"CPU": rt.evaluator_cpus} for _ in range(rt.num_evaluators)]
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

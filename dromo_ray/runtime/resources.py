"""The Ray lifecycle and what each actor of a run asks Ray for (runtime layer).

:func:`ray_session` is the one owner of the Ray lifecycle: it connects through :func:`start_ray` (the package's
only ``ray.init``) and shuts Ray down on the way out only when it started it. With no address (neither
``address=`` nor ``$RAY_ADDRESS``) :func:`start_ray` starts a *local* instance that listens on loopback only:
Ray resolves a ``127.0.0.1`` node address to the machine's external IP (and its gRPC servers then bind every
interface) unless it treats the node as a single-machine one, the way it does on macOS and Windows; we ask for
that, start no dashboard, and the metrics agent follows the node address. An explicit cluster address keeps
Ray's own behaviour.

:class:`RoleResources` says, from the config, what every role of Algorithm 1 requests (CPUs, GPUs, custom
resources, restarts): the actors are created with it (:mod:`dromo_ray.runtime.pipeline`) and the feasibility
rule checks the same numbers (:func:`dromo_ray.runtime.cluster.run_stages`), so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dromo_ray.core.config import ExperimentConfig

REPLAY_CPUS = 0.01
"""The replay actor's CPU request: it only copies arrays in and out, so it never holds a core."""

_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(address: str | None = None, **kwargs: Any) -> bool:
    """``ray.init`` unless Ray is up; True when this call connected (the caller then owns ``ray.shutdown``).

    A local instance binds loopback only (module docstring). A SIGTERM handler the program set before the call
    stays in place (``ray.init`` replaces it with one that calls ``sys.exit`` from wherever the signal lands).
    Prefer :func:`ray_session`, which also shuts down what it started.
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
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    opts.update(kwargs)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(address=address, **opts)
    if main and callable(previous):
        signal.signal(signal.SIGTERM, previous)
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, **init_kwargs: Any) -> Iterator[bool]:
    """Ray for the body of a ``with``: attach to what is up (or to ``address`` / ``$RAY_ADDRESS``), else start a
    local loopback-only instance; on exit shut down only an instance this call started. Yields whether it did.

    ``init_kwargs`` go to ``ray.init`` when this call connects (e.g. ``num_cpus`` for a local instance).
    """
    started = start_ray(address, **init_kwargs)
    try:
        yield started
    finally:
        if started:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def learner_gpus(cfg: ExperimentConfig, cluster_gpus: float) -> float:
    """The learner's GPUs (``runtime.learner_gpus`` -1: one when the cluster has one and ``device`` allows)."""
    if cfg.device == "cpu":
        return 0.0
    if cfg.runtime.learner_gpus >= 0:
        return cfg.runtime.learner_gpus
    return 1.0 if cluster_gpus >= 1 else 0.0


def cluster_gpus() -> float:
    """The GPUs of the Ray cluster this process is connected to."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


@dataclass(frozen=True)
class ActorOptions:
    """What one actor asks Ray for."""

    num_cpus: float
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources (e.g. ``{"rollout_node": 0.01}``) that steer the actor to some nodes."""
    max_restarts: int = 0
    """Ray restarts a killed actor this many times, retrying its calls (rollout workers only)."""

    def bundle(self) -> dict[str, float]:
        """The resources held while the actor lives, as a placement-group bundle / feasibility-check entry."""
        out: dict[str, float] = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus > 0:
            out["GPU"] = self.num_gpus
        return out

    def actor_class(self, cls: type, max_concurrency: int = 1) -> Any:
        """``ray.remote(cls)`` with these options."""
        import ray

        return ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=self.resources or None,
                          max_restarts=self.max_restarts, max_task_retries=-1 if self.max_restarts else 0,
                          max_concurrency=max_concurrency)(cls)


@dataclass(frozen=True)
class RoleResources:
    """The request of every role of one run (DESIGN.md "One DROMO run on Ray"), from ``cfg.runtime``."""

    dynamics: ActorOptions
    """One dynamics trainer (Alg. 1 line 1); ``dynamics.num_trainers`` of them."""
    behavior_fit: ActorOptions
    """The pi^beta fitter, beside the dynamics trainers (only when ``agent.needs_behavior_policy()``)."""
    replay: ActorOptions
    learner: ActorOptions
    rollout: ActorOptions
    """One rollout worker; ``runtime.num_rollout_workers`` of them."""
    evaluator: ActorOptions
    """One evaluator; ``runtime.num_evaluators`` of them."""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, cluster_gpus: float) -> RoleResources:
        rt = cfg.runtime
        return cls(
            dynamics=ActorOptions(rt.dynamics_trainer_cpus),
            behavior_fit=ActorOptions(rt.dynamics_trainer_cpus),
            replay=ActorOptions(REPLAY_CPUS),
            learner=ActorOptions(rt.learner_cpus, learner_gpus(cfg, cluster_gpus), dict(rt.learner_resources)),
            rollout=ActorOptions(rt.rollout_worker_cpus, resources=dict(rt.rollout_worker_resources),
                                 max_restarts=rt.max_worker_restarts),
            evaluator=ActorOptions(rt.evaluator_cpus),
        )

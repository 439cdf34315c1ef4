"""Ray actors: each a thin shell around one core object (STYLE.md principles 2 and 11).

The classes are plain Python with a role suffix (``LearnerActor`` wraps the core ``Learner``), made remote only
where :mod:`dromo_ray.runtime.pipeline` builds them, with the resources of their role
(:meth:`dromo_ray.runtime.resources.ActorOptions.actor_class`); tests build them without Ray. Each receives the
config slices it reads, except :class:`LearnerActor` (see there). Nothing here imports MLflow or Tune.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import ray
import torch

from dromo_ray.core.agents.sac import cpu_copy
from dromo_ray.core.buffer import ReplayBuffer
from dromo_ray.core.config import AgentConfig, DynamicsConfig, ExperimentConfig, RolloutConfig
from dromo_ray.core.envs import get_env_spec
from dromo_ray.core.learner import DatasetSampler, Learner, numpy_rng_state, set_numpy_rng_state
from dromo_ray.core.model_env import penalty_kind
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.threads import set_torch_threads
from dromo_ray.core.types import NumpyBatch


def pick_device(requested: str, gpus: float) -> torch.device:
    if requested == "cpu" or gpus == 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def dataset_arrays(dataset: Any) -> NumpyBatch:
    """OfflineDataset -> NumpyBatch view (no copies of the zero-copy object-store arrays beyond dtype fixes)."""
    n = len(dataset)
    return NumpyBatch(
        np.asarray(dataset.observations, dtype=np.float32),
        np.asarray(dataset.actions, dtype=np.float32),
        np.asarray(dataset.rewards, dtype=np.float32),
        np.asarray(dataset.next_observations, dtype=np.float32),
        np.asarray(dataset.terminals, dtype=np.float32),
        np.zeros(n, dtype=np.float32),
    )


# --------------------------------------------------------------------------------------------------------
class DynamicsActor:
    """Trains a subset of the ensemble's members (Alg. 1 line 1); members of several trainers are merged.

    Every trainer gets the same train/holdout split and fits the normaliser on the same training rows, so the
    sub-ensembles share their normaliser and can be concatenated (``merge_ensembles``).
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: DynamicsConfig, num_members: int, seed: int,
                 torch_threads: int = 1) -> None:
        set_torch_threads(torch_threads)
        from dromo_ray.core import dynamics

        self.gen = torch.Generator().manual_seed(seed)
        self.model = dynamics.EnsembleDynamics(obs_dim, act_dim, cfg, num_members=num_members, generator=self.gen)
        self.cfg = cfg

    def fit(self, dataset: Any, train_idx: np.ndarray, holdout_idx: np.ndarray) -> dict[str, Any]:
        from dromo_ray.core import dynamics

        a = dataset_arrays(dataset)
        inputs, targets = dynamics.make_inputs_targets(a.obs, a.act, a.next_obs, a.rew)
        self.model.set_normalizer(dynamics.normalizer_stats(inputs[train_idx], targets[train_idx]))
        trainer = dynamics.DynamicsTrainer(self.model, self.cfg, self.gen)
        metrics = trainer.train(inputs[train_idx], targets[train_idx], inputs[holdout_idx], targets[holdout_idx])
        state = {k: v.cpu() for k, v in self.model.state_dict().items()}
        return {"state": state, "metrics": metrics, "holdout_losses": np.asarray(trainer.holdout_losses)}


def dynamics_from_state(state: dict[str, Any], obs_dim: int, act_dim: int, cfg: DynamicsConfig) -> Any:
    """Rebuild an :class:`EnsembleDynamics` (of however many members the state holds) from its state dict."""
    from dromo_ray.core.dynamics import EnsembleDynamics

    model = EnsembleDynamics(obs_dim, act_dim, cfg, num_members=int(state["max_logvar"].shape[0]))
    if model.elite_idx.shape != state["elite_idx"].shape:
        model.elite_idx = torch.zeros_like(state["elite_idx"])
    model.load_state_dict(state)
    return model


class BehaviorFitActor:
    """Fits pi^beta by maximum likelihood, in parallel with the dynamics trainers."""

    def __init__(self, torch_threads: int = 1) -> None:
        set_torch_threads(torch_threads)

    def fit(self, dataset: Any, hidden: tuple[int, ...], steps: int, seed: int) -> dict[str, Any]:
        from dromo_ray.core.behavior import fit_behavior_policy

        actor, metrics = fit_behavior_policy(np.asarray(dataset.observations), np.asarray(dataset.actions),
                                             hidden=hidden, steps=steps, seed=seed, device="cpu")
        return {"state": {k: v.cpu() for k, v in actor.state_dict().items()}, "metrics": metrics}


# --------------------------------------------------------------------------------------------------------
class ReplayActor:
    """D_model: a bounded FIFO buffer that serves the learner in chunks of many batches."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, seed: int) -> None:
        self.buffer = ReplayBuffer(capacity, obs_dim, act_dim)
        self.rng = np.random.default_rng(seed)
        self.added = 0
        self.worker_inputs: dict[str, Any] | None = None

    def hold_worker_inputs(self, inputs: dict[str, Any]) -> None:
        """Keep the rollout workers' inputs ({"dynamics", "dataset", "policy"}: ObjectRefs) for the whole run. A
        worker fetches them in its constructor (:meth:`get_worker_inputs`), so that no constructor argument of a
        restartable actor is an object-store ref (Ray warns about, and cannot restart, such actors), and a
        restarted worker finds them here."""
        self.worker_inputs = dict(inputs)

    def get_worker_inputs(self) -> dict[str, Any] | None:
        return self.worker_inputs

    def add(self, batch: NumpyBatch) -> int:
        self.buffer.add(batch)
        self.added += batch.size
        return len(self.buffer)

    def size(self) -> int:
        return len(self.buffer)

    def sample_chunk(self, num_batches: int, batch_size: int) -> NumpyBatch:
        return self.buffer.sample_chunk(num_batches, batch_size, self.rng)

    def stats(self) -> dict[str, float]:
        return {"replay/size": float(len(self.buffer)), "replay/added": float(self.added)}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "rng": numpy_rng_state(self.rng), "added": self.added}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        set_numpy_rng_state(self.rng, state["rng"])
        self.added = int(state["added"])


# --------------------------------------------------------------------------------------------------------
class RolloutActor:
    """Holds the elite ensemble and the latest target policy (inference only); rolls H steps from states of D.

    Synchronous mode: the learner loop calls :meth:`rollout` with an explicit seed per round. Asynchronous mode:
    :meth:`start` runs a background loop that produces ``starts_per_publish`` start states' worth of
    transitions for every policy publish and pushes them to the replay actor, paced by the learner.
    """

    def __init__(self, worker_index: int, env_key: str, inputs: dict[str, Any] | None, replay: Any = None, *,
                 agent: AgentConfig, dynamics: DynamicsConfig, rollout: RolloutConfig, seed: int,
                 torch_threads: int = 1) -> None:
        """``inputs``: {"dynamics": state, "dataset": D, "policy": target-policy state}, each value or an ObjectRef
        (fetched here); None: the dict the replay actor holds (:meth:`ReplayActor.hold_worker_inputs`). ``replay``:
        the replay actor's handle, or its name. The runtime builds its restartable workers with ``inputs=None`` and
        the name, so that no constructor argument is an object-store ref: Ray counts refs and actor handles alike,
        cannot restart such an actor once they are gone, and prints an error line for each one it creates.

        ``agent`` gives the policy's widths and the model-reward penalty, ``dynamics`` the ensemble's shape,
        ``rollout`` H and whether the model is sampled; ``seed`` the run's seed."""
        set_torch_threads(torch_threads)
        import ray

        if isinstance(replay, str):  # the replay actor's name: a handle argument would be an object-store ref too
            replay = ray.get_actor(replay)
        if inputs is None:
            inputs = ray.get(replay.get_worker_inputs.remote())
            if inputs is None:
                raise ValueError("RolloutActor: the replay actor holds no worker inputs (hold_worker_inputs first)")
        keys = ("dynamics", "dataset", "policy")
        values = [inputs[k] for k in keys]
        refs = [i for i, v in enumerate(values) if isinstance(v, ray.ObjectRef)]
        if refs:  # (ray.get([]) would start a Ray instance when none is up, e.g. a worker built outside Ray)
            for i, v in zip(refs, ray.get([values[i] for i in refs]), strict=True):
                values[i] = v
        dynamics_state, dataset, policy_state = values
        from dromo_ray.core.model_env import ModelEnv

        spec = get_env_spec(env_key)
        self.index, self.rollout_cfg = worker_index, rollout
        model = dynamics_from_state(dynamics_state, spec.obs_dim, spec.act_dim, dynamics)
        penalty = penalty_kind(agent)
        assert penalty != "entropy" or agent.mopo_entropy_ref is not None, (
            "RolloutActor: the entropy penalty needs agent.mopo_entropy_ref (the pipeline sets it from D)")
        # MOPO's max over members runs over all of them; other algorithms only log the signal (elites: cheaper).
        self.model_env = ModelEnv(model.eval(), spec.termination_fn, penalty=penalty,
                                  all_members=agent.algorithm == "mopo", entropy_ref=agent.mopo_entropy_ref)
        self.start_obs = torch.as_tensor(np.asarray(dataset.observations, dtype=np.float32))
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, agent.hidden_dims)
        self.actor.load_state_dict(policy_state)
        self.actor.eval()
        self.policy_version = 0
        self.replay = replay
        self._lock = threading.Lock()
        self._pending_rounds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.transitions = 0
        self.busy_s = 0.0
        self.generator = torch.Generator().manual_seed(seed * 1000 + worker_index)

    def set_policy(self, policy_state: dict[str, Any], version: int, rounds: int = 0,
                   starts_per_round: int = 0) -> int:
        """Install new target-policy weights; ``rounds`` more rollout rounds are owed (async mode).

        The background loop starts on the first owed round, also after Ray restarted a killed worker.
        """
        with self._lock:
            self.actor.load_state_dict(policy_state)
            self.policy_version = version
            self._pending_rounds += rounds
        if rounds and starts_per_round:
            self.start(starts_per_round)
        return version

    @torch.no_grad()
    def rollout(self, num_starts: int, seed: int | None = None) -> tuple[NumpyBatch, dict[str, float]]:
        from dromo_ray.core.rollout import rollout, rollout_stats

        gen = torch.Generator().manual_seed(seed) if seed is not None else self.generator
        t0 = time.perf_counter()
        idx = torch.randint(self.start_obs.shape[0], (num_starts,), generator=gen)
        with self._lock:
            batch = rollout(self.model_env, self.actor, self.start_obs[idx], self.rollout_cfg.horizon, gen,
                            deterministic_model=self.rollout_cfg.deterministic)
        stats = rollout_stats(batch, num_starts)
        self.busy_s += time.perf_counter() - t0
        self.transitions += batch.size
        return batch, stats

    # async mode -----------------------------------------------------------------------------------------
    def start(self, starts_per_round: int) -> bool:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, args=(starts_per_round,), daemon=True)
            self._thread.start()
        return True

    def _loop(self, starts_per_round: int) -> None:
        in_flight: list[Any] = []
        while not self._stop.is_set():
            with self._lock:
                owed = self._pending_rounds
                if owed:
                    self._pending_rounds -= 1
            if not owed:
                time.sleep(0.005)
                continue
            batch, _ = self.rollout(starts_per_round)
            in_flight.append(self.replay.add.remote(batch))
            if len(in_flight) > 2:  # bound memory: wait for the oldest push
                ray.wait(in_flight[:1])
                in_flight.pop(0)

    def stop(self) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return True

    def stats(self) -> dict[str, float]:
        return {"transitions": float(self.transitions), "busy_s": self.busy_s,
                "pending_rounds": float(self._pending_rounds), "policy_version": float(self.policy_version)}

    def ping(self) -> int:
        return self.index




# --------------------------------------------------------------------------------------------------------
class LearnerActor:
    """Wraps the core :class:`~dromo_ray.core.learner.Learner`: the agent updates on d_f batches, model rows
    fetched from the replay actor.

    It takes the whole :class:`ExperimentConfig`: the agent it builds reads ``agent``, ``dynamics`` (MOBILE's
    ensemble), ``train.total_steps`` (learning-rate schedules), ``seed`` and ``device``, and the actor itself
    ``runtime``; a slice would be the config again under another name.

    Asynchronous mode prefetches the next chunk while the current one is consumed, so the RPC overlaps
    compute; synchronous mode fetches on demand so that the sample stream is deterministic.
    """

    def __init__(self, cfg: ExperimentConfig, env_key: str, dataset: Any, replay: Any,
                 behavior_state: dict[str, Any] | None, density_state: dict[str, Any] | None,
                 num_gpus: float = 0.0, dynamics_state: dict[str, Any] | None = None) -> None:
        set_torch_threads(cfg.runtime.torch_threads)
        from dromo_ray.core.agents import make_agent
        from dromo_ray.core.density import density_from_state

        spec = get_env_spec(env_key)
        self.cfg = cfg
        self.device = pick_device(cfg.device, num_gpus)
        behavior = None
        if behavior_state is not None:
            behavior = TanhGaussianActor(spec.obs_dim, spec.act_dim, behavior_hidden(cfg.agent))
            behavior.load_state_dict(behavior_state)
        density = density_from_state(density_state) if density_state is not None else None
        # The trained ensemble, for algorithms whose update queries it (MOBILE's penalty): the agent keeps a copy.
        dyn = None
        if dynamics_state is not None and cfg.agent.needs_dynamics():
            dyn = dynamics_from_state(dynamics_state, spec.obs_dim, spec.act_dim, cfg.dynamics)
        self.agent = make_agent(cfg.agent, spec.obs_dim, spec.act_dim, device=self.device, seed=cfg.seed,
                                behavior=behavior, density=density, dataset_size=len(dataset),
                                total_steps=cfg.train.total_steps, dynamics=dyn)
        sampler = DatasetSampler(dataset_arrays(dataset), self.device, seed=cfg.seed + 17)
        self.replay = replay
        self._prefetch: Any = None
        rollouts = (learner_rollouts(cfg, spec, dataset, dynamics_state, self.agent, self.device)
                    if cfg.rollout.mode == "learner" else None)
        self.learner = Learner(self.agent, sampler, cfg.agent.batch_size, cfg.agent.f, self._fetch,
                               chunk_batches=cfg.runtime.replay_chunk_batches, update_mode=cfg.agent.update_mode,
                               rollouts=rollouts, rollout_interval=cfg.rollout.interval)
        self.compute_s = 0.0

    def _fetch(self, num_batches: int, batch_size: int) -> NumpyBatch:
        if self.cfg.runtime.synchronous:
            return ray.get(self.replay.sample_chunk.remote(num_batches, batch_size))
        ref = self._prefetch or self.replay.sample_chunk.remote(num_batches, batch_size)
        self._prefetch = self.replay.sample_chunk.remote(self.cfg.runtime.replay_chunk_batches, batch_size)
        return ray.get(ref)

    def train(self, num_updates: int) -> dict[str, Any]:
        wait0 = self.learner.data_wait_s
        t0 = time.perf_counter()
        metrics = self.learner.train(num_updates)
        dt = time.perf_counter() - t0
        wait = self.learner.data_wait_s - wait0
        self.compute_s += dt
        metrics.update({
            "perf/learner_updates_per_s": num_updates / dt,
            "perf/learner_wait_fraction": wait / dt if dt > 0 else 0.0,
        })
        return {"metrics": metrics, "step": self.learner.steps}

    def policy_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Inference-only weights: the target policy (rollouts) and the current policy (evaluation)."""
        return {"target": self.agent.target_policy_state(), "current": cpu_copy(self.agent.actor.state_dict())}

    def state_dict(self) -> dict[str, Any]:
        return cpu_copy(self.learner.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.learner.load_state_dict(state)
        return self.learner.steps

    def device_name(self) -> str:
        return str(self.device)


# --- learner-side rollouts (rollout.mode: learner) ---------------------------------------------------------
def learner_needs_dynamics(cfg: ExperimentConfig) -> bool:
    """Whether the learner actor gets the trained ensemble: MOBILE's update queries it, learner-side rollouts
    (``rollout.mode: learner``) run it."""
    return cfg.agent.needs_dynamics() or cfg.rollout.mode == "learner"


def learner_rollouts(cfg: ExperimentConfig, spec: Any, dataset: Any, dynamics_state: dict[str, Any] | None,
                     agent: Any, device: torch.device) -> Any:
    """:class:`~dromo_ray.core.rollout.LearnerRollouts` on the learner's device: the elite ensemble, D's states
    as starts, the agent's own target policy; K = ``rollout.batch_size`` starts per round."""
    from dromo_ray.core.model_env import model_env_for
    from dromo_ray.core.rollout import LearnerRollouts

    if dynamics_state is None:
        raise ValueError("rollout.mode learner: the learner needs the trained dynamics ensemble")
    model = dynamics_from_state(dynamics_state, spec.obs_dim, spec.act_dim, cfg.dynamics).to(device)
    return LearnerRollouts(model_env_for(cfg.agent, model, spec.termination_fn), agent.target_actor,
                           np.asarray(dataset.observations, dtype=np.float32), horizon=cfg.rollout.horizon,
                           num_starts=cfg.rollout.batch_size, buffer_size=cfg.rollout.model_buffer_size,
                           device=device, seed=cfg.seed * 1000 + 999, deterministic_model=cfg.rollout.deterministic)
# --- end of learner-side rollouts --------------------------------------------------------------------------


def behavior_hidden(agent: AgentConfig) -> tuple[int, ...]:
    """pi^beta's hidden widths: 256x256 for full-size agents, else the agent's first two layers."""
    return (256, 256) if agent.hidden_dims[0] >= 256 else tuple(agent.hidden_dims[:2])


# --------------------------------------------------------------------------------------------------------
class EvaluatorActor:
    """Runs a policy in the real MuJoCo environment (vectorised) and reports return and normalized score."""

    def __init__(self, env_key: str, hidden: tuple[int, ...], max_episode_steps: int = 1000) -> None:
        set_torch_threads(1)
        spec = get_env_spec(env_key)
        self.env_key, self.max_steps = env_key, max_episode_steps
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, hidden).eval()

    @torch.no_grad()
    def evaluate(self, policy_state: dict[str, Any], episodes: int, seed: int) -> dict[str, Any]:
        from dromo_ray.data.gym_env import evaluate_policy

        self.actor.load_state_dict(policy_state)

        def act(obs: np.ndarray) -> np.ndarray:
            return self.actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()

        res = evaluate_policy(act, self.env_key, episodes=episodes, seed=seed, max_episode_steps=self.max_steps)
        return {"eval/return_mean": float(res.mean_return), "eval/return_std": float(np.std(res.returns)),
                "eval/normalized_score": float(res.mean_normalized),
                "eval/episode_length": float(np.mean(res.lengths))}

"""One typed, validated configuration for a dromo_ray run.

Every knob is a dataclass field with a docstring-style comment. YAML files (``tune_configs/``) use the
same names, nested by section. Construction validates: unknown keys, wrong types and out-of-range values
raise :class:`ConfigError` naming the offending key (and the file, when one is given).

This module is pure Python (no yaml, no torch) so that every layer can import it. It is longer than 500 lines on
purpose: one typed config, each field's docstring beside its validation, and the one strict construction
(:func:`_coerce`) read in one place. The YAML files themselves (``base:`` chains, ``--set``) are
:mod:`dromo_ray.config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from dromo_ray.errors import ConfigError

Algorithm = Literal["dromo", "combo", "mopo", "mopo_auto", "mbpo", "mobile", "cql_rllib"]
ALGORITHMS: tuple[str, ...] = typing.get_args(Algorithm)
"""Every algorithm a config can name; the ones the project's own learner runs are :data:`AGENT_ALGORITHMS`."""
AGENT_ALGORITHMS: tuple[str, ...] = tuple(a for a in ALGORITHMS if a != "cql_rllib")
"""The algorithms of ``dromo_ray.core.agents`` (RLlib's CQL runs outside the project's learner)."""
ENV_KEYS: tuple[str, ...] = ("hopper", "halfcheetah", "walker2d")
"""The environments (their specs: ``dromo_ray.core.envs.ENVS``, in this order)."""


@dataclass
class DataConfig:
    dataset: str = ""
    """Path to a D4RL-format HDF5 file, a D4RL name (``hopper-medium-v2``) looked up in
    ``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets``, or ``minari:<dataset id>`` from the local Minari root."""
    env: str = ""
    """Environment key (``hopper``, ``halfcheetah``, ``walker2d``); inferred from the dataset when empty."""
    allow_unbounded_actions: bool = False
    """Load a dataset whose actions leave the action box [-1, 1] (an error otherwise: D4RL's locomotion actions
    are bounded, so such a file is usually the wrong one); the agents' tanh policies cannot produce them."""

    def validate(self) -> None:
        if not self.dataset:
            raise ConfigError("data.dataset: must name a dataset file, a D4RL name or minari:<id>")
        if self.env and self.env not in ENV_KEYS:
            raise ConfigError(f"data.env: unknown environment {self.env!r} ({', '.join(ENV_KEYS)})")


MBPO_WEIGHT_DECAY = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
"""MBPO/MOPO's L2 decay of the input layer, the three hidden-to-hidden layers and the output layer of the 4 x 200
ensemble (MOPO mopo/models/constructor.py; OfflineRL-Kit run_example/run_mopo.py ``--dynamics-weight-decay``)."""


def mbpo_weight_decays(num_hidden: int) -> tuple[float, ...]:
    """MBPO's schedule for ``num_hidden`` hidden layers (``num_hidden + 1`` linear layers): 2.5e-5 on the input
    layer, 5e-5 on the first hidden-to-hidden layer, 7.5e-5 on the others, 1e-4 on the output layer. For 4 hidden
    layers this is :data:`MBPO_WEIGHT_DECAY` exactly; other depths keep its first, second and last values."""
    middle = [5e-5] + [7.5e-5] * (num_hidden - 2) if num_hidden >= 2 else []
    return (2.5e-5, *middle, 1e-4)


@dataclass
class DynamicsConfig:
    """The ensemble. Defaults are MBPO/MOPO's (MOPO's mopo/models/constructor.py and bnn.py, the same values in
    OfflineRL-Kit's run_example/run_mopo.py and offlinerlkit/dynamics/ensemble_dynamics.py)."""

    ensemble_size: int = 7
    """Number of Gaussian members trained (Alg. 1 line 1); MOPO ``num_networks: 7``."""
    num_elites: int = 5
    """Members with the lowest holdout error used for rollouts; MOPO ``num_elites: 5``."""
    hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    """Hidden layer widths of every member; MOPO 4 x 200 swish (= SiLU)."""
    learning_rate: float = 1e-3
    """Adam learning rate; MOPO 1e-3."""
    weight_decay: float | tuple[float, ...] | None = None
    """L2 decay ``0.5 wd ||W||^2`` per linear layer (input layer first, output layer last): one value for every
    layer, ``len(hidden_dims) + 1`` values, or None (default): MBPO/MOPO's per-layer decay
    (:func:`mbpo_weight_decays`; 2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4 for the 4 x 200 net)."""
    batch_size: int = 256
    """Rows per member per gradient step; MOPO 256."""
    holdout_ratio: float = 0.2
    """Fraction of D kept out for early stopping and elite selection (at most ``max_holdout`` rows); MOPO
    ``holdout_ratio=0.2``."""
    max_holdout: int = 1000
    """Cap on the holdout rows; MOPO ``max_logging=1000``, OfflineRL-Kit ``min(0.2 N, 1000)``."""
    max_epochs: int = 0
    """Hard cap on training epochs; 0 means train until early stopping."""
    max_epochs_since_update: int = 5
    """Stop after this many epochs without a 1% holdout improvement of any member; MOPO/OfflineRL-Kit 5."""
    logvar_loss_coef: float = 0.01
    """Weight of the soft log-variance bound regulariser (max_logvar - min_logvar); MOPO 0.01."""
    bootstrap: bool = True
    """Train each member on its own bootstrap resample of D (MOPO bnn.py and OfflineRL-Kit: one
    ``randint(N, size=[E, N])`` index set per member)."""
    recalibrate: bool = False
    """Apply the per-dimension variance scale fitted on holdout (appendix A) to rollout noise and to every
    uncertainty signal. Off by default: MBPO/MOPO sample from the raw model and MOPO's lambda was tuned on the raw
    sigma. The calibration error is measured and logged either way (``dynamics/calibration_error_*``)."""
    num_trainers: int = 1
    """Ray actors that train members in parallel (members are split among them, then merged)."""
    cache_dir: str = ""
    """Keep trained ensembles here by a content key (dataset rows, split, every other dynamics setting, seed,
    torch threads: ``dromo_ray/runtime/dynamics_cache.py``); a run whose key is there loads that ensemble instead
    of training it (``dynamics/cached`` = 1). Empty: no cache, every run trains its own."""

    def layer_weight_decays(self) -> tuple[float, ...]:
        """The decay of every linear layer, input layer first: ``len(hidden_dims) + 1`` values."""
        wd = self.weight_decay
        if wd is None:
            return mbpo_weight_decays(len(self.hidden_dims))
        if isinstance(wd, (int, float)):
            return (float(wd),) * (len(self.hidden_dims) + 1)
        return tuple(float(v) for v in wd)

    def validate(self) -> None:
        _positive(self, "dynamics", "ensemble_size", "num_elites", "batch_size", "max_holdout",
                  "max_epochs_since_update", "num_trainers")
        if self.num_elites > self.ensemble_size:
            raise ConfigError("dynamics.num_elites: must be <= dynamics.ensemble_size")
        if self.num_trainers > self.ensemble_size:
            raise ConfigError("dynamics.num_trainers: must be <= dynamics.ensemble_size")
        if not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ConfigError("dynamics.hidden_dims: must be a non-empty list of positive widths")
        if not 0.0 < self.holdout_ratio < 1.0:
            raise ConfigError("dynamics.holdout_ratio: must be in (0, 1)")
        if self.learning_rate <= 0 or self.logvar_loss_coef < 0 or self.max_epochs < 0:
            raise ConfigError("dynamics: learning_rate must be > 0; logvar_loss_coef, max_epochs >= 0")
        layers = len(self.hidden_dims) + 1
        if isinstance(self.weight_decay, tuple) and len(self.weight_decay) != layers:
            raise ConfigError(
                f"dynamics.weight_decay: {len(self.weight_decay)} values for a net of {layers} linear layers "
                f"(hidden_dims {list(self.hidden_dims)} + output); give {layers} values or one for every layer")
        if any(v < 0 for v in self.layer_weight_decays()):
            raise ConfigError(f"dynamics.weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass
class AgentConfig:
    algorithm: str = "dromo"
    """One of dromo, combo (alpha=0), mopo, mopo_auto (appendix B), mbpo (alpha=beta=0), mobile, cql_rllib."""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """Hidden widths of the actor and of each critic."""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor (the start value when ``actor_lr_schedule`` is ``cosine``)."""
    actor_lr_schedule: str = "constant"
    """``constant``, or ``cosine``: lr(t) = actor_lr * (1 + cos(pi * min(t, T) / T)) / 2 at learner update t, from
    actor_lr at t = 0 to 0 at t = T (torch's CosineAnnealingLR with eta_min = 0, as OfflineRL-Kit's COMBO
    reproduction anneals its actor, run_example/run_combo.py; it steps once per 1000-update epoch, we step every
    update: the two differ by at most pi / 2000 of actor_lr)."""
    actor_lr_schedule_steps: int = 0
    """T of the cosine schedule in learner updates; 0 means the run's ``train.total_steps``."""
    critic_lr: float = 3e-4
    entropy_lr: float = 1e-4
    """Learning rate of the SAC entropy temperature (R(pi) of Eq. 14)."""
    gamma: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critics and the target policy (Alg. 1 line 7)."""
    batch_size: int = 256
    f: float = 0.5
    """Weight of the *dataset* in d_f = f d + (1-f) rho and pi^f = f pi^beta + (1-f) pi (Theorem 4.2)."""
    auto_entropy: bool = True
    """Learn the SAC temperature towards ``target_entropy``."""
    init_entropy_coef: float = 1.0
    target_entropy: float | None = None
    """Defaults to -|A|."""
    deterministic_backup: bool = False
    """Bellman target without the entropy term, r + gamma (1 - d) min_j Q'_j(s', a'), a' ~ pi(.|s'): Eq. 6/7 as
    written, and what CQL's and OfflineRL-Kit's COMBO code use by default (``deterministic_backup=True``). False
    (the default, SAC's and so MBPO's/MOPO's form): the soft backup, minus c log pi(a'|s') inside the target."""
    alpha: float = 1.0
    """DROMO variance-penalty weight (Eq. 13 second term), per unit of RELATIVE state density: the term is
    alpha E_s sqrt(Var_{pi^f} Q(s, .) / (|D(s)| / N_ref)), N_ref the estimator's mean count over dataset states
    (see ``density.py``), i.e. Eq. 13's weight is alpha sqrt(N_ref). alpha = 1 penalises Q by one standard
    deviation over pi^f at a state of average dataset density, whichever estimator. Forced to 0 for
    combo/mbpo/mopo."""
    beta: float = 1.0
    """Conservative weight (Eq. 13 third term) against the Bellman term 1/2 MSE of Eq. 13. Published COMBO values
    were tuned with a plain-MSE Bellman term (CQL's and OfflineRL-Kit's code), so beta here = beta_published / 2
    gives the same ratio of conservative to Bellman gradient. Forced to 0 for mbpo/mopo."""
    conservative_states: str = "model"
    """States whose Q is pushed down by the conservative term: ``model`` (the D_model rows of the batch:
    rho = d^pi_M_hat(s) pi(a|s) of Eq. 8 (COMBO) and Eq. 13) or ``mixed`` (every row of the d_f batch, D and
    D_model: OfflineRL-Kit's COMBO default, ``--rho-s mix``). The push-up term is always over the D rows."""
    num_actions: int = 10
    """M: actions sampled per state for Var_{pi^f} Q and for the log-sum-exp conservative form."""
    variance_form: str = "action"
    """``action``: Eq. 13, variance over pi^f per state (DROMO). ``strict``: Eq. 17, variance of Q ACROSS the
    batch, an ABLATION only: the paper introduces it for the linear/NTK analysis (section 4.2-4.3), and it pulls
    the Q-values of different states together rather than penalising uncertainty at a state."""
    density: str = "kde"
    """|D(s)| estimator: ``constant`` (every state counts |D|; relative density 1) or ``kde``."""
    kde_bandwidth: float = 1.0
    """Gaussian kernel bandwidth in normalised-state units."""
    kde_subsample: int = 2048
    """Dataset states kept (fixed subsample) as KDE centres."""
    density_floor: float = 1.0
    """Lower clip of the estimated |D(s)| count."""
    conservative_form: str = "logsumexp"
    """``expectation``: beta (E_rho Q - E_D Q) as in Eq. 13; ``logsumexp``: the COMBO practice."""
    mopo_lambda: float = 1.0
    """MOPO reward penalty weight (fixed for mopo; initial value for mopo_auto)."""
    mopo_uncertainty: str = "max_aleatoric"
    """u(s,a): ``max_aleatoric``, ``disagreement`` or ``entropy`` (appendix B); mopo_auto uses entropy. See
    :mod:`dromo_ray.core.model_env` for each signal."""
    mopo_entropy_quantile: float = 0.9
    """q: with the ``entropy`` signal, u(s, a) = max(0, H(s, a) - H_ref), the excess of the per-dimension entropy of
    the model's prediction over H_ref = the q-quantile of H over the dataset under the trained model."""
    mopo_entropy_ref: float | None = None
    """H_ref in nats per output dimension (normalised output space); None: the ``mopo_entropy_quantile`` of H over D,
    computed once after the ensemble is trained."""
    mopo_target_entropy: float | None = None
    """delta of appendix B Eq. 28-30, in the units of u (nats per output dimension above H_ref); None: E_D[u], the
    dataset's own mean excess under the trained model (rollouts may be as uncertain as the data, no more), computed
    once after the ensemble is trained."""
    mopo_lambda_lr: float = 1e-3
    """Step size of the dual update of lambda (Eq. 28-30)."""
    max_grad_norm: float = 0.0
    """Clip gradients of every network to this norm; 0 disables."""
    mobile_beta: float = 1.0
    """MOBILE's beta: the model rows' Bellman target is lowered by beta * U(s, a), U the standard deviation over
    the elite dynamics members of their Bellman estimates (Sun et al., ICML 2023)."""
    mobile_num_samples: int = 10
    """MOBILE's N: next-state samples drawn from each elite member's Gaussian to estimate its Bellman target."""
    mobile_penalty_form: str = "bellman"
    """``bellman``: U = Std_i[r_i + gamma V(s'_i)], the paper's Bellman estimates; ``next_value``: U = Std_i[V(s'_i)],
    what the authors' code computes (rewards and gamma left out)."""
    update_mode: str = "auto"
    """How the learner runs an update: ``eager`` (one PyTorch call after another), ``captured`` (the whole critic +
    actor + temperature + Polyak step, d_f batch assembly and action sampling included, recorded once as a CUDA
    graph and replayed per update, ``core/agents/captured.py``; off CUDA the same static-buffer step runs without
    a graph), or ``auto``: captured on CUDA (eager, with a warning, if the capture fails), eager elsewhere."""

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"agent.algorithm: unknown {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        _positive(self, "agent", "batch_size", "num_actions", "kde_subsample")
        for name in ("actor_lr", "critic_lr", "entropy_lr", "init_entropy_coef", "kde_bandwidth",
                     "density_floor", "mopo_lambda_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"agent.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "tau", "f"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"agent.{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.tau == 0:
            raise ConfigError("agent.tau: must be > 0 (with 0 the target networks never move; 1 copies them "
                              "every update)")
        if self.gamma >= 1.0:
            raise ConfigError("agent.gamma: must be < 1")
        if not 0.0 <= self.mopo_entropy_quantile <= 1.0:
            raise ConfigError(f"agent.mopo_entropy_quantile: must be in [0, 1], got {self.mopo_entropy_quantile}")
        if self.mopo_target_entropy is not None and self.mopo_target_entropy < 0:
            raise ConfigError(f"agent.mopo_target_entropy: must be >= 0 (u >= 0), got {self.mopo_target_entropy}")
        for name in ("alpha", "beta", "mopo_lambda", "max_grad_norm", "mobile_beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"agent.{name}: must be >= 0, got {getattr(self, name)}")
        _choice(self, "agent", "variance_form", ("action", "strict"))
        _choice(self, "agent", "density", ("constant", "kde"))
        _choice(self, "agent", "conservative_form", ("expectation", "logsumexp"))
        _choice(self, "agent", "conservative_states", ("model", "mixed"))
        _choice(self, "agent", "actor_lr_schedule", ("constant", "cosine"))
        if self.actor_lr_schedule_steps < 0:
            raise ConfigError(f"agent.actor_lr_schedule_steps: must be >= 0 (0 = train.total_steps), "
                              f"got {self.actor_lr_schedule_steps}")
        _choice(self, "agent", "mopo_uncertainty", ("max_aleatoric", "disagreement", "entropy"))
        _choice(self, "agent", "mobile_penalty_form", ("bellman", "next_value"))
        _positive(self, "agent", "mobile_num_samples")
        _choice(self, "agent", "update_mode", ("auto", "eager", "captured"))
        if self.algorithm != "cql_rllib" and not 0.0 < self.f < 1.0:
            raise ConfigError(f"agent.f: must be in (0, 1) for model-based algorithms (a d_f batch needs rows "
                              f"from D and from D_model), got {self.f}")
        if self.num_actions < 2:
            raise ConfigError("agent.num_actions: must be >= 2 (a variance needs two samples)")
        if not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ConfigError("agent.hidden_dims: must be a non-empty list of positive widths")

    def effective_alpha(self) -> float:
        """alpha after the algorithm's convention: only DROMO keeps its variance penalty."""
        return self.alpha if self.algorithm == "dromo" else 0.0

    def effective_beta(self) -> float:
        """beta after the algorithm's convention: COMBO = DROMO with alpha=0; MBPO/MOPO have no beta."""
        return self.beta if self.algorithm in ("dromo", "combo") else 0.0

    def needs_behavior_policy(self) -> bool:
        """Whether the run fits pi^beta (Alg. 1 line 1, appendix B): only DROMO's action-variance term (Eq. 13)
        samples from pi^f = f pi^beta + (1 - f) pi, and only when alpha > 0. COMBO (alpha = 0) and the Eq. 17
        ``strict`` ablation (variance across the batch) do not: no fitter, no density, no placement bundle."""
        return self.effective_alpha() > 0 and self.variance_form == "action"

    def needs_dynamics(self) -> bool:
        """Whether the agent's update itself queries the dynamics ensemble (MOBILE's penalty)."""
        return self.algorithm == "mobile"


@dataclass
class RolloutConfig:
    horizon: int = 5
    """H: model steps per rollout (Alg. 1 line 4)."""
    batch_size: int = 50_000
    """K: start states sampled from D per rollout round (split across workers)."""
    interval: int = 1000
    """Learner updates between rollout rounds (synchronous mode) / nominal round period."""
    model_buffer_size: int = 2_000_000
    """Capacity of the FIFO D_model."""
    deterministic: bool = False
    """Use the model mean instead of a sample."""
    mode: str = "workers"
    """Where model rollouts run: ``workers`` (CPU rollout-worker actors feeding the replay actor) or ``learner``
    (the elite ensemble on the learner's device rolls ``batch_size`` starts every ``interval`` updates into a
    D_model held on that device: no workers, weight syncs or Ray round trips; ``core/rollout.LearnerRollouts``)."""

    def validate(self) -> None:
        _positive(self, "rollout", "horizon", "batch_size", "interval", "model_buffer_size")
        _choice(self, "rollout", "mode", ("workers", "learner"))


@dataclass
class RuntimeConfig:
    synchronous: bool = False
    """Interleave rollouts and updates deterministically (bitwise-reproducible on CPU)."""
    num_rollout_workers: int = 2
    num_evaluators: int = 1
    rollout_worker_cpus: float = 1.0
    evaluator_cpus: float = 1.0
    dynamics_trainer_cpus: float = 1.0
    learner_cpus: float = 1.0
    learner_gpus: float = -1.0
    """GPUs for the learner; -1 means one GPU when the cluster has one, else CPU."""
    rollout_worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources that steer rollout workers (e.g. {rollout_node: 0.01})."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources that steer the learner."""
    weight_sync_interval: int = 250
    """Learner updates between publishing target-policy weights to rollout workers."""
    replay_chunk_batches: int = 64
    """Model batches fetched from the replay actor per RPC."""
    torch_threads: int = 1
    """Torch intra-op threads per actor process (2-core machines collapse with more)."""
    max_worker_restarts: int = 3

    def validate(self) -> None:
        _positive(self, "runtime", "weight_sync_interval", "replay_chunk_batches", "torch_threads")
        if self.num_rollout_workers < 1:
            raise ConfigError("runtime.num_rollout_workers: must be >= 1")
        if self.num_evaluators < 0:
            raise ConfigError("runtime.num_evaluators: must be >= 0")
        for name in ("rollout_worker_cpus", "evaluator_cpus", "dynamics_trainer_cpus", "learner_cpus"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"runtime.{name}: must be > 0")
        if self.learner_gpus < -1:
            raise ConfigError("runtime.learner_gpus: must be -1 (auto) or >= 0")


@dataclass
class TrainConfig:
    total_steps: int = 1_000_000
    """Learner updates in the run."""
    eval_interval: int = 10_000
    eval_episodes: int = 10
    log_interval: int = 1000
    checkpoint_interval: int = 50_000
    final_score_last_n: int = 10
    """The reported score is the mean of the last N evaluations (never the max)."""
    max_episode_steps: int = 1000
    """Step limit of evaluation episodes in the real environment."""

    def validate(self) -> None:
        _positive(self, "train", "total_steps", "eval_interval", "eval_episodes", "log_interval",
                  "checkpoint_interval", "final_score_last_n", "max_episode_steps")


@dataclass
class TrackingConfig:
    experiment: str = "dromo_ray"
    """MLflow experiment name."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty means $MLFLOW_TRACKING_URI or an embedded sqlite store under out_dir."""
    run_name: str = ""

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment: must not be empty")


@dataclass
class ExperimentConfig:
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    out_dir: str = "dromo_runs"
    """Where checkpoints and the embedded MLflow store live."""
    data: DataConfig = field(default_factory=DataConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> ExperimentConfig:
        if self.seed < 0:
            raise ConfigError("seed: must be >= 0")
        _choice(self, "", "device", ("auto", "cpu", "cuda"))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate()
        if self.agent.needs_dynamics() and self.dynamics.num_elites < 2:
            raise ConfigError("dynamics.num_elites: mobile's penalty is a standard deviation over the elites; "
                              f"needs >= 2, got {self.dynamics.num_elites}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ---------------------------------------------------------------------------------------------------------
# Generic strict construction from nested dicts (used by YAML, --set and Tune).


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict/list/scalars (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'agent': {'alpha': 1}} -> {'agent.alpha': 1}; ``*_resources`` mappings stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith("_resources"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the field type ``tp`` (the one place a YAML / ``--set`` / Tune value becomes a field value):
    tuples from lists, sections from mappings, numbers checked finite; else a :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        # the alternative that got furthest names the deepest key (weight_decay[1], not weight_decay)
        raise ConfigError(max(errors, key=lambda m: len(m.split(": ", 1)[0])) if errors else
                          f"{key}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int or tp is float:
        kind = "an integer" if tp is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            as_number = _number_text(value)
            if as_number is not None and not math.isfinite(as_number):  # --set x=nan, x: inf (text in YAML)
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            if as_number is not None and "e" in value.lower():
                # PyYAML follows YAML 1.1, which reads 1e-4 (an exponent without a decimal point) as text; YAML 1.2,
                # Python and every user read it as a number, so it is one here (in files and in --set alike).
                value = as_number
            else:
                hint = " (text, not a number: write it unquoted)" if as_number is not None else ""
                raise ConfigError(f"{key}: expected {kind}, got {value!r}{hint}")
        # .inf / .nan in YAML and --set: no field of the config means "unbounded", so a non-finite number is an error
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if tp is int:
            if int(value) != value:
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key + ".")
    return value


def _number_text(value: Any) -> float | None:
    """The number a string spells (``"1e-4"``, ``"nan"``: YAML 1.1 reads both as text), else None."""
    if not isinstance(value, str):
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig`; errors name the source and the key."""
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"top level: expected a mapping, got {type(data).__name__}")
        return _build(ExperimentConfig, data, "").validate()
    except ConfigError as e:
        if source:
            raise ConfigError(f"{source}: {e}") from None
        raise


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``agent.alpha``) in a nested dict, returning a new dict."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _positive(obj: Any, section: str, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{section}.{n}: must be > 0, got {getattr(obj, n)}")


def _choice(obj: Any, section: str, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        key = f"{section}.{name}" if section else name
        raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")

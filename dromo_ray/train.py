"""One tracked run (config -> Ray runtime -> MLflow) and the evaluation of a checkpoint (edge layer).

:func:`train` and :func:`evaluate_checkpoint` are what ``dromo-ray train`` and ``dromo-ray evaluate`` call
(:mod:`dromo_ray.cli.train` prints their results and turns failures into exit codes).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dromo_ray.config import dump_config
from dromo_ray.core.config import ExperimentConfig
from dromo_ray.errors import ConfigError, UserError
from dromo_ray.tracking import (
    MlflowTracker,
    check_tracking_store,
    config_params,
    learning_curve_png,
    resolve_tracking_uri,
    run_tags,
)

if TYPE_CHECKING:
    from dromo_ray.runtime.loop import Reporter


@dataclass
class TrainSummary:
    steps: int
    wall_s: float
    final_normalized_score: float
    final_return: float
    num_evaluations: int
    mlflow_run_id: str
    tracking_uri: str
    run_dir: str
    checkpoint: str
    algorithm: str
    dataset: str
    learner_device: str = "cpu"
    resumed_from: int = 0
    """The step this session started from (0: a new run); ``wall_s`` is this session's time."""
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    """(learner update, D4RL normalized score) of every evaluation of the run, in order."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _run_name(cfg: ExperimentConfig, env_key: str) -> str:
    return cfg.tracking.run_name or f"{cfg.agent.algorithm}-{env_key}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class ResumePlan:
    """What ``--resume`` continues, decided before anything is written."""

    checkpoint: dict[str, Any]
    """The loaded, validated checkpoint (runtime/checkpoint.py ``load_checkpoint``)."""
    run_dir: Path
    mlflow_run_id: str | None


def plan_resume(cfg: ExperimentConfig, resume: str | Path, run_dir: str | Path | None = None,
                mlflow_run_id: str | None = None) -> ResumePlan:
    """Find, load and check the checkpoint of ``--resume`` and the run directory it belongs to; writes nothing.

    ``resume`` is a run directory, its ``checkpoints/`` directory, a checkpoint directory, its ``state.pt``, or
    the name of a run under ``out_dir``. Without an explicit ``run_dir`` the run directory is the one the
    checkpoint records (``run_dir`` in the state; older checkpoints: the name of the directory three levels up)
    and the checkpoint must lie in it, as ``RUN/checkpoints/step_N/state.pt`` beside ``RUN/mlflow_run_id``:
    a checkpoint anywhere else never makes its surroundings a run directory.
    """
    from dromo_ray.runtime.checkpoint import CheckpointError, check_compatible, load_checkpoint, resolve_checkpoint

    if cfg.agent.algorithm == "cql_rllib":
        raise ConfigError("cql_rllib: --resume is not supported (RLlib's CQL run restarts from scratch)")
    target = Path(resume)
    if not target.exists() and len(target.parts) == 1 and (Path(cfg.out_dir) / target).is_dir():
        target = Path(cfg.out_dir) / target  # a run name under out_dir
    ckpt_file = resolve_checkpoint(target)
    state = load_checkpoint(ckpt_file)
    check_compatible(cfg, state)
    if run_dir is None:
        home = ckpt_file.parent.parent.parent if ckpt_file.parent.parent.name == "checkpoints" else None
        recorded = state.get("run_dir")
        ok = home is not None and (home / "mlflow_run_id").is_file() and (
            Path(recorded).name == home.name if recorded else (home / "config.yaml").is_file())
        if not ok:
            raise CheckpointError(f"{ckpt_file}: not inside the run directory it was written in "
                                  f"({recorded or 'RUN'}/checkpoints/step_N/state.pt beside RUN/mlflow_run_id); "
                                  "--resume continues a run in place: pass that run directory")
        run_dir = home
    run_dir = Path(run_dir)
    id_file = run_dir / "mlflow_run_id"
    return ResumePlan(state, run_dir, mlflow_run_id or (id_file.read_text().strip() if id_file.exists() else None))


def _check_creatable(path: Path, key: str) -> None:
    """ConfigError naming ``key`` when ``mkdir -p path`` cannot succeed; creates nothing."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{key}: cannot create {path} ({p} is not a directory)")
            if p != path and not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}: cannot create {path} ({p} is not writable)")
            return


def _make_dirs(path: Path, key: str) -> Path | None:
    """``mkdir -p path``; the topmost directory it created (None: all existed). ConfigError naming ``key``."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create {path} ({e.strerror or e})") from None
    return missing[-1] if missing else None


def _latest_checkpoint(run_dir: Path) -> Path | None:
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        d = run_dir / "checkpoints" / latest.read_text().strip()
        if d.is_dir():
            return d
    return None


def _end_interrupted(tracker: Any, status: str, reason: str) -> None:
    """Mark the tracked run ended after the run stopped by an exception, never masking that exception.

    A SIGTERM can land inside one of MLflow's own SQLite transactions (the handler raises ``Terminated`` from
    wherever the process is); that connection then still holds the write lock, so marking the run KILLED can fail
    with "database is locked". The kill must still end the process as a kill (exit 143) with its checkpoint kept,
    so a failure here is one warning: the run's status stays RUNNING and ``--resume`` continues it as usual.
    """
    try:
        tracker.end(status, reason)
    except Exception as e:  # the original exception is what the caller re-raises
        logging.getLogger(__name__).warning("could not mark the MLflow run %s (%s: %s); it stays RUNNING and "
                                            "--resume continues it", status, type(e).__name__,
                                            str(e).splitlines()[0] if str(e) else "")


def train(cfg: ExperimentConfig, *, tracking_uri: str | None = None, resume: str | Path | None = None,
          progress: bool = True, extra_reporter: Reporter | None = None, parent_run_id: str | None = None,
          run_dir: str | Path | None = None, mlflow_run_id: str | None = None) -> TrainSummary:
    """One tracked run. ``extra_reporter`` (e.g. Tune's) receives every report after MLflow.

    Everything that can reject the command (dataset, tracking store, checkpoint, its compatibility, the
    cluster's resources) is checked before the first write; a rejected command changes nothing.
    """
    from dromo_ray.data.load import load_dataset
    from dromo_ray.runtime.cluster import Cluster, check_run_fits
    from dromo_ray.runtime.driver import RunFailed, run_experiment
    from dromo_ray.runtime.resources import ray_session

    dataset = load_dataset(cfg.data.dataset, cfg.data.env or None,
                           allow_unbounded_actions=cfg.data.allow_unbounded_actions)
    env_key = cfg.data.env or dataset.env_id
    uri = resolve_tracking_uri(cfg, tracking_uri)
    check_tracking_store(uri)
    explicit_dir = run_dir is not None
    plan = plan_resume(cfg, resume, run_dir, mlflow_run_id) if resume else None
    if plan is not None:
        run_dir, mlflow_run_id = plan.run_dir, plan.mlflow_run_id
    else:
        run_dir = Path(run_dir) if run_dir else Path(cfg.out_dir) / _run_name(cfg, env_key)
        if not explicit_dir and run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"tracking.run_name: {run_dir} already exists; continue it with --resume {run_dir} "
                              "or choose another run name")
    resumed_from = int(plan.checkpoint["driver"]["step"]) if plan is not None else 0
    _check_creatable(run_dir, "out_dir")

    with ray_session() as started_ray:
        # Every standalone run checks that the cluster can hold it, also when Ray was already up in this process
        # (else the actors wait forever); inside a Tune trial (extra_reporter) the sweep checked its placement group.
        if started_ray or extra_reporter is None:
            check_run_fits(cfg, Cluster.from_ray())
        created = _make_dirs(run_dir, "out_dir")
        try:
            tracker = MlflowTracker(uri, cfg.tracking.experiment, run_name=run_dir.name,
                                    tags=run_tags(cfg, env_key), run_id=mlflow_run_id, parent_run_id=parent_run_id)
        except BaseException:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "mlflow_run_id").write_text(tracker.run_id)
        tracker.log_params(config_params(cfg))
        history: list[tuple[int, dict[str, float]]] = []
        info: dict[str, Any] = {}

        def report(metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None:
            if metrics:
                tracker.log_metrics(metrics, step)
                history.append((step, dict(metrics)))
            if extra_reporter is not None:
                extra_reporter(metrics, step, checkpoint)

        try:
            if cfg.agent.algorithm == "cql_rllib":  # model-free CQL (RLlib) in the same comparison
                from dromo_ray.rllib.cql import run_cql_rllib

                result = run_cql_rllib(cfg, dataset, run_dir, reporter=report, resume=None, progress=progress,
                                       on_start=info.update)
            else:
                result = run_experiment(cfg, dataset, run_dir, reporter=report,
                                        resume=plan.checkpoint if plan is not None else None, progress=progress,
                                        on_start=info.update)
        except RunFailed as e:
            _end_interrupted(tracker, "FAILED", str(e))
            raise
        except BaseException as e:
            # Ctrl-C, SIGTERM and Tune stopping a trial (SystemExit from tune.report) are kills, not failures.
            killed = isinstance(e, (KeyboardInterrupt, SystemExit))
            _end_interrupted(tracker, "KILLED" if killed else "FAILED", f"{type(e).__name__}: {e}".rstrip(": "))
            last = _latest_checkpoint(run_dir)
            if killed and last is not None:
                e.resume_hint = f"checkpoint {last} kept; continue with --resume {run_dir}"  # type: ignore[attr-defined]
            raise

    tracker.set_tags({"learner_device": str(info.get("learner_device", "cpu")),
                      "learner_gpus": str(info.get("learner_gpus", 0))})
    tracker.log_metrics({"final/normalized_score": result.final_score, "final/return": result.final_return,
                         "perf/total_wall_s": result.wall_s}, result.steps)
    tracker.log_artifact(run_dir / "config.yaml")
    png = learning_curve_png(history, run_dir / "learning_curve.png", title=run_dir.name)
    if png is not None:
        tracker.log_artifact(png)
    if result.checkpoint is not None:
        tracker.log_artifact(result.checkpoint, artifact_path="checkpoint")
    tracker.end("FINISHED")
    return TrainSummary(
        steps=result.steps, wall_s=round(result.wall_s, 2), final_normalized_score=result.final_score,
        final_return=result.final_return, num_evaluations=len(result.evaluations), mlflow_run_id=tracker.run_id,
        tracking_uri=uri, run_dir=str(run_dir), checkpoint=str(result.checkpoint or ""),
        algorithm=cfg.agent.algorithm, dataset=cfg.data.dataset,
        learner_device=str(info.get("learner_device", "cpu")), resumed_from=resumed_from,
        # Algorithm 1's evaluations carry their learner step; RLlib CQL's are numbered in order.
        eval_curve=[(int(e.get("step", i + 1)), float(e.get("eval/normalized_score", float("nan"))))
                    for i, e in enumerate(result.evaluations)],
    )


@dataclass
class _Evaluated:
    """What ``dromo-ray evaluate`` reads from a run checkpoint or a policy file."""

    act: Any  # obs (B, D_o) -> μ(s) (B, D_a), numpy
    env_key: str
    inputs: Any  # obs (B, D_o) -> the networks' input tensor (a policy file may normalise)
    actor: Any
    critic: Any  # TwinCritic | None
    gamma: float
    entropy_coef: float
    soft_backup: bool
    algorithm: str
    step: int
    where: str


POLICY_FILE = "policy.pt"
"""The policy file of a run without runtime checkpoints (an RLlib CQL run: ``dromo_ray.rllib.cql``)."""


def _policy_file(path: str | os.PathLike[str]) -> Path | None:
    """``path`` as a policy file: the file itself (any file but a checkpoint's state.pt), or the ``policy.pt``
    of a run directory that holds no checkpoints; None for anything else."""
    from dromo_ray.runtime.checkpoint import STATE_FILE

    p = Path(path)
    if p.is_file():
        return p if p.name != STATE_FILE else None
    if p.is_dir() and (p / POLICY_FILE).is_file() and not (p / "checkpoints").exists():
        return p / POLICY_FILE
    return None


def _load_evaluated(path: str | os.PathLike[str]) -> _Evaluated:
    """A run checkpoint (anything ``--resume`` accepts) or a policy file (``dromo_ray.policy/1``: a behaviour
    policy, an RLlib CQL run's checkpoint), with the critic where it holds one."""
    import numpy as np
    import torch

    from dromo_ray.core.nets import TwinCritic
    from dromo_ray.errors import CheckpointError, DatasetError
    from dromo_ray.runtime.checkpoint import load_policy_from_checkpoint

    pfile = _policy_file(path)
    if pfile is not None:
        from dromo_ray.data.policy_io import load_policy

        try:
            pol = load_policy(pfile, deterministic=True)
        except DatasetError as e:
            raise CheckpointError(str(e)) from None
        env_key = pol.meta.get("env_key")
        if not env_key:
            raise CheckpointError(f"{pfile}: this policy file does not say its environment (meta.env_key)")
        info = pol.critic_info
        return _Evaluated(pol, str(env_key), pol.inputs, pol.actor, pol.critic, info.get("gamma", float("nan")),
                          info.get("entropy_coef", 0.0), bool(info.get("soft_backup", False)),
                          str(pol.meta.get("algorithm", "policy")), int(pol.meta.get("learner_updates", 0)),
                          str(pfile))
    actor, env_key, state = load_policy_from_checkpoint(path)
    agent_cfg, agent_state = state["config"]["agent"], state["learner"]["agent"]
    try:
        weights = {k: torch.as_tensor(v) for k, v in agent_state["critic"].items()}
        num_q = int(next(iter(weights.values())).shape[0])  # EnsembleMLP: one leading row per member
        critic = TwinCritic(actor.obs_dim, actor.act_dim, tuple(agent_cfg["hidden_dims"]), num_q=num_q)
        critic.load_state_dict(weights)
    except (KeyError, RuntimeError, StopIteration):
        critic = None  # value_check says so; evaluation does not need it
    return _Evaluated(_deterministic(actor), env_key, lambda obs: torch.as_tensor(obs, dtype=torch.float32), actor,
                      critic, float(agent_cfg["gamma"]),
                      float(np.exp(np.asarray(agent_state.get("log_ent_coef", 0.0), dtype=np.float64))),
                      not bool(agent_cfg.get("deterministic_backup", False)), str(agent_cfg["algorithm"]),
                      int(state["driver"]["step"]), str(state["path"]))


def evaluate_checkpoint(path: str | Path, episodes: int = 10, seed: int = 12345) -> dict[str, Any]:
    """The current policy of the checkpoint at ``path`` (anything ``--resume`` accepts that holds one, or a
    policy file), acting deterministically for ``episodes`` (>= 1) episodes in the real environment from ``seed``.

    Returns ``{"env", "episodes", "return_mean", "return_std", "normalized_score", "episode_length_mean"}``;
    raises CheckpointError when ``path`` holds no readable policy.
    """
    import numpy as np

    from dromo_ray.data.gym_env import evaluate_policy

    if episodes < 1:
        raise UserError(f"episodes: expected a positive integer, got {episodes}")
    ev = _load_evaluated(path)
    res = evaluate_policy(ev.act, ev.env_key, episodes=episodes, seed=seed)
    return {"env": ev.env_key, "episodes": episodes, "return_mean": float(res.mean_return),
            "return_std": float(np.std(res.returns)), "normalized_score": float(res.mean_normalized),
            "episode_length_mean": float(np.mean(res.lengths))}


def value_check(path: str | os.PathLike[str], episodes: int = 5, seed: int = 12345, tail: int = 500
                ) -> dict[str, Any]:
    """The critic of a checkpoint against the real return of its policy: the check of the lower-bound claim
    (the seed paper's Theorem: DROMO's Q̂ lies below the true Q^π on the states π visits).

    Runs ``episodes`` episodes of the checkpoint's deterministic policy μ in the real env and compares, at every
    visited state s_t whose return is known (all t of a terminated episode; t < T - ``tail`` of a truncated one,
    where gamma^tail bounds the missing part), the critic's Q(s_t, μ(s_t)) -- the minimum over its members, the
    value the agent backs up, and their mean -- with the Monte-Carlo return G_t = sum_k gamma^k r_{t+k}
    (:func:`~dromo_ray.core.scores.discounted_tail_returns`). A soft backup (``agent.deterministic_backup``
    false; RLlib's CQL) makes Q also count the entropy bonus alpha * H(pi) of the later steps, about
    gamma / (1 - gamma) * alpha * H; it is estimated at the same states (H from one action drawn per state) and
    reported as ``entropy_bonus``, so that ``q_min - entropy_bonus`` is the number to set against G. A policy
    file works when it carries its critic (an RLlib CQL run's ``policy.pt``).
    """
    import numpy as np
    import torch

    from dromo_ray.core.scores import discounted_tail_returns
    from dromo_ray.data.gym_env import record_episodes
    from dromo_ray.errors import CheckpointError

    if episodes < 1 or tail < 0:
        raise UserError(f"value check: episodes must be >= 1 and tail >= 0 (got {episodes}, {tail})")
    ev = _load_evaluated(path)
    if ev.critic is None:
        raise CheckpointError(f"{ev.where}: no critic in this checkpoint")
    gamma, ent_coef, soft = ev.gamma, ev.entropy_coef, ev.soft_backup
    eps = record_episodes(ev.act, ev.env_key, episodes=episodes, seed=seed)
    obs_rows, returns = [], []
    for ep in eps:
        g = discounted_tail_returns(ep.rewards, gamma)
        keep = len(g) if ep.terminated else max(0, len(g) - tail)
        obs_rows.append(ep.observations[:keep])
        returns += g[:keep]
    if not returns:
        raise UserError(f"value check: no state with a known return (episodes of {min(len(e.rewards) for e in eps)} "
                        f"steps, tail {tail}); lower --tail")
    with torch.no_grad():
        obs = ev.inputs(np.concatenate(obs_rows))
        q = ev.critic(obs, ev.actor(obs))  # (num_q, N)
        gen = torch.Generator().manual_seed(seed)
        _, logp = ev.actor.sample(obs, generator=gen)
    entropy = float(-logp.mean())
    bonus = gamma / (1.0 - gamma) * ent_coef * entropy if soft else 0.0
    g = np.asarray(returns, dtype=np.float64)
    q_min = float(q.min(0).values.mean())
    return {
        "env": ev.env_key, "algorithm": ev.algorithm, "step": ev.step,
        "episodes": len(eps), "states": int(g.size), "gamma": gamma,
        "episode_return_mean": float(np.mean([e.rewards.sum() for e in eps])),
        "mc_return_mean": float(g.mean()), "q_min_mean": q_min, "q_mean_mean": float(q.mean(0).mean()),
        "soft_backup": soft, "entropy_coef": ent_coef, "policy_entropy": entropy, "entropy_bonus": bonus,
        "q_min_minus_bonus": q_min - bonus,
        "lower_bound_holds": bool(q_min - bonus <= float(g.mean())),
    }


def model_error(path: str | os.PathLike[str], episodes: int = 2, seed: int = 12345, horizon: int = 5
                ) -> dict[str, Any]:
    """The checkpoint's dynamics ensemble against the real environment, on the states its own policy visits.

    Runs ``episodes`` episodes of the checkpoint's deterministic policy μ in the real env; from every visited
    state s_t (t + ``horizon`` within the episode) the ensemble replays the real actions a_t .. a_{t+h-1}
    open-loop, each step with the mean of the elite members' means (MBPO's deterministic prediction, the noise
    and the member draw of a rollout left out), and is compared with the real s_{t+h}, r_{t+h-1}. Per h = 1 ..
    ``horizon``: the observation error in units of the dataset's per-dimension std (the model's input
    normaliser: RMS over dimensions of (ŝ - s) / std), the reward's absolute error, and the elites'
    predicted reward std at h = 1 beside the real one-step error (is the model's uncertainty the right size?).
    """
    import numpy as np
    import torch

    from dromo_ray.core.config import config_from_dict
    from dromo_ray.data.gym_env import record_episodes
    from dromo_ray.errors import CheckpointError
    from dromo_ray.runtime.actors import dynamics_from_state
    from dromo_ray.runtime.checkpoint import load_policy_from_checkpoint

    if episodes < 1 or horizon < 1:
        raise UserError(f"model error: episodes and horizon must be >= 1 (got {episodes}, {horizon})")
    if _policy_file(path) is not None:
        raise CheckpointError(f"{_policy_file(path)}: a policy file holds no dynamics ensemble (--model-error "
                              "needs a run checkpoint of a model-based algorithm)")
    actor, env_key, state = load_policy_from_checkpoint(path)
    cfg = config_from_dict(state["config"])
    if not state["dynamics"]:
        raise CheckpointError(f"{state['path']}: no dynamics ensemble in this checkpoint "
                              f"({cfg.agent.algorithm} trains none)")
    dyn_state = {k: torch.as_tensor(v) for k, v in state["dynamics"].items()}
    model = dynamics_from_state(dyn_state, actor.obs_dim, actor.act_dim, cfg.dynamics).eval()
    elites = model.elite_idx
    obs_std = model.in_std[: actor.obs_dim].clamp_min(1e-6)

    act = _deterministic(actor)

    eps = record_episodes(act, env_key, episodes=episodes, seed=seed)
    obs_err = [[] for _ in range(horizon)]
    rew_err = [[] for _ in range(horizon)]
    pred_rew_std: list[torch.Tensor] = []
    all_rewards: list[np.ndarray] = []
    for ep in eps:
        t_len = len(ep.rewards)
        if t_len <= horizon:
            continue
        # the real s_{t+h} is row t + h: starts end horizon steps before the episode does
        starts = np.arange(t_len - horizon)
        o = torch.as_tensor(ep.observations, dtype=torch.float32)
        a = torch.as_tensor(ep.actions, dtype=torch.float32)
        r = torch.as_tensor(ep.rewards, dtype=torch.float32)
        s_hat = o[starts]
        with torch.no_grad():
            for h in range(horizon):
                mean, var = model.predict(s_hat, a[starts + h], members=elites)  # (K, B, D_o + 1)
                y = mean.mean(0)
                if h == 0:
                    pred_rew_std.append(var[..., -1].sqrt().mean(0))
                s_hat = s_hat + y[:, : actor.obs_dim]
                target = o[starts + h + 1]
                obs_err[h].append((((s_hat - target) / obs_std).square().mean(-1)).sqrt())
                rew_err[h].append((y[:, -1] - r[starts + h]).abs())
        all_rewards.append(ep.rewards)
    if not obs_err[0]:
        raise UserError(f"model error: every episode is shorter than horizon {horizon}")
    per_h = [{"h": h + 1, "obs_rmse_std_units": float(torch.cat(obs_err[h]).mean()),
              "reward_mae": float(torch.cat(rew_err[h]).mean())} for h in range(horizon)]
    rewards = np.concatenate(all_rewards)
    return {"env": env_key, "algorithm": cfg.agent.algorithm, "step": int(state["driver"]["step"]),
            "episodes": len(eps), "starts": int(torch.cat(obs_err[0]).numel()), "horizon": horizon,
            "per_h": per_h, "predicted_reward_std_h1": float(torch.cat(pred_rew_std).mean()),
            "real_reward_mean": float(rewards.mean()), "real_reward_std": float(rewards.std()),
            "episode_return_mean": float(np.mean([e.rewards.sum() for e in eps]))}


def _deterministic(actor: Any) -> Any:
    """The act function of a checkpoint's policy for the real-env evaluators: obs (B, D_o) -> μ(s) (B, D_a)."""
    import numpy as np
    import torch

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        return actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    return act

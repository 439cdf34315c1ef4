"""Agents: DROMO, COMBO, MBPO, MOPO, MOPO-auto and MOBILE behind one face (STYLE.md principle 3).

    agent = make_agent(cfg, obs_dim, act_dim, device="cpu", seed=0, behavior=pi_beta, density=density,
                       dataset_size=len(D), dynamics=ensemble)      # ensemble: MOBILE only
    metrics = agent.update(MixedBatch(real, model))          # {"train/critic_loss": ..., ...}
    weights = agent.target_policy_state()                    # for rollout workers (Alg. 1 line 4)

Every algorithm is the same :class:`SACAgent` with different components:

=========  ==============================================  =====================================
algorithm  critic terms (Eq. 13)                           model reward
=========  ==============================================  =====================================
dromo      α·variance (Eq. 13) + β·conservative            r
           (Eq. 17's strict variance: an ablation)
combo      β·conservative (α = 0)                          r
mbpo       none (α = β = 0)                                r
mopo       none                                            r - λu, λ = cfg.mopo_lambda
mopo_auto  none                                            r - λu, λ by Eq. 28-30 toward δ
mobile     none                                            r; target - β Std_i[T̂_i Q] (mobile.py)
=========  ==============================================  =====================================
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from dromo_ray.core.agents.dromo import ComboLosses, DromoLosses, DromoTerms
from dromo_ray.core.agents.mobile import BellmanInconsistencyPenalty, MobileLosses, ensemble_from_state
from dromo_ray.core.agents.mopo import DualPenalty, FixedPenalty, MopoAutoLosses, MopoLosses
from dromo_ray.core.agents.sac import MbpoLosses, Metrics, SACAgent, SACLosses, to_metrics
from dromo_ray.core.config import AGENT_ALGORITHMS, AgentConfig
from dromo_ray.core.density import ConstantDensity, StateDensity, density_from_state
from dromo_ray.core.dynamics import EnsembleDynamics
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.types import MixedBatch

__all__ = [
    "AGENT_ALGORITHMS", "Agent", "ComboLosses", "DromoLosses", "MbpoLosses", "Metrics", "MobileLosses",
    "MopoAutoLosses", "MopoLosses", "SACAgent", "SACLosses", "make_agent", "restore_agent", "to_metrics",
]


class Agent(Protocol):
    """The face the learner and the checkpoints see."""

    actor: TanhGaussianActor
    target_actor: TanhGaussianActor
    critic: torch.nn.Module
    target_critic: torch.nn.Module
    device: torch.device

    def update(self, batch: MixedBatch, sync_metrics: bool = True) -> Metrics: ...

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray: ...

    def target_policy_state(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_agent(cfg: AgentConfig, obs_dim: int, act_dim: int, *, device: str | torch.device = "cpu", seed: int = 0,
               behavior: TanhGaussianActor | None = None, density: StateDensity | None = None,
               dataset_size: int = 1, total_steps: int | None = None,
               dynamics: EnsembleDynamics | None = None) -> SACAgent:
    """Build the agent ``cfg.algorithm`` names.

    DROMO with α > 0 and ``variance_form="action"`` needs ``behavior`` (π^β, from ``fit_behavior_policy``) and a
    state density: ``density`` when given (required for ``cfg.density == "kde"``), else ``ConstantDensity
    (dataset_size)`` for ``cfg.density == "constant"``. ``behavior`` and ``density`` are moved to ``device`` and
    π^β is frozen (``requires_grad`` off): the agent only samples from it. Both travel in ``state_dict()["terms"]``.
    ``total_steps`` (the run's ``train.total_steps``) is T of a cosine actor-lr schedule when
    ``cfg.actor_lr_schedule_steps`` is 0.

    MOBILE needs ``dynamics``, the trained ensemble (its elites give the Bellman estimates); the agent keeps a
    frozen copy on ``device``, carried in ``state_dict()["target_penalty"]``. Other algorithms ignore it.
    """
    algo = cfg.algorithm
    if algo not in AGENT_ALGORITHMS:
        raise ValueError(f"make_agent: unknown algorithm {algo!r} (one of {', '.join(AGENT_ALGORITHMS)})")
    dev = torch.device(device)
    common = dict(device=dev, seed=seed, total_steps=total_steps)
    if algo in ("dromo", "combo"):
        alpha, beta = cfg.effective_alpha(), cfg.effective_beta()
        needs_variance = cfg.needs_behavior_policy()
        if needs_variance and density is None:
            if cfg.density == "kde":
                raise ValueError("make_agent: dromo with density='kde' needs a KDEDensity built from D "
                                 "(dromo_ray.core.density.make_density)")
            density = ConstantDensity(dataset_size)
        if not needs_variance:
            behavior = density = None  # unused: keep them out of the agent and its checkpoints
        terms = DromoTerms(alpha=alpha, beta=beta, f=cfg.f, num_actions=cfg.num_actions, act_dim=act_dim,
                           variance_form=cfg.variance_form, conservative_form=cfg.conservative_form,
                           conservative_states=cfg.conservative_states,
                           behavior=behavior.to(dev) if behavior is not None else None,
                           density=density.to(dev) if density is not None else None,
                           report_variance=algo == "dromo")
        losses_cls = DromoLosses if algo == "dromo" else ComboLosses
        return SACAgent(cfg, obs_dim, act_dim, losses_cls=losses_cls, terms=terms, **common)
    if algo == "mopo":
        return SACAgent(cfg, obs_dim, act_dim, losses_cls=MopoLosses, penalty=FixedPenalty(cfg.mopo_lambda, dev),
                        **common)
    if algo == "mopo_auto":
        if cfg.mopo_target_entropy is None:
            raise ValueError("make_agent: mopo_auto needs delta (agent.mopo_target_entropy); the run's driver sets it "
                             "from D once the ensemble is trained (dromo_ray.core.model_env.entropy_reference)")
        penalty = DualPenalty(cfg.mopo_lambda, cfg.mopo_target_entropy, cfg.mopo_lambda_lr, dev)
        return SACAgent(cfg, obs_dim, act_dim, losses_cls=MopoAutoLosses, penalty=penalty, **common)
    if algo == "mobile":
        if dynamics is None:
            raise ValueError("make_agent: mobile needs the trained dynamics ensemble (dynamics=EnsembleDynamics)")
        target_penalty = BellmanInconsistencyPenalty(dynamics, beta=cfg.mobile_beta, num_samples=cfg.mobile_num_samples,
                                                     gamma=cfg.gamma, form=cfg.mobile_penalty_form, device=dev)
        return SACAgent(cfg, obs_dim, act_dim, losses_cls=MobileLosses, target_penalty=target_penalty, **common)
    return SACAgent(cfg, obs_dim, act_dim, losses_cls=MbpoLosses, **common)


def restore_agent(cfg: AgentConfig, obs_dim: int, act_dim: int, state: dict[str, Any], *,
                  device: str | torch.device = "cpu") -> SACAgent:
    """An agent rebuilt from ``agent.state_dict()`` alone (π^β, the density and MOBILE's ensemble come from the
    state)."""
    terms = state.get("terms", {})
    behavior = density = dynamics = None
    if "behavior" in terms:
        weights = [v for k, v in terms["behavior"].items() if k.endswith("weight")]
        behavior = TanhGaussianActor(obs_dim, act_dim, tuple(int(w.shape[0]) for w in weights[:-1]))
    if "density" in terms:
        density = density_from_state(terms["density"])
    dynamics = None
    if "dynamics" in state.get("target_penalty", {}):
        dynamics = ensemble_from_state(state["target_penalty"]["dynamics"])
    agent = make_agent(cfg, obs_dim, act_dim, device=device, behavior=behavior, density=density,
                       total_steps=state.get("actor_lr_steps") or None, dynamics=dynamics)
    agent.load_state_dict(state)
    return agent

"""The actor-critic core every algorithm shares: SAC with twin critics, target critics and a target policy.

One update (Algorithm 1, lines 5-7) on a d_f batch (``MixedBatch``: f·B rows from D, (1-f)·B from D_model):

1. critic (Eq. 13): ½ E_{d_f}[(Q_ψ - T̂^π Q_ψ')²] plus the algorithm's critic terms (DROMO's variance and
   conservative terms, COMBO's conservative term; none for MBPO/MOPO), all critic inputs of the update in ONE
   forward of the twin critics. T̂^π is Eq. 6/7 as written (``cfg.deterministic_backup``) or SAC's soft
   backup with the entropy bonus (the default);
2. actor (Eq. 14): maximise E_{s~d_f}[min_j Q_j(s, π(s))] + R(π), R = SAC entropy (Alg. 1 line 6: d_f states),
   at a constant or cosine-annealed learning rate (``cfg.actor_lr_schedule``);
3. SAC temperature; the algorithm's own dual variable (MOPO-auto's λ);
4. Polyak of the target critics AND the target policy (line 7). The paper prints θ' ← τθ + τθ'; that is a typo
   for τθ + (1-τ)θ', which is what the ψ' half of the same line says and what we do.

The algorithms differ by small components (composition, not subclassing): ``terms`` adds critic inputs and
critic loss terms (``agents/dromo.py``), ``penalty`` rewrites model rewards and owns λ (``agents/mopo.py``),
``target_penalty`` lowers the Bellman target of the model rows (MOBILE, ``agents/mobile.py``).
Shapes: E = 2 critics, B batch rows, D_o / D_a observation / action dims, M actions per state.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from dromo_ray.core import losses as L
from dromo_ray.core.agents.fused import Workspace, twin_q
from dromo_ray.core.config import AgentConfig
from dromo_ray.core.nets import TanhGaussianActor, TwinCritic, polyak_update, tanh_gaussian_log_prob
from dromo_ray.core.types import MixedBatch

Metrics = dict[str, Any]
"""``train/...`` -> float (``sync_metrics=True``) or detached 0-dim tensor (``sync_metrics=False``)."""


# ---------------------------------------------------------------------------------------------------------
# Loss records: one frozen dataclass per algorithm, turned into ``train/<field>`` keys mechanically.


@dataclasses.dataclass(frozen=True)
class SACLosses:
    """What every algorithm reports. Critic terms are summed over the twin critics (the minimised objective)."""

    critic_loss: torch.Tensor
    bellman: torch.Tensor
    actor_loss: torch.Tensor
    entropy_coef: torch.Tensor
    entropy: torch.Tensor
    """-E[log π(a|s)] on the actor-step samples."""
    q_data: torch.Tensor
    """Mean Q_ψ(s, a) over the D rows of the batch (mean of the twins)."""
    q_model: torch.Tensor
    """Mean Q_ψ(s, a) over the D_model rows."""


@dataclasses.dataclass(frozen=True)
class MbpoLosses(SACLosses):
    """MBPO: plain SAC on d_f (α = β = 0)."""


def to_metrics(losses: SACLosses, sync: bool) -> Metrics:
    """A loss record -> ``{"train/<field>": value}``; one host sync for all values when ``sync``."""
    names = [f.name for f in dataclasses.fields(losses)]
    values = [getattr(losses, n).detach() for n in names]
    if sync:
        return {f"train/{n}": float(v) for n, v in zip(names, torch.stack(values).tolist(), strict=True)}
    return {f"train/{n}": v for n, v in zip(names, values, strict=True)}


# ---------------------------------------------------------------------------------------------------------
# Components.


class PolicyDist(NamedTuple):
    """Parameters of a tanh-Gaussian policy at B states: mu, log_std (B, D_a)."""

    mu: torch.Tensor
    log_std: torch.Tensor

    def sample(self, generator: torch.Generator, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised a = tanh(mu + σ ε) and log π(a|s): (B, D_a), (B,); or (B, M, D_a), (B, M) with num=M."""
        mu, log_std = self.mu, self.log_std
        if num is not None:
            mu, log_std = mu.unsqueeze(1).expand(-1, num, -1), log_std.unsqueeze(1).expand(-1, num, -1)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        u = mu + eps * log_std.exp()
        return torch.tanh(u), tanh_gaussian_log_prob(u, mu, log_std)

    def __getitem__(self, rows: Any) -> PolicyDist:  # type: ignore[override]
        return PolicyDist(self.mu[rows], self.log_std[rows])


class UpdateInputs(NamedTuple):
    """What the critic terms may use: d_f states s (B, D_o) and s' (B, D_o), the first ``n_real`` rows from D,
    π_θ's distribution at s and at s' (detached), and the agent's generator."""

    obs: torch.Tensor
    next_obs: torch.Tensor
    n_real: int
    pi: PolicyDist
    pi_next: PolicyDist
    generator: torch.Generator


class CriticTerms(Protocol):
    """Critic loss terms beyond the Bellman error. ``plan`` returns extra critic inputs (obs (N, D_o),
    act (N, D_a)) and whatever ``losses`` needs; ``losses`` gets Q_ψ on the batch (E, B) and on the extra rows
    (E, N) and returns ``{name: (E,) tensor}``, names matching the algorithm's loss record."""

    def plan(self, inputs: UpdateInputs) -> Any: ...

    def extra_rows(self, plan: Any) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def losses(self, q: torch.Tensor, q_extra: torch.Tensor | None, plan: Any, n_real: int
               ) -> dict[str, torch.Tensor]: ...

    def metrics(self, terms: dict[str, torch.Tensor], bellman: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RewardPenalty(Protocol):
    """Rewrites model-row rewards (MOPO) and updates its own λ after the actor step."""

    def reward(self, rew: torch.Tensor, unc: torch.Tensor) -> torch.Tensor: ...

    def update(self, unc: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TargetPenalty(Protocol):
    """Lowers the Bellman target of the model rows by its own penalty (MOBILE). ``penalty`` gets the model rows
    (obs (B_m, D_o), act (B_m, D_a)), ``next_value`` (states (N, D_o) -> (N,) min_j Q'_j(s', a'), a' ~ π_θ(·|s'),
    drawn from the agent's generator) and the generator; it returns the amount subtracted (B_m,) and its
    metrics (names matching the algorithm's loss record)."""

    def penalty(self, obs: torch.Tensor, act: torch.Tensor, next_value: Any, generator: torch.Generator
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def adam(params: Any, lr: float, device: torch.device) -> torch.optim.Adam:
    """Fused Adam (one kernel over all parameters) where torch has it, foreach otherwise."""
    if device.type in ("cpu", "cuda"):
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """base_lr · (1 + cos(π · min(step, T) / T)) / 2: base_lr at step 0, base_lr / 2 at T/2, 0 from T on
    (torch's CosineAnnealingLR with eta_min = 0, held at 0 past T instead of rising again)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def portable_opt_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` as an eager optimizer has it: a tensor lr (the captured update's) as a float and
    ``capturable`` off, so that a checkpoint is the same whichever update mode wrote it."""
    state = opt.state_dict()
    for group in state["param_groups"]:
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No weight gradients for ``module`` inside (its inputs still get theirs): the actor step backpropagates
    through the critic to the actions only."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def cpu_copy(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples with every tensor detached, cloned and moved to CPU."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


# ---------------------------------------------------------------------------------------------------------


class SACAgent:
    """The one face of every algorithm: ``update``, ``act``, ``target_policy_state``, ``state_dict``.

    Attributes: ``actor`` π_θ, ``target_actor`` π_θ' (drives model rollouts, Alg. 1 line 4), ``critic`` and
    ``target_critic`` (TwinCritic), ``device``, ``generator`` (every sample of an update is drawn from it).
    """

    def __init__(self, cfg: AgentConfig, obs_dim: int, act_dim: int, *, device: str | torch.device = "cpu",
                 seed: int = 0, losses_cls: type[SACLosses] = MbpoLosses, terms: CriticTerms | None = None,
                 penalty: RewardPenalty | None = None, target_penalty: TargetPenalty | None = None,
                 total_steps: int | None = None) -> None:
        self.cfg = cfg
        self.algorithm = cfg.algorithm
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.device = torch.device(device)
        self.losses_cls, self.terms, self.penalty = losses_cls, terms, penalty
        self.target_penalty = target_penalty
        self.gamma, self.tau = float(cfg.gamma), float(cfg.tau)
        self.target_entropy = float(-act_dim if cfg.target_entropy is None else cfg.target_entropy)
        self.max_grad_norm = float(cfg.max_grad_norm)
        self.deterministic_backup = bool(cfg.deterministic_backup)
        self.step = 0
        # Actor lr schedule: a pure function of (step, T), so step (in state_dict) and T carry it across resumes.
        self.actor_lr_steps = 0
        if cfg.actor_lr_schedule == "cosine":
            self.actor_lr_steps = int(cfg.actor_lr_schedule_steps or (total_steps or 0))
            if self.actor_lr_steps <= 0:
                raise ValueError("agent.actor_lr_schedule: cosine needs agent.actor_lr_schedule_steps > 0 or the "
                                 "run's train.total_steps (make_agent(..., total_steps=...))")

        # Initial weights from the seed without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            actor = TanhGaussianActor(obs_dim, act_dim, cfg.hidden_dims)
            critic = TwinCritic(obs_dim, act_dim, cfg.hidden_dims)
        self.actor = actor.to(self.device)
        self.critic = critic.to(self.device)
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.act_generator = torch.Generator(device=self.device).manual_seed(seed + 1)

        self.auto_entropy = bool(cfg.auto_entropy)
        self.log_ent_coef = torch.tensor(math.log(cfg.init_entropy_coef), device=self.device,
                                         requires_grad=self.auto_entropy)
        self.actor_opt = adam(self.actor.parameters(), cfg.actor_lr, self.device)
        self.critic_opt = adam(self.critic.parameters(), cfg.critic_lr, self.device)
        self.ent_opt = adam([self.log_ent_coef], cfg.entropy_lr, self.device) if self.auto_entropy else None
        self._critic_params = list(self.critic.parameters())
        self._ws = Workspace()  # critic activations reused across updates (see agents/fused.py)
        self._actor_params = list(self.actor.parameters())

    # ------------------------------------------------------------------------------------------------------
    def update(self, batch: MixedBatch, sync_metrics: bool = True) -> Metrics:
        """One step of Algorithm 1, lines 5-7, on a d_f batch; returns ``train/...`` metrics (detached 0-dim
        tensors without a host sync when ``sync_metrics`` is False)."""
        self.set_actor_lr(self.actor_lr())
        record = self.update_record(batch)
        self.step += 1
        return to_metrics(record, sync_metrics)

    def set_actor_lr(self, lr: float) -> None:
        """Install the actor's learning rate for the next update (only a cosine schedule changes it). A tensor lr
        (the captured update's, :mod:`dromo_ray.core.agents.captured`) is written in place."""
        if not self.actor_lr_steps:
            return
        for group in self.actor_opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer an update steps: actor, critic, temperature and the penalty's dual variable."""
        opts = [self.actor_opt, self.critic_opt, self.ent_opt, getattr(self.penalty, "opt", None)]
        return [o for o in opts if o is not None]

    def update_record(self, batch: MixedBatch) -> SACLosses:
        """The device work of one update (everything but the step counter and the lr schedule): the critic, actor,
        temperature, dual and Polyak steps on ``batch``; returns the loss record (detached tensors).

        No host syncs and no data-dependent shapes given a batch of fixed shapes, so the captured update
        (``agents/captured.py``) records it once as a CUDA graph and replays it."""
        real, model = batch.real, batch.model
        n_real, n_model = real.obs.shape[0], model.obs.shape[0]
        gen = self.generator
        obs = torch.cat([real.obs, model.obs])
        act = torch.cat([real.act, model.act])
        next_obs = torch.cat([real.next_obs, model.next_obs])
        done = torch.cat([real.done, model.done])
        model_rew = model.rew if self.penalty is None else self.penalty.reward(model.rew, model.unc)
        rew = torch.cat([real.rew, model_rew])
        assert obs.shape[1] == self.obs_dim and act.shape[1] == self.act_dim and rew.dim() == 1, (
            f"batch: obs (B, {self.obs_dim}), act (B, {self.act_dim}), rew (B,) expected")
        ent_coef = self.log_ent_coef.detach().exp()

        # π_θ at s (kept with its graph: the actor step reuses it, the actor has not changed by then) and at s'.
        pi = PolicyDist(*self.actor.dist_params(obs))
        with torch.no_grad():
            pi_next = PolicyDist(*self.actor.dist_params(next_obs))
            target = self.bellman_target(rew, done, next_obs, pi_next, ent_coef)
            target_metrics: dict[str, torch.Tensor] = {}
            if self.target_penalty is not None:
                # MOBILE: the model rows' target minus β U(s, a); dataset rows keep theirs.
                u, target_metrics = self.target_penalty.penalty(model.obs, model.act, self._next_value, gen)
                target = torch.cat([target[:n_real], target[n_real:] - u])
            plan = extra = None
            if self.terms is not None:
                pi_detached = PolicyDist(pi.mu.detach(), pi.log_std.detach())
                plan = self.terms.plan(UpdateInputs(obs, next_obs, n_real, pi_detached, pi_next, gen))
                extra = self.terms.extra_rows(plan)

        # Critic (Eq. 13): every critic input of the update in one forward of the twin critics.
        if extra is None:
            q, q_extra = twin_q(self.critic, obs, act, self._ws), None
        else:
            q_all = twin_q(self.critic, torch.cat([obs, extra[0]]), torch.cat([act, extra[1]]), self._ws)
            q, q_extra = q_all[:, : obs.shape[0]], q_all[:, obs.shape[0]:]
        bellman = L.bellman_error(q, target).sum()
        terms = {} if self.terms is None else {k: v.sum() for k, v in
                                               self.terms.losses(q, q_extra, plan, n_real).items()}
        critic_loss = bellman + sum(terms.values()) if terms else bellman
        term_metrics = self.terms.metrics(terms, bellman) if self.terms is not None else {}
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self._critic_params, self.max_grad_norm, foreach=True)
        self.critic_opt.step()

        # Actor (Eq. 14) on the d_f states, under the new critic.
        a_pi, logp_pi = pi.sample(gen)
        with frozen(self.critic):
            q_pi = twin_q(self.critic, obs, a_pi, self._ws)
        actor_loss = L.sac_actor_loss(q_pi, logp_pi, ent_coef)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self._actor_params, self.max_grad_norm, foreach=True)
        self.actor_opt.step()

        # SAC temperature.
        if self.ent_opt is not None:
            ent_loss = L.entropy_coef_loss(self.log_ent_coef, logp_pi, self.target_entropy)
            self.ent_opt.zero_grad(set_to_none=True)
            ent_loss.backward()
            self.ent_opt.step()
        extra_metrics = self.penalty.update(model.unc) if self.penalty is not None else {}

        # Target critics and target policy (Alg. 1 line 7): x' <- τ x + (1 - τ) x'.
        polyak_update(self.target_critic, self.critic, self.tau)
        polyak_update(self.target_actor, self.actor, self.tau)

        q_det = q.detach()
        zero = q_det.new_zeros(())
        return self.losses_cls(
            critic_loss=critic_loss.detach(), bellman=bellman.detach(), actor_loss=actor_loss.detach(),
            entropy_coef=ent_coef, entropy=-logp_pi.detach().mean(),
            q_data=q_det[:, :n_real].mean() if n_real else zero,
            q_model=q_det[:, n_real:].mean() if n_model else zero,
            **{k: v.detach() for k, v in terms.items()}, **term_metrics, **extra_metrics, **target_metrics)

    @torch.no_grad()
    def bellman_target(self, rew: torch.Tensor, done: torch.Tensor, next_obs: torch.Tensor, pi_next: PolicyDist,
                       ent_coef: torch.Tensor) -> torch.Tensor:
        """T̂^π Q_ψ'(s, a) with a' ~ π_θ(·|s') drawn from the agent's generator -> (B,).

        a' comes from the current policy, as in SAC; the target policy π_θ' drives the model rollouts (Alg. 1
        line 4). Deterministic backup: r + γ(1-d) min_j Q'_j(s', a') (Eq. 6/7); else SAC's soft backup. Both
        draw the same a' (and log π), so the random stream does not depend on the switch.
        """
        a_next, logp_next = pi_next.sample(self.generator)
        q_next = twin_q(self.target_critic, next_obs, a_next, self._ws)
        if self.deterministic_backup:
            return L.deterministic_bellman_target(rew, done, q_next, self.gamma)
        return L.soft_bellman_target(rew, done, q_next, logp_next, self.gamma, ent_coef)

    def actor_lr(self, step: int | None = None) -> float:
        """The actor's learning rate at learner update ``step`` (default: the next update)."""
        step = self.step if step is None else step
        if not self.actor_lr_steps:
            return float(self.cfg.actor_lr)
        return cosine_lr(float(self.cfg.actor_lr), step, self.actor_lr_steps)

    def _next_value(self, next_obs: torch.Tensor) -> torch.Tensor:
        """V(s') = min_j Q_ψ'_j(s', a'), a' ~ π_θ(·|s') from the agent's generator: next_obs (N, D_o) -> (N,).
        No entropy term (MOBILE's penalty compares values, not soft values). Call under no_grad."""
        a, _ = PolicyDist(*self.actor.dist_params(next_obs)).sample(self.generator)
        return twin_q(self.target_critic, next_obs, a, self._ws).min(0).values

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """π_θ's action for obs (D_o,) or (B, D_o) -> (D_a,) or (B, D_a); stochastic draws use their own generator."""
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
        single = x.dim() == 1
        x = x.unsqueeze(0) if single else x
        if deterministic:
            a = self.actor(x)
        else:
            a = PolicyDist(*self.actor.dist_params(x)).sample(self.act_generator)[0]
        out = a.cpu().numpy()
        return out[0] if single else out

    def target_policy_state(self) -> dict[str, torch.Tensor]:
        """Inference-only weights of the target policy π_θ' (Alg. 1 line 4), as CPU copies."""
        return cpu_copy(self.target_actor.state_dict())

    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bitwise-identical continuation needs, as CPU copies (safe to pickle or torch.save)."""
        state: dict[str, Any] = {
            "algorithm": self.algorithm,
            "step": self.step,
            "actor_lr_steps": self.actor_lr_steps,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_actor": self.target_actor.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "actor_opt": portable_opt_state(self.actor_opt),
            "critic_opt": portable_opt_state(self.critic_opt),
            "log_ent_coef": self.log_ent_coef,
            "ent_opt": portable_opt_state(self.ent_opt) if self.ent_opt is not None else None,
            "generator": self.generator.get_state(),
            "act_generator": self.act_generator.get_state(),
            "terms": self.terms.state_dict() if self.terms is not None else {},
            "penalty": self.penalty.state_dict() if self.penalty is not None else {},
            "target_penalty": self.target_penalty.state_dict() if self.target_penalty is not None else {},
        }
        return cpu_copy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("algorithm", self.algorithm) != self.algorithm:
            raise ValueError(f"state of a {state['algorithm']!r} agent cannot load into {self.algorithm!r}")
        state = cpu_copy(state)  # never alias the caller's tensors (optimizer states are loaded by reference)
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_actor.load_state_dict(state["target_actor"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        with torch.no_grad():
            self.log_ent_coef.copy_(state["log_ent_coef"])
        if self.ent_opt is not None and state.get("ent_opt") is not None:
            self.ent_opt.load_state_dict(state["ent_opt"])
        self.generator.set_state(state["generator"])
        self.act_generator.set_state(state["act_generator"])
        if self.terms is not None:
            self.terms.load_state_dict(state.get("terms", {}))
        if self.penalty is not None:
            self.penalty.load_state_dict(state.get("penalty", {}))
        if self.target_penalty is not None:
            self.target_penalty.load_state_dict(state.get("target_penalty", {}))
        for opt in self.optimizers():  # a checkpoint of a captured run loads into eager optimizers
            for group in opt.param_groups:
                group["capturable"] = False
        self.step = int(state["step"])
        if self.actor_lr_steps and state.get("actor_lr_steps"):
            self.actor_lr_steps = int(state["actor_lr_steps"])  # the run's T, even if the config says otherwise

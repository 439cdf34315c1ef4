"""The learned model as a batched environment: one step of T_phi for B rows at once (Alg. 1 line 4).

Shapes: B rows, D_o observation dims, D_a action dims, D_t = D_o + 1 targets, E members, K elites, N dataset rows.

Each row is advanced by one elite member drawn uniformly at random per row (as MBPO/MOPO), so the
transition distribution T̂ is the uniform mixture of the elites. Three uncertainty signals u(s, a) are
computed for every row:

* ``max_aleatoric``: max over members of ||sigma_i(s, a)||_2 (MOPO's penalty). With ``all_members=True``
  (MOPO, the default) the max runs over all E members, as MOPO's ``FakeEnv.step`` and OfflineRL-Kit's
  ``EnsembleDynamics.step`` take it (the ensemble's factored prediction, not only the elites); otherwise over
  the K elites, and only the elites are evaluated (cheaper; for algorithms that do not use the penalty).
* ``disagreement``: max over the same members of ||mu_i(s, a) - mean_j mu_j(s, a)||_2.
* ``entropy``: H(s, a) = (1/D_t) sum_d 1/2 (1 + log 2 pi sigma_d^2 / s_d^2), the Gaussian entropy per output
  dimension, in *normalised* output space (s_d = the target std of D, ``out_std``), of the elite mixture's
  variance sigma^2 = mean_i sigma_i^2 + Var_i mu_i. Appendix B's u = 1/2 (1 + log 2 pi sigma^2) >= H(T̂) is the
  maximum-entropy bound for a distribution of variance sigma^2, which is only a bound (not an identity) for a
  non-Gaussian T̂, i.e. for the mixture; that is the reading taken here. Normalising and averaging over dims
  make it scale-free (a model that knows nothing has H = 1/2 (1 + log 2 pi) = 1.42 for every env). The
  penalty of the ``entropy`` signal is ``unc = max(0, H - entropy_ref)``: with the driver's reference
  (:func:`entropy_reference`, a quantile of H over D) it is >= 0, so -λu is a penalty, never a bonus, and it is
  0 on most dataset-like rows (MOPO's max sigma is small there too). Without a reference ``unc = H``.

All three use the unnormalised predictive variance, ``var_scale`` (appendix A recalibration, off by default)
included, over all D_t outputs (state change and reward).

Model blow-up. Every env stops a rollout row whose predicted next observation has a coordinate outside
(-100, 100) or is not finite (:func:`model_blowup`): the row's transition is stored with done = 1 and it is
not rolled out further, as OfflineRL-Kit's termination functions do (``termination_fn_halfcheetah`` and
``_walker2d`` require ``-100 < s' < 100`` in every coordinate; MBPO/MOPO's hopper rule has it for s'[1:]). It
matters most for HalfCheetah, whose task never terminates: a diverging model would otherwise feed D_model
with exploding states for the whole horizon.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from dromo_ray.core.dynamics import EnsembleDynamics

PENALTIES = ("max_aleatoric", "disagreement", "entropy")

BLOWUP_BOUND = 100.0
"""A predicted next observation with any |coordinate| >= this (or a non-finite one) ends the rollout row."""


def model_blowup(next_obs: Any) -> Any:
    """(B, D_o) numpy or torch -> (B,) bool: some coordinate is not finite or lies outside (-100, 100)."""
    if isinstance(next_obs, torch.Tensor):
        return ~(torch.isfinite(next_obs) & (next_obs.abs() < BLOWUP_BOUND)).all(dim=-1)
    x = np.asarray(next_obs)
    return ~(np.isfinite(x) & (np.abs(x) < BLOWUP_BOUND)).all(axis=-1)


def mixture_entropy(mean: torch.Tensor, var: torch.Tensor, out_std: torch.Tensor) -> torch.Tensor:
    """H (B,): per-dimension Gaussian entropy of the mixture of K members' predictions (mean, var (K, B, D_t),
    unnormalised), in the output space normalised by ``out_std`` (D_t,); see the module docstring."""
    mu, v = mean / out_std, var / out_std.square()
    mix_var = v.mean(0) + mu.var(0, unbiased=False)
    return 0.5 * (1.0 + torch.log(2.0 * math.pi * mix_var)).mean(-1)


class ModelStep(NamedTuple):
    """One model step. next_obs (B, D_o), rew (B,), done (B,) bool (the task's termination or a model blow-up),
    unc (B,) the selected penalty, signals: every signal name in :data:`PENALTIES` -> (B,) (``entropy`` is H,
    before the reference), member (B,) long: the ensemble index (an elite) that produced each row, blown_up (B,)
    bool: the rows stopped by :func:`model_blowup`."""

    next_obs: torch.Tensor
    rew: torch.Tensor
    done: torch.Tensor
    unc: torch.Tensor
    signals: dict[str, torch.Tensor]
    member: torch.Tensor
    blown_up: torch.Tensor


class ModelEnv:
    """Batched environment over an :class:`EnsembleDynamics`.

    ``termination_fn`` maps next observations (B, D_o) torch -> (B,) bool (see :mod:`dromo_ray.core.envs`); the
    model blow-up rule is added to it for every env. ``penalty`` names the signal returned as ``unc``.
    ``all_members``: ``max_aleatoric`` and ``disagreement`` over all E members (MOPO) rather than the K elites.
    ``entropy_ref``: H_ref of the ``entropy`` penalty (``unc = max(0, H - H_ref)``); None: ``unc = H``.
    """

    def __init__(self, model: EnsembleDynamics, termination_fn: Callable[[torch.Tensor], torch.Tensor],
                 penalty: str = "max_aleatoric", all_members: bool = True,
                 entropy_ref: float | None = None) -> None:
        if penalty not in PENALTIES:
            raise ValueError(f"ModelEnv: penalty {penalty!r} is not one of {', '.join(PENALTIES)}")
        self.model, self.termination_fn, self.penalty = model, termination_fn, penalty
        self.all_members = bool(all_members)
        self.entropy_ref = None if entropy_ref is None else float(entropy_ref)

    @property
    def obs_dim(self) -> int:
        return self.model.obs_dim

    @property
    def act_dim(self) -> int:
        return self.model.act_dim

    @torch.no_grad()
    def step(self, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None = None,
             deterministic: bool = False) -> ModelStep:
        """Advance every row one step. ``generator`` (on the model's device) draws members and noise.

        ``deterministic``: no Gaussian noise; each row takes the *mean* of its (still randomly drawn) elite
        member, as MBPO's deterministic mode does.
        """
        m = self.model
        assert obs.dim() == 2 and act.dim() == 2 and obs.shape[0] == act.shape[0], (
            f"ModelEnv.step expects obs (B, {m.obs_dim}) and act (B, {m.act_dim}), "
            f"got {tuple(obs.shape)} and {tuple(act.shape)}"
        )
        assert obs.shape[1] == m.obs_dim and act.shape[1] == m.act_dim, (
            f"ModelEnv.step expects obs (B, {m.obs_dim}) and act (B, {m.act_dim}), "
            f"got {tuple(obs.shape)} and {tuple(act.shape)}"
        )
        elites = m.elite_idx
        if self.all_members:
            mean, var = m.predict(obs, act)  # (E, B, D_t) each, unnormalised
            elite_rows = elites  # the elites' positions among the evaluated members
        else:
            mean, var = m.predict(obs, act, members=elites)  # (K, B, D_t) each
            elite_rows = torch.arange(elites.shape[0], device=obs.device)
        k, b = elites.shape[0], obs.shape[0]
        pick = torch.randint(k, (b,), generator=generator, device=obs.device)  # position among the elites
        rows = torch.arange(b, device=obs.device)
        sel = elite_rows[pick]
        mu, v = mean[sel, rows], var[sel, rows]  # (B, D_t): one gather each
        if deterministic:
            y = mu
        else:
            y = mu + v.sqrt() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        next_obs = obs + y[:, : m.obs_dim]
        rew = y[:, m.obs_dim]
        blown = model_blowup(next_obs)
        done = torch.as_tensor(self.termination_fn(next_obs), device=obs.device).to(torch.bool).reshape(b) | blown
        if self.all_members:
            e_mean, e_var = mean.index_select(0, elites), var.index_select(0, elites)
        else:
            e_mean, e_var = mean, var
        entropy = mixture_entropy(e_mean, e_var, m.out_std)
        signals = {
            "max_aleatoric": var.sqrt().norm(dim=-1).amax(0),
            "disagreement": (mean - mean.mean(0, keepdim=True)).norm(dim=-1).amax(0),
            "entropy": entropy,
        }
        unc = signals[self.penalty]
        if self.penalty == "entropy" and self.entropy_ref is not None:
            unc = (entropy - self.entropy_ref).clamp_min(0.0)
        return ModelStep(next_obs, rew, done, unc, signals, elites[pick], blown)


def penalty_kind(agent: Any) -> str:
    """The signal an algorithm's model rows carry as ``unc`` (an ``AgentConfig``): MOPO-auto's dual update needs
    the ``entropy`` signal (appendix B); every other algorithm the configured ``mopo_uncertainty``."""
    return "entropy" if agent.algorithm == "mopo_auto" else agent.mopo_uncertainty


def model_env_for(agent: Any, model: EnsembleDynamics, termination_fn: Callable[[torch.Tensor], torch.Tensor]
                  ) -> ModelEnv:
    """The model env of a run (``agent``: its ``AgentConfig``): MOPO's max over members runs over all of them;
    other algorithms only log the signal (elites: cheaper). The entropy penalty needs ``mopo_entropy_ref``."""
    penalty = penalty_kind(agent)
    if penalty == "entropy" and agent.mopo_entropy_ref is None:
        raise ValueError("model_env_for: the entropy penalty needs agent.mopo_entropy_ref (the driver sets it from D)")
    return ModelEnv(model.eval(), termination_fn, penalty=penalty, all_members=agent.algorithm == "mopo",
                    entropy_ref=agent.mopo_entropy_ref)


class EntropyReference(NamedTuple):
    """H_ref (the q-quantile of H over D) and delta = E_D[max(0, H - H_ref)], both floats (nats per dimension)."""

    entropy_ref: float
    target: float


@torch.no_grad()
def entropy_reference(model: EnsembleDynamics, obs: np.ndarray, act: np.ndarray, quantile: float,
                      max_rows: int = 100_000, generator: torch.Generator | None = None,
                      entropy_ref: float | None = None, chunk: int = 8192) -> EntropyReference:
    """The ``entropy`` penalty's reference on the dataset, computed once after the ensemble is trained.

    obs (N, D_o), act (N, D_a): dataset rows; at most ``max_rows`` of them (drawn without replacement by
    ``generator``, all when N <= max_rows) are pushed through the elite mixture. H_ref = the ``quantile`` of H
    over them (or ``entropy_ref`` when given); delta = their mean excess E_D[max(0, H - H_ref)] (appendix B's
    δ: rollouts may be as uncertain as the data are, on average, and no more).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"entropy_reference: quantile must be in [0, 1], got {quantile}")
    obs, act = np.asarray(obs, dtype=np.float32), np.asarray(act, dtype=np.float32)
    if obs.ndim != 2 or act.ndim != 2 or obs.shape[0] != act.shape[0] or obs.shape[0] == 0:
        raise ValueError(f"entropy_reference: expected obs (N, D_o) and act (N, D_a) with N >= 1, got "
                         f"{obs.shape} and {act.shape}")
    n = obs.shape[0]
    if n > max_rows:
        idx = torch.randperm(n, generator=generator)[:max_rows].sort().values.numpy()
        obs, act = obs[idx], act[idx]
    dev = model.in_mean.device
    hs = []
    for i in range(0, obs.shape[0], chunk):
        o = torch.as_tensor(obs[i:i + chunk], device=dev)
        a = torch.as_tensor(act[i:i + chunk], device=dev)
        mean, var = model.predict(o, a, members=model.elite_idx)
        hs.append(mixture_entropy(mean, var, model.out_std).double().cpu())
    h = torch.cat(hs)
    ref = float(torch.quantile(h, quantile)) if entropy_ref is None else float(entropy_ref)
    return EntropyReference(ref, float((h - ref).clamp_min(0.0).mean()))

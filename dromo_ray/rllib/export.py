"""RLlib SAC/CQL RLModule -> :class:`~dromo_ray.core.nets.TanhGaussianActor` -> dromo_ray policy file.

The pi network of RLlib's SAC module is ``pi_encoder`` (an MLP, ``fcnet_hiddens`` with activation) followed
by the ``pi`` head (``head_fcnet_hiddens`` then one linear output of ``2 * act_dim``: ``[mu, log_std]``).
With ReLU everywhere (:func:`dromo_ray.rllib.module.model_config`) it is one
``Linear, ReLU, ..., Linear`` chain: exactly ``TanhGaussianActor.trunk``. The weights are copied layer by
layer and the result checked numerically against RLlib's own distribution (:func:`check_parity`).

RLlib's action distribution, and how it is handled:

- ``TorchSquashedGaussian``: ``a = (tanh(u) + 1) / 2 * (high - low) + low`` with ``low, high = -1, 1``
  (``from_logits`` defaults), then clamped into [-1, 1]: the same ``tanh(u)`` as the actor. The env runner's
  ``NormalizeAndClipActions`` then maps [-1, 1] to the action space's bounds, the identity for the MuJoCo
  locomotion envs (bounds [-1, 1]); :func:`check_action_space` insists on that.
- log-std: RLlib hard-clamps into [-5, 2], the actor soft-clamps into [-5, 2]. The modules of
  :mod:`dromo_ray.rllib.module` apply the soft clamp inside the network, so RLlib's clamp is a
  no-op and the two distributions coincide (checked: means, log-stds and log-densities). A module without it
  (RLlib's stock module) is still exported, with ``meta['stochastic_parity'] = 0``: its deterministic
  actions match, its sampled actions do not.
- Deterministic action: the actor's is ``tanh(mu)``, the usual SAC evaluation action, which is what the
  parity check compares (``TorchSquashedGaussian._squash(loc)``). RLlib's own ``explore=False`` path
  differs: ``to_deterministic()`` returns ``TorchDeterministic(loc)`` *without* the tanh, so an RLlib
  evaluation would act with ``clip(mu, -1, 1)``. Nothing here uses that path: every checkpoint is evaluated
  from its exported file with :func:`dromo_ray.data.gym_env.evaluate_policy`.
- No observation filter is used in training, so the exported file has ``obs_mean = obs_std = None``.

The critic goes into the same file (:func:`critic_from_weights`): the Q networks of the modules here are one MLP
on ``concat(s, a)`` each (:class:`~dromo_ray.rllib.module.ConcatQEncoder`, then RLlib's linear Q head), the
function one member of :class:`~dromo_ray.core.nets.TwinCritic` computes, so ``dromo-ray evaluate --values`` can
set an RLlib CQL run's Q against the Monte-Carlo return of its policy as it does for the platform's own agents.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dromo_ray.core.nets import TanhGaussianActor, TwinCritic, tanh_gaussian_log_prob
from dromo_ray.data.policy_io import save_policy
from dromo_ray.rllib.module import SoftClampLogStd

PARITY_ATOL = 1e-5
"""Largest absolute difference allowed between RLlib's and the exported actor's actions / log-stds."""


class ExportError(RuntimeError):
    """The RLModule cannot be expressed as a TanhGaussianActor, or the exported actor disagrees with it."""


def _leaves(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if len(list(x.children())) == 0]


def pi_layers(module: Any) -> tuple[list[nn.Linear], bool]:
    """The Linear layers of the pi network in order, and whether the log-std soft clamp is present.

    Raises :class:`ExportError` unless the network is ``Linear, ReLU, ..., ReLU, Linear``.
    """
    if not hasattr(module, "pi_encoder") or not hasattr(module, "pi"):
        raise ExportError(f"{type(module).__name__} has no pi_encoder/pi: not an RLlib SAC/CQL module")
    soft = isinstance(module.pi, SoftClampLogStd)
    leaves = [x for x in _leaves(module.pi_encoder) + _leaves(module.pi) if not isinstance(x, nn.Identity)]
    kinds = ["L" if isinstance(x, nn.Linear) else "R" if isinstance(x, nn.ReLU) else type(x).__name__
             for x in leaves]
    expected = ["L", "R"] * ((len(kinds) - 1) // 2) + ["L"]
    if kinds != expected:
        raise ExportError(f"pi network is {kinds}, expected alternating Linear/ReLU ending in Linear "
                          "(train with fcnet_activation=relu and no layer norm)")
    return [x for x in leaves if isinstance(x, nn.Linear)], soft


def actor_from_module(module: Any) -> tuple[TanhGaussianActor, bool]:
    """A TanhGaussianActor with the pi network's weights; second value: stochastic parity (soft clamp)."""
    layers, soft = pi_layers(module)
    obs_dim = layers[0].in_features
    out = layers[-1].out_features
    if out % 2:
        raise ExportError(f"pi output has {out} units; expected 2 * act_dim ([mu, log_std])")
    hidden = tuple(layer.out_features for layer in layers[:-1])
    actor = TanhGaussianActor(obs_dim, out // 2, hidden)
    targets = [m for m in actor.trunk if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for src, dst in zip(layers, targets, strict=True):
            dst.weight.copy_(src.weight.detach().cpu())
            dst.bias.copy_(src.bias.detach().cpu())
    return actor.eval(), soft


def _q_layers(weights: Mapping[str, Any], name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W out x in, b out) of Q network ``name`` ('qf', 'qf_twin') in order: its encoder's Linear layers, then
    its head's."""
    def linear(prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.weight$")
        idx = sorted(int(m.group(1)) for k in weights if (m := pat.match(k)))
        return [(np.asarray(weights[f"{prefix}{i}.weight"]), np.asarray(weights[f"{prefix}{i}.bias"])) for i in idx]

    enc, head = linear(f"{name}_encoder.net."), linear(f"{name}.net.mlp.")
    if not enc or not head:
        raise ExportError(f"no {name}_encoder.net.* / {name}.net.mlp.* weights: the Q network is not the "
                          "ConcatQEncoder of dromo_ray.rllib.module (RLlib's stock multi-stream encoder?)")
    return enc + head


def critic_from_weights(weights: Mapping[str, Any], obs_dim: int, act_dim: int) -> TwinCritic:
    """Q_1 (``qf``) and Q_2 (``qf_twin``) of an RLlib SAC / CQL module's weights (a ``state_dict`` or
    ``learner_group.get_weights()[module_id]``) as one :class:`TwinCritic` (the online networks, not the targets).

    Each is ``Linear, ReLU, ..., Linear`` on ``concat(s, a)``; an :class:`EnsembleLinear` holds ``W.T`` per member.
    """
    nets = [_q_layers(weights, name) for name in ("qf", "qf_twin")]
    dims = [[w.shape for w, _ in net] for net in nets]
    if dims[0] != dims[1]:
        raise ExportError(f"qf and qf_twin differ in shape: {dims[0]} vs {dims[1]}")
    if dims[0][0][1] != obs_dim + act_dim or dims[0][-1][0] != 1:
        raise ExportError(f"Q network maps {dims[0][0][1]} inputs to {dims[0][-1][0]} outputs; expected "
                          f"{obs_dim} + {act_dim} -> 1")
    hidden = tuple(int(shape[0]) for shape in dims[0][:-1])
    critic = TwinCritic(obs_dim, act_dim, hidden, num_q=2)
    with torch.no_grad():
        for k, layer in enumerate([*critic.net.layers, critic.net.out]):
            layer.weight.copy_(torch.stack([torch.as_tensor(net[k][0]).T for net in nets]))
            layer.bias.copy_(torch.stack([torch.as_tensor(net[k][1]).reshape(1, -1) for net in nets]))
    return critic.eval()


def check_action_space(space: Any) -> None:
    """The export assumes RLlib's [-1, 1] squashing is the env's action range."""
    low, high = np.asarray(space.low), np.asarray(space.high)
    if not (np.allclose(low, -1.0) and np.allclose(high, 1.0)):
        raise ExportError(f"action space bounds [{low.min()}, {high.max()}] are not [-1, 1]; the exported "
                          "actor would need RLlib's rescaling")


@torch.no_grad()
def check_parity(module: Any, actor: TanhGaussianActor, obs: np.ndarray, stochastic: bool = True,
                 atol: float = PARITY_ATOL, seed: int = 0) -> dict[str, float]:
    """Compare RLlib's distribution with the actor's on observations ``obs`` (B, D_o).

    Returns the largest absolute differences: ``det_action`` (RLlib ``_squash(loc)`` vs ``actor(obs)``),
    and with ``stochastic`` also ``log_std`` and ``log_prob`` (RLlib's log-density of its own samples vs
    :func:`tanh_gaussian_log_prob`). Raises :class:`ExportError` when one exceeds ``atol`` (log-prob: 100x).
    """
    from ray.rllib.core.columns import Columns

    x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
    out = module.forward_inference({Columns.OBS: x})[Columns.ACTION_DIST_INPUTS]
    dist = module.get_inference_action_dist_cls().from_logits(out)
    rl_det = dist._squash(dist.loc)
    mu, log_std = actor.dist_params(x)
    report = {"det_action": float((rl_det - actor(x)).abs().max())}
    if stochastic:
        report["log_std"] = float((dist._dist.scale.log() - log_std).abs().max())
        torch.manual_seed(seed)
        u = dist.loc + dist._dist.scale * torch.randn_like(dist.loc)
        report["log_prob"] = float((dist._squashed_logp(u) - tanh_gaussian_log_prob(u, mu, log_std)).abs().max())
    limits = {"det_action": atol, "log_std": atol, "log_prob": 100 * atol}
    bad = {k: v for k, v in report.items() if not v <= limits[k]}
    if bad:
        raise ExportError(f"exported actor disagrees with the RLlib module: {bad} (limits {limits})")
    return report


def export_policy(module: Any, path: str | os.PathLike, obs: np.ndarray,
                  meta: dict[str, Any] | None = None, critic: TwinCritic | None = None,
                  critic_info: dict[str, Any] | None = None) -> tuple[Path, dict[str, float]]:
    """Convert, check parity on ``obs``, and write a dromo_ray policy file, with ``critic`` (and its
    ``critic_info``: gamma, entropy_coef, soft_backup) beside the actor when given. Returns (path, parity report)."""
    actor, soft = actor_from_module(module)
    report = check_parity(module, actor, obs, stochastic=soft)
    full = {**(meta or {}), "source": "rllib", "rllib_module": type(module).__name__,
            "stochastic_parity": int(soft), **{f"parity_{k}": v for k, v in report.items()}}
    return save_policy(path, actor, None, None, full, critic=critic, critic_info=critic_info), report


def learner_module(algo: Any, learned: Mapping[str, Any] | None = None) -> Any:
    """The local EnvRunner's module after syncing it with the learner's weights, checked to hold them.

    (SAC syncs after every update already; CQL never does. Exporting a stale module would be silent.)
    ``learned``: the learner's weights when the caller already fetched them (``learner_group.get_weights()``).
    """
    from ray.rllib.core import DEFAULT_MODULE_ID

    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)
    module = algo.get_module()
    if learned is None:
        learned = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
    mine = module.state_dict()
    for key, value in learned.items():
        if key.startswith(("pi.", "pi_encoder.")):
            if key not in mine or not np.array_equal(np.asarray(value), mine[key].detach().cpu().numpy()):
                raise ExportError(f"the EnvRunner's module does not hold the learner's {key}")
    return module

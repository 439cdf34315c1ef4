"""RLlib SAC / CQL RLModules whose policy is exactly a :class:`~dromo_ray.core.nets.TanhGaussianActor`.

RLlib's default SAC module (``DefaultSACTorchRLModule``) outputs ``[mu, log_std]`` from ``pi_encoder`` ->
``pi`` and feeds them to ``TorchSquashedGaussian.from_logits``, which *hard*-clamps ``log_std`` into
``[MIN_LOG_NN_OUTPUT, MAX_LOG_NN_OUTPUT] = [-5, 2]``. The platform's actor *soft*-clamps the raw output into
the same ``[-5, 2]`` (``LOG_STD_MIN + 0.5 (LOG_STD_MAX - LOG_STD_MIN)(tanh(x) + 1)``). The two agree on the
mean but not on the standard deviation, and no linear layer can turn one into the other.

So the modules here wrap RLlib's ``pi`` head in :class:`SoftClampLogStd`, which applies the platform's soft
clamp to the log-std half of the head's output. RLlib's hard clamp then is the identity (values already lie
in [-5, 2]), and the exported actor (same Linear weights, soft clamp inside ``dist_params``) is the same
distribution as the one RLlib trained and sampled from: same mean, same std, same tanh squashing. For
action spaces bounded by [-1, 1] (Hopper, HalfCheetah, Walker2d v5) RLlib's rescaling
``(tanh(u) + 1) / 2 * (high - low) + low`` is the identity too.

The Q networks are the published ones, not RLlib's default. For a Box action space RLlib 2.60 builds each Q
encoder as a multi-stream net (``SACCatalog._build_qf_encoder_continuous``): an observation MLP and an action MLP
of ``fcnet_hiddens`` each, then ``fusionnet_hiddens`` fusion layers that see the concatenated streams, 989,184
parameters at 3 x 256 on Hopper. CQL's and SAC's published critic is one MLP on ``concat(s, a)`` (3 x 256 ReLU,
then a linear output: 135,681 parameters on Hopper; [CQL] github.com/aviralkumar2907/CQL, rlkit's ``FlattenMlp``;
the platform's own :class:`~dromo_ray.core.nets.TwinCritic`). RLlib's default made each CQL update cost 7.3 times
the Q-network arithmetic of the platform's COMBO with the "same" 3 x 256 sizes (the 0.82 updates/s measured in
the evidence sweep, 2026-12-03). :class:`ConcatQEncoder` replaces both Q encoders (and so their target copies,
which RLlib deep-copies from them after ``setup``): ``fcnet_hiddens`` ReLU layers on ``concat(s, a)``, whose
``ENCODER_OUT`` RLlib's own Q head (one linear layer, ``head_fcnet_hiddens = []``) maps to Q.

Everything else (the pi encoder, the Q heads, losses, exploration) is RLlib's own code.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.cql.torch.default_cql_torch_rl_module import DefaultCQLTorchRLModule
from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from torch import nn

from dromo_ray.core.nets import LOG_STD_MAX, LOG_STD_MIN


def soft_clamp_log_std(raw: torch.Tensor) -> torch.Tensor:
    """The platform's soft clamp into [LOG_STD_MIN, LOG_STD_MAX] (as in ``TanhGaussianActor.dist_params``)."""
    return LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw) + 1.0)


class SoftClampLogStd(nn.Module):
    """Wraps RLlib's pi head: ``[mu, raw] -> [mu, soft_clamp(raw)]``. ``head`` holds every parameter."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, raw = self.head(x).chunk(2, dim=-1)
        return torch.cat([mu, soft_clamp_log_std(raw)], dim=-1)


class ConcatQEncoder(nn.Module):
    """The published Q encoder: ReLU layers of widths ``hidden`` on ``concat(obs, actions)``.

    ``forward({OBS: B x S, ACTIONS: B x A}) -> {ENCODER_OUT: B x hidden[-1]}``, the interface RLlib's SAC / CQL
    modules call their Q encoders with (``_qf_forward_train_helper``)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim + act_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.net = nn.Sequential(*layers)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {ENCODER_OUT: self.net(torch.cat([batch[Columns.OBS], batch[Columns.ACTIONS]], dim=-1))}


def _published_q_encoders(module: Any) -> None:
    """Swap RLlib's multi-stream Q encoders of a built SAC / CQL module for :class:`ConcatQEncoder` (Box actions;
    an inference-only module has none)."""
    if not hasattr(module, "qf_encoder"):
        return
    hidden = tuple(module.model_config["fcnet_hiddens"])
    dims = (int(module.observation_space.shape[0]), int(module.action_space.shape[0]), hidden)
    module.qf_encoder = ConcatQEncoder(*dims)
    if module.twin_q:
        module.qf_twin_encoder = ConcatQEncoder(*dims)


class SoftClampSACTorchRLModule(DefaultSACTorchRLModule):
    """RLlib's default SAC torch module with :class:`SoftClampLogStd` around the pi head and the published
    :class:`ConcatQEncoder` Q encoders."""

    def setup(self) -> None:
        super().setup()
        self.pi = SoftClampLogStd(self.pi)
        _published_q_encoders(self)


class SoftClampCQLTorchRLModule(DefaultCQLTorchRLModule):
    """RLlib's default CQL torch module with :class:`SoftClampLogStd` around the pi head and the published
    :class:`ConcatQEncoder` Q encoders."""

    def setup(self) -> None:
        super().setup()
        self.pi = SoftClampLogStd(self.pi)
        _published_q_encoders(self)


def model_config(hidden: tuple[int, ...]) -> DefaultModelConfig:
    """ReLU MLPs of widths ``hidden`` for pi (encoder = all of ``hidden``; head = one linear layer) and for
    the Q networks (:class:`ConcatQEncoder` of ``fcnet_hiddens``, then RLlib's one-linear-layer head; the fusion
    settings only reach RLlib's own multi-stream encoder, which the modules here replace)."""
    hidden = [int(h) for h in hidden]
    return DefaultModelConfig(
        fcnet_hiddens=hidden, fcnet_activation="relu",
        head_fcnet_hiddens=[], head_fcnet_activation="relu",
        fusionnet_hiddens=hidden, fusionnet_activation="relu",
    )


def module_config_kwargs(hidden: tuple[int, ...], cql: bool = False) -> dict[str, Any]:
    """``AlgorithmConfig.rl_module(**kwargs)`` for the soft-clamp module."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    cls = SoftClampCQLTorchRLModule if cql else SoftClampSACTorchRLModule
    return {"rl_module_spec": RLModuleSpec(module_class=cls), "model_config": model_config(hidden)}

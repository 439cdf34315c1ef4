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

Everything else (encoders, Q networks, losses, exploration) is RLlib's own code.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.cql.torch.default_cql_torch_rl_module import DefaultCQLTorchRLModule
from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule
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


class SoftClampSACTorchRLModule(DefaultSACTorchRLModule):
    """RLlib's default SAC torch module with :class:`SoftClampLogStd` around the pi head."""

    def setup(self) -> None:
        super().setup()
        self.pi = SoftClampLogStd(self.pi)


class SoftClampCQLTorchRLModule(DefaultCQLTorchRLModule):
    """RLlib's default CQL torch module with :class:`SoftClampLogStd` around the pi head."""

    def setup(self) -> None:
        super().setup()
        self.pi = SoftClampLogStd(self.pi)


def model_config(hidden: tuple[int, ...]) -> DefaultModelConfig:
    """ReLU MLPs of widths ``hidden`` for pi (encoder = all of ``hidden``; head = one linear layer) and for
    the Q networks (observation encoder, action encoder and fusion net, all ReLU)."""
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

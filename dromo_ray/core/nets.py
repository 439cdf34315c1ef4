"""Network building blocks. Shapes: E ensemble members, B rows, D features.

Every "ensemble" module runs all E members in one batched matmul (``torch.baddbmm``), never a Python
loop over members. Twin critics are an ensemble of E=2 Q-networks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: (E, B, D_in) -> (E, B, D_out)."""

    def __init__(self, num_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_members, self.in_features, self.out_features = num_members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default (Kaiming-uniform with a=sqrt(5)), per member.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 3 and x.shape[0] == self.num_members and x.shape[-1] == self.in_features, (
            f"EnsembleLinear expects (E={self.num_members}, B, {self.in_features}), got {tuple(x.shape)}"
        )
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """E MLPs with SiLU/ReLU hidden layers, evaluated together: (E, B, D_in) -> (E, B, D_out)."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int, hidden: tuple[int, ...],
                 activation: str = "relu") -> None:
        super().__init__()
        dims = (in_dim, *hidden)
        self.layers = nn.ModuleList(EnsembleLinear(num_members, a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.out = EnsembleLinear(num_members, dims[-1], out_dim)
        self.act = {"relu": F.relu, "silu": F.silu}[activation]
        self.num_members = num_members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.out(x)

    def flops_per_row(self) -> int:
        """Multiply-adds x2 of one forward of one row through every member."""
        total = sum(2 * m.in_features * m.out_features for m in [*self.layers, self.out])
        return total * self.num_members


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    dims = (in_dim, *hidden)
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        mods += [nn.Linear(a, b), activation()]
    mods.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*mods)


class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s))). obs (B, D_o) -> action (B, D_a) in (-1, 1)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, tuple(hidden)
        self.trunk = mlp(obs_dim, 2 * act_dim, hidden)

    def dist_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.trunk(obs).chunk(2, dim=-1)
        # Soft clamp of log_std into [LOG_STD_MIN, LOG_STD_MAX] (keeps gradients, unlike hard clamp).
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1.0)
        return mu, log_std

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None,
               deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample and its log-probability: (B, D_a), (B,). Works for obs (..., D_o)."""
        mu, log_std = self.dist_params(obs)
        if deterministic:
            u = mu
        else:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            u = mu + eps * log_std.exp()
        action = torch.tanh(u)
        return action, tanh_gaussian_log_prob(u, mu, log_std)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """log pi(a|s) for given actions in (-1, 1): (B,)."""
        mu, log_std = self.dist_params(obs)
        a = action.clamp(-1.0 + eps, 1.0 - eps)
        u = torch.atanh(a)
        return tanh_gaussian_log_prob(u, mu, log_std)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action (the mean through tanh)."""
        mu, _ = self.dist_params(obs)
        return torch.tanh(mu)


def tanh_gaussian_log_prob(u: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log density of a = tanh(u), u ~ N(mu, exp(log_std)^2), summed over the last dim."""
    gauss = -0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    # log |d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable.
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return (gauss - log_det).sum(-1)


class TwinCritic(nn.Module):
    """Q_1, Q_2 as one ensemble of 2: obs (..., D_o), act (..., D_a) -> (2, ...) Q-values.

    Inputs of any leading shape are flattened into one batched forward, so that every sampled action of
    every state goes through both critics in one matmul per layer.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], num_q: int = 2) -> None:
        super().__init__()
        self.num_q = num_q
        self.net = EnsembleMLP(num_q, obs_dim + act_dim, 1, hidden, activation="relu")

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[:-1]
        x = torch.cat([obs, act], -1).reshape(1, -1, obs.shape[-1] + act.shape[-1])
        q = self.net(x.expand(self.num_q, -1, -1))
        return q.reshape(self.num_q, *lead)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- tau * source + (1 - tau) * target (Alg. 1 line 7), fused over all parameters."""
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    torch._foreach_lerp_(t_params, s_params, tau)

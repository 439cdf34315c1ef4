"""The probabilistic dynamics ensemble T_phi(s', r | s, a) = N(mu_phi(s, a), Sigma_phi(s, a)) (Alg. 1 line 1).

Shapes: E ensemble members, B rows, D_i = D_o + D_a inputs, D_t = D_o + 1 targets.

Every member predicts the *target* y = [s' - s, r] (the state change and the reward) as a diagonal Gaussian.
All members run in one batched forward (:class:`dromo_ray.core.nets.EnsembleLinear`, one ``baddbmm`` per
layer over the E dimension), never a Python loop over members.

Spaces. The network works in *normalised* space: inputs are standardised with ``in_mean``/``in_std`` and it
predicts standardised targets ``(y - out_mean) / out_std``. Both normalisers are buffers fitted from the
training rows (:func:`normalizer_stats`, :meth:`EnsembleDynamics.set_normalizer`). The learned soft bounds
``max_logvar``/``min_logvar`` live in that normalised space. :meth:`EnsembleDynamics.forward` and
:meth:`EnsembleDynamics.predict` return *unnormalised* target space; :meth:`forward_normalized` is the
training path. ``var_scale`` (appendix A recalibration, default ones) multiplies the unnormalised variance
in :meth:`predict` only; the training loss never sees it.

Training (:class:`DynamicsTrainer`), as in MBPO/MOPO: loss = sum over members of the mean (over rows and
dims) of the Gaussian NLL ``(mu - y)^2 exp(-logvar) + logvar`` (the constant and the 1/2 dropped, as
MBPO), plus ``logvar_loss_coef * (sum max_logvar - sum min_logvar)``, plus L2 weight decay on each layer's
weight matrix with that layer's coefficient (``DynamicsConfig.layer_weight_decays``: MBPO/MOPO's 2.5e-5, 5e-5,
7.5e-5, 7.5e-5, 1e-4 from the input layer to the output layer by default). The decay is applied through
Adam's ``weight_decay``, one parameter group per layer (gradient ``wd_l * w``), which is exactly the gradient
of MBPO's ``0.5 * wd_l * sum(w^2)`` loss term, at no extra cost per step. Each member draws its own shuffled
minibatch every step (an (E, B) index tensor, gathered in one op), from its own bootstrap resample of the
training rows by default (``bootstrap``, as MBPO/MOPO). Early stopping and elite selection use the holdout
MSE of the mean in *normalised* target space (scale-free across state and reward dims).

Parallel training across processes: split the rows once (:func:`holdout_split`), fit the normaliser once
(:func:`normalizer_stats`), give every process the same split and stats and a *different* init generator,
train sub-ensembles with ``num_members=k``, then :func:`merge_ensembles` them.
"""

from __future__ import annotations

import copy
import math
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dromo_ray.core.config import DynamicsConfig
from dromo_ray.core.nets import EnsembleMLP

# ---------------------------------------------------------------------------------------------------------
# Data helpers


def make_inputs_targets(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray,
                        rew: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transitions -> (inputs (N, D_o + D_a), targets (N, D_o + 1)) float32: x = [s, a], y = [s' - s, r]."""
    obs, act, next_obs = (np.asarray(a, dtype=np.float32) for a in (obs, act, next_obs))
    rew = np.asarray(rew, dtype=np.float32).reshape(-1)
    n = obs.shape[0]
    if (obs.ndim != 2 or act.ndim != 2 or next_obs.shape != obs.shape or act.shape[0] != n
            or rew.shape[0] != n):
        raise ValueError("make_inputs_targets: expected obs (N, D_o), act (N, D_a), next_obs (N, D_o), "
                         f"rew (N,); got {obs.shape}, {act.shape}, {next_obs.shape}, {rew.shape}")
    inputs = np.concatenate([obs, act], axis=1)
    targets = np.concatenate([next_obs - obs, rew[:, None]], axis=1)
    return inputs, targets


def holdout_split(num_rows: int, cfg: DynamicsConfig,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (train_idx, holdout_idx): ``holdout_ratio`` of the rows, at most ``max_holdout``, at least 1."""
    if num_rows < 2:
        raise ValueError(f"holdout_split: need at least 2 rows, got {num_rows}")
    n_hold = int(min(max(1, round(num_rows * cfg.holdout_ratio)), cfg.max_holdout, num_rows - 1))
    perm = rng.permutation(num_rows)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


class NormalizerStats(NamedTuple):
    """Per-dimension standardisation: in_* (D_i,), out_* (D_t,), float32 numpy arrays."""

    in_mean: np.ndarray
    in_std: np.ndarray
    out_mean: np.ndarray
    out_std: np.ndarray


def normalizer_stats(inputs: np.ndarray, targets: np.ndarray, eps: float = 1e-6) -> NormalizerStats:
    """Mean and std of inputs (N, D_i) and targets (N, D_t); a near-constant dim gets std 1."""

    def ms(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(a, dtype=np.float64)
        m, s = a.mean(0), a.std(0)
        return m.astype(np.float32), np.where(s < eps, 1.0, s).astype(np.float32)

    return NormalizerStats(*ms(inputs), *ms(targets))


# ---------------------------------------------------------------------------------------------------------
# The ensemble

CPU_PREDICT_CHUNK = 1024
"""Rows per forward chunk in :meth:`EnsembleDynamics.predict` on CPU (activations stay in cache)."""


class EnsembleDynamics(nn.Module):
    """E Gaussian MLPs (SiLU) over [s, a] predicting [s' - s, r]; see the module docstring for the spaces.

    Parameters: ``net`` (an :class:`EnsembleMLP` whose output layer emits 2 D_t values: mean and raw
    log-variance), ``max_logvar`` and ``min_logvar`` (E, 1, D_t), per member so that sub-ensembles trained
    apart can be merged. Buffers: ``in_mean``, ``in_std`` (D_i,), ``out_mean``, ``out_std``, ``var_scale``
    (D_t,), ``elite_idx`` (num_elites,) long, best member first.

    ``generator`` (optional) draws the initial weights, so that processes training members of the same
    ensemble apart start from different, reproducible weights without touching the global RNG.
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: DynamicsConfig, num_members: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        e = int(num_members if num_members is not None else cfg.ensemble_size)
        if e < 1:
            raise ValueError(f"EnsembleDynamics: num_members must be >= 1, got {e}")
        self.cfg = cfg
        self.obs_dim, self.act_dim, self.num_members = int(obs_dim), int(act_dim), e
        self.in_dim, self.out_dim = self.obs_dim + self.act_dim, self.obs_dim + 1
        self.hidden = tuple(int(h) for h in cfg.hidden_dims)
        self.num_elites = min(int(cfg.num_elites), e)
        self.net = EnsembleMLP(e, self.in_dim, 2 * self.out_dim, self.hidden, activation="silu")
        self.max_logvar = nn.Parameter(torch.full((e, 1, self.out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((e, 1, self.out_dim), -10.0))
        self.register_buffer("in_mean", torch.zeros(self.in_dim))
        self.register_buffer("in_std", torch.ones(self.in_dim))
        self.register_buffer("out_mean", torch.zeros(self.out_dim))
        self.register_buffer("out_std", torch.ones(self.out_dim))
        self.register_buffer("var_scale", torch.ones(self.out_dim))
        self.register_buffer("elite_idx", torch.arange(self.num_elites, dtype=torch.long))
        if generator is not None:
            self.reset_parameters(generator)

    # -- construction helpers ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform(+-1/sqrt(fan_in)) per layer (nn.Linear's default scale), drawn from ``generator``."""
        for layer in self.linear_layers():
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
        self.max_logvar.fill_(0.5)
        self.min_logvar.fill_(-10.0)

    def linear_layers(self) -> list[nn.Module]:
        return [*self.net.layers, self.net.out]

    @torch.no_grad()
    def set_normalizer(self, stats: NormalizerStats) -> None:
        for name, value in zip(NormalizerStats._fields, stats, strict=True):
            buf = getattr(self, name)
            t = torch.as_tensor(np.asarray(value, dtype=np.float32), device=buf.device)
            assert t.shape == buf.shape, (
                f"set_normalizer: {name} must have shape {tuple(buf.shape)}, got {tuple(t.shape)}")
            buf.copy_(t)

    def get_normalizer(self) -> NormalizerStats:
        return NormalizerStats(*(getattr(self, n).detach().cpu().numpy().copy()
                                 for n in NormalizerStats._fields))

    @torch.no_grad()
    def set_elites(self, idx: torch.Tensor | np.ndarray | list[int]) -> None:
        t = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.elite_idx.device).reshape(-1)
        assert t.numel() >= 1 and int(t.min()) >= 0 and int(t.max()) < self.num_members, (
            f"set_elites: indices must lie in [0, {self.num_members}), got {t.tolist()}")
        self.num_elites = int(t.numel())
        self.elite_idx = t  # re-registers the buffer with the new length

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The elite count may differ between a fresh module and a checkpoint (merged, or sub-ensembles).
        key = prefix + "elite_idx"
        if key in state_dict and state_dict[key].shape != self.elite_idx.shape:
            self.elite_idx = torch.empty_like(state_dict[key], device=self.elite_idx.device)
            self.num_elites = int(state_dict[key].numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward ---------------------------------------------------------------------------------------
    def flops_per_row(self) -> int:
        """Multiply-add FLOPs (x2) of one forward of one row through every member."""
        return self.net.flops_per_row()

    def normalize_inputs(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """obs (..., D_o), act (..., D_a) -> standardised [s, a] (..., D_i)."""
        ok = obs.shape[-1] == self.obs_dim and act.shape[-1] == self.act_dim and obs.shape[:-1] == act.shape[:-1]
        assert ok, (f"EnsembleDynamics expects obs (..., {self.obs_dim}) and act (..., {self.act_dim}) with "
                    f"equal leading dims, got {tuple(obs.shape)} and {tuple(act.shape)}")
        return (torch.cat([obs, act], -1) - self.in_mean) / self.in_std

    def forward_normalized(self, x: torch.Tensor,
                           members: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised inputs (M, B, D_i) -> standardised (mean, logvar), each (M, B, D_t).

        M = E, or M = len(members) when ``members`` (long (M,)) selects a subset (e.g. the elites). A
        (1, B, D_i) input is broadcast to every selected member.
        """
        m = self.num_members if members is None else int(members.shape[0])
        assert x.dim() == 3 and x.shape[-1] == self.in_dim and x.shape[0] in (1, m), (
            f"EnsembleDynamics expects inputs (E={m} or 1, B, {self.in_dim}), got {tuple(x.shape)}"
        )
        if x.shape[0] == 1 and m > 1:
            x = x.expand(m, -1, -1)
        layers = self.linear_layers()
        for i, layer in enumerate(layers):
            w, b = layer.weight, layer.bias
            if members is not None:
                w, b = w.index_select(0, members), b.index_select(0, members)
            x = torch.baddbmm(b, x, w)
            if i < len(layers) - 1:
                x = F.silu(x)
        mean, raw = x.split(self.out_dim, dim=-1)
        max_lv, min_lv = self.max_logvar, self.min_logvar
        if members is not None:
            max_lv, min_lv = max_lv.index_select(0, members), min_lv.index_select(0, members)
        # Soft bounds (PETS/MBPO): logvar stays inside [min_logvar, max_logvar] with non-zero gradients.
        logvar = max_lv - F.softplus(max_lv - raw)
        logvar = min_lv + F.softplus(logvar - min_lv)
        return mean, logvar

    def forward(self, obs: torch.Tensor, act: torch.Tensor,
                members: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, D_o) or (M, B, D_o), act likewise -> (mean, logvar), each (M, B, D_t), *unnormalised*.

        mean predicts [s' - s, r]; logvar is the model's log-variance (without ``var_scale``).
        """
        assert obs.dim() in (2, 3), (
            f"EnsembleDynamics: obs must be (B, D_o) or (E, B, D_o), got {tuple(obs.shape)}")
        x = self.normalize_inputs(obs, act)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        mean, logvar = self.forward_normalized(x, members)
        return mean * self.out_std + self.out_mean, logvar + 2.0 * torch.log(self.out_std)

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor, members: torch.Tensor | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: (mean, var), each (M, B, D_t), unnormalised, var multiplied by ``var_scale``.

        obs (B, D_o), act (B, D_a) shared by every member. On CPU the rows go through the network in chunks
        of ``chunk_size`` (default :data:`CPU_PREDICT_CHUNK`) so that the (M, chunk, hidden) activations stay
        in cache; on CUDA the default is one chunk. Results do not depend on the chunking.
        """
        if chunk_size is None:
            chunk_size = CPU_PREDICT_CHUNK if obs.device.type == "cpu" else 0
        b = obs.shape[-2] if obs.dim() >= 2 else 0
        if obs.dim() != 2 or chunk_size <= 0 or b <= chunk_size:
            mean, logvar = self.forward(obs, act, members)
            return mean, logvar.exp() * self.var_scale
        m = self.num_members if members is None else int(members.shape[0])
        mean = obs.new_empty(m, b, self.out_dim)
        var = obs.new_empty(m, b, self.out_dim)
        for i in range(0, b, chunk_size):
            mu, logvar = self.forward(obs[i:i + chunk_size], act[i:i + chunk_size], members)
            mean[:, i:i + chunk_size] = mu
            torch.mul(logvar.exp_(), self.var_scale, out=var[:, i:i + chunk_size])
        return mean, var


# ---------------------------------------------------------------------------------------------------------
# Training


class DynamicsTrainer:
    """Trains an :class:`EnsembleDynamics` on (inputs, targets) with holdout early stopping.

    ``generator`` (a torch.Generator on the model's device) drives minibatch shuffles and bootstrap
    resamples. The model's normaliser must be set before :meth:`train` (``fit_normalizer=True`` fits it
    from the training rows; leave it False when sub-ensembles must share the driver's stats).
    """

    def __init__(self, model: EnsembleDynamics, cfg: DynamicsConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.model = model
        self.cfg = cfg if cfg is not None else model.cfg
        self.device = next(model.parameters()).device
        self.generator = generator if generator is not None else torch.Generator(self.device).manual_seed(0)
        weights = [layer.weight for layer in model.linear_layers()]
        decays = self.cfg.layer_weight_decays()
        assert len(decays) == len(weights), (
            f"DynamicsTrainer: dynamics.weight_decay gives {len(decays)} values for a net of {len(weights)} linear "
            f"layers; give {len(weights)} values (input layer first) or one for every layer")
        others = [p for p in model.parameters() if all(p is not w for w in weights)]
        groups = [{"params": [w], "weight_decay": wd} for w, wd in zip(weights, decays, strict=True)]
        groups.append({"params": others, "weight_decay": 0.0})
        opt_kw = {"fused": True} if self.device.type in ("cpu", "cuda") else {"foreach": True}
        self.optimizer = torch.optim.Adam(groups, lr=self.cfg.learning_rate, **opt_kw)
        self.holdout_losses = np.full(model.num_members, np.inf)
        """Best holdout MSE (normalised target space) of every member, after :meth:`train`."""

    # -- one step --------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Normalised inputs (E, B, D_i) and targets (E, B, D_t) -> the scalar training loss."""
        m = self.model
        mean, logvar = m.forward_normalized(x)
        nll = ((mean - y).square() * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
        bound = self.cfg.logvar_loss_coef * (m.max_logvar.sum() - m.min_logvar.sum())
        return nll + bound

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One Adam step on every member; returns the detached loss (no host sync)."""
        loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Steps over the columns of ``perm`` (E, n) in batches of ``batch_size``: member e's batch t is rows
        ``perm[e, t*B:(t+1)*B]`` of the normalised x (N, D_i) and y (N, D_t), gathered in one op. Returns the
        mean loss as a device tensor (no host sync)."""
        bs = self.cfg.batch_size
        assert perm.dim() == 2 and perm.shape[0] == self.model.num_members, (
            f"train_epoch: perm must be (E={self.model.num_members}, n), got {tuple(perm.shape)}")
        e = perm.shape[0]
        loss_sum = torch.zeros((), device=self.device)
        num_steps = 0
        for i in range(0, perm.shape[1], bs):
            idx = perm[:, i:i + bs].reshape(-1)  # (E * b,): index_select is ~4x faster than x[idx_2d]
            b = idx.shape[0] // e
            loss_sum += self.step(x.index_select(0, idx).view(e, b, -1), y.index_select(0, idx).view(e, b, -1))
            num_steps += 1
        return loss_sum / max(num_steps, 1)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                 normalized: bool = False, chunk: int = 8192) -> np.ndarray:
        """Per-member MSE of the mean, in normalised target space: (E,) numpy."""
        m = self.model
        x = torch.as_tensor(inputs, dtype=torch.float32, device=self.device)
        y = torch.as_tensor(targets, dtype=torch.float32, device=self.device)
        if not normalized:
            x, y = (x - m.in_mean) / m.in_std, (y - m.out_mean) / m.out_std
        total = torch.zeros(m.num_members, device=self.device)
        for i in range(0, x.shape[0], chunk):
            mean, _ = m.forward_normalized(x[i:i + chunk].unsqueeze(0))
            total += (mean - y[i:i + chunk]).square().sum(dim=(1, 2))
        return (total / (x.shape[0] * m.out_dim)).cpu().numpy().astype(np.float64)

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self, train_inputs: np.ndarray, train_targets: np.ndarray, holdout_inputs: np.ndarray,
              holdout_targets: np.ndarray, max_epochs: int | None = None, fit_normalizer: bool = False,
              max_seconds: float | None = None) -> dict[str, float]:
        """Train until no member improves its holdout MSE by > 1% for ``max_epochs_since_update`` epochs
        (or ``max_epochs``, cfg.max_epochs when None, 0 = no cap; or ``max_seconds``), restore every
        member's best weights, select elites. Returns float metrics (``dynamics/...``)."""
        cfg, m, g = self.cfg, self.model, self.generator
        if fit_normalizer:
            m.set_normalizer(normalizer_stats(train_inputs, train_targets))
        x_all = torch.as_tensor(np.asarray(train_inputs, dtype=np.float32), device=self.device)
        y_all = torch.as_tensor(np.asarray(train_targets, dtype=np.float32), device=self.device)
        ok = x_all.dim() == 2 and x_all.shape[1] == m.in_dim and y_all.shape == (x_all.shape[0], m.out_dim)
        assert ok, (
            f"train: expected inputs (N, {m.in_dim}) and targets (N, {m.out_dim}), "
            f"got {tuple(x_all.shape)} and {tuple(y_all.shape)}"
        )
        with torch.no_grad():
            x_all = (x_all - m.in_mean) / m.in_std
            y_all = (y_all - m.out_mean) / m.out_std
        hx = torch.as_tensor(np.asarray(holdout_inputs, dtype=np.float32), device=self.device)
        hy = torch.as_tensor(np.asarray(holdout_targets, dtype=np.float32), device=self.device)
        hx, hy = (hx - m.in_mean) / m.in_std, (hy - m.out_mean) / m.out_std

        n, e = x_all.shape[0], m.num_members
        if cfg.bootstrap:
            boot = torch.randint(n, (e, n), generator=g, device=self.device)
        max_epochs = cfg.max_epochs if max_epochs is None else max_epochs
        params = list(m.parameters())
        best_params = [p.detach().clone() for p in params]
        best = np.full(e, np.inf)
        epochs_since, epoch, rows, train_time = 0, 0, 0, 0.0
        t_start = time.perf_counter()
        last_loss = torch.zeros((), device=self.device)
        while True:
            t0 = time.perf_counter()
            perm = torch.argsort(torch.rand(e, n, generator=g, device=self.device), dim=1)
            if cfg.bootstrap:
                perm = torch.gather(boot, 1, perm)
            last_loss = self.train_epoch(x_all, y_all, perm)
            rows += n
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_time += time.perf_counter() - t0
            epoch += 1

            losses = self.evaluate(hx, hy, normalized=True)
            improved = (best - losses) / np.where(np.isfinite(best), best, 1.0) > 0.01
            improved |= ~np.isfinite(best) & np.isfinite(losses)
            if improved.any():
                mask = torch.as_tensor(improved, device=self.device)
                with torch.no_grad():
                    for p, bp in zip(params, best_params, strict=True):
                        bp[mask] = p[mask]
                best = np.where(improved, losses, best)
                epochs_since = 0
            else:
                epochs_since += 1
            if epochs_since >= cfg.max_epochs_since_update:  # the config's contract (MBPO stops one later)
                break
            if max_epochs and epoch >= max_epochs:
                break
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                break

        with torch.no_grad():
            for p, bp in zip(params, best_params, strict=True):
                p.copy_(bp)
        self.holdout_losses = best.copy()
        m.set_elites(np.argsort(best, kind="stable")[: m.num_elites])
        elites = m.elite_idx.cpu().numpy()
        metrics: dict[str, float] = {
            "dynamics/holdout_mse": float(best[elites].mean()),
            "dynamics/holdout_mse_all": float(best.mean()),
            "dynamics/train_loss": float(last_loss),
            "dynamics/epochs": float(epoch),
            "dynamics/train_rows": float(rows),
            "dynamics/train_seconds": float(train_time),
            "dynamics/train_rows_per_s": rows / max(train_time, 1e-9),
            "dynamics/train_member_rows_per_s": rows * e / max(train_time, 1e-9),
            "dynamics/num_elites": float(len(elites)),
        }
        for i, v in enumerate(best):
            metrics[f"dynamics/holdout_mse_member_{i}"] = float(v)
            metrics[f"dynamics/is_elite_member_{i}"] = float(i in set(elites.tolist()))
        return metrics

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "holdout_losses": self.holdout_losses.copy(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.holdout_losses = np.asarray(state["holdout_losses"], dtype=np.float64).copy()
        self.generator.set_state(state["generator"])


def train_ensemble(model: EnsembleDynamics, inputs: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
                   generator: torch.Generator | None = None, cfg: DynamicsConfig | None = None,
                   max_epochs: int | None = None) -> dict[str, float]:
    """The single-process path: split a holdout, fit the normaliser on the training rows, train, elites."""
    cfg = cfg if cfg is not None else model.cfg
    tr, ho = holdout_split(inputs.shape[0], cfg, rng)
    model.set_normalizer(normalizer_stats(inputs[tr], targets[tr]))
    trainer = DynamicsTrainer(model, cfg, generator)
    return trainer.train(inputs[tr], targets[tr], inputs[ho], targets[ho], max_epochs=max_epochs)


# ---------------------------------------------------------------------------------------------------------
# Merging sub-ensembles trained apart


def merge_ensembles(models: list[EnsembleDynamics], holdout_losses: list[np.ndarray] | list[list[float]],
                    num_elites: int | None = None) -> EnsembleDynamics:
    """Concatenate sub-ensembles along E (in list order) and choose elites globally by holdout loss.

    Every model must share dims, hidden widths and normaliser stats (the same driver-side split and stats);
    ``holdout_losses[i]`` holds model i's per-member losses on the *same* holdout. ``var_scale`` is reset to
    ones (recalibrate the merged ensemble). ``num_elites`` defaults to the first model's cfg.num_elites.
    """
    if not models:
        raise ValueError("merge_ensembles: no models")
    if len(holdout_losses) != len(models):
        raise ValueError("merge_ensembles: need one holdout-loss array per model")
    first = models[0]
    for k, m in enumerate(models[1:], 1):
        if (m.obs_dim, m.act_dim, m.hidden) != (first.obs_dim, first.act_dim, first.hidden):
            raise ValueError(f"merge_ensembles: model {k} has different dims or hidden widths")
        for name in NormalizerStats._fields:
            if not torch.allclose(getattr(m, name), getattr(first, name)):
                raise ValueError(f"merge_ensembles: model {k} has a different normaliser ({name}); "
                                 "train every sub-ensemble with the same stats")
    losses = np.concatenate([np.asarray(h, dtype=np.float64).reshape(-1) for h in holdout_losses])
    total = sum(m.num_members for m in models)
    if losses.shape[0] != total:
        raise ValueError(f"merge_ensembles: {losses.shape[0]} holdout losses for {total} members")
    cfg = copy.copy(first.cfg)
    merged = EnsembleDynamics(first.obs_dim, first.act_dim, cfg, num_members=total)
    merged.to(first.in_mean.device)
    states = [m.state_dict() for m in models]
    new_state = merged.state_dict()
    with torch.no_grad():
        for key in new_state:
            if key.startswith("net.") or key in ("max_logvar", "min_logvar"):
                new_state[key] = torch.cat([s[key] for s in states], 0)
            elif key in NormalizerStats._fields:
                new_state[key] = states[0][key].clone()
    new_state["elite_idx"] = merged.elite_idx
    merged.load_state_dict(new_state)
    k = min(num_elites if num_elites is not None else cfg.num_elites, total)
    merged.set_elites(np.argsort(losses, kind="stable")[:k])
    return merged

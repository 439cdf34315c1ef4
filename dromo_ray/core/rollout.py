"""Branched model rollouts (Alg. 1 line 4): K start states from D, H steps of the target policy in the model.

:func:`rollout` returns numpy (what a CPU rollout worker ships to the replay actor); :func:`rollout_batch` keeps
the same transitions on the device, and :class:`LearnerRollouts` runs whole rounds on the learner's device into a
device D_model (``rollout.mode: learner``: no worker, no weight sync, no Ray round trip).

Shapes: K start rows, D_o observation dims, D_a action dims, N <= K * H transitions returned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dromo_ray.core.buffer import DeviceReplayBuffer
from dromo_ray.core.model_env import ModelEnv, model_blowup
from dromo_ray.core.nets import TanhGaussianActor
from dromo_ray.core.types import Batch, NumpyBatch

CPU_ROLLOUT_CHUNK = 2048
"""Start states rolled out together on CPU (policy and model activations stay in cache)."""


@torch.no_grad()
def rollout(model_env: ModelEnv, actor: TanhGaussianActor, start_obs: torch.Tensor, horizon: int,
            generator: torch.Generator | None = None, deterministic_policy: bool = False,
            deterministic_model: bool = False, chunk_size: int | None = None) -> NumpyBatch:
    """Roll the target policy ``actor`` (pi_theta') out for ``horizon`` steps from ``start_obs`` (K, D_o).

    A row that terminates stores its terminal transition (done = 1) and is not rolled out further; a model
    blow-up (:func:`dromo_ray.core.model_env.model_blowup`, any |s'_i| >= 100) counts as a termination in
    every env (the model env's ``done``). Returns
    every transition as float32 numpy arrays: obs (N, D_o), act (N, D_a), rew (N,), next_obs (N, D_o),
    done (N,) 0/1, unc (N,) the model env's selected signal.

    Start states are processed in chunks of ``chunk_size`` rows (default :data:`CPU_ROLLOUT_CHUNK` on CPU,
    all at once on CUDA), each rolled out for the whole horizon; rows come out chunk-major, then step-major
    (chunk 0's step-0 rows, its step-1 rows, ..., then chunk 1's). The result is deterministic for a given
    generator state and chunk size.

    Everything stays on the model's device until the end: the only host syncs are one per step to drop
    terminated rows (a boolean index) and the single transfer of the packed result.
    """
    return _unpack(rollout_chunks(model_env, actor, start_obs, horizon, generator, deterministic_policy,
                                  deterministic_model, chunk_size), model_env.obs_dim, model_env.act_dim)


@torch.no_grad()
def rollout_batch(model_env: ModelEnv, actor: TanhGaussianActor, start_obs: torch.Tensor, horizon: int,
                  generator: torch.Generator | None = None, deterministic_policy: bool = False,
                  deterministic_model: bool = False, chunk_size: int | None = None) -> Batch:
    """:func:`rollout` without leaving the device: the same transitions, in the same order, as a torch
    :class:`Batch` on ``start_obs``'s device (what learner-side rollouts write into a device D_model)."""
    chunks = rollout_chunks(model_env, actor, start_obs, horizon, generator, deterministic_policy,
                            deterministic_model, chunk_size)
    d_o, d_a = model_env.obs_dim, model_env.act_dim
    packed = torch.cat(chunks, 0) if chunks else start_obs.new_zeros(0, 2 * d_o + d_a + 3)
    cols = np.cumsum([0, d_o, d_a, 1, d_o, 1, 1])
    obs, act, rew, next_obs, done, unc = (packed[:, a:b] for a, b in zip(cols[:-1], cols[1:], strict=True))
    return Batch(obs.contiguous(), act.contiguous(), rew[:, 0].contiguous(), next_obs.contiguous(),
                 done[:, 0].contiguous(), unc[:, 0].contiguous())


def rollout_chunks(model_env: ModelEnv, actor: TanhGaussianActor, start_obs: torch.Tensor, horizon: int,
                   generator: torch.Generator | None, deterministic_policy: bool, deterministic_model: bool,
                   chunk_size: int | None) -> list[torch.Tensor]:
    """The packed rows [obs, act, rew, next_obs, done, unc] (n, 2·D_o + D_a + 3) of :func:`rollout`, per step."""
    d_o = model_env.obs_dim
    assert start_obs.dim() == 2 and start_obs.shape[1] == d_o, (
        f"rollout expects start_obs (K, {d_o}), got {tuple(start_obs.shape)}"
    )
    if horizon < 1:
        raise ValueError(f"rollout: horizon must be >= 1, got {horizon}")
    if chunk_size is None:
        chunk_size = CPU_ROLLOUT_CHUNK if start_obs.device.type == "cpu" else 0
    k = start_obs.shape[0]
    step = chunk_size if chunk_size > 0 else max(k, 1)
    chunks: list[torch.Tensor] = []
    for i in range(0, k, step):
        _rollout_chunk(model_env, actor, start_obs[i:i + step], horizon, generator, deterministic_policy,
                       deterministic_model, chunks)
    return chunks


def _rollout_chunk(model_env: ModelEnv, actor: TanhGaussianActor, obs: torch.Tensor, horizon: int,
                   generator: torch.Generator | None, deterministic_policy: bool, deterministic_model: bool,
                   chunks: list[torch.Tensor]) -> None:
    for h in range(horizon):
        act, _ = actor.sample(obs, generator=generator, deterministic=deterministic_policy)
        st = model_env.step(obs, act, generator, deterministic=deterministic_model)
        done = st.done.to(obs.dtype)
        chunks.append(torch.cat([obs, act, st.rew[:, None], st.next_obs, done[:, None], st.unc[:, None]], 1))
        if h + 1 < horizon:
            obs = st.next_obs[~st.done]
            if obs.shape[0] == 0:
                break


def _unpack(chunks: list[torch.Tensor], d_o: int, d_a: int) -> NumpyBatch:
    if not chunks:
        chunks = [torch.zeros(0, 2 * d_o + d_a + 3)]
    packed = torch.cat(chunks, 0).to("cpu", torch.float32).numpy()
    cols = np.cumsum([0, d_o, d_a, 1, d_o, 1, 1])
    obs_np, act_np, rew_np, next_np, done_np, unc_np = (
        np.ascontiguousarray(packed[:, a:b]) for a, b in zip(cols[:-1], cols[1:], strict=True)
    )
    return NumpyBatch(obs_np, act_np, rew_np[:, 0], next_np, done_np[:, 0], unc_np[:, 0])


def rollout_stats(batch: NumpyBatch, num_starts: int) -> dict[str, float]:
    """Summary of one rollout round: mean reward, fraction of the ``num_starts`` rows that terminated (the
    task's rule or a model blow-up) and that were stopped by the blow-up rule, mean uncertainty, number of
    transitions."""
    n = batch.size
    starts = max(int(num_starts), 1)
    return {
        "rollout/mean_reward": float(batch.rew.mean()) if n else 0.0,
        "rollout/frac_terminated": float(batch.done.sum()) / starts,
        "rollout/frac_blown_up": float(model_blowup(batch.next_obs).sum()) / starts,
        "rollout/mean_unc": float(batch.unc.mean()) if n else 0.0,
        "rollout/transitions": float(n),
    }


class LearnerRollouts:
    """Alg. 1 line 4 on the learner's device: every :meth:`round` rolls the target policy π_θ' (the agent's own
    ``target_actor``, so always the latest, with no weight copies) ``horizon`` steps from ``num_starts`` start
    states of D through the elite ensemble, and appends the transitions to a :class:`DeviceReplayBuffer`, which
    :meth:`sample_chunk` serves to the learner (``Learner(fetch_model_chunk=...)``).

    ``model_env`` and ``actor`` on ``device``; ``start_obs`` (N, D_o): D's observations (moved to the device once);
    ``buffer_size``: D_model's capacity; ``seed``: the device generator that draws start states, rollout noise and
    D_model samples (its state is in :meth:`state_dict`).
    """

    def __init__(self, model_env: ModelEnv, actor: TanhGaussianActor, start_obs: np.ndarray | torch.Tensor, *,
                 horizon: int, num_starts: int, buffer_size: int, device: torch.device | str, seed: int,
                 deterministic_model: bool = False) -> None:
        self.device = torch.device(device)
        self.model_env, self.actor = model_env, actor
        self.start_obs = torch.as_tensor(np.asarray(start_obs, dtype=np.float32) if not torch.is_tensor(start_obs)
                                         else start_obs, dtype=torch.float32, device=self.device)
        assert self.start_obs.dim() == 2 and self.start_obs.shape[1] == model_env.obs_dim, (
            f"LearnerRollouts: start_obs (N, {model_env.obs_dim}) expected, got {tuple(self.start_obs.shape)}")
        self.horizon, self.num_starts = int(horizon), int(num_starts)
        self.deterministic_model = bool(deterministic_model)
        self.buffer = DeviceReplayBuffer(buffer_size, model_env.obs_dim, model_env.act_dim, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.rounds = 0

    @torch.no_grad()
    def round(self) -> dict[str, float]:
        """One rollout round into D_model; returns :func:`rollout_stats` (a few host syncs per round)."""
        idx = torch.randint(self.start_obs.shape[0], (self.num_starts,), generator=self.generator,
                            device=self.device)
        batch = rollout_batch(self.model_env, self.actor, self.start_obs.index_select(0, idx), self.horizon,
                              self.generator, deterministic_model=self.deterministic_model)
        self.buffer.add(batch)
        self.rounds += 1
        stats = rollout_stats(batch, self.num_starts)
        stats.update({"replay/size": float(len(self.buffer)), "replay/added": float(self.buffer.total_added)})
        return stats

    def sample_chunk(self, num_batches: int, batch_size: int) -> Batch:
        """``num_batches`` model batches of ``batch_size`` rows from D_model, on the device."""
        return self.buffer.sample_chunk(num_batches, batch_size, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "generator": self.generator.get_state(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
        self.rounds = int(state.get("rounds", 0))

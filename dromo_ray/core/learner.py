"""The learner's inner loop (Alg. 1 lines 5-7) without any Ray: d_f batches and agent updates.

Each update draws a batch from d_f = f·d + (1-f)·ρ: ``round(f·B)`` rows from the dataset D and the rest
from the model buffer D_model (f is the weight of the dataset; see AgentConfig.f). Dataset rows are
sampled on the learner's device from tensors placed there once; model rows arrive in chunks of many
batches (one RPC per chunk in the runtime) and are sliced on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dromo_ray.core.types import Batch, MixedBatch, NumpyBatch


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the run must stop and keep its last good checkpoint."""


class DatasetSampler:
    """Uniform sampling of dataset rows on a device, driven by an explicit torch.Generator.

    arrays: NumpyBatch of N rows (obs (N, D_o), act (N, D_a), rew (N,), next_obs (N, D_o), done (N,), unc (N,)).
    """

    def __init__(self, arrays: NumpyBatch, device: torch.device, seed: int) -> None:
        self.device = device
        self.data = arrays.to_torch(device)
        self.n = self.data.obs.shape[0]
        # Indices are drawn on the CPU generator (identical streams on every device), then moved.
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(self.n, (batch_size,), generator=self.generator).to(self.device, non_blocking=True)
        return Batch(*(t.index_select(0, idx) for t in self.data))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def split_batch_size(batch_size: int, f: float) -> tuple[int, int]:
    """Rows from D and from D_model for one d_f batch (f = dataset weight)."""
    n_real = int(round(f * batch_size))
    return n_real, batch_size - n_real


class Learner:
    """Runs ``agent.update`` on d_f batches. ``fetch_model_chunk(num_batches, batch_size) -> NumpyBatch``
    supplies model rows (from the replay actor in the runtime, from a local buffer in tests)."""

    def __init__(self, agent: Any, sampler: DatasetSampler, batch_size: int, f: float,
                 fetch_model_chunk: Callable[[int, int], NumpyBatch], chunk_batches: int = 64) -> None:
        self.agent, self.sampler = agent, sampler
        self.n_real, self.n_model = split_batch_size(batch_size, f)
        self.fetch_model_chunk = fetch_model_chunk
        self.chunk_batches = chunk_batches
        self.device = sampler.device
        self.steps = 0
        self.data_wait_s = 0.0

    def _model_batches(self, n: int):
        """Yield n model batches, fetching chunks of at most ``chunk_batches`` batches."""
        remaining = n
        while remaining > 0:
            k = min(self.chunk_batches, remaining)
            if self.n_model == 0:
                for _ in range(k):
                    yield None
            else:
                t0 = time.perf_counter()
                chunk = self.fetch_model_chunk(k, self.n_model).to_torch(self.device)
                self.data_wait_s += time.perf_counter() - t0
                for i in range(k):
                    sl = slice(i * self.n_model, (i + 1) * self.n_model)
                    yield Batch(*(t[sl] for t in chunk))
            remaining -= k

    def train(self, num_updates: int) -> dict[str, float]:
        """``num_updates`` agent updates; returns the metrics averaged over them (one host sync at the end)."""
        sums: dict[str, torch.Tensor] = {}
        for model in self._model_batches(num_updates):
            real = self.sampler.sample(self.n_real)
            if model is None:
                model = Batch(*(t[:0] for t in real))
            metrics = self.agent.update(MixedBatch(real, model), sync_metrics=False)
            for k, v in metrics.items():
                sums[k] = sums[k] + v if k in sums else v.detach().clone() if torch.is_tensor(v) else v
            self.steps += 1
        out = {k: (float(v) / num_updates) for k, v in sums.items()}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"non-finite {', '.join(sorted(bad))} at learner step {self.steps}")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"agent": self.agent.state_dict(), "sampler": self.sampler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self.sampler.load_state_dict(state["sampler"])
        self.steps = int(state["steps"])


def numpy_rng_state(rng: np.random.Generator) -> str:
    """A numpy Generator's state as a JSON string (safe to store in a weights_only checkpoint)."""
    import json

    return json.dumps(rng.bit_generator.state)


def set_numpy_rng_state(rng: np.random.Generator, state: str) -> None:
    import json

    rng.bit_generator.state = json.loads(state)

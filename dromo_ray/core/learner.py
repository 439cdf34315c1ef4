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

    def draw_indices(self, batch_size: int) -> torch.Tensor:
        """The next batch's row indices (batch_size,) long, on the CPU (the stream ``sample`` uses)."""
        return torch.randint(self.n, (batch_size,), generator=self.generator)

    def sample(self, batch_size: int) -> Batch:
        idx = self.draw_indices(batch_size).to(self.device, non_blocking=True)
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
    """Runs ``agent.update`` on d_f batches. ``fetch_model_chunk(num_batches, batch_size) -> NumpyBatch`` (or a
    torch :class:`Batch`) supplies model rows (from the replay actor in the runtime, from a local buffer in tests).

    ``update_mode`` (``AgentConfig.update_mode``): ``eager`` calls ``agent.update`` per batch; ``captured`` runs
    :class:`~dromo_ray.core.agents.captured.CapturedUpdate` (one CUDA graph replay per update on CUDA, the same
    static-buffer step eagerly elsewhere) on the same batches — the dataset indices come from the same CPU
    generator in the same order, so both modes train on identical d_f batches; ``auto`` is ``captured`` on CUDA
    (falling back to ``eager``, with a warning, should the capture fail) and ``eager`` elsewhere. Metrics are read
    back once per :meth:`train` call in every mode.

    ``rollouts`` (``rollout.mode: learner``, :class:`~dromo_ray.core.rollout.LearnerRollouts`): model rollouts on
    the learner's device into a device-side D_model, one round every ``rollout_interval`` updates (Alg. 1 line 4,
    a round before the first update and whenever that D_model is empty); model rows then come from it instead of
    ``fetch_model_chunk``. Rollout time counts as data wait (the learner does not update meanwhile).

    ``data_wait_s`` is host time spent getting model rows (and rolling out). With the captured update on CUDA
    the device keeps replaying the queued updates of the previous chunk while the host fetches the next one, so
    there it is an upper bound of the device's idle time.
    """

    def __init__(self, agent: Any, sampler: DatasetSampler, batch_size: int, f: float,
                 fetch_model_chunk: Callable[[int, int], NumpyBatch | Batch] | None, chunk_batches: int = 64,
                 update_mode: str = "eager", rollouts: Any = None, rollout_interval: int = 1000) -> None:
        from dromo_ray.core.agents.captured import resolve_update_mode

        self.agent, self.sampler = agent, sampler
        self.n_real, self.n_model = split_batch_size(batch_size, f)
        self.rollouts, self.rollout_interval = rollouts, int(rollout_interval)
        if rollouts is not None:
            fetch_model_chunk = rollouts.sample_chunk
        if fetch_model_chunk is None:
            raise ValueError("Learner: fetch_model_chunk or rollouts must supply model rows")
        self.fetch_model_chunk = fetch_model_chunk
        self.chunk_batches = chunk_batches
        self.device = sampler.device
        self.update_mode = resolve_update_mode(update_mode, self.device)
        self._fallback = update_mode == "auto"
        self.captured: Any = None
        self.steps = 0
        self.data_wait_s = 0.0
        self.rollout_s = 0.0
        self._rolled_at = -1

    def _model_chunks(self, n: int):
        """Yield (k, model rows of k batches on the device, or None without model rows) for n batches, in chunks
        of at most ``chunk_batches`` batches."""
        remaining = n
        while remaining > 0:
            k = min(self.chunk_batches, remaining)
            if self.n_model == 0:
                yield k, None
            else:
                t0 = time.perf_counter()
                chunk = self.fetch_model_chunk(k, self.n_model)
                chunk = chunk.to(self.device) if isinstance(chunk, Batch) else chunk.to_torch(self.device)
                self.data_wait_s += time.perf_counter() - t0
                yield k, chunk
            remaining -= k

    def _model_batches(self, n: int):
        """Yield n model batches (None without model rows)."""
        for k, chunk in self._model_chunks(n):
            for i in range(k):
                if chunk is None:
                    yield None
                else:
                    sl = slice(i * self.n_model, (i + 1) * self.n_model)
                    yield Batch(*(t[sl] for t in chunk))

    def train(self, num_updates: int) -> dict[str, float]:
        """``num_updates`` agent updates; returns the metrics averaged over them (one host sync at the end), with
        the last learner-side rollout round's ``rollout/...`` figures when one ran."""
        sums: dict[str, Any] = {}
        stats: dict[str, float] = {}
        done = 0
        while done < num_updates:
            n = num_updates - done
            if self.rollouts is not None:
                stats = self._maybe_rollout() or stats
                n = min(n, (self.steps // self.rollout_interval + 1) * self.rollout_interval - self.steps)
            if self.update_mode == "captured" and self._captured() is not None:
                self._train_captured(n, sums)
            else:
                self._train_eager(n, sums)
            done += n
        out = {k: (float(v) / num_updates) for k, v in sums.items()}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"non-finite {', '.join(sorted(bad))} at learner step {self.steps}")
        out.update(stats)
        return out

    def _train_eager(self, n: int, sums: dict[str, Any]) -> None:
        for model in self._model_batches(n):
            real = self.sampler.sample(self.n_real)
            if model is None:
                model = Batch(*(t[:0] for t in real))
            metrics = self.agent.update(MixedBatch(real, model), sync_metrics=False)
            for k, v in metrics.items():
                sums[k] = sums[k] + v if k in sums else v.detach().clone() if torch.is_tensor(v) else v
            self.steps += 1

    def _captured(self) -> Any:
        """The captured runner, built and prepared on first use; None after an ``auto`` fallback to eager."""
        if self.captured is None:
            from dromo_ray.core.agents.captured import CapturedUpdate

            runner = CapturedUpdate(self.agent, self.sampler.data, self.n_real, self.n_model, self.chunk_batches)
            try:
                runner.prepare()
            except Exception as e:  # noqa: BLE001 - only under "auto": an explicit "captured" re-raises
                if not self._fallback:
                    raise
                import warnings

                warnings.warn(f"captured update unavailable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "running the eager update", RuntimeWarning, stacklevel=2)
                self.update_mode = "eager"
                return None
            self.captured = runner
        return self.captured

    def _train_captured(self, n: int, sums: dict[str, Any]) -> None:
        runner = self.captured
        runner.reset_sums()
        for k, model in self._model_chunks(n):
            idx = torch.cat([self.sampler.draw_indices(self.n_real) for _ in range(k)])
            runner.load_chunk(k, idx, model)
            runner.run(k)
            self.steps += k
        for key, v in runner.read_sums().items():
            sums[key] = sums[key] + v if key in sums else v

    def _maybe_rollout(self) -> dict[str, float] | None:
        """A learner-side rollout round at every multiple of ``rollout_interval`` (once), or when D_model is empty."""
        due = self.steps % self.rollout_interval == 0 and self._rolled_at != self.steps
        if not due and len(self.rollouts.buffer) > 0:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued updates are compute, not rollout time
        t0 = time.perf_counter()
        stats = self.rollouts.round()
        dt = time.perf_counter() - t0
        self.rollout_s += dt
        self.data_wait_s += dt
        self._rolled_at = self.steps
        return stats

    def state_dict(self) -> dict[str, Any]:
        state = {"agent": self.agent.state_dict(), "sampler": self.sampler.state_dict(), "steps": self.steps}
        if self.rollouts is not None:
            state["rollouts"] = self.rollouts.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self.sampler.load_state_dict(state["sampler"])
        self.steps = int(state["steps"])
        if self.rollouts is not None and "rollouts" in state:
            self.rollouts.load_state_dict(state["rollouts"])
        if self.captured is not None:
            self.captured.invalidate()  # optimizer tensors were replaced: recapture


def numpy_rng_state(rng: np.random.Generator) -> str:
    """A numpy Generator's state as a JSON string (safe to store in a weights_only checkpoint)."""
    import json

    return json.dumps(rng.bit_generator.state)


def set_numpy_rng_state(rng: np.random.Generator, state: str) -> None:
    import json

    rng.bit_generator.state = json.loads(state)

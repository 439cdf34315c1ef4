"""The captured update: a whole agent update (Alg. 1 lines 5-7) recorded once as a CUDA graph and replayed.

At batch 256 with 3×256 networks a GPU update is launch-bound: the eager update issues hundreds of small kernels
and Python calls. Here one update is ONE graph replay over static device buffers:

1. the d_f batch is gathered on the device: rows ``cursor·n_real ...`` of a static index buffer pick dataset rows
   (D already lives on the device, ``DatasetSampler.data``); rows ``cursor·n_model ...`` of a static chunk buffer
   are the D_model rows;
2. :meth:`SACAgent.update_record` runs unchanged — critic (Eq. 13), actor (Eq. 14), temperature, MOPO-auto's
   dual step, Polyak (line 7) — every action sampled from the agent's device generator, which is registered with
   the graph (``CUDAGraph.register_generator_state``): each replay draws fresh numbers exactly where an eager
   update would, and the generator's offset advances as if the update had run eagerly;
3. the loss record is added to a static metric-sum vector, read back once per :meth:`read_sums` (one host sync
   per ``Learner.train`` call, never per update); the cursor advances.

Optimizers become ``capturable`` (Adam's step counter lives on the device); a cosine actor-lr schedule becomes a
device lr tensor fed from a per-chunk schedule buffer. No algorithm needs data-dependent control flow inside an
update once the batch shapes are fixed (n_real, n_model are constants of the run; DROMO's π^f mixture is a
``torch.where``, MOBILE's elites an ``index_select``), so all six algorithms are captured whole; none needs
``torch.compile``.

What stays on the host, per chunk of k <= C updates (C = ``chunk_batches``): the dataset row indices, drawn by
the :class:`~dromo_ray.core.learner.DatasetSampler`'s CPU generator exactly as the eager path draws them (so both
paths see the same batches), the model rows of the chunk, and the lr of each step; per update only
``graph.replay()`` and the step counter.

Off CUDA there is no graph: the same static-buffer step runs eagerly (``graph=False``), which is how CI checks
that the captured path computes what the eager path computes.

Shapes: C chunk batches, n_real / n_model rows per batch from D / D_model, N dataset rows, F loss-record fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dromo_ray.core.types import Batch, MixedBatch

UPDATE_MODES = ("auto", "eager", "captured")
WARMUP_UPDATES = 3
"""Eager updates on the capture stream before capture (lazy allocations, cuBLAS workspaces); undone afterwards."""


def resolve_update_mode(mode: str, device: torch.device | str) -> str:
    """``auto`` -> ``captured`` on CUDA, ``eager`` elsewhere; ``eager`` and ``captured`` as given."""
    if mode not in UPDATE_MODES:
        raise ValueError(f"update mode {mode!r} is not one of {', '.join(UPDATE_MODES)}")
    if mode == "auto":
        return "captured" if torch.device(device).type == "cuda" else "eager"
    return mode


class CapturedUpdate:
    """Agent updates from static device buffers; one CUDA graph replay per update when ``graph`` (default: on
    CUDA), the same step run eagerly otherwise.

    ``agent``: a :class:`~dromo_ray.core.agents.sac.SACAgent` on the device; ``data``: the dataset rows on that
    device (N rows, the fields of :class:`Batch`); ``n_real`` / ``n_model``: rows of a d_f batch from D / D_model;
    ``chunk_batches``: C, the most updates one :meth:`load_chunk` feeds.

    Use: :meth:`prepare` (captures; called by :meth:`run` when needed), then per chunk :meth:`load_chunk` and
    :meth:`run`; :meth:`reset_sums` / :meth:`read_sums` around a block of updates. After the agent's state was
    replaced (``load_state_dict`` swaps optimizer tensors) call :meth:`invalidate`: the next run recaptures.
    """

    def __init__(self, agent: Any, data: Batch, n_real: int, n_model: int, chunk_batches: int,
                 graph: bool | None = None, warmup: int = WARMUP_UPDATES) -> None:
        dev = agent.device
        assert data.obs.device == dev, f"CapturedUpdate: dataset on {data.obs.device}, agent on {dev}"
        self.agent, self.data, self.device = agent, data, dev
        self.n_real, self.n_model, self.chunk = int(n_real), int(n_model), int(chunk_batches)
        self.graph = dev.type == "cuda" if graph is None else bool(graph)
        if self.graph and dev.type != "cuda":
            raise ValueError("CapturedUpdate: a CUDA graph needs a CUDA device")
        self.warmup = int(warmup)
        c = self.chunk
        self.idx = torch.zeros(c * self.n_real, dtype=torch.long, device=dev)
        self.model = Batch(*(torch.zeros((c * self.n_model, *t.shape[1:]), dtype=t.dtype, device=dev) for t in data))
        self.cursor = torch.zeros((), dtype=torch.long, device=dev)
        self.ar_real = torch.arange(self.n_real, device=dev)
        self.ar_model = torch.arange(self.n_model, device=dev)
        self.names = [f.name for f in dataclasses.fields(agent.losses_cls)]
        self.sums = torch.zeros(len(self.names), device=dev)
        self.scheduled = bool(agent.actor_lr_steps)
        self.lr_sched = torch.zeros(c, device=dev) if self.scheduled else None
        self.lr = torch.tensor(float(agent.actor_lr()), device=dev) if self.scheduled else None
        self._graph: Any = None
        self._ready = False

    # ------------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One update from the static buffers at the cursor (what the graph records)."""
        pos = self.cursor * self.n_real + self.ar_real
        rows = self.idx.index_select(0, pos)
        real = Batch(*(t.index_select(0, rows) for t in self.data))
        pos_m = self.cursor * self.n_model + self.ar_model
        model = Batch(*(t.index_select(0, pos_m) for t in self.model))
        if self.lr is not None:
            self.lr.copy_(self.lr_sched.index_select(0, self.cursor.view(1)).view(()))
        record = self.agent.update_record(MixedBatch(real, model))
        self.sums.add_(torch.stack([getattr(record, n) for n in self.names]))
        self.cursor.add_(1)

    def load_chunk(self, k: int, real_idx: torch.Tensor, model: Batch | None) -> None:
        """Feed the next k <= C updates: dataset row indices (k·n_real,) long (any device), model rows
        (k·n_model rows, any device; None when n_model = 0); the actor lr of each step from the agent's schedule.
        Writes are stream-ordered after the updates already queued, so they never race a running replay."""
        assert 0 < k <= self.chunk, f"load_chunk: 0 < k <= {self.chunk}, got {k}"
        assert real_idx.shape == (k * self.n_real,), f"load_chunk: real_idx ({k * self.n_real},) expected"
        self.idx[: k * self.n_real].copy_(real_idx)
        if self.n_model:
            assert model is not None and model.obs.shape[0] == k * self.n_model, (
                f"load_chunk: {k * self.n_model} model rows expected")
            for dst, src in zip(self.model, model, strict=True):
                dst[: k * self.n_model].copy_(src)
        if self.lr_sched is not None:
            first = self.agent.step
            lrs = torch.tensor([self.agent.actor_lr(first + i) for i in range(k)], dtype=self.lr_sched.dtype)
            self.lr_sched[:k].copy_(lrs)
        self.cursor.zero_()

    def run(self, k: int) -> None:
        """k updates from the loaded chunk (k graph replays, or k eager steps without a graph)."""
        if not self._ready:
            self.prepare()
        if self._graph is not None:
            for _ in range(k):
                self._graph.replay()
        else:
            for _ in range(k):
                self.step()
        self.agent.step += k

    def reset_sums(self) -> None:
        self.sums.zero_()

    def read_sums(self) -> dict[str, float]:
        """``{"train/<field>": sum over the updates since reset_sums}``: the one host sync."""
        return {f"train/{n}": v for n, v in zip(self.names, self.sums.tolist(), strict=True)}

    def invalidate(self) -> None:
        """The agent's tensors were replaced (a checkpoint loaded): rebuild the lr tensor and recapture."""
        self._graph = None
        self._ready = False

    # ------------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Install the device lr (cosine schedule) and, with ``graph``, capture: warm-up updates on the capture
        stream (undone bitwise, :meth:`warmup_and_restore`), then one recorded update. On failure every optimizer
        is left as it was before (not capturable) and the error propagates."""
        if self.lr is not None:
            self.lr.fill_(float(self.agent.actor_lr()))
            for group in self.agent.actor_opt.param_groups:
                group["lr"] = self.lr
        if not self.graph:
            self._ready = True
            return
        opts = self.agent.optimizers()
        try:
            for opt in opts:
                for group in opt.param_groups:
                    group["capturable"] = True
            self._capture()
        except BaseException:
            for opt in opts:
                for group in opt.param_groups:
                    group["capturable"] = False
            self._graph = None
            raise
        self._ready = True

    def _capture(self) -> None:
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.warmup_and_restore()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        for opt in self.agent.optimizers():
            opt.zero_grad(set_to_none=True)  # the graph's backward allocates (and then rewrites) every .grad
        gen = self.agent.generator
        gen_state = gen.get_state()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        with torch.cuda.graph(graph, stream=side):
            self.step()
        gen.set_state(gen_state)  # capture draws no numbers; keep the stream exactly where it was regardless
        self.cursor.zero_()
        self._graph = graph

    def warmup_and_restore(self) -> None:
        """Run ``warmup`` updates (lazy optimizer state, workspaces, library handles get created), then put every
        tensor an update writes back as it was: weights, targets, temperature, λ, optimizer moments and steps
        (state that did not exist before is zeroed: Adam's initial state), generator, cursor, metric sums."""
        snap = self._snapshot()
        try:
            for _ in range(self.warmup):
                self.cursor.zero_()  # never index past the buffers, whatever C is
                self.step()
        finally:
            self._restore(snap)

    def _mutable(self) -> tuple[list[torch.Tensor], list[torch.optim.Optimizer]]:
        a = self.agent
        tensors = [p for m in (a.actor, a.critic, a.target_actor, a.target_critic) for p in m.parameters()]
        tensors += [a.log_ent_coef, self.cursor, self.sums]
        if self.lr is not None:
            tensors.append(self.lr)
        lam = getattr(a.penalty, "log_lambda", None)
        if lam is not None:
            tensors.append(lam)
        return tensors, a.optimizers()

    def _snapshot(self) -> dict[str, Any]:
        tensors, opts = self._mutable()
        opt_state = [{id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                      for g in opt.param_groups for p in g["params"] if opt.state.get(p)} for opt in opts]
        return {"tensors": [t.detach().clone() for t in tensors], "opt": opt_state,
                "generator": self.agent.generator.get_state()}

    @torch.no_grad()
    def _restore(self, snap: dict[str, Any]) -> None:
        tensors, opts = self._mutable()
        for t, saved in zip(tensors, snap["tensors"], strict=True):
            t.copy_(saved)
        for opt, saved in zip(opts, snap["opt"], strict=True):
            for g in opt.param_groups:
                for p in g["params"]:
                    before = saved.get(id(p), {})
                    for k, v in opt.state.get(p, {}).items():
                        if torch.is_tensor(v):
                            v.copy_(before[k]) if k in before else v.zero_()
            opt.zero_grad(set_to_none=True)
        self.agent.generator.set_state(snap["generator"])

"""The twin critics' forward and backward written out by hand (one autograd node for the whole MLP).

Numerically the same function as ``TwinCritic.forward`` (E members evaluated together, one batched matmul per
layer), but with the work a generic autograd graph wastes on CPU removed, as measured on the learner bench:

- the 256 -> 1 output layer: ``bmm`` with an output width of 1 runs as a slow batched GEMV (forward, input
  gradient and weight gradient together cost about as much as a tenth of a hidden layer); here it is a
  transposed bmm (forward, weight gradient) and a broadcast product (input gradient), 10-20x faster;
- ReLU in place on the ``baddbmm`` output, and its backward in place on the incoming gradient (no allocation
  and one memory pass less per layer).

Shapes: E members, N rows, H hidden width. Only ReLU MLPs built by ``EnsembleMLP`` are handled; anything else
falls back to the module's own forward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from dromo_ray.core.nets import TwinCritic


class Workspace:
    """Activation and gradient buffers of (E, N, H) reused across updates, keyed by name and shape.

    A large fresh tensor on CPU is fresh pages: glibc hands freed blocks of several MB back to the kernel, and
    the next update page-faults them in again (about 11k faults, a tenth of the time, per DROMO update at the
    reference sizes). Buffers saved for backward are protected by autograd's version counter: should a graph
    still be alive when its buffers are written again, its backward raises instead of returning wrong gradients.
    Weight and input gradients are never pooled (autograd may keep them as ``.grad``).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (name, shape, like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def clear(self) -> None:
        self._bufs.clear()


class _EnsembleReluMLP(torch.autograd.Function):
    """x (E, N, D_in) -> (E, N, 1) through ReLU layers ``W_i (E, D_i, D_i+1)``, ``b_i (E, 1, D_i+1)`` and an output
    layer ``W_out (E, H, 1)``, ``b_out (E, 1, 1)``; params = (W_1, b_1, ..., W_out, b_out)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ws: Workspace | None, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hs = [x]
        h = x
        e, n = x.shape[0], x.shape[1]
        for i in range(0, len(params) - 2, 2):
            w, b = params[i], params[i + 1]
            out = None if ws is None else ws.get(f"h{i // 2}", (e, n, w.shape[-1]), w)
            h = torch.baddbmm(b, h, w, out=out).relu_() if out is not None else torch.baddbmm(b, h, w).relu_()
            hs.append(h)
        w_out, b_out = params[-2], params[-1]
        # (E, 1, H) @ (E, H, N) -> (E, 1, N): a fast GEMV on the transposed view, then (E, N, 1).
        q = torch.baddbmm(b_out, w_out.transpose(1, 2), h.transpose(1, 2)).transpose(1, 2)
        ctx.save_for_backward(*hs, *params)
        ctx.num_hidden = len(hs) - 1
        ctx.ws = ws
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, dq: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        nh, ws = ctx.num_hidden, ctx.ws
        hs, params = saved[: nh + 1], saved[nh + 1:]
        grads: list[torch.Tensor | None] = [None] * len(params)
        need_w = any(ctx.needs_input_grad[2:])  # False in the actor step: gradients to the actions only
        w_out = params[-2]
        if need_w:
            grads[-2] = torch.bmm(dq.transpose(1, 2), hs[-1]).transpose(1, 2)  # (E, 1, N) @ (E, N, H) -> (E, H, 1)
            grads[-1] = dq.sum(1, keepdim=True)  # (E, 1, 1)
        # dq ⊗ w_out: the output layer's input gradient, as a broadcast product
        shape = hs[-1].shape
        g = torch.mul(dq, w_out.transpose(1, 2), out=ws.get("g0", shape, dq)) if ws is not None else \
            dq * w_out.transpose(1, 2)
        for layer in range(nh - 1, -1, -1):
            torch.ops.aten.threshold_backward.grad_input(g, hs[layer + 1], 0.0, grad_input=g)  # ReLU bwd, in place
            w = params[2 * layer]
            if need_w:
                grads[2 * layer] = torch.bmm(hs[layer].transpose(1, 2), g)
                grads[2 * layer + 1] = g.sum(1, keepdim=True)
            if layer > 0:
                shape = hs[layer].shape
                out = ws.get(f"g{layer % 2 + 1}", shape, g) if ws is not None else None
                g = torch.bmm(g, w.transpose(1, 2), out=out) if out is not None else torch.bmm(g, w.transpose(1, 2))
            elif ctx.needs_input_grad[0]:
                g = torch.bmm(g, w.transpose(1, 2))  # (E, N, D_in), fresh: autograd carries it on
        dx = g if ctx.needs_input_grad[0] else None
        return (dx, None, *grads)


def _fusable(critic: TwinCritic) -> bool:
    net = critic.net
    return getattr(net, "act", None) is F.relu and net.out.out_features == 1


def twin_q(critic: TwinCritic, obs: torch.Tensor, act: torch.Tensor, workspace: Workspace | None = None
           ) -> torch.Tensor:
    """Q_1..Q_E at (obs (..., D_o), act (..., D_a)) -> (E, ...); the same values as ``critic(obs, act)``.

    With a ``workspace`` the large intermediate buffers are reused from call to call: the graph of the previous
    call that used the same buffers must have been backpropagated (or dropped) first.
    """
    if not _fusable(critic):
        return critic(obs, act)
    net = critic.net
    lead = obs.shape[:-1]
    x = torch.cat([obs, act], -1).reshape(1, -1, obs.shape[-1] + act.shape[-1]).expand(critic.num_q, -1, -1)
    params: list[torch.Tensor] = []
    for layer in [*net.layers, net.out]:
        params += [layer.weight, layer.bias]
    q = _EnsembleReluMLP.apply(x, workspace, *params)
    return q.reshape(critic.num_q, *lead)

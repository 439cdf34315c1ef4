"""One place that sets torch's thread counts for a process.

On a 2-core machine, two busy processes each running OpenMP with the default thread count
busy-wait against each other and lose 10-50x throughput. Every entry point (CLI, Ray actor,
benchmark) calls :func:`set_torch_threads` once at start.
"""

from __future__ import annotations

import os

import torch

_DONE: list[int] = []


def set_torch_threads(n: int = 1) -> int:
    """Set intra-op threads to ``n`` (and inter-op to 1 once per process); returns ``n``."""
    n = max(1, int(n))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    torch.set_num_threads(n)
    if not _DONE:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once work started in this process
            pass
        _DONE.append(n)
    return n

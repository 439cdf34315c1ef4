"""Shared benchmark helpers: the machine's measured fp32 matmul peak and result printing."""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_peak_gflops(device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 GEMM throughput (GFLOP/s) of an n x n x n matmul, measured on this device now."""
    if device.type == "cuda":
        n = max(n, 4096)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if iters % 4 == 0:
            sync(device)
            if time.perf_counter() - t0 > seconds:
                break
    dt = time.perf_counter() - t0
    return 2.0 * n**3 * iters / dt / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def emit(result: dict[str, Any], as_json: bool, title: str) -> None:
    """Print a result dict as JSON or as an aligned table."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(title)
    width = max(len(k) for k in result)
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:,.2f}"
        print(f"  {k:<{width}}  {v}")


def resolve_device(name: str) -> torch.device:
    """The benchmark's device; a CUDA request without a usable GPU is a one-line user error, not a traceback."""
    device = torch.device(name or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        from dromo_ray.cli import UserError

        built = "with" if torch.backends.cuda.is_built() else "without"
        raise UserError(f"--device {name}: no usable CUDA GPU (torch {torch.__version__} was built {built} CUDA)")
    return device

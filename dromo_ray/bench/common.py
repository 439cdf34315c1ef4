"""Shared benchmark helpers: the machine's measured fp32 matmul peak and result printing."""

from __future__ import annotations

import json
import math
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


def _user_error(msg: str) -> Exception:
    from dromo_ray.errors import UserError

    return UserError(msg)


def check_at_least(flag: str, value: float | None, minimum: float, *, exclusive: bool = False) -> None:
    """A one-line user error naming ``flag`` unless ``value`` is a finite number >= ``minimum`` (> when
    ``exclusive``); None (the flag's default meaning "automatic") passes."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > minimum if exclusive else value >= minimum)
    if not ok:
        raise _user_error(f"{flag}: must be {'>' if exclusive else '>='} {minimum:g}, got {value:g}")


def resolve_device(name: str) -> torch.device:
    """The benchmark's device: ``cpu``, ``cuda`` or ``cuda:N``. Anything else, or a CUDA request without that
    GPU, is a one-line user error, not a traceback."""
    try:
        device = torch.device(name or "cpu")
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise _user_error(f"--device {name}: unknown device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "with" if torch.backends.cuda.is_built() else "without"
        raise _user_error(f"--device {name}: no usable CUDA GPU (torch {torch.__version__} was built {built} CUDA)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise _user_error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device

"""Shared test setup: one torch thread per process (2-core CI), fixtures for small real datasets."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from dromo_ray.core.threads import set_torch_threads  # noqa: E402

set_torch_threads(1)

"""Imports point inward: core never pulls Ray, MLflow, Tune or YAML; runtime never pulls MLflow or Tune."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(import_stmt: str) -> set[str]:
    code = f"import sys; {import_stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_core_imports_no_ray_mlflow_yaml():
    import pkgutil

    import dromo_ray.core as core

    names = [f"dromo_ray.core.{m.name}" for m in pkgutil.walk_packages(core.__path__, prefix="")]
    stmt = "; ".join(f"import {n}" for n in names)
    mods = _modules_after(stmt)
    assert not mods & {"ray", "mlflow", "yaml", "gymnasium"}, mods & {"ray", "mlflow", "yaml", "gymnasium"}


def test_runtime_imports_no_mlflow_or_tune():
    code = (
        "import sys, dromo_ray.runtime.driver, dromo_ray.runtime.actors, dromo_ray.runtime.loop, "
        "dromo_ray.runtime.pipeline, dromo_ray.runtime.resources, dromo_ray.runtime.cluster; "
        "print(any(m == 'mlflow' or m.startswith('mlflow.') for m in sys.modules)); "
        "print(any(m.startswith('ray.tune') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]

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


# ---- every import, lazy ones included (an AST walk over the package) ------------------------------------------

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[2] / "dromo_ray"

FLOORS = {"errors": 0, "ui": 0, "__init__": 0, "core": 1, "theory": 2, "data": 2, "runtime": 3, "config": 4,
          "tracking": 4, "rllib": 4, "train": 4, "report": 4, "plots": 4, "sweep": 4, "bench": 4, "demo": 4,
          "cli": 5}
"""The house, ground floor first: errors and ui (import nothing of the project) <- core (numpy + torch only) <-
data, theory <- runtime (Ray actors) <- the edges (config files, tracking, RLlib, train, report, sweep, bench,
demo) <- cli. A module may import its own floor and the floors below; no two modules may import each other,
directly or round a circle (test_no_import_circle)."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``dromo_ray`` module that ``path`` imports, at any depth of the file (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "dromo_ray"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "dromo_ray":
                continue
            # ``from dromo_ray.x import y``: y may itself be a module (dromo_ray.x.y)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((sub if _exists(sub) else mod, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            name = str(node.args[0].value)
            if name.startswith("dromo_ray"):
                found.append((name, node.lineno))
    return found


def _exists(module: str) -> bool:
    p = PACKAGE.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _floor(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in FLOORS, f"{module}: a module the layer map does not know (add it to FLOORS)"
    return top, FLOORS[top]


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_inward():
    wrong = []
    for mod, imports in _graph().items():
        top, floor = _floor(mod)
        for target, line in imports:
            ttop, tfloor = _floor(target)
            if tfloor > floor or (top == "core" and ttop not in ("core", "errors", "__init__")) or \
                    (ttop == "theory" and top != "theory"):
                wrong.append(f"{mod}:{line} imports {target}")
    assert not wrong, "imports that point outward:\n" + "\n".join(wrong)


def test_no_import_circle():
    graph = {m: sorted({t if t in _graph_nodes() else t.rsplit(".", 1)[0] for t, _ in imps} - {m})
             for m, imps in _graph().items()}
    order: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:  # depth-first; a grey node met again closes a circle
        order[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if order.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in order:
                visit(t)
        stack.pop()
        order[m] = 2

    for m in graph:
        if m not in order:
            visit(m)


def _graph_nodes() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("*.py")}


def test_only_the_cli_parses_arguments():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module_name(path)
        if mod.startswith("dromo_ray.cli"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "argparse" or n.startswith("dromo_ray.cli") for n in names):
                offenders.append(f"{mod}:{node.lineno}")
    assert not offenders, f"argparse or dromo_ray.cli imported outside cli/: {offenders}"

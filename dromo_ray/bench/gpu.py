"""``dromo-ray bench gpu``: issue #14's prepared GPU check, one call of at most ~5 minutes on an H100/H200.

Stages, each written to the JSON file as soon as it is done (a check cut short still leaves what it measured):

1. ``equality``: for every algorithm, two learners built from the same seeds train on the same batches, one with
   the eager update, one with the captured one (a CUDA graph replay per update); the max abs difference over
   every tensor an update writes (weights, targets, temperature, λ, Adam moments) after ``EQUAL_UPDATES`` updates,
   against :data:`TOLERANCE` (capturable Adam computes its bias corrections on the device in fp32, so the two
   differ by rounding, not by algorithm);
2. ``learner``: the learner bench (:func:`~dromo_ray.bench.learner.measure_learner`) of every algorithm at the
   reference sizes (batch 256, 3×256 networks, M = 10), eager and captured: updates/s, the ratio, wait fraction;
3. ``pipeline``: the pipeline bench (:func:`~dromo_ray.bench.pipeline.measure_pipeline`, DROMO) with learner-side
   rollouts, and with CPU rollout workers when Ray is installed (skipped, with the reason, otherwise).

``quick`` shrinks every size (tiny networks, a few updates) so that the same code path runs on CPU in the test
suite; its figures mean nothing. A stage past the time budget is skipped, a stage that fails records its error.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dromo_ray.bench.common import device_name, resolve_device
from dromo_ray.core.config import AGENT_ALGORITHMS

EQUAL_UPDATES = 20
"""Updates of the graphed == eager check (several chunks' worth of replays: chunks of 64 are cut at 8 here)."""
TOLERANCE = 1e-4
"""Max abs difference allowed between graphed and eager tensors after the check's updates (CUDA); on CPU the
static-buffer step must agree to within a cosine lr's float32 rounding."""
LEARNER_STEPS = {"eager": 300, "captured": 2000}
"""Timed updates per round of the learner bench, per mode (captured runs ~10x faster)."""
PIPELINE_STEPS = 2000
"""Timed learner updates of the pipeline bench (8 learner-side rollout rounds at its interval of 250)."""


def agent_tensors(agent: Any) -> dict[str, torch.Tensor]:
    """Every tensor an update writes, by name: networks and targets, temperature, λ, optimizer moments and steps."""
    state = agent.state_dict()
    out: dict[str, torch.Tensor] = {}
    for net in ("actor", "critic", "target_actor", "target_critic"):
        out.update({f"{net}.{k}": v for k, v in state[net].items()})
    out["log_ent_coef"] = state["log_ent_coef"]
    opts = {"actor_opt": state["actor_opt"], "critic_opt": state["critic_opt"], "ent_opt": state["ent_opt"],
            "penalty_opt": state["penalty"].get("opt")}
    for name, opt in opts.items():
        for pid, st in (opt or {}).get("state", {}).items():
            out.update({f"{name}.{pid}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    if "log_lambda" in state["penalty"]:
        out["log_lambda"] = state["penalty"]["log_lambda"]
    return out


def check_equal(algo: str, device: torch.device, *, updates: int, batch: int, hidden: tuple[int, ...],
                rows: int) -> dict[str, Any]:
    """Eager vs captured learners from the same seeds on the same batches: max abs difference of their tensors."""
    from dromo_ray.bench.learner import learner_core

    eager, _ = learner_core(algo, device, batch=batch, hidden=hidden, update_mode="eager", rows=rows,
                            chunk_batches=8)
    captured, _ = learner_core(algo, device, batch=batch, hidden=hidden, update_mode="captured", rows=rows,
                               chunk_batches=8)
    m_e, m_c = eager.train(updates), captured.train(updates)
    a, b = agent_tensors(eager.agent), agent_tensors(captured.agent)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    metric_diff = max(abs(m_e[k] - m_c[k]) for k in m_e)
    graph = bool(captured.captured is not None and captured.captured.graph)
    ok = a.keys() == b.keys() and math.isfinite(diff) and diff <= TOLERANCE and captured.update_mode == "captured"
    return {"max_abs_diff": diff, "max_metric_diff": metric_diff, "tensors": len(a), "updates": updates,
            "graph": graph, "tolerance": TOLERANCE, "ok": bool(ok)}


def run_gpu_check(*, device: str = "cuda", out: str | Path = "gpu_check.json", quick: bool = False,
                  budget_s: float = 270.0, algorithms: tuple[str, ...] = AGENT_ALGORITHMS,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three stages (module docstring) on ``device`` and write ``out`` (JSON) after each; returns the
    report, whose ``passed`` is True when every algorithm's graphed == eager check held. A device that cannot work
    (``cuda`` without CUDA, ``tpu``) is a UserError."""
    from dromo_ray.bench.learner import measure_learner
    from dromo_ray.bench.pipeline import measure_pipeline

    dev = resolve_device(device)
    t0 = time.perf_counter()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = dict(batch=32, hidden=(32, 32), rows=2000) if quick else dict(batch=256, hidden=(256, 256, 256),
                                                                          rows=100_000)
    report: dict[str, Any] = {
        "device": device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda, "quick": quick,
        "sizes": {"batch": sizes["batch"], "hidden": list(sizes["hidden"]), "num_actions": 10},
        "equality": {}, "learner": {}, "pipeline": {}, "passed": False,
    }

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t0, 2)
        path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))

    def guarded(section: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if time.perf_counter() - t0 > budget_s:
            section[key] = {"skipped": f"time budget of {budget_s:g} s spent"}
            log(f"  {key}: skipped (time budget)")
            save()
            return None
        try:
            section[key] = fn()
        except Exception as e:  # noqa: BLE001 - recorded, and the remaining stages still run
            section[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            log(f"  {key}: error {section[key]['error']}")
        save()
        return section[key] if "error" not in section[key] else None

    log(f"bench gpu on {report['device']} (torch {torch.__version__}); writing {path}")
    save()
    log("1. graphed == eager (max abs difference of every tensor an update writes)")
    for algo in algorithms:
        r = guarded(report["equality"], algo, lambda a=algo: check_equal(
            a, dev, updates=3 if quick else EQUAL_UPDATES, batch=sizes["batch"], hidden=sizes["hidden"],
            rows=sizes["rows"]))
        if r is not None:
            log(f"  {algo:<10} {r['max_abs_diff']:.3g} over {r['tensors']} tensors, graph={r['graph']}: "
                f"{'ok' if r['ok'] else 'DIFFERENT'}")
    log("2. learner bench (updates/s, eager and captured)")
    for algo in algorithms:
        def bench(a: str = algo) -> dict[str, Any]:
            res: dict[str, Any] = {}
            for mode in ("eager", "captured"):
                steps = 3 if quick else LEARNER_STEPS[mode]
                m = measure_learner(algo=a, device=str(dev), batch=sizes["batch"], steps=steps,
                                    threads=1 if quick else 0, update_modes=(mode,), hidden=sizes["hidden"], peak=False,
                                    warmup=2 if quick else 10, rounds=1 if quick else 3)
                res.update({k: v for k, v in m.items() if k.startswith(mode)})
                res.update({k: m[k] for k in ("gflop_per_update", "critic_rows_per_update", "threads")})
                if mode == "captured":
                    res["captured_graph"] = m["captured_graph"]
            res["captured_vs_eager"] = res["captured_updates_per_s"] / res["eager_updates_per_s"]
            return res

        r = guarded(report["learner"], algo, bench)
        if r is not None:
            log(f"  {algo:<10} captured {r['captured_updates_per_s']:,.0f}/s, eager {r['eager_updates_per_s']:,.0f}/s "
                f"(x{r['captured_vs_eager']:.1f}), wait {100 * r['captured_wait_fraction']:.2f}%")
    log(f"3. pipeline bench ({'MBPO' if quick else 'DROMO'})")
    for mode in ("learner", "workers"):
        def pipe(m: str = mode) -> dict[str, Any]:
            if m == "workers":
                if quick:
                    return {"skipped": "quick mode"}
                try:
                    import ray  # noqa: F401
                except ImportError:
                    return {"skipped": "Ray is not installed here"}
            return measure_pipeline(algo="mbpo" if quick else "dromo", steps=10 if quick else PIPELINE_STEPS,
                                    device=str(dev), rollout_mode=m,
                                    **({"starts_per_round": 200, "warmup": 2, "interval": 5} if quick else {}))

        r = guarded(report["pipeline"], mode, pipe)
        if r is not None:
            log(f"  {mode:<10} " + ", ".join(f"{k}={v}" for k, v in r.items()
                                             if "per_s" in k or "wait" in k or k == "skipped"))
    report["passed"] = bool(report["equality"]) and all(r.get("ok") for r in report["equality"].values())
    save()
    log(f"done in {report['elapsed_s']} s: graphed == eager {'held' if report['passed'] else 'DID NOT hold'} "
        f"for every algorithm; {path}")
    return report

"""``dromo-ray report --experiment NAME``: result tables and learning curves from MLflow (edge layer).

Protocol (the same for every algorithm, stated in every table written):

- A run's score is its ``final/normalized_score`` metric, which ``train`` logs at the end of the run: the mean
  D4RL normalized score (100 * (return - random) / (expert - random)) of its last N evaluations, where
  N = ``train.final_score_last_n`` (each evaluation averages ``train.eval_episodes`` episodes). Never the best
  evaluation.
- Only FINISHED runs that logged that metric count; runs still running, failed, killed or stopped early by a
  scheduler are listed as excluded, with the reason.
- Runs are grouped by (algorithm, dataset, variant), where the variant is what a sweep searched besides the
  seed (the ``sweep.variant`` tag; empty for plain ``train`` runs). A group's entry is the mean ± standard
  deviation over its runs (its seeds); the standard deviation is the population one (numpy's default, ddof=0).
- Beside the score: the return (``final/return``, the same last N evaluations), the behaviour score of the dataset
  (the D4RL normalized score of its own episodes, read from the dataset the run names in ``data.dataset`` when
  it is on this machine: a file, or a D4RL name in ``$D4RL_DATASET_DIR``), the learner updates the score was
  logged at, the wall time (``perf/total_wall_s``) and the learner's device (the ``learner_device`` tag).
- Learning curves plot ``eval/normalized_score`` against learner updates: per group the mean over runs at each
  evaluated step, shaded ± one standard deviation. A step logged twice (a resumed run repeats the updates after
  its last checkpoint) counts once, with its latest value.
- DROMO's diagnostic ``train/variance_to_bellman`` (Eq. 13's variance term over the Bellman term, per logged
  update) is plotted per dataset on a log scale and tabulated at the first, middle and last logged step.

Outputs in ``--out``: ``results.md``, ``results.csv``, ``curves_<dataset>.png`` and ``variance_<dataset>.png``; when
every counted run belongs to one sweep, the same files are logged as artifacts of the sweep's parent run (under
``report/``).
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORE_KEY = "final/normalized_score"
RETURN_KEY = "final/return"
WALL_KEY = "perf/total_wall_s"
CURVE_KEY = "eval/normalized_score"
VARIANCE_KEY = "train/variance_to_bellman"
ARTIFACT_DIR = "report"


@dataclass
class RunRecord:
    run_id: str
    algorithm: str
    dataset: str
    variant: str
    seed: str
    score: float
    last_n: str
    parent_run_id: str | None
    curve: list[tuple[int, float]] = field(default_factory=list)
    final_return: float = math.nan
    updates: int | None = None
    """The learner step ``final/normalized_score`` was logged at: the run's last update."""
    wall_s: float = math.nan
    device: str = "?"
    dataset_path: str = ""
    variance_ratio: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Row:
    algorithm: str
    dataset: str
    variant: str
    n: int
    seeds: list[str]
    mean: float
    std: float
    min: float
    max: float
    last_n: str
    scores: list[float]
    run_ids: list[str]
    return_mean: float = math.nan
    behavior_score: float = math.nan
    """The dataset's own D4RL normalized score (NaN when its file is not on this machine)."""
    updates: str = "?"
    wall_s_mean: float = math.nan
    device: str = "?"

    def label(self) -> str:
        return f"{self.algorithm} [{self.variant}]" if self.variant else self.algorithm

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _error(msg: str) -> Exception:
    from dromo_ray.errors import UserError

    return UserError(msg)


def resolve_uri(cli_uri: str | None) -> str:
    """--tracking-uri, else the store ``train`` and ``sweep`` default to (``tracking.default_tracking_uri``:
    $MLFLOW_TRACKING_URI, else ./dromo_runs/mlflow.db), which a reader requires to exist."""
    from dromo_ray.core.config import ExperimentConfig
    from dromo_ray.tracking import default_tracking_uri, sqlite_path

    if cli_uri:
        return cli_uri
    uri = default_tracking_uri(ExperimentConfig.__dataclass_fields__["out_dir"].default, create=False)
    db = sqlite_path(uri)
    if db is not None and not db.exists() and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise _error(f"no MLflow store at {db} (the default of `train` and `sweep`); pass --tracking-uri")
    return uri


def _search_all(client: Any, experiment_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _curve(client: Any, run_id: str, key: str = CURVE_KEY) -> list[tuple[int, float]]:
    """A metric by step (eval/normalized_score by default); a step logged twice keeps its latest value (by
    timestamp)."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, float(m.value))
    return [(s, v) for s, (_, v) in sorted(latest.items())]


def collect_runs(client: Any, experiment_id: str) -> tuple[list[RunRecord], list[dict[str, str]]]:
    """The experiment's counted runs and the excluded ones (with the reason)."""
    records, excluded = [], []
    for run in _search_all(client, experiment_id):
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get("sweep.role") == "parent" or "algorithm" not in tags:
            continue
        name = tags.get("mlflow.runName", run.info.run_id)
        if run.info.status != "FINISHED":
            reason = f"status {run.info.status}" + (" (stopped early by the scheduler)"
                                                   if tags.get("sweep.stopped_early") == "true" else "")
            excluded.append({"run_id": run.info.run_id, "run_name": name, "reason": reason})
            continue
        score = metrics.get(SCORE_KEY)
        if score is None or math.isnan(score):
            excluded.append({"run_id": run.info.run_id, "run_name": name, "reason": f"no {SCORE_KEY}"})
            continue
        final = client.get_metric_history(run.info.run_id, SCORE_KEY)
        records.append(RunRecord(
            run_id=run.info.run_id, algorithm=tags["algorithm"], dataset=tags.get("dataset", "?"),
            variant=tags.get("sweep.variant", ""), seed=tags.get("seed", "?"), score=float(score),
            last_n=run.data.params.get("train.final_score_last_n", "?"),
            parent_run_id=tags.get("mlflow.parentRunId"), curve=_curve(client, run.info.run_id),
            final_return=float(metrics.get(RETURN_KEY, math.nan)),
            updates=int(max(final, key=lambda m: m.timestamp).step) if final else None,
            wall_s=float(metrics.get(WALL_KEY, math.nan)), device=tags.get("learner_device", "?"),
            dataset_path=run.data.params.get("data.dataset", ""),
            variance_ratio=_curve(client, run.info.run_id, VARIANCE_KEY) if VARIANCE_KEY in metrics else []))
    return records, excluded


def behavior_scores(records: list[RunRecord]) -> dict[str, float]:
    """dataset tag -> the D4RL normalized score of the dataset's own episodes, for every dataset the runs'
    ``data.dataset`` parameter finds on this machine (a file, or a D4RL name in ``$D4RL_DATASET_DIR``, as
    ``train`` resolves it); read once per dataset."""
    from dromo_ray.data.info import dataset_info
    from dromo_ray.data.load import load_dataset, resolve_dataset
    from dromo_ray.errors import DatasetError

    out: dict[str, float] = {}
    for r in records:
        if r.dataset in out or not r.dataset_path:
            continue
        try:
            spec = resolve_dataset(r.dataset_path)
        except DatasetError:
            continue
        try:
            out[r.dataset] = float(dataset_info(load_dataset(spec))["normalized_score"])
        except Exception:  # noqa: BLE001 - an unreadable file leaves the column empty, never fails the report
            continue
    return out


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _one(values: set[str]) -> str:
    return values.pop() if len(values) == 1 else ("mixed" if values else "?")


def summarize(records: list[RunRecord], behavior: dict[str, float] | None = None) -> list[Row]:
    import numpy as np

    behavior = behavior or {}
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.algorithm, r.dataset, r.variant), []).append(r)
    rows = []
    for (algo, ds, variant), rs in groups.items():
        rs = sorted(rs, key=lambda r: (_seed_key(r.seed), r.run_id))
        scores = np.array([r.score for r in rs], dtype=np.float64)
        last_ns = {r.last_n for r in rs}
        rows.append(Row(algo, ds, variant, len(rs), [r.seed for r in rs], float(scores.mean()), float(scores.std()),
                        float(scores.min()), float(scores.max()), last_ns.pop() if len(last_ns) == 1 else "mixed",
                        [float(s) for s in scores], [r.run_id for r in rs],
                        return_mean=_mean([r.final_return for r in rs]),
                        behavior_score=behavior.get(ds, math.nan),
                        updates=_one({str(r.updates) for r in rs if r.updates is not None}),
                        wall_s_mean=_mean([r.wall_s for r in rs]), device=_one({r.device for r in rs})))
    rows.sort(key=lambda r: (r.dataset, -r.mean, r.algorithm, r.variant))
    return rows


def _seed_key(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.isdigit() else (1 << 30, seed)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def _f(x: float, fmt: str) -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def variance_points(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The first, middle and last logged (step, variance term / Bellman term) of a run."""
    if not curve:
        return []
    idx = sorted({0, len(curve) // 2, len(curve) - 1})
    return [curve[i] for i in idx]


def write_markdown(rows: list[Row], path: Path, experiment: str, excluded: list[dict[str, str]],
                   records: list[RunRecord] | None = None) -> Path:
    lines = [f"# Results: MLflow experiment `{experiment}`", "",
             "Score of a run: its `final/normalized_score`, the mean D4RL normalized score of its last N evaluations "
             "(N = `train.final_score_last_n`), never the best one. Entries: mean ± standard deviation over runs "
             "(seeds; population std, ddof=0). Only FINISHED runs count. Return: `final/return` (the same "
             "evaluations); behaviour: the dataset's own episodes, D4RL normalized; updates: learner updates at the "
             "score; wall: the run's wall time, mean over runs.", "",
             "| algorithm | dataset | variant | runs | seeds | N | normalized score | return | behaviour | updates "
             "| wall (min) | device | min | max |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.algorithm} | {r.dataset} | {r.variant or '-'} | {r.n} | {', '.join(r.seeds)} | "
                     f"{r.last_n} | {_pm(r.mean, r.std)} | {_f(r.return_mean, '.1f')} | "
                     f"{_f(r.behavior_score, '.2f')} | {r.updates} | {_f(r.wall_s_mean / 60.0, '.1f')} | "
                     f"{r.device} | {r.min:.2f} | {r.max:.2f} |")
    datasets = sorted({r.dataset for r in rows})
    labels = sorted({r.label() for r in rows})
    if rows and len(labels) > 1:
        cell = {(r.dataset, r.label()): f"{_pm(r.mean, r.std)} ({r.n})" for r in rows}
        lines += ["", "## Side by side (mean ± std (runs))", "", "| dataset | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for ds in datasets:
            lines.append(f"| {ds} | " + " | ".join(cell.get((ds, lab), "-") for lab in labels) + " |")
    with_ratio = [r for r in records or [] if r.variance_ratio]
    if with_ratio:
        lines += ["", f"## DROMO: variance term / Bellman term (`{VARIANCE_KEY}`)", "",
                  "At the first, middle and last logged update of each run.", "",
                  "| run | dataset | seed | step: ratio |", "|---|---|---|---|"]
        for r in sorted(with_ratio, key=lambda r: (r.dataset, r.algorithm, r.variant, _seed_key(r.seed))):
            pts = ", ".join(f"{s}: {v:.3g}" for s, v in variance_points(r.variance_ratio))
            label = f"{r.algorithm} [{r.variant}]" if r.variant else r.algorithm
            lines.append(f"| {label} | {r.dataset} | {r.seed} | {pts} |")
    if excluded:
        lines += ["", f"## Excluded runs ({len(excluded)})", ""]
        lines += [f"- `{e['run_name']}` ({e['run_id']}): {e['reason']}" for e in excluded]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(rows: list[Row], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "dataset", "variant", "runs", "seeds", "last_n", "mean", "std", "min", "max",
                    "scores", "run_ids", "return_mean", "behavior_score", "updates", "wall_s_mean", "device"])
        for r in rows:
            w.writerow([r.algorithm, r.dataset, r.variant, r.n, " ".join(r.seeds), r.last_n, repr(r.mean),
                        repr(r.std), repr(r.min), repr(r.max), " ".join(repr(s) for s in r.scores),
                        " ".join(r.run_ids), repr(r.return_mean), repr(r.behavior_score), r.updates,
                        repr(r.wall_s_mean), r.device])
    return path


def curve_stats(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[int]]:
    """Steps, mean, std (ddof=0) and the number of runs at each step that any run evaluated."""
    import numpy as np

    by_step: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            by_step.setdefault(int(s), []).append(v)
    steps = sorted(by_step)
    return (steps, [float(np.mean(by_step[s])) for s in steps], [float(np.std(by_step[s])) for s in steps],
            [len(by_step[s]) for s in steps])


def plot_curves(records: list[RunRecord], rows: list[Row], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    by_id = {r.run_id: r for r in records}
    for ds in sorted({r.dataset for r in rows}):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = False
        for row in [r for r in rows if r.dataset == ds]:
            steps, mean, std, _ = curve_stats([by_id[i].curve for i in row.run_ids if by_id[i].curve])
            if not steps:
                continue
            m, s = np.asarray(mean), np.asarray(std)
            (line,) = ax.plot(steps, m, marker="o", markersize=3, label=f"{row.label()} (n={row.n})")
            ax.fill_between(steps, m - s, m + s, color=line.get_color(), alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.grid(alpha=0.3)
        paths.append(_save(fig, ax, f"{ds}: evaluation score (mean ± std over runs)", "D4RL normalized score",
                           out / f"curves_{_safe(ds)}.png"))
    return paths


def _save(fig: Any, ax: Any, title: str, ylabel: str, path: Path) -> Path:
    """Title, axis labels and legend of a report figure against learner updates; written to ``path``, closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_xlabel("learner updates")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_variance(records: list[RunRecord], out: Path) -> list[Path]:
    """``variance_<dataset>.png``: train/variance_to_bellman against learner updates, one line per run (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for ds in sorted({r.dataset for r in records if r.variance_ratio}):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for r in sorted((r for r in records if r.dataset == ds and r.variance_ratio),
                        key=lambda r: (r.algorithm, r.variant, _seed_key(r.seed))):
            label = (f"{r.algorithm} [{r.variant}]" if r.variant else r.algorithm) + f" s{r.seed}"
            ax.plot([s for s, _ in r.variance_ratio], [max(v, 1e-12) for _, v in r.variance_ratio], label=label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(fig, ax, f"{ds}: DROMO variance term / Bellman term", "variance term / Bellman term",
                           out / f"variance_{_safe(ds)}.png"))
    return paths


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def build_report(experiment: str, tracking_uri: str, out: str | Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise _error(f"--experiment: no experiment {experiment!r} at {tracking_uri} (experiments: {known})")
    records, excluded = collect_runs(client, exp.experiment_id)
    if not records:
        raise _error(f"--experiment: {experiment!r} has no finished run with {SCORE_KEY} "
                     f"({len(excluded)} excluded: {', '.join(sorted({e['reason'] for e in excluded})) or '-'})")
    rows = summarize(records, behavior_scores(records))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = write_markdown(rows, out_dir / "results.md", experiment, excluded, records)
    table = write_csv(rows, out_dir / "results.csv")
    pngs = plot_curves(records, rows, out_dir)
    variance_pngs = plot_variance(records, out_dir)

    parents = {r.parent_run_id for r in records}
    parent = next(iter(parents)) if len(parents) == 1 else None
    logged_to = None
    if parent:
        for f in (md, table, *pngs, *variance_pngs):
            client.log_artifact(parent, str(f), ARTIFACT_DIR)
        logged_to = parent
    return {"experiment": experiment, "tracking_uri": tracking_uri, "rows": [r.to_dict() for r in rows],
            "excluded": excluded, "files": {"markdown": str(md), "csv": str(table), "curves": [str(p) for p in pngs],
                                                   "variance": [str(p) for p in variance_pngs]},
            "artifacts_run_id": logged_to,
            "note": None if parent or len(parents) == 1 else
            f"runs come from {len(parents)} parents (sweeps or plain train runs); artifacts not logged"}


def report(experiment: str, tracking_uri: str | None = None, out: str | Path = "report") -> dict[str, Any]:
    """``dromo-ray report``: resolve the store (:func:`resolve_uri`; a reader never creates an empty store) and
    build the report of ``experiment`` into ``out`` (see :func:`build_report` for what it returns)."""
    from dromo_ray.tracking import check_tracking_store

    uri = resolve_uri(tracking_uri)
    check_tracking_store(uri, must_exist=True)
    return build_report(experiment, uri, out)

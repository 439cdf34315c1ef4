"""``dromo-ray report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from dromo_ray.report import ARTIFACT_DIR, report

    rep = report(args.experiment, args.tracking_uri, args.out)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(Path(rep["files"]["markdown"]).read_text())
    print(f"wrote {rep['files']['markdown']}, {rep['files']['csv']}"
          + "".join(f", {p}" for p in rep["files"]["curves"] + rep["files"]["variance"]))
    if rep["artifacts_run_id"]:
        print(f"logged as artifacts ({ARTIFACT_DIR}/) of the sweep's parent run {rep['artifacts_run_id']}")
    elif rep["note"]:
        print(rep["note"])
    return 0

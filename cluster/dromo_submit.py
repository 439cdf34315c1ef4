"""Run a ``dromo-ray`` command on the head of a cluster-launcher cluster, through ``ray submit``.

``ray submit`` uploads a Python script to the head and runs it there with the given arguments::

    ray submit cluster/aws-gpu.yaml cluster/dromo_submit.py -- sweep tune_configs/sweeps/<sweep>.yaml

This script moves into the synced repository (``~/dromo_ray``, or ``$DROMO_REPO``) so that relative
paths such as ``tune_configs/...`` resolve, then replaces itself with ``dromo-ray <arguments>``. The
head's login shell has already activated the project's virtualenv and exported MLFLOW_TRACKING_URI and
RAY_AUTH_MODE (cluster/setup_node.sh), so the command connects to the running cluster and logs to the
head's MLflow server. Add ``--tmux`` or ``--screen`` to ``ray submit`` to detach a long sweep.
"""

from __future__ import annotations

import os
import sys


def repo_dir() -> str:
    return os.path.expanduser(os.environ.get("DROMO_REPO", "~/dromo_ray"))


def command(args: list[str]) -> list[str]:
    """The argv that runs ``dromo-ray`` with ``args``."""
    return ["dromo-ray", *args]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    os.chdir(repo_dir())
    sys.stdout.flush()
    os.execvp("dromo-ray", command(args))
    return 0  # not reached: execvp replaces this process


if __name__ == "__main__":
    sys.exit(main())

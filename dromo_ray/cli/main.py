"""``dromo-ray``'s entry point: parse, run one handler, and turn what ends it into an exit code.

A :class:`~dromo_ray.errors.UserError` (bad config, dataset, checkpoint, tracking store, flag) is one line on
stderr and exit 2, never a traceback; Ctrl-C is one line and 130; SIGTERM one line and 143.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from dromo_ray.errors import UserError

os.environ.setdefault("RAY_DEDUP_LOGS", "1")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C would be: the same clean stop, exit code 143."""


_SIGTERM_SEEN = threading.Event()
"""Set by the handler: a library that catches the Terminated raised inside it (Ray's ``ray.get`` can surface it as
a plain KeyboardInterrupt) still ends the command as terminated, 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    _SIGTERM_SEEN.set()
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command. Ctrl-C (130) and SIGTERM (143) are one line and a clean stop from the first statement
    on: the handler is installed, and the ``try`` entered, before any heavy import (parsing is light; the
    command's module imports torch, Ray, MLflow, ...). SIGTERM raises :class:`Terminated` where Ctrl-C raises
    ``KeyboardInterrupt``, so the cleanup that handles one (atomic writes remove their temporary file,
    :mod:`dromo_ray.core.files`; a run records itself killed) handles both."""
    main_thread = threading.current_thread() is threading.main_thread()
    _SIGTERM_SEEN.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    command = None
    try:
        # numpy before anything imports torch: torch's C initialisation imports numpy itself and swallows whatever
        # that import raises (it warns "Failed to initialize NumPy" and carries on), so a Ctrl-C or SIGTERM landing
        # there would be lost and the command would run on. Imported here, the signal lands in Python code that lets
        # it through.
        import numpy  # noqa: F401

        from dromo_ray.cli.parser import build_parser

        args = build_parser().parse_args(argv)
        command = args.command
        try:
            return _run(args)
        except KeyboardInterrupt:
            raise
        except (UserError, FileNotFoundError) as e:  # one line, exit 2
            msg = str(e) if not isinstance(e, FileNotFoundError) else f"file not found: {e.filename or e}"
            from dromo_ray.core.messages import plain_message

            msg = " ".join(plain_message(msg).split())  # one line, whatever the underlying library printed
            print(f"dromo-ray {command}: error: {msg}", file=sys.stderr)
            return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated), at any point, imports included
        terminated = isinstance(e, Terminated) or _SIGTERM_SEEN.is_set()
        what, code = ("terminated", 143) if terminated else ("interrupted", 130)
        hint = getattr(e, "resume_hint", "")
        prog = f"dromo-ray {command}" if command else "dromo-ray"
        print(f"{prog}: {what}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(args: argparse.Namespace) -> int:
    return int(args.func(args) or 0)

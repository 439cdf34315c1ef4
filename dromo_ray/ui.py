"""What the user sees in a terminal: every table (rich) and every progress bar (tqdm), in one place.

A ground-floor module like :mod:`dromo_ray.errors`: it imports nothing of the project, so data, runtime and the
edges may all use it (core stays numpy + torch only and prints nothing). Tables render to plain text, without
colour or box-drawing characters, so that they read the same in a terminal, a log file and a CI transcript;
progress bars write to stderr and switch themselves off where nobody watches (``enabled=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(x: Any, digits: int = 2) -> str:
    """One table cell: ``-`` for a missing or NaN value, floats with ``digits`` decimals."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """``rows`` under ``header`` as aligned plain text (a title line, the header, a rule, the rows)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="", title=None,
              collapse_padding=True)
    for h in header:
        t.add_column(str(h), no_wrap=True)
    for row in rows:
        t.add_row(*[c if isinstance(c, str) else fmt(c) for c in row])
    console = Console(width=400, no_color=True, color_system=None, force_terminal=False, record=True,
                      file=_Discard())
    console.print(t)
    lines = [line.rstrip() for line in console.export_text().splitlines() if line.strip()]
    return "\n".join(([title] if title else []) + lines)


class _Discard:
    """A file that drops what is written (rich records the table; the caller decides where it goes)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0, leave: bool = False,
             position: int | None = None) -> Any:
    """A progress bar on stderr (tqdm): ``bar.update(n)``, ``bar.set_postfix(...)``, ``bar.close()``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                leave=leave, mininterval=0.5, position=position)

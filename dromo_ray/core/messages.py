"""One-line messages for people: no terminal colour codes, no numpy reprs (``np.float32(0.5)`` -> ``0.5``)."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NUMPY_SCALAR = re.compile(r"\bnp\.(?:float|int|uint|bool|complex)\w*\(([^()]*)\)")


def plain_message(text: str) -> str:
    """``text`` without ANSI escape sequences and with numpy scalar reprs replaced by their values."""
    return _NUMPY_SCALAR.sub(r"\1", _ANSI.sub("", str(text)))

"""Atomic writes: the one rule every file the package writes in place follows.

A file is written to a hidden temporary path beside it (same directory, so the final ``os.replace`` is atomic)
and renamed over the target when the write finished; when anything interrupts it, the temporary path is removed
and the target is untouched. "Anything" is any ``BaseException``: an error, a full disk, Ctrl-C
(``KeyboardInterrupt``) and SIGTERM, which ``dromo_ray.cli.main`` turns into ``cli.Terminated`` (a
``KeyboardInterrupt``) for that reason. So a reader sees either the old file or the whole new one, and an
interrupted command leaves no ``.*.tmp`` behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path_for(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A fresh hidden path beside ``path``: ``.<name>.<12 hex>.<suffix>``; unique, so writers never collide."""
    path = Path(path)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}"


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree if it exists (never raises for a missing path)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (a file, or a directory the block creates).

    On a normal exit the temporary path is renamed over ``path`` (``os.replace``; a directory target must not
    exist or be empty). On any exception, ``KeyboardInterrupt`` and SIGTERM included, it is removed and the
    exception propagates; ``path`` is untouched. ``suffix`` matters to writers that append their own
    (``np.savez`` adds ``.npz`` unless the name ends so).
    """
    tmp = temp_path_for(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)

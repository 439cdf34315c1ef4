"""Errors of the data layer."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file or name is unusable. The message names the file, the key and the problem."""

    def __init__(self, source: str, problem: str, key: str | None = None) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: {problem}")

"""The project's errors, in one place (the ground floor: this module imports nothing of the project).

Every error whose message is enough for the user derives from :class:`UserError`; the command line prints it as
one line and exits with 2 (``dromo_ray/cli/main.py``). Library code raises the specific kind so that a caller
(a notebook, a Tune trial) can tell them apart; all of them are also ``ValueError`` for callers that predate
the hierarchy.
"""

from __future__ import annotations


class DromoError(Exception):
    """Base of every error raised on purpose by dromo_ray."""


class UserError(DromoError):
    """An error whose message is enough: the command line prints it as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range (the message names the key)."""


class DatasetError(UserError, ValueError):
    """A dataset file or name is unusable. The message names the file, the key and the problem."""

    def __init__(self, source: str, problem: str, key: str | None = None) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: {problem}")


class CheckpointError(UserError, ValueError):
    """A checkpoint path is missing or unreadable (the message names the path)."""


class TrackingError(UserError, ValueError):
    """The tracking store cannot be used (the message names the URI)."""

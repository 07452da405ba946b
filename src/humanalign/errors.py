"""User-facing errors.

A ``UserError`` is a mistake in the user's input (a config key, a data line, a path). The CLI prints it as one
line and exits with code 2; it never shows a traceback for it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""

    exit_code = 2


class RecordError(UserError):
    """A bad record in a data file: names the file, the 1-based line (or record index) and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {problem}")


class ConfigError(UserError):
    """A bad configuration value or key."""


class Interrupted(Exception):
    """A run stopped by SIGINT / SIGTERM after saving a checkpoint. The message says how to resume; the CLI
    prints it as one line and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

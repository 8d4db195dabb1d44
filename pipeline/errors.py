"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""

from __future__ import annotations


class RptError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ConfigError(RptError):
    """A bad or unknown config key or value; the message names the key."""


class InputError(RptError):
    """Bad input data; the message names the file (and line or row) and what to do."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "") + ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ArtifactError(RptError):
    """A missing, corrupt or unresolvable artifact."""


class StageTimeoutError(RptError):
    """A task of a stage ran past its `runner.timeouts` entry; the message names the stage and setting."""

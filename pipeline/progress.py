"""Progress bars (tqdm) and logging that do not garble each other."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; silenced with RPT_PROGRESS=0 (CI logs, tests)."""
    kwargs.setdefault("disable", os.environ.get("RPT_PROGRESS", "1") == "0" or None)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


class TqdmHandler(logging.StreamHandler):
    """Writes log records through tqdm.write so they appear above active bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(level: str | int = "INFO") -> None:
    root = logging.getLogger("rpt")
    root.setLevel(level if isinstance(level, int) else level.upper())
    if not any(isinstance(h, TqdmHandler) for h in root.handlers):
        h = TqdmHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.propagate = False

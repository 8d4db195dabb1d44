"""Progress bars (tqdm) and logging that do not garble each other; bars can also report to a hook.

Stages know nothing of Prefect: an orchestrator that wants to show how far a stage is installs a hook
(`report_progress`) around the stage's code, and every bar the stage opens in that context calls it,
at most once per interval, and once more when it closes.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Tick:
    """One report of a bar: `bar` identifies it (one id per bar), `done` is how far it is."""

    bar: int
    desc: str
    done: float
    total: float | None
    unit: str
    final: bool

    @property
    def percent(self) -> float | None:
        return None if not self.total else min(100.0, 100.0 * self.done / self.total)


ProgressHook = Callable[[Tick], None]

# A context variable, so that each shard (thread, process or Dask worker) reports to its own hook.
_HOOK: ContextVar[tuple[ProgressHook, float] | None] = ContextVar("rpt_progress_hook", default=None)
_BAR_IDS = itertools.count()  # not id(): a closed bar's id can be reused by the next one
log = logging.getLogger("rpt.progress")


@contextmanager
def report_progress(hook: ProgressHook, every_s: float) -> Iterator[None]:
    """Bars opened inside this context call `hook` at most once per `every_s` seconds while they run
    (the first time after `every_s`, so a bar that ends sooner reports nothing), and a last time when
    they close; a hook that raises is logged once per bar and never fails the stage."""
    token = _HOOK.set((hook, every_s))
    try:
        yield
    finally:
        _HOOK.reset(token)


class _ReportingBar(tqdm):  # type: ignore[misc]
    """A tqdm bar that also reports to a hook. It counts on its own: a disabled tqdm counts nothing."""

    def __init__(self, *args: Any, hook: ProgressHook, every_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._hook, self._every, self._id = hook, every_s, next(_BAR_IDS)
        self._desc, self._unit = str(kwargs.get("desc") or ""), str(kwargs.get("unit") or "it")
        self._done: float = self.n
        self._t_last = time.monotonic()
        self._reported = self._failed = self._closed = False
        self._hook_lock = threading.Lock()  # tqdm's own `_lock` is a class-wide lock

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        self._done += 1 if n is None else n
        self._tick(final=False)
        return out

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            yield item
            self._done += 1
            self._tick(final=False)

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            if self._reported:  # a bar that never reported has nothing to finish
                self._tick(final=True)
        super().close()

    def _tick(self, final: bool) -> None:
        now = time.monotonic()
        if self._failed or (not final and now - self._t_last < self._every):
            return
        self._t_last = now
        self._reported = True
        tick = Tick(self._id, self._desc, self._done, self.total or None, self._unit, final)
        try:
            with self._hook_lock:
                self._hook(tick)
        except Exception as e:  # progress is a view: it must not fail the work it shows
            self._failed = True
            log.warning("progress report of %r failed (%s); no more reports from this bar", tick.desc, e)


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; silenced with RPT_PROGRESS=0 (CI logs, tests). Inside `report_progress`
    the bar also reports to that hook, even when silenced, unless the caller disabled it explicitly."""
    hooked = _HOOK.get()
    explicitly_off = kwargs.get("disable") is True
    kwargs.setdefault("disable", os.environ.get("RPT_PROGRESS", "1") == "0" or None)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    if hooked is None or explicitly_off:
        return tqdm(iterable, **kwargs)
    return _ReportingBar(iterable, hook=hooked[0], every_s=hooked[1], **kwargs)


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

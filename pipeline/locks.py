"""One writer per artifact version: the build lock.

Two builds of the same version (two terminals, a scheduled deployment and a manual run) share one
`.partial-<version>` folder; without a lock the second removed the first's temporary files as debris
and one of them crashed. With it, the second waits, then finds the artifact published (or resumes the
shards the first finished, had it been killed).

The lock is an advisory `flock` on `<root>/<stage>/.locks/<version>.lock`: the kernel releases it when
its holder exits, however it exits, so a killed build never leaves it stuck. Object stores have no such
primitive; there the store's publish protocol keeps readers safe, and a version should be built from one
place at a time (docs/orchestration.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.store import ArtifactStore

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not protected against a concurrent twin
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("rpt.locks")

LOCKS_DIR = ".locks"


def lock_path(store: ArtifactStore, stage: str, version: str) -> str:
    return os.path.join(store.root, stage, LOCKS_DIR, f"{version}.lock")


@contextmanager
def build_lock(store: ArtifactStore, stage: str, version: str) -> Iterator[None]:
    """Hold the build lock of `stage@version` (waiting for another holder) for the enclosed block."""
    if not store.is_local or fcntl is None:
        yield
        return
    path = lock_path(store, stage, version)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            log.info("%s@%s is being built by %s; waiting for it", stage, version, holder)
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("%s@%s: the other build ended after %.0f s", stage, version, time.monotonic() - t0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def unless_building(store: ArtifactStore, stage: str, version: str) -> Iterator[bool | None]:
    """Whether no build of `stage@version` runs (True), one does (False), or that cannot be told (None:
    an object store, no flock). While True is held, no build can start, so its folders may be removed."""
    if not store.is_local or fcntl is None:
        yield None
        return
    path = lock_path(store, stage, version)
    if not os.path.exists(path):  # no build since locks exist; an older writer cannot be told
        yield None
        return
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)

"""The worker cache: expensive objects (a model, a database index, a tensor on the GPU) built once per
worker process and shared by every shard that process runs, whatever runner runs them.

A key is a tuple whose first element names the kind of object, e.g. `("bm25.index", path, version)`;
the eviction rules apply among the entries of one kind:

- `max_entries=n`: at most n entries of the kind, the least recently used dropped first (bm25 keeps
  one corpus index: a new key replaces the old);
- `owner=x`: entries of the kind built for another owner are dropped (dense keeps the objects of one
  embeddings artifact at a time).

Entries are dropped before the new one is built, so the old object's memory can be freed first. The
factory runs outside the cache's lock: threads that ask for the same key wait for the one building it
(the factory runs once per key), and different keys build side by side. A factory that raises stores
nothing; the next caller tries again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Entry:
    owner: Hashable
    builder: int  # thread id of the thread running the factory
    ready: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    failed: bool = False


class WorkerCache:
    """A thread-safe keyed cache with per-kind bounds (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Hashable, ...], _Entry] = OrderedDict()

    def get(
        self,
        key: tuple[Hashable, ...],
        factory: Callable[[], T],
        *,
        owner: Hashable = None,
        max_entries: int | None = None,
    ) -> T:
        """The object cached under `key`, built by `factory()` if absent."""
        if not isinstance(key, tuple) or not key:
            raise TypeError(f"a worker cache key is a tuple (kind, ...), not {key!r}")
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        kind = key[0]
        while True:
            with self._lock:
                same_kind = [k for k in self._entries if k[0] == kind]
                for k in same_kind:
                    if self._entries[k].owner != owner:
                        del self._entries[k]
                entry = self._entries.get(key)
                if entry is None:
                    if max_entries is not None:
                        same_kind = [k for k in self._entries if k[0] == kind]  # oldest use first
                        for k in same_kind[: max(0, len(same_kind) - max_entries + 1)]:
                            del self._entries[k]
                    entry = self._entries[key] = _Entry(owner, threading.get_ident())
                    build = True
                else:
                    self._entries.move_to_end(key)
                    build = False
            if build:
                return self._build(key, entry, factory)
            if entry.builder == threading.get_ident() and not entry.ready.is_set():
                raise RuntimeError(f"the factory of worker cache key {key!r} asked for that key itself")
            entry.ready.wait()
            if not entry.failed:
                return entry.value
            # the thread that built it failed: build it here (or wait for the next thread that does)

    def _build(self, key: tuple[Hashable, ...], entry: _Entry, factory: Callable[[], T]) -> T:
        try:
            entry.value = factory()
        except BaseException:
            entry.failed = True
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            entry.ready.set()
            raise
        entry.ready.set()
        return entry.value

    def cached_keys(self) -> list[tuple[Hashable, ...]]:
        """The cached keys, least recently used first (entries being built included)."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = WorkerCache()  # this process's


def worker_cache(
    key: tuple[Hashable, ...],
    factory: Callable[[], T],
    *,
    owner: Hashable = None,
    max_entries: int | None = None,
) -> T:
    """The process-wide cache (`StageContext.worker_cache` for stages; this function for helpers that
    run without a context, e.g. the benchmarks)."""
    return _CACHE.get(key, factory, owner=owner, max_entries=max_entries)


def clear_worker_cache() -> None:
    _CACHE.clear()

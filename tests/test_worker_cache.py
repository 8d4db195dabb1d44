"""The worker cache (pipeline.worker_cache): one build per key across threads, the per-kind bounds
(max_entries: least recently used out; owner: other owners' entries out), failures cached nowhere."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.worker_cache import WorkerCache


def test_factory_runs_once_per_key_across_threads():
    cache = WorkerCache()
    calls: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def factory(name: str):
        def make() -> object:
            with lock:
                calls[name] = calls.get(name, 0) + 1
            time.sleep(0.05)  # slow enough that every thread asks while the first one builds
            return object()

        return make

    got: dict[int, list[object]] = {}

    def worker(i: int) -> None:
        start.wait()
        got[i] = [cache.get(("kind", name), factory(name)) for name in ("a", "b")]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"a": 1, "b": 1}
    assert len({id(v[0]) for v in got.values()}) == 1 and len({id(v[1]) for v in got.values()}) == 1


def test_different_keys_build_side_by_side():
    """A slow build of one key does not hold up another key's."""
    cache = WorkerCache()
    release = threading.Event()
    t = threading.Thread(target=lambda: cache.get(("kind", "slow"), lambda: release.wait(10)))
    t.start()
    try:
        t0 = time.perf_counter()
        assert cache.get(("kind", "fast"), lambda: 1) == 1
        assert time.perf_counter() - t0 < 5
    finally:
        release.set()
        t.join()


def test_max_entries_keeps_the_most_recently_used():
    cache = WorkerCache()
    for name in ("a", "b"):
        cache.get(("k", name), lambda name=name: name, max_entries=2)
    cache.get(("k", "a"), lambda: "again")  # a used: b is now the least recent
    assert cache.get(("k", "c"), lambda: "c", max_entries=2) == "c"
    assert cache.cached_keys() == [("k", "a"), ("k", "c")]
    # one entry (bm25's corpus index): a new key replaces the old one before it is built
    seen = []
    cache.get(("one", 1), lambda: 1, max_entries=1)
    cache.get(("one", 2), lambda: seen.append(cache.cached_keys()) or 2, max_entries=1)
    assert ("one", 1) not in seen[0] and [k for k in cache.cached_keys() if k[0] == "one"] == [("one", 2)]
    # the bound is per kind: the other kinds' entries stay
    assert ("k", "a") in cache.cached_keys() and ("k", "c") in cache.cached_keys()


def test_owner_drops_the_other_owners_entries_of_its_kind():
    """dense: the objects of one embeddings artifact at a time."""
    cache = WorkerCache()
    cache.get(("dense", "db"), lambda: 1, owner="v1")
    cache.get(("dense", "index"), lambda: 2, owner="v1")
    cache.get(("other", "x"), lambda: 3, owner="v0")
    assert len(cache.cached_keys()) == 3
    assert cache.get(("dense", "db"), lambda: 10, owner="v2") == 10
    assert sorted(cache.cached_keys()) == [("dense", "db"), ("other", "x")]
    assert cache.get(("dense", "db"), lambda: 11, owner="v2") == 10


def test_a_failed_build_is_not_cached():
    cache = WorkerCache()

    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get(("k", 1), fail)
    assert cache.cached_keys() == []
    assert cache.get(("k", 1), lambda: "ok") == "ok"


def test_waiters_retry_after_a_failed_build():
    cache = WorkerCache()
    building = threading.Event()
    release = threading.Event()
    calls = []

    def fail() -> None:
        calls.append("fail")
        building.set()
        release.wait(10)
        raise RuntimeError("boom")

    errors = []

    def first() -> None:
        try:
            cache.get(("k", 1), fail)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    building.wait(10)
    result = []
    waiter = threading.Thread(
        target=lambda: result.append(cache.get(("k", 1), lambda: calls.append("ok") or 5))
    )
    waiter.start()
    release.set()
    t.join()
    waiter.join()
    assert len(errors) == 1 and result == [5] and calls == ["fail", "ok"]


def test_a_factory_that_asks_for_its_own_key_is_an_error():
    cache = WorkerCache()
    with pytest.raises(RuntimeError, match="asked for that key itself"):
        cache.get(("k", 1), lambda: cache.get(("k", 1), lambda: 0))
    assert cache.cached_keys() == []


def test_bad_keys_and_bounds():
    cache = WorkerCache()
    with pytest.raises(TypeError):
        cache.get("k", lambda: 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.get(("k",), lambda: 0, max_entries=0)


def test_stage_context_uses_the_process_cache(tmp_path):
    """ctx.worker_cache is the process-wide cache: two contexts (two shards) share the object."""
    from pipeline.stage import StageContext
    from pipeline.worker_cache import clear_worker_cache

    def ctx() -> StageContext:
        return StageContext("s", "v", None, None, {}, None, str(tmp_path))  # type: ignore[arg-type]

    calls = []
    try:
        a = ctx().worker_cache(("test.shared", 1), lambda: calls.append(1) or object())
        b = ctx().worker_cache(("test.shared", 1), lambda: calls.append(1) or object())
        assert a is b and calls == [1]
    finally:
        clear_worker_cache()

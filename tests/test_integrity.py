"""A stage never builds on an input artifact whose files disagree with its manifest."""

from __future__ import annotations

import pytest

import pipeline.executor as executor
from pipeline.errors import ArtifactError
from pipeline.executor import build, resolve
from pipeline.store import Artifact, ArtifactStore
from tests.conftest import copy_stages


@pytest.fixture
def private(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "_VERIFIED", set())  # each test starts with nothing verified
    return copy_stages(tiny_run, tmp_path / "store", ("documents", "tokenizer", "chunks"))


def flip_one_bit(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_an_input_stops_the_build(private):
    """Before: bm25 built on the damaged tokens without a word, and the wrong table was cached under the
    trusted version."""
    store = ArtifactStore(private.root())
    chunks = store.resolve("chunks")
    tokens = chunks.local_path("tokens.npy")
    flip_one_bit(tokens, tokens.stat().st_size - 7)  # same size: only a checksum sees it
    with pytest.raises(
        ArtifactError,
        match=rf"bm25 will not build on its input 'chunks' = {chunks.ref}: .*tokens\.npy checksum mismatch",
    ):
        build("bm25", private)
    assert not store.exists("bm25", resolve("bm25", private).version)
    assert store.partials("bm25") == []  # refused before any work


def test_sizes_are_checked_even_without_checksums(private):
    store = ArtifactStore(private.root())
    chunks = store.resolve("chunks")
    tokens = chunks.local_path("tokens.npy")
    tokens.write_bytes(tokens.read_bytes()[:-64])
    run = private.with_section("runner", {"verify_inputs": "size"})
    with pytest.raises(ArtifactError, match=r"tokens\.npy has \d+ bytes, manifest says \d+"):
        build("bm25", run)


def test_an_intact_input_is_hashed_once_per_process(private, monkeypatch):
    calls = []
    real = Artifact.verify

    def counted(self):
        calls.append(self.ref)
        return real(self)

    monkeypatch.setattr(Artifact, "verify", counted)
    build("bm25", private)
    build("bm25", private.with_section("bm25", {"k": 3}))
    assert calls.count(ArtifactStore(private.root()).resolve("chunks").ref) == 1


# ------------------------------------------------------------------------------ concurrent builds

# Process A: builds `stage` (and its inputs), but its first shard of `stage` announces itself and then
# waits for a marker file, so that B surely starts while A holds the build lock.
HOLDER = """
import os
import sys
import time

from stages import load_config
from pipeline.executor import build
from stages import REGISTRY

cfg, stage, marker = sys.argv[1:4]
impl = REGISTRY.get(stage)
real = impl.run_shard


def held(ctx, shard):
    print("building", stage, flush=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(ctx, shard)


impl.run_shard = held
art = build(stage, load_config(cfg), with_deps=True)
print("built", art.ref, flush=True)
"""

# Process B: a plain build of the same version.
TWIN = """
import logging
import sys

from stages import load_config
from pipeline.executor import build

logging.basicConfig(level=logging.INFO)
art = build(sys.argv[2], load_config(sys.argv[1]), with_deps=True)
print("built", art.ref, flush=True)
"""


def _lines(stream, q) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


@pytest.mark.parametrize("stage", ["chunks", "tokenizer"])
def test_two_processes_building_the_same_version_both_succeed(tmp_path, gutenberg_dir, stage):
    """Before: the loser crashed with FileNotFoundError on a temp file (20 of 20 pairs); now the second
    waits for the first and finds the artifact. A holds `stage`'s build lock (its shard waits for a marker
    file) until B has logged that it waits for that very version. `chunks` is sharded (one shard per book)
    and builds its inputs too; `tokenizer` is a single shard."""
    import os
    import queue
    import subprocess
    import sys
    import threading
    import time

    import yaml

    from stages import load_config
    from tests.conftest import REPO

    books = tmp_path / "books"
    books.mkdir()
    for book in sorted(gutenberg_dir.glob("*.txt.gz"))[:6]:
        (books / book.name).symlink_to(book)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "artifacts_root": str(tmp_path / "store"),
                "runner": {"kind": "serial"},
                "documents": {"paths": [str(books)], "shard_bytes": 1},
                "tokenizer": {"vocab_size": 1024, "max_train_chars": 1_000_000},
            }
        )
    )
    run = load_config(cfg)
    version = resolve(stage, run).version
    marker = tmp_path / "go-on"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(script: str) -> tuple[subprocess.Popen, dict[str, queue.Queue]]:
        p = subprocess.Popen(
            [sys.executable, "-c", script, str(cfg), stage, str(marker)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        qs: dict[str, queue.Queue] = {"out": queue.Queue(), "err": queue.Queue()}
        for stream, q in ((p.stdout, qs["out"]), (p.stderr, qs["err"])):
            threading.Thread(target=_lines, args=(stream, q), daemon=True).start()
        return p, qs

    def wait_for(q: queue.Queue, want: str, what: str, seen: list[str]) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                line = q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                q.put(None)  # the process closed the stream: it ended
                break
            seen.append(line)
            if want in line:
                return
        pytest.fail(f"{what}; it said:\n{''.join(seen)[-3000:]}")

    def rest(q: queue.Queue, seen: list[str]) -> str:
        """Everything the stream said, once its process has closed it."""
        while (line := q.get(timeout=300)) is not None:
            seen.append(line)
        return "".join(seen)

    a, a_qs = start(HOLDER)
    b, b_qs = None, None
    seen: dict[str, list[str]] = {k: [] for k in ("a_out", "a_err", "b_out", "b_err")}
    try:
        wait_for(a_qs["out"], f"building {stage}", f"A never started building {stage}", seen["a_out"])
        b, b_qs = start(TWIN)
        wait_for(
            b_qs["err"],
            f"{stage}@{version} is being built by pid {a.pid}",
            f"B did not wait for A's build of {stage}@{version}",
            seen["b_err"],
        )
    finally:
        marker.touch()  # A goes on (and ends) whatever happened
        a.wait(timeout=300)
        if b is not None:
            b.wait(timeout=300)
    a_out, a_err = rest(a_qs["out"], seen["a_out"]), rest(a_qs["err"], seen["a_err"])
    b_out, b_err = rest(b_qs["out"], seen["b_out"]), rest(b_qs["err"], seen["b_err"])
    assert a.returncode == 0, a_err[-3000:]
    assert b.returncode == 0, b_err[-3000:]
    assert "built" in a_out and "built" in b_out
    assert f"{stage}@{version}: the other build ended" in b_err  # B went on only once A was done
    store = ArtifactStore(run.root())
    art = store.get(stage, version)
    assert art.verify() == [] and store.partials(stage) == []

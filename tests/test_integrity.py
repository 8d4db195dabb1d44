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

TWIN = """
import logging
import sys

from pipeline.config import load_config
from pipeline.executor import build

logging.basicConfig(level=logging.INFO)
art = build(sys.argv[2], load_config(sys.argv[1]), with_deps=True)
print("built", art.ref)
"""


@pytest.mark.parametrize("stage", ["chunks", "tokenizer"])
def test_two_processes_building_the_same_version_both_succeed(tmp_path, gutenberg_dir, stage):
    """Before: the loser crashed with FileNotFoundError on a temp file (20 of 20 pairs); now the second
    waits for the first and finds the artifact. `chunks` is sharded (one shard per book) and builds its
    inputs too; `tokenizer` is a single shard."""
    import subprocess
    import sys

    import yaml

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
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWIN, str(cfg), stage],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "built" in out
    from pipeline.config import load_config

    run = load_config(cfg)
    store = ArtifactStore(run.root())
    art = store.get(stage, resolve(stage, run).version)
    assert art.verify() == [] and store.partials(stage) == []
    assert sum("being built by" in err for _, err in outs) >= 1  # one of them really waited

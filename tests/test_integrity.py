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

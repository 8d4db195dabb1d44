"""tokenizer + chunks: exact round trips on the fixture books, layout invariants, adopting a given tokenizer."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.executor import build
from pipeline.formats import ChunkReader, load_tokenizer
from pipeline.store import ArtifactStore
from tests.conftest import copy_stages, make_config

# Latin-1 books (pg105, pg1661), UTF-8 books with a BOM, curly quotes and accents
ROUND_TRIP_BOOKS = ["pg105", "pg1661", "pg11", "pg5200", "pg46", "pg1232"]


@pytest.fixture(scope="module")
def books_run(tmp_path_factory, gutenberg_dir):
    d = tmp_path_factory.mktemp("rt") / "books"
    d.mkdir()
    for b in ROUND_TRIP_BOOKS:
        (d / f"{b}.txt.gz").symlink_to(gutenberg_dir / f"{b}.txt.gz")
    run = make_config(
        d.parent / "store",
        documents={"paths": [str(d)]},
        tokenizer={"vocab_size": 4096, "max_train_chars": 3_000_000},
    )
    build("chunks", run, with_deps=True)
    return run


def by_doc(chunks_table):
    out: dict[int, list[dict]] = {}
    for r in chunks_table.to_pylist():
        out.setdefault(r["doc_idx"], []).append(r)
    return out


def test_chunks_reproduce_each_book_exactly(books_run):
    store = ArtifactStore(books_run.root())
    docs = store.resolve("documents").read().to_pylist()
    chunks = by_doc(store.resolve("chunks").read())
    tok = load_tokenizer(store.resolve("tokenizer"))
    assert len(docs) == len(ROUND_TRIP_BOOKS)
    for d in docs:
        rows = chunks[d["doc_idx"]]
        assert "".join(r["text"] for r in rows) == d["text"], d["doc_id"]
        ids = [t for r in rows for t in r["tokens"]]
        assert tok.decode(ids) == d["text"], d["doc_id"]
        assert ids == tok.encode(d["text"], add_special_tokens=False).ids


def test_layout_invariants(books_run):
    store = ArtifactStore(books_run.root())
    art = store.resolve("chunks")
    t = art.read()
    L = art.manifest.config["chunk_len"]
    ids = t["chunk_id"].to_numpy()
    assert (ids == np.arange(len(ids))).all()  # global, dense
    reader = ChunkReader(art)
    tokens = reader.tokens
    assert tokens.shape == (len(ids), L)
    for r in t.slice(0, 3000).to_pylist():
        row = tokens[r["chunk_id"]]
        assert row[: r["n_tokens"]].tolist() == r["tokens"] and (row[r["n_tokens"] :] == -1).all()
    docs = store.resolve("documents").read()
    split_of = dict(zip(docs["doc_idx"].to_pylist(), docs["split"].to_pylist()))
    for span in reader.docs():
        pos = t["chunk_idx"].to_numpy()[span.first : span.first + span.n]
        n_tok = t["n_tokens"].to_numpy()[span.first : span.first + span.n]
        assert (pos == np.arange(span.n)).all()
        assert (n_tok[:-1] == L).all() and 0 < n_tok[-1] <= L  # only a document's last chunk is shorter
        assert span.split == split_of[span.doc_idx]
        assert set(t["split"].to_pylist()[span.first : span.first + span.n]) == {span.split}
    assert (reader.chunk_pos == t["chunk_idx"].to_numpy()).all()
    assert (reader.chunk_doc == t["doc_idx"].to_numpy()).all()
    assert art.stats["tokens"] == int(t["n_tokens"].to_numpy().sum())
    assert art.stats["fill_rate"] == pytest.approx(float((np.asarray(tokens) >= 0).mean()), abs=1e-6)


def test_multibyte_characters_split_across_chunks(tmp_path):
    """With a byte-level vocabulary this small, accented letters and emoji are several tokens, so tiny
    chunks cut through characters; the chunk texts must still partition the document."""
    d = tmp_path / "in"
    d.mkdir()
    text = "Žluťoučký kůň úpěl ďábelské ódy — naïve café, 東京, 🙂🙂 end.\n" * 40
    (d / "u.txt").write_text(text, encoding="utf-8")
    run = make_config(
        tmp_path / "s",
        documents={"paths": [str(d)], "min_chars": 10, "split_lists": {"train": ["in/u.txt"]}},
        tokenizer={"vocab_size": 300, "min_frequency": 1},
        chunks={"chunk_len": 3},
    )
    art = build("chunks", run, with_deps=True)
    rows = art.read().to_pylist()
    assert "".join(r["text"] for r in rows) == text
    tok = load_tokenizer(ArtifactStore(run.root()).resolve("tokenizer"))
    assert tok.decode([t for r in rows for t in r["tokens"]]) == text
    # some chunk boundary really fell inside a character
    assert any(tok.decode(r["tokens"]) != r["text"] for r in rows)


def test_given_tokenizer_is_adopted_by_content(small_run, tmp_path):
    shutil.copytree(small_run.root(), tmp_path / "store")  # leave the shared session store untouched
    small_run = small_run.model_copy(update={"artifacts_root": str(tmp_path / "store")})
    store = ArtifactStore(small_run.root())
    trained = store.resolve("tokenizer")
    given = tmp_path / "my-tokenizer.json"
    given.write_bytes(trained.local_path("tokenizer.json").read_bytes())
    run = small_run.with_section("tokenizer", {"path": str(given)})
    art = build("chunks", run, with_deps=True)
    tok_art = store.resolve("tokenizer")
    assert tok_art.meta["source"] == "given" and tok_art.manifest.inputs == {}
    ref = build("chunks", small_run)
    assert art.version != ref.version  # another tokenizer artifact upstream...
    assert art.read().equals(ref.read())  # ...with the same content gives the same chunks
    spec = json.loads(given.read_text())
    spec["model"]["vocab"]["zzz-new-token"] = len(spec["model"]["vocab"])
    given.write_text(json.dumps(spec))
    from pipeline.executor import resolve

    assert resolve("tokenizer", run).version != tok_art.version  # content, not path, is the identity


def test_adopted_tokenizer_with_truncation_and_padding_keeps_documents_whole(small_run, tmp_path):
    """A tokenizer.json exported for a fixed-length model (MiniLM's: truncation at 128, padding with id 0)
    is adopted with both switched off: the chunks equal those of the same tokenizer without them."""
    shutil.copytree(small_run.root(), tmp_path / "store")
    small_run = small_run.model_copy(update={"artifacts_root": str(tmp_path / "store")})
    trained = ArtifactStore(small_run.root()).resolve("tokenizer")
    spec = json.loads(trained.local_path("tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {
        "strategy": {"Fixed": 128},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
    given = tmp_path / "fixed-length.json"
    given.write_text(json.dumps(spec))
    run = small_run.with_section("tokenizer", {"path": str(given)})
    art = build("chunks", run, with_deps=True)
    assert ArtifactStore(run.root()).resolve("tokenizer").stats["disabled"] == ["truncation", "padding"]
    assert art.read().equals(build("chunks", small_run).read())
    assert art.stats["tokens"] > 128 * 4


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"vocab_size": 30522, "hidden_size": 384}', "not a HF tokenizers tokenizer.json"),
        ("{not json", "not a JSON file"),
        ('{"model": {"type": "Nonsense"}}', "cannot be loaded as a tokenizer"),
    ],
)
def test_a_file_that_is_not_a_tokenizer_names_file_and_setting(tmp_path, content, match):
    bad = tmp_path / "config.json"
    bad.write_text(content)
    run = make_config(tmp_path / "store", tokenizer={"path": str(bad)})
    with pytest.raises(ConfigError, match=rf"tokenizer\.path: {re.escape(str(bad))} .*{match}"):
        build("tokenizer", run)


def test_documents_spanning_row_groups_are_indexed_whole(tiny_run, tmp_path, monkeypatch):
    """finalize streams a shard row group by row group; with tiny row groups (documents spread over
    many of them) the parts, tokens.npy and doc_index.parquet equal those of the default layout."""
    import pyarrow.parquet as pq

    import pipeline.parquet as pp

    src = ArtifactStore(tiny_run.root())
    ref = src.resolve("chunks")
    run = copy_stages(tiny_run, tmp_path / "store", ("documents", "tokenizer"))
    monkeypatch.setattr(pp, "_row_group_rows", lambda t: 7)  # every 7 chunks a row group
    art = build("chunks", run)
    assert art.version == ref.version
    assert pq.ParquetFile(art.parts()[0]).num_row_groups > 10
    assert art.read().equals(ref.read())
    assert np.array_equal(np.load(art.local_path("tokens.npy")), np.load(ref.local_path("tokens.npy")))
    index = pq.read_table(art.local_path("doc_index.parquet"))
    assert index.equals(pq.read_table(ref.local_path("doc_index.parquet")))
    assert index.num_rows == len(src.resolve("documents").read())


def test_tokenizer_learns_from_the_train_split_only(tmp_path):
    """A word that fills the valid and test documents, and never occurs in train, gets no merged token."""
    import json as _json

    from pipeline.store import ArtifactStore

    d = tmp_path / "c"
    d.mkdir()
    (d / "train.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    (d / "valid.txt").write_text("zyxwvut qponml " * 2000)
    (d / "test.txt").write_text("qponml zyxwvut " * 2000)  # not a copy of valid.txt (documents refuse those)
    run = make_config(
        tmp_path / "store",
        documents={"paths": [str(d)], "split_lists": {"valid": ["c/valid.txt"], "test": ["c/test.txt"]}},
        tokenizer={"vocab_size": 400},
    )
    art = build("tokenizer", run, with_deps=True)
    vocab = _json.loads(art.local_path("tokenizer.json").read_text())["model"]["vocab"]
    assert any("qu" in t for t in vocab)  # merges were learned, from the train text
    assert not any(p in t for t in vocab for p in ("yx", "xw", "wv", "qp", "nm"))
    assert art.stats["vocab_size"] <= 400 and ArtifactStore(run.root()).exists("tokenizer", art.version)

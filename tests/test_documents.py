"""documents: Gutenberg boilerplate, encodings, readers, splits, and every kind of bad input."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.executor import build, resolve
from pipeline.store import ArtifactStore
from stages.documents.decoding import decode
from stages.documents.gutenberg import strip_gutenberg
from tests.conftest import make_config


@pytest.fixture(scope="module")
def all_books(tmp_path_factory, gutenberg_dir):
    """The documents artifact of all fixture books (a second: no tokenization)."""
    root = tmp_path_factory.mktemp("docs")
    art = build("documents", make_config(root, documents={"paths": [str(gutenberg_dir)]}))
    texts = dict(
        zip(
            art.read(columns=["doc_id"])["doc_id"].to_pylist(), art.read(columns=["text"])["text"].to_pylist()
        )
    )
    titles = dict(
        zip(
            art.read(columns=["doc_id"])["doc_id"].to_pylist(),
            art.read(columns=["title"])["title"].to_pylist(),
        )
    )
    return art, texts, titles


def manifest_rows(gutenberg_dir):
    with open(gutenberg_dir / "MANIFEST.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def naive_body(raw: bytes, encoding: str) -> str:
    """An independent line-based reading of a Gutenberg file: decode with the declared encoding, keep the
    lines strictly between the '*** START' line and the first 'End of ...'/'*** END' line."""
    text = raw.decode({"latin-1": "latin-1", "utf-8": "utf-8-sig"}[encoding])
    lines = text.replace("\r\n", "\n").split("\n")
    start = next(
        i for i, line in enumerate(lines) if "START OF TH" in line and line.lstrip().startswith("***")
    )
    end = next(
        i
        for i, line in enumerate(lines)
        if i > start
        and (
            (line.startswith("End of") and "Project Gutenberg" in line)
            or line.lstrip().startswith("***END OF")
            or line.lstrip().startswith("*** END OF")
        )
    )
    return "\n".join(lines[start + 1 : end]).strip("\n")


def test_all_books_stripped_and_decoded(all_books, gutenberg_dir):
    art, texts, titles = all_books
    rows = manifest_rows(gutenberg_dir)
    assert len(texts) == len(rows) == len(list(gutenberg_dir.glob("*.txt.gz"))) >= 10
    assert art.stats["gutenberg_stripped"] == len(rows)
    assert art.stats["encodings"].get("cp1252") == sum(r["encoding"] == "latin-1" for r in rows)
    for r in rows:
        doc_id = f"gutenberg/pg{r['gutenberg_id']}.txt.gz"
        text = texts[doc_id]
        with gzip.open(gutenberg_dir / f"pg{r['gutenberg_id']}.txt.gz") as f:
            raw = f.read()
        assert text == naive_body(raw, r["encoding"]), doc_id
        assert "\r" not in text and "\ufffd" not in text and not text.startswith("\ufeff")
        assert not re.search(r"PROJECT GUTENBERG E-?BOOK", text, re.I), doc_id
        assert "Project Gutenberg-tm" not in text and "Section 5." not in text
        # the title line of the header is kept as the title (MANIFEST drops punctuation)
        assert (
            re.sub(r"[^a-z]", "", titles[doc_id].lower())[:6] == re.sub(r"[^a-z]", "", r["title"].lower())[:6]
        )


def test_latin1_books_have_their_accents(all_books):
    _, texts, _ = all_books
    assert "\u00e9" in texts["gutenberg/pg105.txt.gz"]  # Persuasion: é (Latin-1 byte 0xE9)
    assert texts["gutenberg/pg1661.txt.gz"].count("\u00e9") > 0  # Sherlock Holmes: é (Latin-1 byte 0xE9)


def test_decode_fallbacks():
    assert decode("caf\u00e9".encode()) == ("caf\u00e9", "utf-8")
    assert decode(b"\xef\xbb\xbfhi") == ("hi", "utf-8-sig")
    assert decode("caf\u00e9".encode("latin-1")) == ("caf\u00e9", "cp1252")
    assert decode(b"\x93quoted\x94 \x80") == (
        "\u201cquoted\u201d \u20ac",
        "cp1252",
    )  # cp1252 smart quotes, euro
    assert decode(b"\xe9\x81")[0] == "\u00e9\x81"  # a byte cp1252 leaves undefined falls back to Latin-1


def test_strip_keeps_non_gutenberg_text_intact():
    t = "No header here.\n*** Not a marker ***\nEnd of story."
    assert strip_gutenberg(t).text == t and not strip_gutenberg(t).had_header


def test_split_is_by_doc_hash_and_stable(tmp_path, gutenberg_dir, all_books):
    art, _, _ = all_books
    full = dict(zip(art.read()["doc_id"].to_pylist(), art.read()["split"].to_pylist()))
    assert {"train", "test"} <= set(full.values())
    sub = build("documents", make_config(tmp_path, documents={"paths": [str(gutenberg_dir / "pg1*.txt.gz")]}))
    t = sub.read()
    assert 0 < t.num_rows < len(full)
    for d, s in zip(t["doc_id"].to_pylist(), t["split"].to_pylist()):
        assert (
            full[d] == s
        )  # same id (the glob's folder names it), same split, whatever else is in the corpus


def test_doc_idx_dense_in_order_across_shards(tmp_path, small_corpus):
    one = build("documents", make_config(tmp_path / "a", documents={"paths": [str(small_corpus)]}))
    many = build(
        "documents", make_config(tmp_path / "b", documents={"paths": [str(small_corpus)], "shard_bytes": 1})
    )
    assert len(many.parts()) == 4 and len(one.parts()) == 1
    assert many.version == one.version  # shard size is not part of the version
    assert many.read().to_pylist() == one.read().to_pylist()
    assert many.read()["doc_idx"].to_pylist() == [0, 1, 2, 3]


def test_min_chars_drops_and_counts(tmp_path, small_corpus):
    art = build(
        "documents", make_config(tmp_path, documents={"paths": [str(small_corpus)], "min_chars": 170_000})
    )
    t = art.read()
    assert all(n >= 170_000 for n in t["n_chars"].to_pylist())
    assert art.stats["dropped_short"] == 4 - t.num_rows > 0


def test_explicit_split_lists(tmp_path, small_corpus):
    art = build(
        "documents",
        make_config(
            tmp_path, documents={"paths": [str(small_corpus)], "split_lists": {"test": ["books/pg46.txt.gz"]}}
        ),
    )
    splits = dict(zip(art.read()["doc_id"].to_pylist(), art.read()["split"].to_pylist()))
    assert splits.pop("books/pg46.txt.gz") == "test" and set(splits.values()) == {"train"}
    with pytest.raises(Exception, match="not in the corpus: books/nope"):
        build(
            "documents",
            make_config(
                tmp_path / "x",
                documents={"paths": [str(small_corpus)], "split_lists": {"test": ["books/nope"]}},
            ),
        )


def test_jsonl_parquet_and_globs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "x1", "body": "alpha " * 50}) + "\n\n")
        f.write(json.dumps({"id": "x2", "body": "beta\r\nline " * 50}) + "\n")
    pq.write_table(pa.table({"body": ["gamma " * 60, "delta " * 60], "name": ["G", "D"]}), d / "b.parquet")
    (d / "c.txt").write_text("epsilon " * 40)
    (d / "notes.md").write_text("ignored")
    run = make_config(
        tmp_path,
        documents={
            "paths": [str(d / "*.jsonl.gz"), str(d / "*.parquet"), str(d / "c.txt")],
            "text_field": "body",
            "id_field": "id",
            "title_field": "name",
            "min_chars": 10,
        },
    )
    t = build("documents", run).read()
    rows = {r["doc_id"]: r for r in t.to_pylist()}
    assert set(rows) == {"x1", "x2", "in/b.parquet:0", "in/b.parquet:1", "c.txt"}
    assert rows["x2"]["text"].startswith("beta\nline") and "\r" not in rows["x2"]["text"]
    assert rows["in/b.parquet:1"]["title"] == "D" and rows["x1"]["source"] == "in/a.jsonl.gz"


def test_embedded_stdlib_corpus(tmp_path):
    art = build("documents", make_config(tmp_path, documents={"stdlib_include": ["json", "argparse"]}))
    rows = {r["doc_id"]: r for r in art.read().to_pylist()}
    assert set(rows) == {"stdlib/json", "stdlib/argparse"}
    js = rows["stdlib/json"]["text"]
    assert js.startswith("# ---- json/__init__.py ----\n")
    assert "# ---- json/decoder.py ----\n" in js and "# ---- json/tool.py ----\n" in js
    assert art.meta["corpus"] == "stdlib"


# ------------------------------------------------------------------------------ bad input


def bad_corpus(tmp_path, name, data: bytes):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "good.txt").write_text("fine text " * 200)
    (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize(
    "name,data,pattern",
    [
        ("empty.txt", b"", r"empty\.txt: file is empty"),
        ("blob.txt", bytes(range(256)) * 10, r"blob\.txt: file looks binary"),
        ("trunc.txt.gz", gzip.compress(b"some text " * 500)[:-30], r"trunc\.txt\.gz: cannot read file"),
        (
            "bad.jsonl",
            b'{"text": "ok ' + b"x" * 2000 + b'"}\n{"text": broken}\n',
            r"bad\.jsonl, line 2: malformed JSON",
        ),
        (
            "nofield.jsonl",
            b'{"body": "x"}\n',
            r"nofield\.jsonl, line 1: record has no 'text' field \(has: body\)",
        ),
        ("empty.jsonl", b"", r"empty\.jsonl: file is empty"),
        ("notext.parquet", "parquet:content", r"notext\.parquet: Parquet file has no 'text' column"),
        ("norows.parquet", "parquet:text:0", r"norows\.parquet: Parquet file has no rows"),
        ("junk.parquet", b"PAR1 this is not parquet", r"junk\.parquet: not a readable Parquet file"),
    ],
)
def test_bad_input_is_named_and_skippable(tmp_path, name, data, pattern):
    if isinstance(data, str):  # a Parquet file: "parquet:<column>[:<rows>]"
        _, col, *rows = data.split(":")
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({col: ["x" * 2000] * int(rows[0] if rows else 1)}), buf)
        data = buf.getvalue().to_pybytes()
    d = bad_corpus(tmp_path, name, data)
    with pytest.raises(InputError, match=pattern):
        build("documents", make_config(tmp_path / "s1", documents={"paths": [str(d)]}))
    art = build(
        "documents",
        make_config(tmp_path / "s2", documents={"paths": [str(d)], "on_error": "skip", "min_chars": 100}),
    )
    assert sum(art.stats["skipped"].values()) == 1
    assert "bad/good.txt" in art.read()["doc_id"].to_pylist()
    [example] = art.stats["skipped_examples"]  # the manifest names the file (and line) it skipped
    assert example["file"].endswith(name) and re.search(pattern.split(": ", 1)[-1], example["error"])


def test_parquet_without_text_column(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    pq.write_table(pa.table({"content": ["x" * 2000]}), d / "t.parquet")
    with pytest.raises(
        InputError, match=r"t\.parquet: Parquet file has no 'text' column \(columns: content\)"
    ):
        build("documents", make_config(tmp_path, documents={"paths": [str(d)]}))


def test_unreadable_paths(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such file or folder"):
        build("documents", make_config(tmp_path, documents={"paths": [str(tmp_path / "nowhere")]}))
    with pytest.raises(InputError, match=r"glob matches no files"):
        build("documents", make_config(tmp_path, documents={"paths": [str(tmp_path / "*.jsonl")]}))
    d = tmp_path / "links"
    d.mkdir()
    (d / "ok.txt").write_text("x" * 3000)
    os.symlink(tmp_path / "missing.txt", d / "dangling.txt")
    with pytest.raises(InputError, match=r"dangling\.txt: cannot read: broken symbolic link"):
        build("documents", make_config(tmp_path, documents={"paths": [str(d)]}))
    # on_error=skip: a file found in a folder that cannot be read is skipped and counted
    art = build("documents", make_config(tmp_path, documents={"paths": [str(d)], "on_error": "skip"}))
    assert art.stats["skipped"] == {"unreadable": 1} and art.stats["docs"] == 1
    assert art.stats["skipped_examples"][0]["file"].endswith("dangling.txt")
    # the skipped file enters the version by its name in the corpus, never by where the folder lies
    moved = tmp_path / "elsewhere" / "links"
    moved.parent.mkdir()
    d.rename(moved)
    run = make_config(tmp_path / "s3", documents={"paths": [str(moved)], "on_error": "skip"})
    assert resolve("documents", run).version == art.version


def test_error_loses_nothing_already_written(tmp_path, small_corpus):
    run = make_config(tmp_path, documents={"paths": [str(small_corpus)]})
    good = build("documents", run)
    d = bad_corpus(tmp_path, "empty.txt", b"")
    with pytest.raises(InputError):
        build("documents", run.with_section("documents", {"paths": [str(d)]}))
    store = ArtifactStore(run.root())
    assert store.get_ref("documents", "latest") == good.version and good.verify() == []
    assert [m.version for m in store.versions("documents")] == [good.version]


def test_a_large_file_is_streamed_in_batches(tmp_path, monkeypatch):
    """One big .jsonl is one shard; its documents are written batch by batch (bounded memory) and come
    out exactly as when written at once, doc_idx dense across the batches."""
    import stages.documents.stage as sd

    d = tmp_path / "j"
    d.mkdir()
    with open(d / "big.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"document {i} " + "word " * 50}) + "\n")
    cfg = {"paths": [str(d)], "min_chars": 10}
    whole = build("documents", make_config(tmp_path / "a", documents=cfg))
    monkeypatch.setattr(sd, "BATCH_CHARS", 1000)  # ~4 documents per batch
    batches: list[int] = []
    real = sd.coalesce

    def counted(tables):  # the batches that finalize streams into the part (then joins to row groups)
        return real(batches.append(t.num_rows) or t for t in tables)

    monkeypatch.setattr(sd, "coalesce", counted)
    streamed = build("documents", make_config(tmp_path / "b", documents=cfg))
    assert len(batches) >= 50 and max(batches) <= 5 and sum(batches) == 300
    assert streamed.read().equals(whole.read())
    assert streamed.read()["doc_idx"].to_pylist() == list(range(300))


# ------------------------------------------------------------------------------ encodings and duplicates

RUSSIAN = "Война и мир. Лев Николаевич Толстой. Часть первая. Князь Василий говорил всегда лениво. " * 30
GREEK = "Η Ιλιάδα είναι επικό ποίημα του Ομήρου για τον Τρωικό πόλεμο και την οργή του Αχιλλέα. " * 30


@pytest.mark.parametrize(
    "data, encoding",
    [
        (RUSSIAN.encode("cp1251"), "cp1251"),
        (RUSSIAN.encode("koi8-r"), "koi8_r"),
        (GREEK.encode("cp1253"), "cp1253"),
        (b"\xff\xfe" + RUSSIAN.encode("utf-16-le"), "utf-16-le"),
        (b"\xfe\xff" + GREEK.encode("utf-16-be"), "utf-16-be"),
        (b"\xff\xfe\x00\x00" + GREEK.encode("utf-32-le"), "utf-32-le"),
        ("Café crème, déjà vu: naïve façade. ".encode("cp1252") * 40, "cp1252"),
    ],
)
def test_legacy_and_utf16_encodings_are_read_not_garbled(tmp_path, data, encoding):
    """cp1251 read as Windows-1252 gave 'Âîéíà è ìèð'; UTF-16 with a byte-order mark was called binary."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "book.txt").write_bytes(data)
    art = build("documents", make_config(tmp_path / "s", documents={"paths": [str(d)], "min_chars": 10}))
    (text,) = art.read(columns=["text"])["text"].to_pylist()
    expected = {"cp1251": RUSSIAN, "koi8_r": RUSSIAN, "utf-16-le": RUSSIAN, "cp1252": None}.get(
        encoding, GREEK
    )
    assert text == (expected or "Café crème, déjà vu: naïve façade. " * 40)
    assert art.stats["encodings"] == {encoding: 1}


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    d = bad_corpus(tmp_path, "wide.txt", RUSSIAN.encode("utf-16-le"))
    with pytest.raises(InputError, match=r"wide\.txt: file looks binary .*byte-order mark"):
        build("documents", make_config(tmp_path / "s", documents={"paths": [str(d)]}))


def test_a_file_listed_twice_is_one_document(tmp_path, small_corpus):
    """A folder and a file inside it (and an overlapping glob) used to give the same book two doc ids."""
    paths = [str(small_corpus), str(small_corpus / "pg11.txt.gz"), str(small_corpus / "pg1*.txt.gz")]
    art = build("documents", make_config(tmp_path / "s", documents={"paths": paths}))
    ids = art.read(columns=["doc_id"])["doc_id"].to_pylist()
    assert sorted(ids) == sorted(f"books/{p.name}" for p in small_corpus.iterdir())


@pytest.mark.parametrize("mode", ["raise", "drop", "keep"])
def test_the_same_text_under_two_names(tmp_path, mode):
    d = tmp_path / "in"
    (d / "train").mkdir(parents=True)
    (d / "copies").mkdir()
    book = "It was the best of times, it was the worst of times. " * 100
    (d / "train" / "a.txt").write_text(book)
    (d / "copies" / "a-copy.txt").write_text(book)
    (d / "train" / "b.txt").write_text("Call me Ishmael. " * 200)
    run = make_config(tmp_path / "s", documents={"paths": [str(d)], "duplicates": mode})
    if mode == "raise":
        with pytest.raises(
            InputError, match=r"'in/copies/a-copy\.txt' and 'in/train/a\.txt' have the same text"
        ):
            build("documents", run)
        return
    art = build("documents", run)
    t = art.read(columns=["doc_id", "doc_idx"])
    assert art.stats["same_text"] == 1
    if mode == "drop":
        assert t["doc_id"].to_pylist() == ["in/copies/a-copy.txt", "in/train/b.txt"]
        assert t["doc_idx"].to_pylist() == [0, 1] and art.stats["docs"] == 2
        assert art.stats["dropped_duplicates"] == 1 and sum(art.stats["splits"].values()) == 2
    else:
        assert art.stats["docs"] == 3 and t["doc_idx"].to_pylist() == [0, 1, 2]


CHANGE_DURING_BUILD = """
import sys
from pathlib import Path

import stages.documents.stage as documents
from pipeline.executor import build
from tests.conftest import make_config

root, corpus = Path(sys.argv[1]), Path(sys.argv[2])
target = corpus / "b.txt"
real_iter_file = documents.iter_file


def iter_file(f, *args):
    # another program rewrites a book after the version was resolved, before the shard reads it
    if f.path == str(target):
        target.write_text("A different book altogether. " * 100)
    return real_iter_file(f, *args)


documents.iter_file = iter_file
# serial: the shards run in this process, where the writer above is installed
build("documents", make_config(root, runner={"kind": "serial"}, documents={"paths": [str(corpus)], "shard_bytes": 1}))
"""


def test_a_file_changed_during_the_build_fails_it_and_publishes_nothing(tmp_path):
    """The version was computed from the old text; the shard read the new one: that artifact would have
    held the new text under the old version, and verify would call it intact."""
    import subprocess
    import sys

    from tests.conftest import REPO

    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The first book. " * 100)
    (corpus / "b.txt").write_text("The second book. " * 100)
    run = make_config(
        tmp_path / "s", runner={"kind": "serial"}, documents={"paths": [str(corpus)], "shard_bytes": 1}
    )
    old_version = resolve("documents", run).version
    r = subprocess.run(
        [sys.executable, "-c", CHANGE_DURING_BUILD, str(tmp_path / "s"), str(corpus)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert f"{corpus / 'b.txt'}: changed while the documents stage was reading it" in r.stderr
    assert not ArtifactStore(str(tmp_path / "s")).exists("documents", old_version)
    # once the corpus is settled, the rerun builds the new content under its own version
    art = build("documents", run)
    assert art.version != old_version and art.verify() == []
    assert "A different book altogether." in art.read(columns=["text"])["text"].to_pylist()[1]


def test_a_file_added_after_the_version_was_computed_fails_the_build(tmp_path):
    """A book dropped into a listed folder between resolving and planning used to be ingested under the
    version computed without it."""
    from pipeline.executor import build_node

    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The first book. " * 100)
    (corpus / "b.txt").write_text("The second book. " * 100)
    run = make_config(tmp_path / "s", runner={"kind": "serial"}, documents={"paths": [str(corpus)]})
    node = resolve("documents", run)
    (corpus / "c.txt").write_text("A late arrival. " * 100)
    with pytest.raises(InputError, match=r"the corpus changed .*added: in/c\.txt"):
        build_node(node)
    assert not ArtifactStore(run.root()).exists("documents", node.version)
    (corpus / "b.txt").unlink()
    with pytest.raises(InputError, match=r"added: in/c\.txt, removed: in/b\.txt"):
        build_node(node)


@pytest.mark.parametrize(
    "text",
    [
        "Привет мир",  # ten letters
        "# -*- coding: cp1251 -*-\nimport os\n\n\ndef main():\n    # Получить список файлов\n    return os.listdir('.')\n",
        "This eBook is for the use of anyone anywhere at no cost. " * 20 + "Война и мир. Лев Толстой.",
    ],
)
def test_short_and_mixed_cp1251_is_not_garbled(text):
    """Below 20 letters, or Russian comments in code, or a long English header: read as Windows-1252
    these came back as 'Ïðèâåò ìèð'."""
    assert decode(text.encode("cp1251")) == (text, "cp1251")


@pytest.mark.parametrize(
    "text",
    [
        "não, mãe, pão, irmão, coração, ação, " * 5,  # was switched to cp1250: 'năo, măe'
        "ÉTÉ À OÙ DÉJÀ ÇA " * 5,  # was switched to cp1257
        "L'été dernier, à Paris, nous avons dîné près de la fenêtre; déjà la forêt était rouge. " * 10,
        "Größe, Übung, Mädchen, schön, Straße, früh. " * 10,
    ],
)
def test_western_text_stays_windows_1252(text):
    assert decode(text.encode("cp1252")) == (text, "cp1252")


def test_a_jsonl_file_decides_its_encoding_once(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    lines = [{"text": "Война и мир. Лев Николаевич Толстой. Часть первая. " * 30}, {"text": "Привет, мир"}]
    (d / "ru.jsonl").write_bytes(
        b"".join(json.dumps(r, ensure_ascii=False).encode("cp1251") + b"\n" for r in lines)
    )
    art = build("documents", make_config(tmp_path / "s", documents={"paths": [str(d)], "min_chars": 5}))
    assert sorted(art.read(columns=["text"])["text"].to_pylist()) == sorted(r["text"] for r in lines)


def test_a_jsonl_line_that_only_looks_western_does_not_decide_the_encoding(tmp_path):
    # ’ and — have the same bytes in cp1251 and cp1252: the first line reads as cp1252, the second is Cyrillic
    d = tmp_path / "in"
    d.mkdir()
    lines = [{"text": "Don’t panic — chapter one"}, {"text": "Война и мир. Лев Николаевич Толстой. " * 20}]
    (d / "ru.jsonl").write_bytes(
        b"".join(json.dumps(r, ensure_ascii=False).encode("cp1251") + b"\n" for r in lines)
    )
    art = build("documents", make_config(tmp_path / "s", documents={"paths": [str(d)], "min_chars": 5}))
    assert sorted(art.read(columns=["text"])["text"].to_pylist()) == sorted(r["text"] for r in lines)
    assert art.manifest.stats["encodings"].get("cp1251") == 1


def naive_recurrences(text: str, spans: list[tuple[int, int, int]]) -> str:
    """The text rebuilt from its original lines and the reported insertions, one line at a time."""
    lines = text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1] + "\n"] if lines[-1] else [])
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        for after, first, n in spans:
            if after == i:
                out.extend(lines[first : first + n])
    rebuilt = "".join(out)
    return rebuilt if text.endswith("\n") else rebuilt[:-1]


@pytest.mark.parametrize("trailing", ["\n", ""])
def test_recurrences_copy_earlier_lines_and_keep_the_rest(trailing):
    from stages.documents.recurrences import Recurrences, insert_recurrences

    text = "\n".join(f"line {k} " + "x" * (k % 7) for k in range(3000)) + trailing
    cfg = Recurrences(every_lines=10, min_lines=2, max_lines=6, near_share=0.5, near_lines=12)
    out, done = insert_recurrences(text, "pkg/a", cfg)
    assert 200 < done.copies < 400 and len(out) == len(text) + done.chars
    assert out == naive_recurrences(text, done.spans)
    for after, first, n in done.spans:
        assert 2 <= n <= 6 and first + n <= after + 1  # the source ends at or before the insertion point
    near = sum(after + 1 - (first + n) <= 12 for after, first, n in done.spans)
    assert 0.35 < near / done.copies < 0.75  # half drawn near, and a far draw can land near too
    assert insert_recurrences(text, "pkg/a", cfg) == (out, done)  # the draws depend on the id alone
    assert insert_recurrences(text, "pkg/b", cfg)[0] != out
    assert insert_recurrences(text, "pkg/a", Recurrences())[0] == text  # every_lines 0: unchanged
    with pytest.raises(ValueError, match="max_lines"):
        Recurrences(every_lines=5, min_lines=4, max_lines=3)


def test_recurrences_change_train_documents_only(tmp_path, small_corpus):
    plain = build("documents", make_config(tmp_path / "a", documents={"paths": [str(small_corpus)]}))
    cfg = {"paths": [str(small_corpus)], "split_lists": {"test": ["books/pg46.txt.gz"]}}
    base = build("documents", make_config(tmp_path / "b", documents=cfg))
    rec = build(
        "documents", make_config(tmp_path / "c", documents={**cfg, "recurrences": {"every_lines": 20}})
    )
    assert rec.manifest.version != base.manifest.version
    off = make_config(tmp_path / "d", documents={**cfg, "recurrences": {"every_lines": 0, "min_lines": 3}})
    assert resolve("documents", off).version == base.manifest.version  # off: the version from before
    before = dict(zip(base.read()["doc_id"].to_pylist(), base.read()["text"].to_pylist()))
    after = rec.read().to_pylist()
    assert plain.manifest.stats.get("recurrences") == 0
    for row in after:
        if row["split"] == "test":
            assert row["text"] == before[row["doc_id"]]
        else:
            assert len(row["text"]) > len(before[row["doc_id"]]) and row["n_chars"] == len(row["text"])
    inserted = sum(len(r["text"]) - len(before[r["doc_id"]]) for r in after)
    assert rec.manifest.stats["recurrence_chars"] == inserted > 0


def test_recurrences_do_not_hide_a_duplicate(tmp_path):
    """Two names, one text: the copies drawn for each differ (they depend on the id), so the duplicate
    check must compare the texts as read, before the recurrences."""
    d = tmp_path / "in"
    d.mkdir()
    book = "".join(f"line {k} of the book\n" for k in range(300))
    (d / "a.txt").write_text(book)
    (d / "b.txt").write_text(book)
    docs = {"paths": [str(d)], "splits": {"train": 1.0, "valid": 0.0, "test": 0.0}}
    with pytest.raises(InputError, match="have the same text"):
        build("documents", make_config(tmp_path / "s", documents={**docs, "recurrences": {"every_lines": 5}}))
    art = build(
        "documents",
        make_config(
            tmp_path / "k", documents={**docs, "duplicates": "keep", "recurrences": {"every_lines": 5}}
        ),
    )
    a, b = art.read()["text"].to_pylist()
    assert a != b and len(a) > len(book) and len(b) > len(book)
    assert art.stats["chars"] == len(a) + len(b) and art.stats["recurrence_chars"] == len(a) + len(
        b
    ) - 2 * len(book)

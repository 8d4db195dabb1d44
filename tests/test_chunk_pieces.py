"""Long documents are tokenized in pieces (pipeline.pieces): the tokens, offsets and chunks equal those of
the whole document, for the tokenizer the pipeline trains (exact cuts), for adopted tokenizers of other
kinds (stitched windows), and around whitespace runs, newline runs, multi-byte characters and words
longer than a piece; the chunks artifact is byte-identical whether a document is split or not, and the
memory of the stage no longer grows with the document."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from pipeline.pieces import CUT_CHARS, DocBytes, cut_pattern, find_cut, plan_pieces, safe_cut_chars
from stages.chunks import chunk_batches
from tests.conftest import REPO, copy_stages, make_config

EOT = "<|endoftext|>"
WORDS = [
    "the", "cat's", "they'll", "naïve", "café", "東京", "🙂", "x1234", "3.14159", "--", "!!!", "e\u0301t\u00e9",
    "λόγος", EOT, "don't", "\u00a0", "\u3000", "\u2028", "def f(x):", "a_b", "Ω", "ﬁ", "\u0301",
]  # fmt: skip
SEPS = [" ", "  ", "\n", "\n\n", "\n\n\n", "\t", " \n", "   \n  ", "\r\n", " \t ", "\n ", "", "\u00a0 "]


def tricky_text(n_bytes: int, seed: int, long_runs: bool = True) -> str:
    """Words of several scripts and byte lengths between runs of spaces, tabs and newlines, plus a few
    stretches with no whitespace at all (longer than a piece) and long whitespace runs."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        r = rng.random() if long_runs else 1.0
        if r < 0.0005:
            s = rng.choice(["a", "ab", "é", "東"]) * rng.randint(500, 5000)
        elif r < 0.001:
            s = rng.choice([" ", "\n", "\t", " \n"]) * rng.randint(10, 2000)
        else:
            s = rng.choice(WORDS) + rng.choice(SEPS)
        out.append(s)
        size += len(s.encode())
    return "".join(out)


# ------------------------------------------------------------------------------------------ tokenizers


def _train(tok, trainer, texts):
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def train_text() -> list[str]:
    return tricky_text(150_000, seed=1).splitlines(keepends=True)


def byte_level(train_text, **kw):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = kw.pop("pre", None) or pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=True
    )
    tok.decoder = decoders.ByteLevel()
    if "normalizer" in kw:
        tok.normalizer = kw.pop("normalizer")
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _train(tok, trainer, train_text)
    if "post" in kw:
        tok.post_processor = kw.pop("post")
    if "added" in kw:
        tok.add_tokens(kw.pop("added"))
    return tok


def make_tokenizer(kind: str, train_text: list[str]):
    """The trained kind (what the tokenizer stage makes) and stand-ins for adopted tokenizer.json files."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "byte-level":  # the tokenizer stage's
        return byte_level(train_text)
    if kind == "nfc+trim-offsets":  # GPT-NeoX-like normalizer and post-processor
        return byte_level(
            train_text,
            normalizer=normalizers.NFC(),
            post=processors.ByteLevel(trim_offsets=True, add_prefix_space=False),
        )
    if kind == "space-run-tokens":  # GPT-NeoX adds tokens for runs of spaces: no cut before a space
        return byte_level(train_text, added=[AddedToken(" " * k, normalized=False) for k in (2, 4, 8)])
    if kind == "digits+byte-level":  # an unknown pre-tokenizer: stitched windows
        seq = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        return byte_level(train_text, pre=seq)
    if kind == "no-pre-tokenizer":  # Llama-2-like: one "word" per document, BPE with byte fallback
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        return _train(
            tok,
            trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"], show_progress=False),
            train_text,
        )
    if kind == "wordpiece":  # BERT-like: whitespace produces no token
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return _train(
            tok,
            trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[UNK]"], show_progress=False),
            train_text,
        )
    if kind == "metaspace-unigram":  # T5-like: a Viterbi path per pre-token, so a join inside one fails
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=400, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False
        )
        return _train(tok, trainer, train_text)
    raise ValueError(kind)


KINDS = [
    "byte-level",
    "nfc+trim-offsets",
    "space-run-tokens",
    "digits+byte-level",
    "no-pre-tokenizer",
    "wordpiece",
    "metaspace-unigram",
]


@pytest.fixture(scope="module")
def tokenizers(train_text):
    return {k: make_tokenizer(k, train_text) for k in KINDS}


def test_which_tokenizers_get_exact_cuts(tokenizers, train_text):
    from tokenizers import AddedToken, normalizers, pre_tokenizers, processors

    assert safe_cut_chars(tokenizers["byte-level"]) == CUT_CHARS
    assert safe_cut_chars(tokenizers["nfc+trim-offsets"]) == CUT_CHARS
    assert safe_cut_chars(tokenizers["space-run-tokens"]) == "\n\t"
    for k in ("digits+byte-level", "no-pre-tokenizer", "wordpiece", "metaspace-unigram"):
        assert safe_cut_chars(tokenizers[k]) == "", k
    tok = byte_level(train_text)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space before every piece
    assert safe_cut_chars(tok) == ""
    tok = byte_level(train_text, post=processors.ByteLevel(trim_offsets=True, add_prefix_space=True))
    assert safe_cut_chars(tok) == ""  # the first token of a piece would keep its space
    tok = byte_level(train_text, normalizer=normalizers.NFKC())  # maps U+00A8 to a space and a mark
    assert safe_cut_chars(tok) == ""
    tok = byte_level(train_text, added=[AddedToken("<mask>", lstrip=True)])  # eats the space before it
    assert safe_cut_chars(tok) == ""


# ------------------------------------------------------------------------------------------ exact cuts


def all_cuts(text: str, chars: str) -> list[int]:
    raw = text.encode()
    doc, pattern = DocBytes(memoryview(raw)), cut_pattern(chars)
    cuts, c = [], find_cut(doc, pattern, 1, doc.n)
    while c is not None:
        cuts.append(c)
        c = find_cut(doc, pattern, c + 1, doc.n)
    # byte positions -> character positions
    return [len(raw[:c].decode()) for c in cuts]


def encoded(tok, text: str, shift: int = 0) -> list[tuple[int, int, int]]:
    enc = tok.encode(text, add_special_tokens=False)
    return [(i, s + shift, e + shift) for i, (s, e) in zip(enc.ids, enc.offsets)]


@pytest.mark.parametrize("kind", ["byte-level", "nfc+trim-offsets", "space-run-tokens"])
def test_every_exact_cut_changes_no_token(tokenizers, kind):
    """Cut the text at every place the rule allows: the two halves' tokens and offsets are always the
    whole text's. Cutting between a space and its word does change tokens: a naive cut is not exact."""
    tok = tokenizers[kind]
    text = tricky_text(6000, seed=7, long_runs=False)
    whole = encoded(tok, text)
    cuts = all_cuts(text, safe_cut_chars(tok))
    assert len(cuts) > 200
    for c in cuts:
        assert text[c] in CUT_CHARS and not text[c - 1].isspace()
        assert encoded(tok, text[:c]) + encoded(tok, text[c:], c) == whole, (c, text[c - 5 : c + 5])
    # between a space and the word it belongs to ("Ġword"): a naive cut there splits a pre-token
    naive = [c for c in range(1, len(text)) if text[c - 1] == " " and text[c].isalpha()][:100]
    broken = sum(encoded(tok, text[:c]) + encoded(tok, text[c:], c) != whole for c in naive)
    assert len(naive) > 50 and broken > len(naive) // 2


def test_whitespace_means_the_same_to_python_and_the_pre_tokenizer():
    """The byte search calls a character whitespace by str.isspace(); the pre-tokenizer's regex by its
    \\s. Every \\s character must be isspace(), or a cut could follow whitespace. And no allowed
    normalizer may turn a non-whitespace character into text that starts or ends with whitespace."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    chars = [chr(i) for i in range(0x110000) if not 0xD800 <= i < 0xE000]
    text = "x".join(chars)
    splits = pre_tokenizers.Split(Regex(r"\s"), "isolated").pre_tokenize_str(text)
    regex_ws = {text[s:e] for _, (s, e) in splits if e - s == 1 and text[s] != "x"}
    assert regex_ws and all(c.isspace() for c in regex_ws)
    assert all(c in regex_ws for c in CUT_CHARS)
    for norm in (normalizers.NFC(), normalizers.NFD(), normalizers.Lowercase()):
        for c in chars:
            if not c.isspace():
                out = norm.normalize_str(c)
                assert not out or not (out[0].isspace() or out[-1].isspace()), (norm, hex(ord(c)))
        assert all(norm.normalize_str(c) == c for c in CUT_CHARS)


# ------------------------------------------------------------------------------------------ pieces


def documents(texts: list[str], first: int = 0) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "doc_idx": pa.array(range(first, first + len(texts)), pa.int64()),
            "split": pa.array(["train"] * len(texts)),
            "text": pa.array(texts),
        }
    )


def chunk_table(
    tok, texts: list[str], piece_bytes: int | None, stats: dict | None = None, chunk_len: int = 64
):
    """The chunk rows of `texts` (in two record batches, as the stage reads them) from `chunk_batches`."""
    batches = [documents(texts[:2]), documents(texts[2:], 2)] if len(texts) > 2 else [documents(texts)]
    return pa.concat_tables(list(chunk_batches(batches, tok, chunk_len, piece_bytes, 4, stats)))


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_give_the_whole_documents_tokens(tokenizers, kind):
    """A 150 KB document of tricky text, split into pieces of 1-4 KB (about a hundred of them, windows
    where no exact cut is near), chunks exactly as when encoded whole: ids, offsets-derived chunk texts,
    positions. Short and empty documents around it are unaffected."""
    tok = tokenizers[kind]
    long_doc = tricky_text(150_000, seed=11)
    texts = [long_doc, "short " * 10, "", tricky_text(20_000, seed=12)]
    whole = chunk_table(tok, texts, None)
    ids = [t for r in whole.to_pylist() if r["doc_idx"] == 0 for t in r["tokens"]]
    assert ids == tok.encode(long_doc, add_special_tokens=False).ids  # the whole-document path is exact
    for piece_bytes in (1024, 1531, 4096):
        stats: dict = {}
        pieced = chunk_table(tok, texts, piece_bytes, stats)
        assert stats["pieces"] > 20 and stats["pieced_docs"] == 2, stats
        assert pieced.equals(whole), (kind, piece_bytes)
        assert stats["empty_docs"] == 1 and stats["docs"] == 4


def test_windows_in_a_long_run_and_exact_cuts_elsewhere(tokenizers):
    """With the trained tokenizer, ordinary text is cut exactly; a 30 KB word (one pre-token, no exact
    cut inside) goes to windows that cannot be joined inside it and grow until they hold it whole."""
    tok = tokenizers["byte-level"]
    text = "lorem ipsum dolor\n" * 2000 + "ab" * 15_000 + " sit amet\n" * 2000
    doc = DocBytes(memoryview(text.encode()))
    pieces = list(plan_pieces(doc, cut_pattern(safe_cut_chars(tok)), 2048))
    assert sum(not p.exact_end for p in pieces) > 5  # windows over the long word
    assert sum(p.exact_end for p in pieces) > 20
    stats: dict = {}
    assert chunk_table(tok, [text], 2048, stats).equals(chunk_table(tok, [text], None))
    assert stats["regrown_windows"] > 0


@pytest.mark.parametrize("seed", range(4))
def test_random_piece_sizes_and_chunk_lengths(tokenizers, seed):
    rng = random.Random(seed)
    tok = tokenizers[rng.choice(["byte-level", "space-run-tokens", "digits+byte-level"])]
    texts = [tricky_text(rng.randint(20_000, 60_000), seed=100 + seed) for _ in range(3)]
    chunk_len = rng.choice([1, 3, 64, 200])
    piece_bytes = rng.randint(1024, 5000)
    whole = chunk_table(tok, texts, None, chunk_len=chunk_len)
    assert chunk_table(tok, texts, piece_bytes, chunk_len=chunk_len).equals(whole)
    for d, text in enumerate(texts):
        assert "".join(r["text"] for r in whole.to_pylist() if r["doc_idx"] == d) == text


# ------------------------------------------------------------------------------------------ the stage


def test_chunks_artifact_is_byte_identical_split_or_not(tmp_path, gutenberg_dir):
    """One long document (a book and generated text, about 0.8 MB) among short ones: the chunks stage
    with pieces of 4 KB writes the same files, byte for byte, as with whole documents, under the same
    version (piece_bytes is unhashed)."""
    import gzip

    from pipeline.executor import build

    d = tmp_path / "corpus"
    d.mkdir()
    with gzip.open(gutenberg_dir / "pg1661.txt.gz") as f:
        book = f.read().decode("utf-8", errors="replace")
    (d / "long.txt").write_text(book + tricky_text(200_000, seed=5).replace("\r", ""), encoding="utf-8")
    for k in range(3):
        (d / f"short{k}.txt").write_text(tricky_text(3000 + 1000 * k, seed=20 + k), encoding="utf-8")
    whole_run = make_config(
        tmp_path / "whole",
        documents={"paths": [str(d)], "min_chars": 100, "strip_gutenberg": False},
        tokenizer={"vocab_size": 500, "max_train_chars": 300_000},
        chunks={"piece_bytes": None},
    )
    whole = build("chunks", whole_run, with_deps=True)
    pieced_run = copy_stages(whole_run, tmp_path / "pieced", ("documents", "tokenizer"))
    pieced_run = pieced_run.with_section("chunks", {"piece_bytes": 4096})
    pieced = build("chunks", pieced_run)
    assert pieced.version == whole.version
    assert whole.stats["pieces"] == whole.stats["docs"] and pieced.stats["pieces"] > 150
    files = {f.path: f.sha256 for f in whole.manifest.files}
    assert files == {f.path: f.sha256 for f in pieced.manifest.files}
    assert {"tokens.npy", "doc_index.parquet"} <= set(files)
    for name in files:
        assert (whole.local_path(name)).read_bytes() == (pieced.local_path(name)).read_bytes()


def test_memory_does_not_grow_with_the_document(tmp_path):
    """Peak RSS of chunking one single-line document, 1 MB and 4 MB, each in a fresh process: whole, the
    extra peak grows with the document (~190 bytes per byte); in 64 KB pieces it barely grows at all."""
    script = textwrap.dedent(
        """
        import json, random, resource, sys
        import pyarrow as pa
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from stages.chunks import chunk_batches
        n_bytes, piece_bytes = int(sys.argv[1]), int(sys.argv[2]) or None
        words = ["alpha", "beta", "gamma", "delta", "x1", "42", "(", ")", ":", "=", "é", "東"]
        rng = random.Random(0)  # the same prefix at every size, so the same tokenizer
        text = " ".join(rng.choice(words) for _ in range(n_bytes // 4))[:n_bytes]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([text[:100_000]], trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        batch = pa.record_batch({"doc_idx": pa.array([0], pa.int64()), "split": pa.array(["train"]),
                                 "text": pa.array([text])})
        def peak_kb():
            # VmHWM: this image's own peak (ru_maxrss would also count the parent's pages at fork)
            try:
                with open("/proc/self/status") as f:
                    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
            except (OSError, StopIteration):
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before = peak_kb()
        stats = {}
        n = sum(t.num_rows for t in chunk_batches([batch], tok, 64, piece_bytes, 2, stats))
        after = peak_kb()
        print(json.dumps({"extra_mb": (after - before) / 1024, "chunks": n, "pieces": stats["pieces"]}))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    runs = {
        (size, piece): subprocess.Popen(
            [sys.executable, "-c", script, str(size), str(piece)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for size in (1 << 20, 4 << 20)
        for piece in (0, 64 << 10)  # 0: whole
    }
    res = {}
    for key, p in runs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        res[key] = json.loads(out.strip().splitlines()[-1])
    small, big = 1 << 20, 4 << 20
    assert res[big, 64 << 10]["pieces"] > 50 and res[big, 0]["pieces"] == 1, res
    assert res[big, 64 << 10]["chunks"] == res[big, 0]["chunks"] > 4 * res[small, 0]["chunks"] * 0.9, res
    whole_growth = res[big, 0]["extra_mb"] - res[small, 0]["extra_mb"]
    pieced_growth = res[big, 64 << 10]["extra_mb"] - res[small, 64 << 10]["extra_mb"]
    assert whole_growth > 200, res  # ~190 bytes per byte: 3 MB more text costs ~570 MB more
    assert pieced_growth < max(0.1 * whole_growth, 20), res

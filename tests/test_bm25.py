"""bm25 stage: top-k equality with independent per-query BM25 implementations built over exactly the
retrievable chunks (rank-bm25 BM25Okapi, bm25s "lucene", plain numpy formulas), the causal rule,
corpus scope, padding and edge documents, versions, resume."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import RunnerConfig
from pipeline.errors import ConfigError, InputError
from pipeline.executor import build, open_build, resolve, run_shard
from pipeline.formats import ChunkReader, causal_retrievable, load_tokenizer, read_neighbors
from pipeline.store import ArtifactStore
from retrieval.bm25 import Params, document_neighbors
from stages.bm25 import corpus_index, plan_groups
from tests.conftest import make_config

K = 20
EXCL = 16
K1, B, EPS = 1.5, 0.75, 0.25


# ----------------------------------------------------------------------------------------- references
def _tf(chunks: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """tf[j, u]: occurrences of terms[u] (sorted) in chunk j (-1 pads ignored)."""
    if len(terms) == 0:
        return np.zeros((len(chunks), 0))
    lut = np.full(max(int(chunks.max()), int(terms.max())) + 2, -1)  # lut[-1] = -1 serves the pads
    lut[terms] = np.arange(len(terms))
    pos = lut[chunks]
    hit = pos >= 0
    flat = np.nonzero(hit)[0] * len(terms) + pos[hit]
    return (
        np.bincount(flat, minlength=len(chunks) * len(terms)).reshape(len(chunks), len(terms)).astype(float)
    )


def ref_lucene(chunks: np.ndarray, query: np.ndarray, k1: float = K1, b: float = B) -> np.ndarray:
    """Plain Lucene BM25 of every chunk for one query (bm25s method "lucene"); a repeated query token
    adds its term again."""
    terms, qcount = np.unique(query[query >= 0], return_counts=True)
    tf = _tf(chunks, terms)
    dl = (chunks >= 0).sum(1)
    n_docs = len(chunks)
    df = (tf > 0).sum(0)
    idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    part = tf / (tf + k1 * (1 - b + b * dl[:, None] / dl.mean()))
    return (part * (idf * qcount)).sum(1)


def ref_okapi(
    chunks: np.ndarray, query: np.ndarray, k1: float = K1, b: float = B, eps: float = EPS
) -> np.ndarray:
    """rank-bm25 BM25Okapi's formulas, vectorised per query (checked against rank-bm25 itself below)."""
    n_docs = len(chunks)
    srt = np.sort(chunks, axis=1)
    first = np.ones_like(srt, dtype=bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    df_all = np.bincount(srt[first & (srt >= 0)])  # document frequency of every term of these chunks
    vocab_terms = np.flatnonzero(df_all)
    raw = np.zeros(len(df_all))
    raw[vocab_terms] = np.log(n_docs - df_all[vocab_terms] + 0.5) - np.log(df_all[vocab_terms] + 0.5)
    floor = eps * raw[vocab_terms].mean()
    terms, qcount = np.unique(query[query >= 0], return_counts=True)
    present = terms < len(df_all)
    present[present] = df_all[terms[present]] > 0
    idf = np.where(present, raw[np.minimum(terms, len(raw) - 1)], 0.0)
    idf = np.where(present & (idf < 0), floor, idf)
    tf = _tf(chunks, terms)
    dl = (chunks >= 0).sum(1)
    part = tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl[:, None] / dl.mean()))
    return (part * (idf * qcount)).sum(1)


def query_tokens(doc: np.ndarray, i: int, mode: str) -> np.ndarray:
    if mode == "chunk+target" and i + 1 < len(doc):
        return np.concatenate([doc[i], doc[i + 1]])
    return doc[i]


def check_row(ids: np.ndarray, scores: np.ndarray, ref: np.ndarray, cand_ids: np.ndarray, k: int = K) -> None:
    """Our row equals the reference ranking of the candidates (score desc, then chunk id desc): scores to
    1e-4 relative, ids equal except among scores that tie within that tolerance, -1/NaN pads at the tail."""
    order = np.lexsort((-cand_ids, -ref))[:k]
    exp_ids, exp_sc = cand_ids[order], ref[order]
    n = len(order)
    assert (ids[n:] == -1).all() and np.isnan(scores[n:]).all()
    assert (ids[:n] >= 0).all() and len(set(ids[:n].tolist())) == n
    np.testing.assert_allclose(scores[:n], exp_sc, rtol=1e-4, atol=1e-9)
    lookup = dict(zip(cand_ids.tolist(), ref.tolist()))
    got = np.array([lookup[i] for i in ids[:n].tolist()])  # KeyError: not a retrievable chunk
    np.testing.assert_allclose(got, exp_sc, rtol=1e-4, atol=1e-9)
    same = ids[:n] == exp_ids
    if not same.all():  # any difference is a swap inside a tie
        assert np.allclose(exp_sc[~same], got[~same], rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def bm25_run(small_run, tmp_path_factory):
    """A private copy of the session store (documents/tokenizer/chunks of four short books)."""
    root = tmp_path_factory.mktemp("bm25") / "store"
    shutil.copytree(small_run.root(), root)
    # serial: no process start-up per build here; the process runner is exercised by the resume test
    return small_run.model_copy(update={"artifacts_root": str(root), "runner": RunnerConfig(kind="serial")})


@pytest.fixture(scope="session")
def chunks(bm25_run):
    reader = ChunkReader(ArtifactStore(bm25_run.root()).resolve("chunks"))
    return reader, np.asarray(reader.tokens)


_BUILT: dict[str, tuple] = {}


def table(run, **bm25):
    """Build (once per session) the bm25 artifact of these settings; returns (artifact, q, ids, scores)."""
    key = repr(sorted(bm25.items()))
    if key not in _BUILT:
        art = build("bm25", run.with_section("bm25", bm25))
        _BUILT[key] = (art, *read_neighbors(art))
    return _BUILT[key]


# ----------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("mode", ["chunk", "chunk+target"])
def test_lucene_causal_equals_per_query_reference_on_every_query(bm25_run, chunks, mode):
    reader, tokens = chunks
    art, q, ids, scores = table(bm25_run, query=mode)
    assert np.array_equal(q, np.arange(reader.n_chunks))  # one row per chunk, every split
    for d in reader.docs():
        doc = tokens[d.first : d.first + d.n]
        for i in range(d.n):
            m = i - EXCL
            row = d.first + i
            if m <= 0:
                assert (ids[row] == -1).all()
                continue
            check_row(
                ids[row], scores[row], ref_lucene(doc[:m], query_tokens(doc, i, mode)), d.first + np.arange(m)
            )
    assert art.meta == {
        **art.meta,
        "source": "bm25",
        "scope": "document-causal",
        "query": mode,
        "variant": "lucene",
        "stats": "causal",
        "exclude_recent": EXCL,
    }


def test_okapi_causal_equals_rank_bm25(bm25_run, chunks):
    from rank_bm25 import BM25Okapi

    reader, tokens = chunks
    _, _, ids, scores = table(bm25_run, variant="okapi", query="chunk+target")
    rng = np.random.default_rng(0)
    for d in reader.docs():
        doc = tokens[d.first : d.first + d.n]
        lists = [r[r >= 0].tolist() for r in doc]
        sample = set(rng.choice(np.arange(EXCL + 1, d.n), 12, replace=False).tolist()) | {
            EXCL + 1,
            EXCL + 2,
            d.n - 1,
        }
        for i in range(EXCL + 1, d.n):
            m = i - EXCL
            qt = query_tokens(doc, i, "chunk+target")
            ref = ref_okapi(doc[:m], qt)
            if i in sample:  # rank-bm25 itself, one index per query over exactly the retrievable chunks
                np.testing.assert_allclose(
                    BM25Okapi(lists[:m], k1=K1, b=B, epsilon=EPS).get_scores(qt.tolist()),
                    ref,
                    rtol=1e-9,
                    atol=1e-12,
                )
            check_row(ids[d.first + i], scores[d.first + i], ref, d.first + np.arange(m))


def test_document_stats_equal_one_index_per_document(bm25_run, chunks):
    """stats: document is the rank-bm25 peer's setting: one index per document, non-retrievable masked."""
    from rank_bm25 import BM25Okapi

    reader, tokens = chunks
    art_l, _, ids_l, sc_l = table(bm25_run, stats="document")
    art_o, _, ids_o, sc_o = table(bm25_run, stats="document", variant="okapi")
    assert art_l.meta["stats"] == "document" and art_o.meta["stats"] == "document"
    for d in reader.docs():
        doc = tokens[d.first : d.first + d.n]
        okapi = BM25Okapi([r[r >= 0].tolist() for r in doc], k1=K1, b=B, epsilon=EPS)
        for i in range(EXCL + 1, d.n):
            m, row = i - EXCL, d.first + i
            cand = d.first + np.arange(m)
            if i % 2 == 0:
                check_row(ids_l[row], sc_l[row], ref_lucene(doc, doc[i])[:m], cand)
            if i % 10 == 0:
                check_row(ids_o[row], sc_o[row], okapi.get_scores(doc[i][doc[i] >= 0].tolist())[:m], cand)


def test_lucene_reference_matches_bm25s(chunks):
    """The plain formula used above is bm25s' "lucene" method (checked on a few queries)."""
    import bm25s

    reader, tokens = chunks
    d = reader.docs()[0]
    doc = tokens[d.first : d.first + d.n]
    for i in (40, 300, d.n - 1):
        m = i - EXCL
        retriever = bm25s.BM25(method="lucene", k1=K1, b=B, dtype="float64")
        retriever.index([[str(t) for t in r[r >= 0]] for r in doc[:m]], show_progress=False)
        qt = query_tokens(doc, i, "chunk+target")
        got = retriever.get_scores([str(t) for t in qt[qt >= 0]])
        np.testing.assert_allclose(got, ref_lucene(doc[:m], qt), rtol=1e-9, atol=1e-12)


def test_long_book_sampled_queries(bm25_run, gutenberg_dir):
    """A long document (the fixture books one after another, ~5K chunks at vocab 2048) straight through the
    kernel, sampled queries."""
    from rank_bm25 import BM25Okapi

    tok = load_tokenizer(ArtifactStore(bm25_run.root()).resolve("tokenizer"))
    text = "\n".join(
        gzip.decompress(book.read_bytes()).decode("utf-8", errors="replace")
        for book in sorted(gutenberg_dir.glob("*.txt.gz"))
    )
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    n = -(-len(ids) // 64)
    doc = np.full((n, 64), -1, np.int32)
    doc.ravel()[: len(ids)] = ids
    assert n > 4000
    lucene = document_neighbors(doc, Params(query="chunk+target"))
    okapi = document_neighbors(doc, Params(variant="okapi"))
    lists = [r[r >= 0].tolist() for r in doc]
    for i in (17, 18, 100, 1234, n // 2, n - 2, n - 1):
        m = i - EXCL
        check_row(
            *(a[i] for a in lucene), ref_lucene(doc[:m], query_tokens(doc, i, "chunk+target")), np.arange(m)
        )
        if i in (18, 1234, n - 1):
            ref = BM25Okapi(lists[:m], k1=K1, b=B, epsilon=EPS).get_scores(lists[i])
            check_row(*(a[i] for a in okapi), ref, np.arange(m))


def test_unequal_chunk_lengths_use_exact_causal_avgdl():
    """Chunks of different lengths inside the prefix (not produced by `chunks`, but allowed): avgdl is that
    of exactly the retrievable chunks."""
    rng = np.random.default_rng(1)
    doc = rng.zipf(1.3, size=(200, 64)).astype(np.int32) % 300
    doc[rng.random(doc.shape) < 0.3] = -1  # holes: lengths vary per chunk
    for p, ref in (
        (Params(exclude_recent=3), ref_lucene),
        (Params(exclude_recent=0, variant="okapi"), ref_okapi),
    ):
        pos, sc = document_neighbors(doc, p)
        for i in range(p.exclude_recent + 1, 200):
            m = i - p.exclude_recent
            check_row(pos[i], sc[i], ref(doc[:m], doc[i]), np.arange(m))


# ----------------------------------------------------------------------------------------- rules and edges
def test_causal_rule_and_tail_padding(bm25_run, chunks):
    reader, _ = chunks
    _, q, ids, scores = table(bm25_run)
    doc_of, pos_of = reader.chunk_doc, reader.chunk_pos
    valid = ids >= 0
    expected = np.minimum(K, np.maximum(0, pos_of - EXCL))  # every retrievable chunk is eligible
    assert np.array_equal(valid.sum(1), expected)
    assert np.array_equal(valid, np.arange(K)[None, :] < expected[:, None])  # -1 only at row tails
    assert np.isnan(scores[~valid]).all() and np.isfinite(scores[valid]).all()
    r, c = np.nonzero(valid)
    nb = ids[r, c]
    assert (doc_of[nb] == doc_of[q[r]]).all()
    assert causal_retrievable(pos_of[q[r]], pos_of[nb], EXCL).all()
    assert (np.diff(scores, axis=1)[valid[:, 1:]] <= 0).all()  # sorted by score


def test_example_bound_keeps_train_candidates_inside_their_example(bm25_run, chunks):
    """example_chunks L: a train chunk's neighbors are the top-k of its own example of L chunks (the
    example scored as a document of its own); other splits keep whole-document neighbors."""
    reader, tokens = chunks
    L = 24
    art, q, ids, scores = table(bm25_run, query="chunk+target", example_chunks=L)
    _, q0, ids0, _ = table(bm25_run, query="chunk+target")
    assert art.meta["example_chunks"] == L and art.meta["example_splits"] == ["train"]
    split_of = {d.doc_idx: d.split for d in reader.docs()}
    assert set(split_of.values()) > {"train"}  # the small books have other splits too
    doc_of, pos_of = reader.chunk_doc, reader.chunk_pos
    row = {int(c): r for r, c in enumerate(q)}
    for d in reader.docs():
        rows = [row[c] for c in d.chunk_ids.tolist()]
        if d.split != "train":
            assert np.array_equal(
                ids[rows], ids0[[{int(c): r for r, c in enumerate(q0)}[c] for c in d.chunk_ids]]
            )
            continue
        doc = tokens[d.first : d.first + d.n]
        for e0 in range(0, d.n, L):
            ex = doc[e0 : e0 + L]
            want, want_sc = document_neighbors(ex, Params(k=K, query="chunk+target", exclude_recent=EXCL))
            got = ids[rows[e0 : e0 + L]]
            assert np.array_equal(got, np.where(want >= 0, want + d.first + e0, -1))
            np.testing.assert_allclose(scores[rows[e0 : e0 + L]], want_sc, rtol=1e-6)
    r, c = np.nonzero(ids >= 0)
    nb = ids[r, c]
    train = np.array([split_of[int(x)] == "train" for x in doc_of[q[r]]])
    assert causal_retrievable(pos_of[q[r]][train], pos_of[nb][train], EXCL, example_chunks=L).all()
    assert not causal_retrievable(pos_of[q[r]][~train], pos_of[nb][~train], EXCL, example_chunks=L).all()


def test_ties_prefer_recent_chunks_and_zero_scores_are_eligible():
    doc = np.tile(np.arange(64, dtype=np.int32), (30, 1))  # identical chunks: every score ties
    doc[25] = np.arange(1000, 1064)  # shares no term with the prefix: all scores are zero
    for variant in ("lucene", "okapi"):
        pos, sc = document_neighbors(doc, Params(k=5, exclude_recent=2, variant=variant))
        assert (pos[:3] == -1).all()
        assert pos[3].tolist() == [0, -1, -1, -1, -1]
        assert pos[20].tolist() == [17, 16, 15, 14, 13]
        assert pos[25].tolist() == [22, 21, 20, 19, 18] and (sc[25] == 0).all()


def test_document_shorter_than_exclude_recent_gives_all_pad_rows(bm25_run, chunks):
    reader, _ = chunks
    longest = max(d.n for d in reader.docs())
    art, _, ids, scores = table(bm25_run, exclude_recent=longest)
    assert (ids == -1).all() and np.isnan(scores).all()
    assert (
        art.stats["fill_rate"] == 0
        and art.stats["mean_valid_neighbors"] == 0
        and art.stats["rows"] == reader.n_chunks
    )
    pos, _ = document_neighbors(np.zeros((3, 64), np.int32), Params(exclude_recent=16))
    assert (pos == -1).all()


# ----------------------------------------------------------------------------------------- corpus scope
def test_corpus_scope_equals_reference_and_never_returns_own_document(bm25_run, chunks):
    reader, tokens = chunks
    art, q, ids, scores = table(bm25_run, scope="corpus", query="chunk+target")
    assert art.meta["scope"] == "corpus" and art.meta["stats"] == "database"
    train = reader.docs("train")
    db = np.concatenate([d.chunk_ids for d in train])
    assert len(train) == 2 and len(db) < reader.n_chunks
    valid = ids >= 0
    assert valid.all()  # the database is larger than k for every query
    r, c = np.nonzero(valid)
    assert (reader.chunk_doc[ids[r, c]] != reader.chunk_doc[q[r]]).all()
    assert np.isin(ids[valid], db).all()
    for d in reader.docs():
        doc = tokens[d.first : d.first + d.n]
        cand = db[reader.chunk_doc[db] != d.doc_idx]
        full_db = tokens[db]
        for i in range(0, d.n, 9):
            ref = ref_lucene(full_db, query_tokens(doc, i, "chunk+target"))  # statistics from the database
            check_row(ids[d.first + i], scores[d.first + i], ref[reader.chunk_doc[db] != d.doc_idx], cand)


def test_corpus_overfetch_filters_the_unmasked_ranking(bm25_run, chunks):
    reader, tokens = chunks
    _, _, ids, _ = table(bm25_run, scope="corpus", variant="okapi", overfetch=3)
    _, _, ids_masked, _ = table(bm25_run, scope="corpus", variant="okapi")
    train = reader.docs("train")
    db = np.concatenate([d.chunk_ids for d in train])
    d = train[0]
    doc = tokens[d.first : d.first + d.n]
    from rank_bm25 import BM25Okapi

    okapi = BM25Okapi([r[r >= 0].tolist() for r in tokens[db]], k1=K1, b=B, epsilon=EPS)
    padded = 0
    for i in range(0, d.n, 25):
        ref = okapi.get_scores(doc[i][doc[i] >= 0].tolist())
        top = db[np.lexsort((-db, -ref))[: K + 3]]
        kept = top[(top < d.first) | (top >= d.first + d.n)][:K]
        row = ids[d.first + i]
        assert row[: len(kept)].tolist() == kept.tolist() and (row[len(kept) :] == -1).all()
        padded += len(kept) < K
        assert (ids_masked[d.first + i] >= 0).all()  # masking inside the scorer never pads here
    assert padded > 0  # a chunk's own document floods its top k + 3: over-fetch pads, the mask does not


def test_corpus_scope_without_train_chunks_is_a_clear_error():
    reader = SimpleNamespace(
        art=SimpleNamespace(ref="chunks@abc", path="/x", version="abc"), docs=lambda split=None: []
    )
    with pytest.raises(InputError, match="train"):
        corpus_index(reader, Params())


# ----------------------------------------------------------------------------------------- versions, config, resume
def test_versions(bm25_run):
    def version(**kw):
        return resolve("bm25", bm25_run.with_section("bm25", kw)).version

    base = version()
    assert version(query="chunk+target") != base
    assert version(stats="document") != base and version(variant="okapi") != base
    assert version(shard_chunks=7) == base  # how, not what
    assert version(epsilon=0.5) == base  # lucene has no epsilon
    assert version(variant="okapi", epsilon=0.5) != version(variant="okapi")
    assert version(overfetch=5) == base  # causal scope has no over-fetch
    assert version(scope="corpus", stats="document", exclude_recent=3) == version(scope="corpus")
    with pytest.raises(ConfigError, match="bm25.scope"):
        bm25_run.with_section("bm25", {"scope": "global"})
    with pytest.raises(ConfigError, match="bm25.k"):
        bm25_run.with_section("bm25", {"k": 0})


def test_shard_plan_groups_documents():
    assert plan_groups([5, 5, 5, 20, 1, 1], 10) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert plan_groups([], 10) == []


def test_resume_after_partial_build_is_identical(bm25_run, tmp_path):
    run = bm25_run.model_copy(
        update={"artifacts_root": str(tmp_path / "store"), "runner": RunnerConfig(kind="processes")}
    )
    shutil.copytree(bm25_run.root(), run.root(), ignore=shutil.ignore_patterns("bm25"))
    run = run.with_section("bm25", {"shard_chunks": 1000, "query": "chunk+target"})
    node = resolve("bm25", run)
    store = ArtifactStore(run.root())
    ctx = open_build(node, {"chunks": store.resolve("chunks")})
    shards = node.impl.plan(ctx)
    assert len(shards) >= 3
    run_shard(ctx, shards[1])  # a run that died after one shard
    part = Path(ctx.path("part-00001.parquet"))
    stamp = part.stat().st_mtime_ns
    art = build("bm25", run)
    assert Path(art.file("part-00001.parquet")).stat().st_mtime_ns == stamp  # resumed, not recomputed
    _, q, ids, scores = table(bm25_run, query="chunk+target")
    q2, ids2, scores2 = read_neighbors(art)
    assert np.array_equal(q, q2) and np.array_equal(ids, ids2)
    np.testing.assert_array_equal(scores, scores2)


@pytest.mark.slow
def test_every_fixture_book_through_the_stage(tmp_path, gutenberg_dir):
    """All fixture books through `documents -> tokenizer -> chunks -> bm25` (the default causal statistics,
    both query modes and okapi): sampled queries of every book equal the per-query references built over
    exactly that query's retrievable chunks (plain Lucene formula; rank-bm25's BM25Okapi itself)."""
    from rank_bm25 import BM25Okapi

    books = sorted(gutenberg_dir.glob("*.txt.gz"))
    assert len(books) >= 10
    run = make_config(
        tmp_path / "store",
        documents={"paths": [str(gutenberg_dir)]},
        tokenizer={"vocab_size": 2048, "max_train_chars": 2_000_000},
        runner={"kind": "threads", "workers": 2},
    )
    tables = {
        (q, v): read_neighbors(
            build("bm25", run.with_section("bm25", {"query": q, "variant": v}), with_deps=True)
        )
        for q, v in (("chunk", "lucene"), ("chunk+target", "lucene"), ("chunk", "okapi"))
    }
    reader = ChunkReader(ArtifactStore(run.root()).resolve("chunks"))
    tokens = np.asarray(reader.tokens)
    rng = np.random.default_rng(0)
    docs = reader.docs()
    assert len(docs) == len(books)
    checked = 0
    for d in docs:
        doc = tokens[d.first : d.first + d.n]
        picks = sorted({EXCL + 1, d.n - 1, *rng.integers(EXCL + 1, d.n, size=8).tolist()})
        for i in picks:
            m = i - EXCL
            cands = np.arange(d.first, d.first + m)
            for q in ("chunk", "chunk+target"):
                qids, ids, sc = tables[(q, "lucene")]
                row = d.first + i
                assert qids[row] == row
                check_row(ids[row], sc[row], ref_lucene(doc[:m], query_tokens(doc, i, q)), cands)
                checked += 1
        i = picks[len(picks) // 2]
        m = i - EXCL
        qids, ids, sc = tables[("chunk", "okapi")]
        lists = [r[r >= 0].tolist() for r in doc[:m]]
        ref = BM25Okapi(lists, k1=K1, b=B, epsilon=EPS).get_scores(doc[i][doc[i] >= 0].tolist())
        check_row(ids[d.first + i], sc[d.first + i], ref, np.arange(d.first, d.first + m))
        checked += 1
    assert checked >= len(docs) * 5


@pytest.mark.parametrize("variant", ["lucene", "okapi"])
@pytest.mark.parametrize("query", ["chunk", "chunk+target"])
def test_a_sharded_database_gives_the_unsharded_table(variant, query):
    """Corpus scope on a database cut into 1, 4 or 7 row shards (global statistics summed from the
    shards, each shard's top-k merged) equals the unsharded index exactly: ids, scores and tie order;
    each query's own document masked across shard boundaries."""
    from retrieval.bm25 import CorpusIndex, CorpusStats, ShardedCorpus

    rng = np.random.default_rng(3)
    vocab, L, n_db = 300, 16, 997
    # a skewed vocabulary (frequent terms take the dense path) and repeated rows (score ties)
    db = (rng.zipf(1.3, size=(n_db, L)) % vocab).astype(np.int32)
    db[500:520] = db[100:120]
    db_ids = np.arange(10, 10 + n_db, dtype=np.int64)
    p = Params(
        k=7, query=query, exclude_recent=0, variant=variant, k1=1.2, b=0.75, epsilon=0.25, stats="corpus"
    )
    whole = CorpusIndex.build(db, db_ids, p, vocab)
    stats = CorpusStats.of(db[:400], vocab) + CorpusStats.of(db[400:], vocab)
    assert stats.n == n_db and (stats.df == CorpusStats.of(db, vocab).df).all()
    queries = db[480:540]  # rows of one "document" that also sit in the database
    for n_shards in (1, 4, 7):
        sharded = ShardedCorpus.build(db, db_ids, p, vocab, shard_rows=-(-n_db // n_shards))
        assert len(sharded.shards) == n_shards
        for own in ((480, 540), (0, 0)):
            want_i, want_s = whole.search(queries, own, p)
            got_i, got_s = sharded.search(queries, own, p)
            np.testing.assert_array_equal(got_i, want_i)
            np.testing.assert_array_equal(got_s, want_s)
            if own != (0, 0):
                assert not np.isin(got_i, db_ids[own[0] : own[1]]).any()
            else:  # unmasked, a row that is in the database finds itself
                assert (got_i[:, 0] >= 0).all()


def test_the_stage_on_a_sharded_database_builds_the_unsharded_table_and_resumes_per_pair(bm25_run, tmp_path):
    """`db_shard_chunks`: (query group, database shard) pairs as shards, partials merged in finalize. The
    table equals the unsharded stage's exactly (same version: how, not what); a killed build keeps its
    finished pairs; the partials are scratch (not published), the database statistics are."""
    run = bm25_run.model_copy(update={"artifacts_root": str(tmp_path / "store")})
    shutil.copytree(bm25_run.root(), run.root(), ignore=shutil.ignore_patterns("bm25"))
    settings = {"scope": "corpus", "query": "chunk+target", "shard_chunks": 700}
    _, q, ids, scores = table(bm25_run, **settings)
    n_db = len(
        np.concatenate(
            [d.chunk_ids for d in ChunkReader(ArtifactStore(run.root()).resolve("chunks")).docs("train")]
        )
    )
    run = run.with_section("bm25", {**settings, "db_shard_chunks": -(-n_db // 3)})
    node = resolve("bm25", run)
    assert node.version == resolve("bm25", bm25_run.with_section("bm25", settings)).version
    store = ArtifactStore(run.root())
    ctx = open_build(node, {"chunks": store.resolve("chunks")})
    shards = node.impl.plan(ctx)
    n_q = len({s.payload["q"] for s in shards})
    assert len(shards) == 3 * n_q and n_q >= 2
    assert [s.payload["s"] for s in shards] == sorted(s.payload["s"] for s in shards)  # shard-major
    run_shard(ctx, shards[1])  # a build that died after one pair
    partial = Path(ctx.path(f"partial/q{shards[1].payload['q']:05d}-s00000.npz"))
    stamp = partial.stat().st_mtime_ns
    seen: list[int] = []
    import stages.corpus_shards as cs

    real = cs.read_partial

    def spy(ctx, q, s):
        if (q, s) == (shards[1].payload["q"], 0):
            seen.append(Path(ctx.path(cs.partial_name(q, s))).stat().st_mtime_ns)
        return real(ctx, q, s)

    cs.read_partial = spy
    try:
        art = build("bm25", run)
    finally:
        cs.read_partial = real
    assert seen == [stamp]  # resumed: the finished pair was not recomputed
    q2, ids2, scores2 = read_neighbors(art)
    assert np.array_equal(q, q2) and np.array_equal(ids, ids2)
    np.testing.assert_array_equal(scores, scores2)
    names = [f.path for f in art.manifest.files]
    assert "database_stats.npz" in names and not any(n.startswith("partial/") for n in names)
    assert art.manifest.stats["database_shards"] == 3 and art.manifest.stats["rows"] == len(q)


def test_query_splits_keep_only_those_rows(bm25_run, tmp_path):
    """Corpus scope with `query_splits`: rows of those splits only, each equal to the full table's row; a
    split with no document is a clear error naming the setting."""
    settings = {"scope": "corpus", "query": "chunk+target", "shard_chunks": 700}
    _, q, ids, _ = table(bm25_run, **settings)
    reader = ChunkReader(ArtifactStore(bm25_run.root()).resolve("chunks"))
    split = next(d.split for d in reader.docs() if d.split != "train")
    _, q2, ids2, _ = table(bm25_run, **settings, query_splits=[split], db_shard_chunks=500)
    want = np.concatenate([d.chunk_ids for d in reader.docs() if d.split == split])
    assert np.array_equal(q2, want)
    assert np.array_equal(ids2, ids[np.searchsorted(q, want)])
    with pytest.raises(InputError, match="query_splits"):
        table(bm25_run, **settings, query_splits=["nosuchsplit"])

"""Stage `dense`: exact and approximate neighbor tables, checked against brute force written out naively."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.executor import build, resolve
from pipeline.formats import ChunkReader, causal_retrievable, read_embeddings, read_neighbors
from pipeline.store import ArtifactStore


@pytest.fixture(scope="module")
def emb_run(small_run, tiny_encoder, tmp_path_factory):
    """The four-book run with stand-in-encoder embeddings built (~3k chunks; 2 train books ~1.2k chunks),
    in a copy of the shared session store (these tests add and replace artifacts)."""
    root = tmp_path_factory.mktemp("dense-store")
    shutil.copytree(small_run.root(), root, dirs_exist_ok=True)
    run = small_run.model_copy(update={"artifacts_root": str(root)})
    run = run.with_section("embeddings", {"model": str(tiny_encoder), "workers": 1, "batch_size": 256})
    build("embeddings", run)
    return run


@pytest.fixture(scope="module")
def data(emb_run):
    """(float64 embeddings, doc of each chunk, position in doc, is-train) for the naive references."""
    chunks = ChunkReader(build("chunks", emb_run))
    _, emb = read_embeddings(build("embeddings", emb_run))
    train = np.zeros(chunks.n_chunks, bool)
    for d in chunks.docs("train"):
        train[d.first : d.first + d.n] = True
    return emb.astype(np.float64), chunks.chunk_doc, chunks.chunk_pos, train


def dense_run(run, **dense):
    return run.with_section("dense", dense)


def fresh_build(run):
    """Build dense even if an artifact of this version exists (backend and device are not in the version)."""
    store = ArtifactStore(run.root())
    version = resolve("dense", run).version
    if store.exists("dense", version):
        shutil.rmtree(store.version_dir("dense", version))
    return build("dense", run)


def naive_scores(emb: np.ndarray, i: int, cand: np.ndarray, metric: str) -> np.ndarray:
    if metric == "ip":
        return emb[cand] @ emb[i]
    return -((emb[cand] - emb[i]) ** 2).sum(1)


def brute_force_recall(art, emb, doc, train, k) -> float:
    """recall@k of a corpus-scope table against brute force on every 3rd query (and no neighbor of the own
    document)."""
    _, ids, _ = read_neighbors(art)
    db = np.flatnonzero(train)
    hits = total = 0
    for i in range(0, len(emb), 3):
        cand = db[doc[db] != doc[i]]
        exact = cand[np.argsort(-naive_scores(emb, i, cand, "ip"))[:k]]
        hits += len(np.intersect1d(exact, ids[i]))
        total += len(exact)
        assert not np.any(doc[ids[i][ids[i] >= 0]] == doc[i])
    return hits / total


def check_row(got_ids, got_sc, cand, ref, k, tol=1e-4):
    """Our row against the naive ranking of exactly the retrievable candidates (score desc, newer first):
    same scores rank by rank; ids equal except among near-ties; -1 only at the tail."""
    order = np.lexsort((-cand, -ref))
    want_ids, want_sc = cand[order[:k]], ref[order[:k]]
    n = len(want_ids)
    assert np.all(got_ids[n:] == -1) and np.all(np.isnan(got_sc[n:])), "pads: -1 ids, NaN scores, at the tail"
    assert np.all(got_ids[:n] >= 0)
    np.testing.assert_allclose(got_sc[:n], want_sc, atol=tol)
    assert set(got_ids[:n]) <= set(cand.tolist()), "only retrievable chunks"
    clear = np.abs(want_sc - (want_sc[-1] if n else 0)) > tol  # above the k-th score by more than the noise
    clear &= np.array([np.sum(np.abs(ref - s) <= tol) == 1 for s in want_sc], bool)
    assert np.array_equal(got_ids[:n][clear], want_ids[clear])


@pytest.mark.parametrize("metric,backend", [("ip", "torch"), ("l2", "torch"), ("ip", "faiss")])
def test_corpus_exact_matches_brute_force(emb_run, data, metric, backend):
    emb, doc, _, train = data
    k = 10
    # overfetch 0: with the faiss backend the own document fills the first fetch, forcing re-fetches
    art = fresh_build(dense_run(emb_run, k=k, index="flat", metric=metric, backend=backend, overfetch=0))
    q, ids, sc = read_neighbors(art)
    assert np.array_equal(q, np.arange(len(emb)))
    db = np.flatnonzero(train)
    for i in range(0, len(emb), 7):
        cand = db[doc[db] != doc[i]]
        check_row(ids[i], sc[i], cand, naive_scores(emb, i, cand, metric), k)
    # the own document is never returned, every neighbor is a train chunk
    valid = ids >= 0
    assert not np.any(doc[ids[valid]] == np.repeat(doc, k).reshape(-1, k)[valid])
    assert train[ids[valid]].all()
    m = art.manifest
    assert m.meta["source"] == "dense" and m.meta["scope"] == "corpus" and m.meta["index"]["exact"] is True
    assert m.stats["fill_rate"] == 1.0 and m.stats["recall_at_k"] >= 0.999
    if backend == "faiss":
        assert m.stats["refetched_rows"] > 0


@pytest.mark.parametrize("exclude_recent", [0, 3])
def test_document_causal_matches_brute_force(emb_run, data, exclude_recent):
    emb, doc, pos, _ = data
    k = 5
    art = build("dense", dense_run(emb_run, k=k, scope="document-causal", exclude_recent=exclude_recent))
    _, ids, sc = read_neighbors(art)
    first = np.arange(len(emb)) - pos
    for i in range(len(emb)):
        same = np.arange(first[i], first[i] + np.sum(doc == doc[i]))
        cand = same[causal_retrievable(pos[i], pos[same], exclude_recent)]
        if i % 5 == 0 or len(cand) < k + 2:  # every early row, a sample of the rest
            check_row(ids[i], sc[i], cand, naive_scores(emb, i, cand, "ip"), k)
        v = ids[i][ids[i] >= 0]
        assert np.all(doc[v] == doc[i]) and np.all(pos[v] <= pos[i] - 1 - exclude_recent)
    # the first exclude_recent + 1 chunks of a document retrieve nothing
    assert np.all(ids[pos <= exclude_recent] == -1)
    assert art.manifest.meta["exclude_recent"] == exclude_recent


def test_ivfpq_reaches_recall_with_tuned_nprobe(emb_run, data):
    emb, doc, _, train = data
    k = 10
    # a small over-fetch (k + 30 candidates re-scored exactly, 3% of this database; the default 100
    # would re-score 9% of it): the recall comes from the index and its tuned nprobe
    art = build("dense", dense_run(emb_run, k=k, index="ivfpq", recall_sample=400, overfetch=30))
    index = art.manifest.meta["index"]
    assert index["kind"] == "ivfpq" and index["factory"].startswith(f"IVF{index['nlist']},PQ")
    assert index["tuned"] and index["search_param"] == "nprobe"
    assert 1 <= index["search_value"] < index["nlist"], "an approximate search, not an exhaustive one"
    assert index["train_vectors"] >= 30 * index["nlist"]
    assert art.manifest.stats["recall_at_k"] >= 0.95

    assert brute_force_recall(art, emb, doc, train, k) >= 0.95

    import faiss

    saved = faiss.read_index(str(art.local_path("index.faiss")))
    assert saved.ntotal == train.sum() and saved.nlist == index["nlist"]


def test_hnsw_reaches_recall(emb_run):
    art = build("dense", dense_run(emb_run, k=10, index="hnsw", hnsw_m=16, recall_sample=300))
    assert art.manifest.meta["index"]["factory"] == "HNSW16,Flat"
    assert art.manifest.stats["recall_at_k"] >= 0.95


def test_too_few_training_vectors_per_list_is_refused(emb_run, data):
    n_db = int(data[3].sum())
    with pytest.raises(ConfigError, match=r"at least 30 vectors per list.*Lower dense\.nlist to at most"):
        build("dense", dense_run(emb_run, index="ivfpq", nlist=n_db // 10))
    with pytest.raises(ConfigError, match=r"raise dense\.train_sample to at least 600"):
        build("dense", dense_run(emb_run, index="ivfpq", nlist=20, train_sample=300))
    bad = dense_run(emb_run, index="ivfpq", backend="torch")
    resolve("dense", bad)  # a valid config ...
    with pytest.raises(ConfigError, match=r"dense\.backend=torch does exact search only"):
        build("dense", bad)  # ... refused when planned, before any work


def test_index_is_reused_on_resume(emb_run, monkeypatch):
    from stages.dense import DenseStage

    run = dense_run(emb_run, k=5, index="ivfpq", nprobe=4, recall_sample=50, shard_chunks=1000)
    real_shard, real_build = DenseStage.run_shard, DenseStage._build_index
    builds: list[int] = []

    def dying(self, ctx, shard):
        if shard.index == 1:
            raise RuntimeError("killed")
        return real_shard(self, ctx, shard)

    monkeypatch.setattr(DenseStage, "_build_index", lambda *a: builds.append(1) or real_build(*a))
    monkeypatch.setattr(DenseStage, "run_shard", dying)
    with pytest.raises(RuntimeError, match="killed"):
        build("dense", run)
    monkeypatch.setattr(DenseStage, "run_shard", real_shard)
    art = build("dense", run)
    assert builds == [1], "the trained index of the partial build is reused"
    assert art.manifest.meta["index"]["search_value"] == 4 and not art.manifest.meta["index"]["tuned"]
    assert art.verify() == []


def test_topk_ties_go_to_the_later_chunk_and_short_rows_pad():
    """Against a lexsort on many small rows full of ties (the k-th score tied past the fetched margin)."""
    import torch

    from retrieval.exact import topk_rows

    rng = np.random.default_rng(1)
    for _ in range(200):
        B, N, k = rng.integers(1, 6), rng.integers(0, 40), rng.integers(1, 12)
        s = rng.integers(-3, 4, size=(B, N)).astype(np.float32) / 2
        s[rng.random((B, N)) < 0.2] = -np.inf  # not retrievable
        if N:
            s[0, 0] = -0.0  # ties with 0.0
        pos, sc = topk_rows(torch.from_numpy(s.copy()), k)
        for r in range(B):
            cols = np.flatnonzero(np.isfinite(s[r]))
            want = cols[np.lexsort((-cols, -(s[r][cols] + 0.0)))][:k]
            assert np.array_equal(pos[r][: len(want)], want)
            assert np.all(pos[r][len(want) :] == -1) and np.all(np.isinf(sc[r][len(want) :]))
    # long rows take the torch.topk path; with 7 distinct values the k-th score is always tied
    s = rng.integers(-3, 4, size=(3, 20000)).astype(np.float32)
    pos, _ = topk_rows(torch.from_numpy(s.copy()), 5)
    cols = np.arange(20000)
    for r in range(3):
        assert np.array_equal(pos[r], cols[np.lexsort((-cols, -s[r]))][:5])


def test_missing_faiss_names_the_extras(monkeypatch):
    from stages.dense import faiss_module

    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` sees with neither extra installed
    with pytest.raises(ConfigError, match=r"\.\[cpu\]"):
        faiss_module()


# ----------------------------------------------------------------------------------------- sharded database
def _train_rows(emb_run) -> int:
    return sum(d.n for d in ChunkReader(build("chunks", emb_run)).docs("train"))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_sharded_exact_table_equals_the_unsharded_one(emb_run, backend):
    """db_shard_chunks: (query group, database shard) pairs, merged in finalize: the exact table is the
    unsharded one, ids and scores, and has the same version (how, not what)."""
    settings = dict(k=10, index="flat", backend=backend, overfetch=0, shard_chunks=1000)
    whole = fresh_build(dense_run(emb_run, **settings))
    run = dense_run(emb_run, **settings, db_shard_chunks=-(-_train_rows(emb_run) // 3))
    assert resolve("dense", run).version == whole.version
    art = fresh_build(run)
    q, ids, sc = read_neighbors(whole)
    q2, ids2, sc2 = read_neighbors(art)
    assert np.array_equal(q, q2) and np.array_equal(ids, ids2)
    np.testing.assert_array_equal(sc, sc2)
    m = art.manifest
    assert m.stats["database_shards"] == 3 and m.stats["recall_at_k"] == 1.0
    assert not any(f.path.startswith("partial/") for f in m.files)


def test_sharded_ivfpq_keeps_index_shards_and_reaches_recall(emb_run, data):
    """IVF-PQ on a sharded database: one trained index, one index file per database shard holding that
    shard's vectors, nprobe tuned on shard 0; recall@k of the merged table checked by brute force."""
    import faiss

    emb, doc, _, train = data
    k = 10
    n_train = _train_rows(emb_run)
    art = fresh_build(
        dense_run(
            emb_run, k=k, index="ivfpq", recall_sample=400, overfetch=30, db_shard_chunks=n_train // 2 + 1
        )
    )
    index = art.manifest.meta["index"]
    assert (
        index["kind"] == "ivfpq" and index["tuned_on"] == "database shard 0" and index["database_shards"] == 2
    )
    assert index["tuning_k"] == -(-k * (n_train // 2 + 1) // n_train)  # shard 0's share of the merged top-k
    files = sorted(f.path for f in art.manifest.files if f.path.startswith("index/shard-"))
    assert files == ["index/shard-00000.faiss", "index/shard-00001.faiss"]
    sizes = [faiss.read_index(str(art.local_path(f))).ntotal for f in files]
    assert sizes == [n_train // 2 + 1, n_train - (n_train // 2 + 1)]
    assert faiss.read_index(str(art.local_path("index.faiss"))).ntotal == 0  # trained, empty
    assert art.manifest.stats["recall_at_k"] >= 0.95
    assert brute_force_recall(art, emb, doc, train, k) >= 0.95


def test_query_splits_sharded_or_not_and_hnsw_refused(emb_run):
    reader = ChunkReader(build("chunks", emb_run))
    split = next(d.split for d in reader.docs() if d.split != "train")
    settings = dict(k=5, index="flat", shard_chunks=1000)
    _, ids, _ = read_neighbors(fresh_build(dense_run(emb_run, **settings)))
    art = fresh_build(dense_run(emb_run, **settings, db_shard_chunks=500, query_splits=[split]))
    q2, ids2, _ = read_neighbors(art)
    want = np.concatenate([d.chunk_ids for d in reader.docs() if d.split == split])
    assert np.array_equal(q2, want) and np.array_equal(ids2, ids[want])
    assert art.manifest.stats["recall_at_k"] == 1.0
    art3 = fresh_build(dense_run(emb_run, **settings, query_splits=[split]))
    q3, ids3, _ = read_neighbors(art3)
    assert np.array_equal(q3, want) and np.array_equal(ids3, ids[want])  # unsharded, the same rows
    assert art3.manifest.stats["recall_at_k"] == 1.0 and art3.manifest.stats["recall_queries"] <= len(want)
    with pytest.raises(ConfigError, match="hnsw"):
        build("dense", dense_run(emb_run, index="hnsw", db_shard_chunks=500))


def test_a_killed_sharded_ivfpq_build_keeps_its_index_and_shard_files(emb_run):
    """Resume: the trained index and the index shard files of a killed build are reused, not rebuilt
    (mtimes unchanged), and the finished pair is not rerun."""
    from pathlib import Path

    from pipeline.executor import open_build, run_shard

    n_db = _train_rows(emb_run) // 2 + 1
    run = dense_run(
        emb_run, k=5, index="ivfpq", nlist=8, recall_sample=100, overfetch=30, db_shard_chunks=n_db
    )
    node = resolve("dense", run)
    store = ArtifactStore(run.root())
    if store.exists("dense", node.version):
        shutil.rmtree(store.version_dir("dense", node.version))
    ctx = open_build(node, {r: store.get(c.stage, c.version) for r, c in node.inputs.items()})
    shards = node.impl.plan(ctx)
    run_shard(ctx, shards[-1])  # a build that died after one pair (on database shard 1)
    names = ("index.faiss", "index/shard-00000.faiss", "index/shard-00001.faiss")
    stamps = [Path(ctx.path(n)).stat().st_mtime_ns for n in names]
    art = build("dense", run)
    assert [Path(art.local_path(n)).stat().st_mtime_ns for n in names] == stamps
    assert art.manifest.stats["recall_at_k"] >= 0.9

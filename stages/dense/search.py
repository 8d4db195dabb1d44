"""The searches of one shard, around the kernels of `retrieval.exact` and `retrieval.faiss_index`: exact
corpus-scope neighbors of any query chunks, a shard of corpus-scope queries (exact torch search, or a faiss
index with over-fetch and the own-document filter, re-scored exactly), and a shard of documents searched
document-causally."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.devices import resolve_device
from pipeline.formats import NEIGHBOR_PAD, ChunkReader
from pipeline.progress import progress
from pipeline.stage import StageContext
from retrieval.exact import causal_search_documents, exact_corpus_search, exact_rescore
from retrieval.faiss_index import GPU_MAX_K, faiss_search_batched, open_index
from stages.dense.build_files import read_index_info
from stages.dense.config import INDEX_FILE, Config
from stages.dense.database import (
    Database,
    cached,
    chunk_embeddings,
    database_tensor,
    load_database,
    own_doc_ranges,
    sampled_embeddings,
)
from stages.dense.index_plan import faiss_gpu, faiss_module


def exact_neighbors(ctx: StageContext, db: Database, q_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact corpus-scope neighbors (database positions, scores) of the given query chunk ids."""
    cfg: Config = ctx.cfg
    device = resolve_device(cfg.device, "dense.device")
    reader = ChunkReader(ctx.inputs["chunks"])
    lo, hi = own_doc_ranges(reader, db.ids, q_ids)
    dbt = database_tensor(ctx, db, device)
    return exact_corpus_search(sampled_embeddings(ctx, q_ids), dbt, cfg.k, lo, hi, cfg.metric, device)


def causal_shard(ctx: StageContext, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Document-causal neighbors (chunk ids, scores, stats) of the chunks [lo, hi): whole documents."""
    cfg: Config = ctx.cfg
    device = resolve_device(cfg.device, "dense.device")
    docs = [d for d in ChunkReader(ctx.inputs["chunks"]).docs() if lo <= d.first < hi]
    bar = progress(total=len(docs), desc=f"dense causal {lo}..{hi}", unit="doc")
    rel, out_sc = causal_search_documents(
        chunk_embeddings(ctx, lo, hi),
        [(d.first - lo, d.first - lo + d.n) for d in docs],
        cfg.k,
        cfg.exclude_recent,
        cfg.metric,
        device,
        on_document=bar.update,
    )
    bar.close()
    out_ids = np.where(rel >= 0, rel + lo, NEIGHBOR_PAD)
    return out_ids, out_sc, {"docs": len(docs)}


def corpus_shard(ctx: StageContext, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Corpus-scope neighbors (chunk ids, scores, stats) of the query chunks [lo, hi), with the search
    index.json names: exact torch search, or a faiss index (IndexFlat or the saved one)."""
    cfg: Config = ctx.cfg
    db = load_database(ctx)
    reader = ChunkReader(ctx.inputs["chunks"])
    q = chunk_embeddings(ctx, lo, hi)
    q_ids = np.arange(lo, hi)
    info = read_index_info(ctx) or {}
    extra: dict[str, Any] = {}
    if info.get("kind") == "flat" and info.get("backend") == "torch":
        device = resolve_device(cfg.device, "dense.device")
        own_lo, own_hi = own_doc_ranges(reader, db.ids, q_ids)
        bar = progress(total=len(q), desc=f"dense exact {lo}..{hi}", unit="query")
        pos, sc = exact_corpus_search(
            q,
            database_tensor(ctx, db, device),
            cfg.k,
            own_lo,
            own_hi,
            cfg.metric,
            device,
            on_progress=bar.update,
        )
        bar.close()
    else:
        index, gpu = search_index(ctx, db, info)
        desc = f"dense {info.get('factory')} {lo}..{hi}"
        pos, extra["refetched_rows"] = faiss_neighbors(
            cfg, index, gpu, q, reader.chunk_doc[lo:hi], db.doc, db.emb, desc
        )
    pos, sc = exact_rescore(q, db.emb, pos, cfg.metric)
    return db.chunk_ids(pos), sc, extra


def faiss_neighbors(
    cfg: Config,
    index: Any,
    gpu: bool,
    q: np.ndarray,
    q_doc: np.ndarray,
    db_doc: np.ndarray,
    db_emb: np.ndarray,
    desc: str,
) -> tuple[np.ndarray, int]:
    """Database positions of each query's top-k from a faiss index: over-fetched in batches, the query's own
    document filtered out (re-score them exactly with `exact_rescore`). Returns (positions, rows re-fetched)."""
    bar = progress(total=-(-len(q) // cfg.batch_size), desc=desc, unit="batch")
    pos, _, refetched = faiss_search_batched(
        index,
        q,
        cfg.k,
        cfg.k + cfg.overfetch,
        q_doc,
        db_doc,
        db_emb,
        cfg.metric,
        GPU_MAX_K if gpu else len(db_emb),
        cfg.batch_size,
        on_batch=bar.update,
    )
    bar.close()
    return pos, refetched


def search_index(ctx: StageContext, db: Database, info: dict[str, Any]) -> tuple[Any, bool]:
    """The shard's faiss index, loaded once per process: the saved one, or an IndexFlat over the database."""
    faiss_module()  # a missing faiss is a ConfigError naming the extras

    cfg: Config = ctx.cfg
    gpu = faiss_gpu(cfg.device) if info.get("kind") != "hnsw" else None  # faiss has no GPU HNSW

    param, value = info.get("search_param"), info.get("search_value")

    def make() -> Any:
        if info.get("kind") == "flat":
            return open_index(db.emb, cfg.metric, None, gpu, param, value)
        with ctx.local_file(INDEX_FILE) as path:  # faiss reads the whole index: the copy can go after
            return open_index(db.emb, cfg.metric, str(path), gpu, param, value)

    key = ("index", ctx.workdir, str(info.get("sha256")), cfg.metric, str(gpu))
    return cached(ctx, key, make), gpu is not None

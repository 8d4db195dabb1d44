"""Stage `dense`: nearest-neighbor tables over chunk embeddings (RETRO-style frozen-encoder retrieval).

Two scopes, with the same output schema as `bm25` (`pipeline.formats.neighbor_table`):

- `corpus` (RETRO): the database is every train-split chunk, the queries are all chunks; a query's
  own document is excluded by doc id. Exact search (`flat`) is a blocked matrix product + top-k with
  the own document masked out. Approximate search (`ivfpq`, `hnsw`, faiss) over-fetches
  `k + overfetch` candidates, drops the own document, re-scores the survivors exactly from the
  stored embeddings, and re-fetches more for rows that are still short; -1 pads what is left.
  The index is trained on a seeded random sample, saved as `index.faiss` (reused on resume), and
  `nprobe` / `efSearch` are tuned on a sample of queries to reach `target_recall` unless given.
  Recall@k of what was written, against exact search, is measured on a held-out sample of queries.
- `document-causal` (RPT self-retrieval): chunk i retrieves chunks j of its own document with
  j <= i - 1 - exclude_recent (`pipeline.formats.causal_retrievable`); exact, one matrix product
  per document, no index.

Scores are higher-is-better: the inner product (`metric: ip`) or the negative squared L2 distance
(`metric: l2`). Rows are ordered by score, ties broken by the more recent chunk (higher chunk_id),
as in the bm25 tables.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import ConfigError, InputError
from pipeline.formats import (
    NEIGHBOR_PAD,
    ChunkReader,
    causal_retrievable,
    neighbor_schema,
    neighbor_table,
    read_embeddings,
)
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats

log = logging.getLogger("rpt.dense")

INDEX_FILE = "index.faiss"
INDEX_INFO = "index.json"
# Rows of the score block are chosen so that a block holds about this many scores.
BLOCK_ELEMS = 1 << 24
GPU_MAX_K = 2048  # faiss GPU indexes cap k and nprobe at 2048
TIE_MARGIN = 8  # extra entries fetched by the float top-k to settle ties at the k-th score


class Config(StageConfig):
    k: int = Field(20, ge=1, le=4096, description="neighbors per query chunk")
    scope: Literal["corpus", "document-causal"] = Field(
        "corpus",
        description="corpus: train-split database, own document excluded (RETRO); "
        "document-causal: earlier chunks of the query's own document (RPT)",
    )
    exclude_recent: int = Field(
        16, ge=0, description="document-causal: chunk i retrieves j <= i-1-exclude_recent"
    )
    index: Literal["auto", "flat", "ivfpq", "hnsw"] = Field(
        "auto", description="corpus scope; auto: flat (exact) up to flat_max database vectors, ivfpq above"
    )
    flat_max: int = Field(
        200_000, ge=0, description="index: auto uses exact search up to this many database vectors"
    )
    metric: Literal["ip", "l2"] = Field(
        "ip", description="inner product (cosine on normalised embeddings) or L2"
    )
    nlist: int | None = Field(None, ge=1, description="IVF lists; None: 4*sqrt(N), at most N/39")
    nprobe: int | None = Field(None, ge=1, description="IVF lists probed; None: tuned to reach target_recall")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantizers (bytes per vector); None: dim/4")
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW neighbors per node")
    ef_search: int | None = Field(None, ge=1, description="HNSW efSearch; None: tuned to reach target_recall")
    target_recall: float = Field(
        0.95, gt=0, le=1, description="recall@k that nprobe/ef_search tuning aims for"
    )
    train_sample: int | None = Field(
        None,
        ge=1,
        description="IVF training vectors (seeded random sample); None: min(N, max(256*nlist, 65536))",
    )
    overfetch: int = Field(100, ge=0, description="extra candidates fetched before the own-document filter")
    recall_sample: int = Field(1000, ge=0, description="held-out queries for measuring (and tuning) recall")
    seed: int = Field(0, description="seed of the training, tuning and recall samples")
    backend: Literal["auto", "faiss", "torch"] = Field(
        "auto",
        description="exact search engine: torch matmul+top-k (exact own-doc mask) or faiss IndexFlat; "
        "ivfpq/hnsw always use faiss; auto: torch",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: GPU when torch/faiss see one")
    batch_size: int = Field(4096, ge=1, description="queries per search call")
    shard_chunks: int = Field(65536, ge=1, description="query chunks per shard (unit of resume)")

    UNHASHED = frozenset({"backend", "device", "batch_size", "shard_chunks"})


# ----------------------------------------------------------------------------------------- exact search


def _order_key(scores: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int64 keys that sort like (score, position): a float32's bits made monotone, then the position.
    The largest keys are the highest scores, ties broken by the higher position (the later chunk)."""
    b = (np.asarray(scores, np.float32) + np.float32(0)).view(np.int32).astype(np.int64)  # + 0 makes -0.0 0.0
    b = np.where(b < 0, b ^ 0x7FFFFFFF, b)
    return b * (1 << 32) + pos


def select_top(vals: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each row of a few candidates (scores, positions) by score, ties to the higher position;
    non-finite scores (not retrievable) become -1 / -inf at the tail. Returns ([B, k] positions, scores)."""
    B, f = vals.shape
    out_pos = np.full((B, k), NEIGHBOR_PAD, np.int64)
    out_sc = np.full((B, k), -np.inf, np.float32)
    if f == 0 or B == 0:
        return out_pos, out_sc
    key = _order_key(vals, pos)
    kk = min(k, f)
    idx = (
        np.argpartition(key, f - kk, axis=1)[:, f - kk :] if kk < f else np.broadcast_to(np.arange(f), (B, f))
    )
    idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(key, idx, 1), axis=1), 1)
    v, p = np.take_along_axis(vals, idx, 1), np.take_along_axis(pos, idx, 1)
    ok = np.isfinite(v)
    out_pos[:, :kk] = np.where(ok, p, NEIGHBOR_PAD)
    out_sc[:, :kk] = np.where(ok, v, -np.inf)
    return out_pos, out_sc


def topk_rows(scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a float32 torch score block (-inf = not retrievable; CPU or GPU), ties to the
    higher column. Returns numpy (columns int64 [B, k], scores [B, k]), -1 / -inf padded.

    A partial top-k fetches a few extra entries and only those are ordered exactly; rows whose tie at
    the k-th score may reach past the fetched entries are redone on their full row."""
    import torch

    B, N = scores.shape
    if N == 0 or B == 0:
        return select_top(np.zeros((B, 0), np.float32), np.zeros((B, 0), np.int64), k)
    kk = min(N, k + TIE_MARGIN)
    if scores.device.type == "cpu" and N <= 16384:  # numpy's partition beat torch.topk on short rows here
        s = scores.numpy()
        # partitioning the negated block for its smallest runs several times faster than for the largest
        sel = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < N else np.broadcast_to(np.arange(N), (B, N))
        vals = np.take_along_axis(s, sel, 1)
        p = sel
    else:
        vals_t, sel_t = torch.topk(scores, kk, dim=1, sorted=False)
        vals, p = vals_t.cpu().numpy(), sel_t.cpu().numpy()
    if kk < N:
        kth = np.partition(vals, kk - min(k, kk), axis=1)[:, kk - min(k, kk)]  # the k-th largest fetched
        low = vals.min(1)
        ambiguous = np.flatnonzero((low == kth) & np.isfinite(kth))
        if len(ambiguous):
            rows = torch.from_numpy(ambiguous).to(scores.device)
            full_v = scores[rows].cpu().numpy()
            full_p = np.broadcast_to(np.arange(N), full_v.shape)
            p2, v2 = select_top(full_v, full_p, kk)
            vals[ambiguous], p[ambiguous] = v2, p2
    return select_top(vals, p, k)


def score_block(q: Any, x: Any, metric: str, x_sq: Any | None = None) -> Any:
    """Scores of queries [B, d] against vectors [N, d] (torch): inner products or negative squared L2."""
    import torch

    if q.device.type == "cpu":  # numpy's OpenBLAS sgemm ran 1.3-1.5x faster than torch's on the dev machine
        s = torch.from_numpy(q.numpy() @ x.numpy().T)
    else:
        s = q @ x.T
    if metric == "l2":
        if x_sq is None:
            x_sq = (x * x).sum(1)
        s = -((q * q).sum(1, keepdim=True) + x_sq[None, :] - 2 * s).clamp_min_(0)
    return s


def fill_masked(scores: Any, mask: np.ndarray) -> None:
    """scores[mask] = -inf in place; on the CPU through numpy (torch's threaded elementwise kernels stall
    on a busy machine), on a GPU with a device mask."""
    import torch

    if scores.device.type == "cpu":
        scores.numpy()[mask] = -np.inf
    else:
        scores.masked_fill_(torch.from_numpy(mask).to(scores.device), float("-inf"))


def mask_ranges(scores: Any, lo: np.ndarray, hi: np.ndarray) -> None:
    """Set scores[r, lo[r]:hi[r]] = -inf (each row's own document), one slice per distinct range."""
    pairs = np.stack([lo, hi], 1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    target = scores.numpy() if scores.device.type == "cpu" else scores
    for u, (a, b) in enumerate(uniq):
        if b > a:
            rows = np.flatnonzero(inverse == u)
            if target is scores:
                import torch

                rows = torch.from_numpy(rows).to(scores.device)
            target[rows, int(a) : int(b)] = float("-inf")


def exact_corpus_search(
    q: np.ndarray,
    db: Any,
    k: int,
    own_lo: np.ndarray,
    own_hi: np.ndarray,
    metric: str,
    device: str = "cpu",
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query over the database, excluding db positions [own_lo, own_hi) per query (the
    query's own document). `db` is a float32 torch tensor on `device`. Returns (db positions, scores)."""
    import torch

    n, N = len(q), db.shape[0]
    out_pos = np.full((n, k), NEIGHBOR_PAD, np.int64)
    out_sc = np.full((n, k), -np.inf, np.float32)
    x_sq = (db * db).sum(1) if metric == "l2" else None
    rows = max(1, min(n, BLOCK_ELEMS // max(N, 1)))
    bar = progress(total=n, desc=desc, unit="query", **({"disable": True} if desc is None else {}))
    with torch.inference_mode():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            qb = torch.from_numpy(np.ascontiguousarray(q[s:e], np.float32)).to(device)
            sc = score_block(qb, db, metric, x_sq)
            mask_ranges(sc, own_lo[s:e], own_hi[s:e])
            out_pos[s:e], out_sc[s:e] = topk_rows(sc, k)
            bar.update(e - s)
    bar.close()
    return out_pos, out_sc


def causal_document_search(x: Any, k: int, exclude_recent: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact document-causal neighbors within one document: x is its chunks' embeddings [n, d] (torch,
    float32, in chunk order). Returns (positions within the document, scores), -1 / -inf padded."""
    import torch

    n = x.shape[0]
    out_pos = np.full((n, k), NEIGHBOR_PAD, np.int64)
    out_sc = np.full((n, k), -np.inf, np.float32)
    x_sq = (x * x).sum(1) if metric == "l2" else None
    rows = max(1, min(n, BLOCK_ELEMS // max(n, 1)))
    cand = np.arange(n)
    with torch.inference_mode():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            # only candidates that some row of this block may retrieve enter the product
            last = e - 1 - 1 - exclude_recent
            if last < 0:
                continue
            sc = score_block(x[s:e], x[: last + 1], metric, None if x_sq is None else x_sq[: last + 1])
            allowed = causal_retrievable(np.arange(s, e)[:, None], cand[None, : last + 1], exclude_recent)
            fill_masked(sc, ~allowed)
            out_pos[s:e], out_sc[s:e] = topk_rows(sc, k)
    return out_pos, out_sc


# ----------------------------------------------------------------------------------------- faiss search


def rerank_filter(
    q: np.ndarray,
    cand: np.ndarray,
    k: int,
    q_doc: np.ndarray,
    db_doc: np.ndarray,
    db: np.ndarray,
    metric: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop candidates (db positions, -1 = none) from the query's own document, score the rest exactly
    and keep the top k. Returns (positions, scores, number of surviving candidates per row)."""
    n, f = cand.shape
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    valid &= db_doc[safe] != q_doc[:, None]
    out_pos = np.full((n, k), NEIGHBOR_PAD, np.int64)
    out_sc = np.full((n, k), -np.inf, np.float32)
    rows = max(1, BLOCK_ELEMS // max(1, f * db.shape[1]))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        qb = np.asarray(q[s:e], np.float32)
        cb = db[safe[s:e]]  # [B, f, d]
        sc = np.matmul(cb, qb[:, :, None])[:, :, 0]
        if metric == "l2":
            sc = -np.maximum((qb * qb).sum(1)[:, None] + (cb * cb).sum(2) - 2 * sc, 0)
        sc[~valid[s:e]] = -np.inf
        out_pos[s:e], out_sc[s:e] = select_top(sc.astype(np.float32), np.where(valid[s:e], cand[s:e], -1), k)
    return out_pos, out_sc, valid.sum(1)


def exact_rescore(
    q: np.ndarray, x: np.ndarray, pos: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Recompute the chosen neighbors' scores (x positions, -1 = none) in float64 with numpy's fixed
    summation order and re-sort them (ties: the later chunk first). BLAS scores change in the last bit
    with its thread count and the device; these do not, so a version has the same bytes under every
    runner (threads, Dask workers with one BLAS thread each, a GPU)."""
    out_pos = np.full(pos.shape, NEIGHBOR_PAD, np.int64)
    out_sc = np.full(pos.shape, -np.inf, np.float32)
    n, k = pos.shape
    rows = max(1, BLOCK_ELEMS // max(1, 2 * k * q.shape[1]))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        ok = pos[s:e] >= 0
        qd = np.asarray(q[s:e], np.float64)[:, None, :]
        xd = np.asarray(x[np.where(ok, pos[s:e], 0)], np.float64)  # [B, k, d]
        sc = (qd * xd).sum(-1) if metric == "ip" else -((qd - xd) ** 2).sum(-1)
        sc = np.where(ok, sc, -np.inf).astype(np.float32)
        out_pos[s:e], out_sc[s:e] = select_top(sc, np.where(ok, pos[s:e], NEIGHBOR_PAD), k)
    return out_pos, out_sc


def faiss_search(
    index: Any,
    q: np.ndarray,
    k: int,
    fetch: int,
    q_doc: np.ndarray,
    db_doc: np.ndarray,
    db: np.ndarray,
    metric: str,
    max_fetch: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Over-fetch from a faiss index, filter the own document, re-score exactly; rows left with fewer
    than k neighbors while the index still had more to give are searched again with 4x the fetch."""
    n = len(q)
    N = index.ntotal
    out_pos = np.full((n, k), NEIGHBOR_PAD, np.int64)
    out_sc = np.full((n, k), -np.inf, np.float32)
    todo = np.arange(n)
    f = min(max(fetch, k), N, max_fetch)
    refetched = 0
    while len(todo):
        _, cand = index.search(np.ascontiguousarray(q[todo], np.float32), f)
        p, v, kept = rerank_filter(q[todo], cand, k, q_doc[todo], db_doc, db, metric)
        out_pos[todo], out_sc[todo] = p, v
        # short rows whose candidate list was full: the index may hold more of other documents
        short = (kept < k) & (cand[:, -1] >= 0)
        if f >= min(N, max_fetch) or not short.any():
            break
        todo = todo[short]
        refetched += len(todo)
        f = min(f * 4, N, max_fetch)
    return out_pos, out_sc, {"refetched_rows": refetched}


def faiss_module() -> Any:
    """The `faiss` module, from whichever extra is installed (`cpu` or `gpu`: both provide it)."""
    try:
        import faiss
    except ImportError as e:
        raise ConfigError(
            "the dense stage needs faiss: install one extra, `pip install -e '.[cpu]'` or `.[gpu]` "
            "(make setup FAISS=cpu|gpu), or set dense.backend: torch for exact search without faiss"
        ) from e
    return faiss


def _faiss_metric(metric: str) -> int:
    faiss = faiss_module()

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def use_faiss_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    faiss = faiss_module()

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and n == 0:
        raise ConfigError(
            "dense.device=cuda but faiss sees no GPU (install the `gpu` extra: faiss-gpu==1.15.1) "
            "or use dense.backend: torch for exact search on the GPU"
        )
    return n > 0


_GPU_RES: list[Any] = []  # faiss GPU resources must outlive every index that uses them


def to_gpu(index: Any) -> Any:
    """Move an IVF/flat index to GPU 0 (float16 PQ lookup tables: needed above 48 code bytes); layouts the
    GPU does not support stay on the CPU, with a warning."""
    faiss = faiss_module()

    try:
        if not _GPU_RES:
            _GPU_RES.append(faiss.StandardGpuResources())
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        return faiss.index_cpu_to_gpu(_GPU_RES[0], 0, index, co)
    except (RuntimeError, AttributeError) as e:
        log.warning("faiss could not move %s to the GPU (%s); searching on the CPU", type(index).__name__, e)
        return index


def set_search_param(index: Any, name: str, value: int) -> None:
    faiss = faiss_module()

    ps = faiss.GpuParameterSpace() if type(index).__name__.startswith("Gpu") else faiss.ParameterSpace()
    ps.set_index_parameter(index, name, int(value))


# ----------------------------------------------------------------------------------------- data


@dataclass
class Database:
    """The corpus-scope database: train-split chunks in chunk-id order."""

    ids: np.ndarray  # chunk ids [N]
    doc: np.ndarray  # doc_idx per database row [N]
    emb: np.ndarray  # float32 [N, d]

    def chunk_ids(self, pos: np.ndarray) -> np.ndarray:
        """Database positions (-1 = none) to chunk ids (-1 = none)."""
        return np.where(pos >= 0, self.ids[pos.clip(0)], NEIGHBOR_PAD)


_CACHE: dict[tuple[str, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


def _cached(ctx: StageContext, key: tuple[str, ...], make: Any) -> Any:
    """Per-process cache of the database, its tensor and the search index, so shards run in one worker
    load them once. It holds the objects of one embeddings artifact at a time."""
    owner = ctx.inputs["embeddings"].version
    with _CACHE_LOCK:
        if any(k[0] != owner for k in _CACHE):
            _CACHE.clear()
        full = (owner, *key)
        if full not in _CACHE:
            _CACHE[full] = make()
        return _CACHE[full]


def _embeddings(ctx: StageContext, lo: int, hi: int) -> np.ndarray:
    """float32 embeddings of chunk ids [lo, hi), checked to be complete."""
    art = ctx.inputs["embeddings"]
    ids, emb = read_embeddings(art, lo, hi)
    if len(ids) != hi - lo or (len(ids) and (ids[0] != lo or ids[-1] != hi - 1)):
        raise InputError(
            f"{art.ref} lacks embeddings of chunk ids {lo}..{hi - 1} (found {len(ids)} of "
            f"{hi - lo}); rebuild it (rpt run embeddings) and check `rpt artifacts verify`"
        )
    return emb.astype(np.float32)


def load_database(ctx: StageContext) -> Database:
    def make() -> Database:
        reader = ChunkReader(ctx.inputs["chunks"])
        emb = _embeddings(ctx, 0, reader.n_chunks)
        docs = reader.docs("train")
        if not docs:
            raise InputError(
                f"{reader.art.ref} has no train-split chunks: the corpus scope retrieves from the "
                "train split (set documents.splits / split_lists, or use dense.scope: document-causal)"
            )
        ids = np.concatenate([d.chunk_ids for d in docs])
        doc = np.concatenate([np.full(d.n, d.doc_idx, np.int64) for d in docs])
        return Database(ids, doc, emb[ids])

    return _cached(ctx, ("db", ctx.inputs["chunks"].version), make)


def own_doc_ranges(reader: ChunkReader, db: Database, q_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Database positions [lo, hi) of each query's own document (empty for non-train documents)."""
    first = q_ids - reader.chunk_pos[q_ids]
    docs = reader.docs()
    starts = np.array([d.first for d in docs], np.int64)
    sizes = np.array([d.n for d in docs], np.int64)
    end = first + sizes[np.searchsorted(starts, first)]
    return np.searchsorted(db.ids, first), np.searchsorted(db.ids, end)


# ----------------------------------------------------------------------------------------- index choice


@dataclass
class IndexPlan:
    kind: str  # flat | ivfpq | hnsw
    backend: str  # torch | faiss
    nlist: int | None = None
    pq_m: int | None = None
    n_train: int | None = None

    def factory(self, dim: int, hnsw_m: int) -> str:
        if self.kind == "ivfpq":
            return f"IVF{self.nlist},PQ{self.pq_m}np"  # np: skip polysemous training (unused, slow)
        if self.kind == "hnsw":
            return f"HNSW{hnsw_m},Flat"
        return "Flat"


def plan_index(cfg: Config, n_db: int, dim: int) -> IndexPlan:
    """Resolve index/backend choices and check the training constraints before any work is done."""
    kind = cfg.index
    if kind == "auto":
        kind = "flat" if n_db <= cfg.flat_max else "ivfpq"
    backend = cfg.backend
    if kind != "flat":
        if backend == "torch":
            raise ConfigError(
                f"dense.backend=torch does exact search only, but dense.index resolves to {kind}; "
                "use dense.index: flat, or dense.backend: auto/faiss"
            )
        backend = "faiss"
    elif backend == "auto":
        backend = "torch"
    if kind != "ivfpq":
        return IndexPlan(kind, backend)
    pq_m = cfg.pq_m or _default_pq_m(dim)
    if dim % pq_m:
        raise ConfigError(
            f"dense.pq_m={pq_m} must divide the embedding dimension {dim}; e.g. dense.pq_m: {_default_pq_m(dim)}"
        )
    avail = min(cfg.train_sample or n_db, n_db)
    nlist = cfg.nlist or max(1, min(round(4 * math.sqrt(n_db)), avail // 39))
    n_train = min(n_db, cfg.train_sample) if cfg.train_sample else min(n_db, max(256 * nlist, 65536))
    if n_train < 30 * nlist:
        raise ConfigError(
            f"dense: IVF training needs at least 30 vectors per list, but nlist={nlist} has only {n_train} training "
            f"vectors ({n_train / nlist:.1f} per list; the database has {n_db} train-split chunks). "
            f"Lower dense.nlist to at most {max(1, n_train // 30)}"
            + ("" if n_train >= n_db else f", or raise dense.train_sample to at least {30 * nlist}")
            + ", or use dense.index: flat (exact search)."
        )
    if n_train < 256:
        raise ConfigError(
            f"dense: PQ training needs at least 256 vectors (8-bit codes), the sample has {n_train}; "
            "use dense.index: flat for a database this small"
        )
    return IndexPlan(kind, backend, nlist, pq_m, n_train)


def _default_pq_m(dim: int) -> int:
    """About 4 dimensions per sub-quantizer (96 bytes for 384 dims): the largest divisor of dim not above
    dim/4. Coarser codes (dim/8) lost 1.5-3 points of recall@10 at equal nprobe in our measurements."""
    target = max(1, dim // 4)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def _samples(
    cfg: Config, n_queries: int, n_db: int, n_train: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded samples: training rows of the database, and two disjoint sets of query chunk ids, one to
    tune nprobe/efSearch on and one held out to measure recall on."""
    rng = np.random.default_rng(cfg.seed)
    train = np.sort(rng.choice(n_db, size=n_train, replace=False)) if n_train else np.zeros(0, np.int64)
    queries = rng.permutation(n_queries)
    m = min(cfg.recall_sample, n_queries // 2)
    return train, np.sort(queries[:m]), np.sort(queries[m : 2 * m])


# ----------------------------------------------------------------------------------------- the stage


class DenseStage(Stage):
    name = "dense"
    version = 1
    Config = Config
    description = "dense neighbor tables over chunk embeddings (exact or faiss IVF-PQ/HNSW)"
    preferred_runner = "serial"  # torch/faiss already use every core within a shard
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"embeddings": InputRef("embeddings"), "chunks": InputRef("chunks")}

    def output_schema(self) -> pa.Schema | None:
        return None  # k is in the config; the parts carry the schema

    # ---- plan: shards, and (corpus scope, approximate) the index
    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        reader = ChunkReader(ctx.inputs["chunks"])
        n = reader.n_chunks
        rows = ctx.inputs["embeddings"].manifest.rows
        if rows != n:
            raise InputError(
                f"{ctx.inputs['embeddings'].ref} has {rows} rows but {reader.art.ref} has {n} chunks; "
                "they do not belong together: rebuild embeddings from these chunks"
            )
        if cfg.scope == "document-causal":
            return self._doc_shards(reader, cfg.shard_chunks)
        db = load_database(ctx)
        ip = plan_index(cfg, len(db.ids), db.emb.shape[1])
        if ip.kind != "flat" and not self._index_ready(ctx):
            self._build_index(ctx, db, ip, n)
        elif ip.kind == "flat":
            self._write_info(
                ctx,
                {
                    "kind": "flat",
                    "backend": ip.backend,
                    "factory": "Flat",
                    "exact": True,
                    "database": len(db.ids),
                },
            )
        starts = list(range(0, n, cfg.shard_chunks))
        return [
            Shard(i, len(starts), {"lo": lo, "hi": min(lo + cfg.shard_chunks, n)})
            for i, lo in enumerate(starts)
        ]

    @staticmethod
    def _doc_shards(reader: ChunkReader, budget: int) -> list[Shard]:
        groups: list[tuple[int, int]] = []
        for d in reader.docs():
            if groups and groups[-1][1] == d.first and d.first + d.n - groups[-1][0] <= budget:
                groups[-1] = (groups[-1][0], d.first + d.n)
            else:
                groups.append((d.first, d.first + d.n))
        return [Shard(i, len(groups), {"lo": lo, "hi": hi}) for i, (lo, hi) in enumerate(groups)]

    def _write_info(self, ctx: StageContext, info: dict[str, Any]) -> None:
        ctx.write_text(INDEX_INFO, json.dumps(info, indent=2, sort_keys=True))

    def _read_info(self, ctx: StageContext) -> dict[str, Any] | None:
        if not ctx.exists(INDEX_INFO):
            return None
        with ctx.fs.open(ctx.path(INDEX_INFO), "r") as f:
            return json.load(f)

    def _index_ready(self, ctx: StageContext) -> bool:
        """A resumed build reuses the saved index when its checksum still matches."""
        info = self._read_info(ctx)
        if not info or info.get("kind") == "flat" or not ctx.exists(INDEX_FILE):
            return False
        ok = ctx.file_entry(INDEX_FILE).sha256 == info.get("sha256")
        if ok:
            log.info("reusing the trained %s index of this partial build", info.get("factory"))
        return ok

    def _build_index(self, ctx: StageContext, db: Database, ip: IndexPlan, n_queries: int) -> None:
        faiss = faiss_module()

        cfg: Config = ctx.cfg
        dim = db.emb.shape[1]
        factory = ip.factory(dim, cfg.hnsw_m)
        gpu = ip.kind == "ivfpq" and use_faiss_gpu(cfg.device)  # faiss has no GPU HNSW
        train, tune_q, _ = _samples(cfg, n_queries, len(db.ids), ip.n_train)
        t0 = time.perf_counter()
        index = faiss.index_factory(dim, factory, _faiss_metric(cfg.metric))
        if ip.kind == "hnsw":
            index.hnsw.efConstruction = max(40, 2 * cfg.hnsw_m)
        work = to_gpu(index) if gpu else index
        if ip.kind == "ivfpq":
            log.info(
                "training %s on %d of %d database vectors (seed %d)",
                factory,
                len(train),
                len(db.ids),
                cfg.seed,
            )
            work.train(np.ascontiguousarray(db.emb[train]))
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        step = 1 << 16
        bar = progress(total=len(db.ids), desc=f"dense: adding to {factory}", unit="vec")
        for s in range(0, len(db.ids), step):
            work.add(np.ascontiguousarray(db.emb[s : s + step]))
            bar.update(min(step, len(db.ids) - s))
        bar.close()
        t_add = time.perf_counter() - t0
        param = "nprobe" if ip.kind == "ivfpq" else "efSearch"
        given = cfg.nprobe if ip.kind == "ivfpq" else cfg.ef_search
        t0 = time.perf_counter()
        value, curve = (given, []) if given else self._tune(ctx, work, db, ip, tune_q, param, gpu)
        t_tune = time.perf_counter() - t0
        on_gpu = work is not index
        if on_gpu:
            index = faiss.index_gpu_to_cpu(work)
        with ctx.local_dir("") as root:
            tmp = root / f"{INDEX_FILE}.tmp-{os.getpid()}"
            faiss.write_index(index, str(tmp))
            os.replace(tmp, root / INDEX_FILE)
        info = {
            "kind": ip.kind,
            "backend": "faiss",
            "factory": factory,
            "exact": False,
            "database": len(db.ids),
            "metric": cfg.metric,
            "nlist": ip.nlist,
            "pq_m": ip.pq_m,
            "hnsw_m": cfg.hnsw_m if ip.kind == "hnsw" else None,
            "ef_construction": index.hnsw.efConstruction if ip.kind == "hnsw" else None,
            "train_vectors": len(train) if ip.kind == "ivfpq" else None,
            "search_param": param,
            "search_value": int(value),
            "tuned": given is None,
            "target_recall": cfg.target_recall,
            "tuning_queries": len(tune_q),
            "tuning_curve": curve,
            "trained_on_gpu": on_gpu,
            "train_s": round(t_train, 3),
            "add_s": round(t_add, 3),
            "tune_s": round(t_tune, 3),
            "sha256": ctx.file_entry(INDEX_FILE).sha256,
        }
        self._write_info(ctx, info)
        log.info("built %s (%s=%s) in %.1f s", factory, param, value, t_train + t_add + t_tune)

    def _tune(
        self,
        ctx: StageContext,
        index: Any,
        db: Database,
        ip: IndexPlan,
        tune_q: np.ndarray,
        param: str,
        gpu: bool,
    ) -> tuple[int, list[list[float]]]:
        """The smallest nprobe/efSearch on a geometric ladder whose recall@k on the tuning queries reaches
        target_recall (the largest tried when none does)."""
        cfg: Config = ctx.cfg
        fetch = cfg.k + cfg.overfetch
        if ip.kind == "ivfpq":
            # steps of sqrt(2): 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, ... up to every list
            ladder = sorted(
                {min(round(2 ** (i / 2)), ip.nlist) for i in range(0, 2 * int(math.log2(ip.nlist)) + 3)}
            )
            if gpu:
                ladder = [v for v in ladder if v <= GPU_MAX_K] or [GPU_MAX_K]
        else:
            ladder = [2**i for i in range(4, 13)]
        if not len(tune_q):
            return ladder[-1], []
        exact, _ = self._exact(ctx, db, tune_q)
        q = _embeddings_at(ctx, tune_q)
        q_doc = ChunkReader(ctx.inputs["chunks"]).chunk_doc[tune_q]
        curve = []
        for v in ladder:
            set_search_param(index, param, v)
            got, _, _ = faiss_search(
                index, q, cfg.k, fetch, q_doc, db.doc, db.emb, cfg.metric, GPU_MAX_K if gpu else len(db.ids)
            )
            r = recall(db.chunk_ids(got), db.chunk_ids(exact))
            curve.append([v, round(r, 4)])
            log.info("tuning %s=%d: recall@%d %.4f", param, v, cfg.k, r)
            if r >= cfg.target_recall:
                return v, curve
        log.warning(
            "no %s reached recall@%d >= %.2f (best %.4f at %s=%d); raise dense.overfetch or use a finer "
            "index",
            param,
            cfg.k,
            cfg.target_recall,
            curve[-1][1],
            param,
            ladder[-1],
        )
        return ladder[-1], curve

    def _exact(self, ctx: StageContext, db: Database, q_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact corpus-scope neighbors (database positions, scores) of the given query chunk ids."""
        cfg: Config = ctx.cfg
        device = _torch_device(cfg.device)
        reader = ChunkReader(ctx.inputs["chunks"])
        lo, hi = own_doc_ranges(reader, db, q_ids)
        dbt = _db_tensor(ctx, db, device)
        return exact_corpus_search(_embeddings_at(ctx, q_ids), dbt, cfg.k, lo, hi, cfg.metric, device)

    # ---- shards
    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        lo, hi = int(shard.payload["lo"]), int(shard.payload["hi"])
        import torch  # noqa: F401  (imported before the clock starts: search_s is search time)

        t0 = time.perf_counter()
        if cfg.scope == "document-causal":
            ids, scores, extra = self._causal_shard(ctx, lo, hi)
        else:
            ids, scores, extra = self._corpus_shard(ctx, lo, hi)
        ctx.write_parquet(
            f"part-{shard.name}.parquet",
            neighbor_table(np.arange(lo, hi), ids, scores),
            schema=neighbor_schema(cfg.k),
        )
        valid = (ids != NEIGHBOR_PAD).sum(1)
        return {
            "rows": hi - lo,
            "full_rows": int((valid == cfg.k).sum()),
            "valid_neighbors": int(valid.sum()),
            "empty_rows": int((valid == 0).sum()),
            "search_s": time.perf_counter() - t0,
            **extra,
        }

    def _causal_shard(
        self, ctx: StageContext, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        import torch

        cfg: Config = ctx.cfg
        device = _torch_device(cfg.device)
        emb_np = _embeddings(ctx, lo, hi)
        emb = torch.from_numpy(emb_np).to(device)
        out_ids = np.full((hi - lo, cfg.k), NEIGHBOR_PAD, np.int64)
        out_sc = np.full((hi - lo, cfg.k), np.nan, np.float32)
        docs = [d for d in ChunkReader(ctx.inputs["chunks"]).docs() if lo <= d.first < hi]
        for d in progress(docs, desc=f"dense causal {lo}..{hi}", unit="doc"):
            a, b = d.first - lo, d.first - lo + d.n
            p, s = causal_document_search(emb[a:b], cfg.k, cfg.exclude_recent, cfg.metric)
            out_ids[a:b] = np.where(p >= 0, p + d.first, NEIGHBOR_PAD)
            out_sc[a:b] = s
        rel, out_sc = exact_rescore(
            emb_np, emb_np, np.where(out_ids >= 0, out_ids - lo, NEIGHBOR_PAD), cfg.metric
        )
        out_ids = np.where(rel >= 0, rel + lo, NEIGHBOR_PAD)
        return out_ids, out_sc, {"docs": len(docs)}

    def _corpus_shard(
        self, ctx: StageContext, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        cfg: Config = ctx.cfg
        db = load_database(ctx)
        reader = ChunkReader(ctx.inputs["chunks"])
        q = _embeddings(ctx, lo, hi)
        q_ids = np.arange(lo, hi)
        info = self._read_info(ctx) or {}
        pos = np.full((hi - lo, cfg.k), NEIGHBOR_PAD, np.int64)
        sc = np.full((hi - lo, cfg.k), -np.inf, np.float32)
        extra: dict[str, Any] = {}
        if info.get("kind") == "flat" and info.get("backend") == "torch":
            device = _torch_device(cfg.device)
            own_lo, own_hi = own_doc_ranges(reader, db, q_ids)
            pos, sc = exact_corpus_search(
                q,
                _db_tensor(ctx, db, device),
                cfg.k,
                own_lo,
                own_hi,
                cfg.metric,
                device,
                desc=f"dense exact {lo}..{hi}",
            )
        else:
            index, gpu = self._search_index(ctx, db, info)
            q_doc = reader.chunk_doc[lo:hi]
            fetch = cfg.k + cfg.overfetch
            refetched = 0
            for s in progress(
                range(0, hi - lo, cfg.batch_size),
                desc=f"dense {info.get('factory')} {lo}..{hi}",
                unit="batch",
            ):
                e = min(hi - lo, s + cfg.batch_size)
                pos[s:e], sc[s:e], st = faiss_search(
                    index,
                    q[s:e],
                    cfg.k,
                    fetch,
                    q_doc[s:e],
                    db.doc,
                    db.emb,
                    cfg.metric,
                    GPU_MAX_K if gpu else len(db.ids),
                )
                refetched += st["refetched_rows"]
            extra["refetched_rows"] = refetched
        pos, sc = exact_rescore(q, db.emb, pos, cfg.metric)
        return db.chunk_ids(pos), sc, extra

    def _search_index(self, ctx: StageContext, db: Database, info: dict[str, Any]) -> tuple[Any, bool]:
        """The shard's faiss index, loaded once per process: the saved one, or an IndexFlat over the database."""
        faiss = faiss_module()

        cfg: Config = ctx.cfg
        gpu = info.get("kind") != "hnsw" and use_faiss_gpu(cfg.device)  # faiss has no GPU HNSW

        def make() -> Any:
            if info.get("kind") == "flat":
                index = faiss.index_factory(db.emb.shape[1], "Flat", _faiss_metric(cfg.metric))
                index.add(db.emb)
            else:
                index = faiss.read_index(_local_file(ctx, INDEX_FILE))
            if gpu:
                index = to_gpu(index)
            if info.get("search_param"):
                set_search_param(index, info["search_param"], info["search_value"])
            return index

        key = ("index", ctx.workdir, str(info.get("sha256")), cfg.metric, str(gpu))
        return _cached(ctx, key, make), gpu

    # ---- finalize: stats and recall of what was written
    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        stats = merge_stats(r.stats for r in results)
        rows = stats.get("rows", 0)
        stats["fill_rate"] = round(stats.get("full_rows", 0) / rows, 6) if rows else None
        stats["mean_valid_neighbors"] = round(stats.get("valid_neighbors", 0) / rows, 4) if rows else None
        secs = stats.get("search_s", 0.0)
        stats["queries_per_s"] = round(rows / secs, 1) if secs else None
        if cfg.scope == "corpus":
            stats.update(self._recall(ctx))
        return stats

    def _recall(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        db = load_database(ctx)
        info = self._read_info(ctx) or {}
        reader = ChunkReader(ctx.inputs["chunks"])
        _, _, held_out = _samples(cfg, reader.n_chunks, len(db.ids), info.get("train_vectors") or 0)
        if not len(held_out):
            return {"recall_at_k": None, "recall_queries": 0}
        t0 = time.perf_counter()
        exact, _ = self._exact(ctx, db, held_out)
        r = recall(_written_neighbors(ctx, held_out), db.chunk_ids(exact))
        log.info(
            "recall@%d of the written table against exact search on %d held-out queries: %.4f",
            cfg.k,
            len(held_out),
            r,
        )
        return {
            "recall_at_k": round(r, 6),
            "recall_k": cfg.k,
            "recall_queries": len(held_out),
            "recall_s": round(time.perf_counter() - t0, 3),
        }

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        emb_meta = ctx.inputs["embeddings"].meta
        causal = cfg.scope == "document-causal"
        out: dict[str, Any] = {  # source, scope, query, k, exclude_recent: the same keys as bm25's
            "source": "dense",
            "scope": cfg.scope,
            "query": "chunk",
            "k": cfg.k,
            "exclude_recent": cfg.exclude_recent if causal else None,
            "metric": cfg.metric,
            "score": "inner product" if cfg.metric == "ip" else "negative squared L2 distance",
            "encoder": (emb_meta.get("encoder") or {}).get("name"),
            "normalized": emb_meta.get("normalize"),
        }
        if causal:
            out["index"] = {"kind": "exact-per-document", "exact": True}
        else:
            info = self._read_info(ctx) or {}
            out.update(
                index={k: v for k, v in info.items() if k != "sha256"},
                overfetch=cfg.overfetch,
                database="train split",
            )
        return out


# ----------------------------------------------------------------------------------------- helpers


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |got ∩ exact| / |exact| (chunk ids, -1 = none); queries with no exact neighbor skip."""
    total, n = 0.0, 0
    for g, e in zip(got, exact):
        e = e[e != NEIGHBOR_PAD]
        if len(e) == 0:
            continue
        total += len(np.intersect1d(g[g != NEIGHBOR_PAD], e)) / len(e)
        n += 1
    return total / n if n else 1.0


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dense.device=cuda but torch sees no CUDA device; use dense.device: auto or cpu")
    return device


def _db_tensor(ctx: StageContext, db: Database, device: str) -> Any:
    import torch

    return _cached(
        ctx, ("dbt", ctx.inputs["chunks"].version, device), lambda: torch.from_numpy(db.emb).to(device)
    )


def _embeddings_at(ctx: StageContext, q_ids: np.ndarray) -> np.ndarray:
    """float32 embeddings of arbitrary chunk ids (a sample)."""
    art = ctx.inputs["embeddings"]
    t = art.read(
        columns=["chunk_id", "embedding"], filter=pc.field("chunk_id").isin(pa.array(q_ids, pa.int64()))
    )
    dim = t.schema.field("embedding").type.list_size
    ids = t.column("chunk_id").to_numpy()
    emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    order = np.argsort(ids)
    if not np.array_equal(ids[order], q_ids):
        raise InputError(f"{art.ref} lacks embeddings of some sampled chunk ids; rebuild it")
    return emb[order].astype(np.float32)


def _written_neighbors(ctx: StageContext, q_ids: np.ndarray) -> np.ndarray:
    """The neighbor ids this build wrote for the given query chunk ids (read back from the parts)."""
    import pyarrow.dataset as pads

    parts = sorted(
        p for p in ctx.fs.ls(ctx.workdir, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")
    )
    t = pads.dataset(parts, format="parquet", filesystem=ctx.fs).to_table(
        columns=["chunk_id", "neighbor_ids"], filter=pc.field("chunk_id").isin(pa.array(q_ids, pa.int64()))
    )
    k = t.schema.field("neighbor_ids").type.list_size
    ids = t.column("chunk_id").to_numpy()
    nb = t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
    return nb[np.argsort(ids)]


def _local_file(ctx: StageContext, name: str) -> str:
    """A local path of a file in this build's folder (downloaded to a temporary file on remote stores)."""
    if ctx.store.is_local:
        return ctx.path(name)
    import tempfile

    tmp = os.path.join(tempfile.mkdtemp(prefix="rpt-dense-"), name)
    ctx.fs.get(ctx.path(name), tmp)
    return tmp


STAGE = DenseStage()

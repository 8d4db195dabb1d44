"""faiss indexes for corpus-scope dense search: build, tune nprobe/efSearch, over-fetch and filter.

An approximate index over-fetches `fetch` candidates per query, drops the query's own document,
re-scores the survivors exactly from the stored vectors, and re-fetches more for rows that are still
short. faiss is imported inside each function: callers that want a friendly error for a missing faiss
check for it first (`stages.dense.faiss_module`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from retrieval.exact import BLOCK_ELEMS, NEIGHBOR_PAD, select_top

# the dense stage's logger: these messages are the stage's progress, and keep the name they always had
log = logging.getLogger("rpt.dense")

GPU_MAX_K = 2048  # faiss GPU indexes cap k and nprobe at 2048


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


def faiss_search_batched(
    index: Any,
    q: np.ndarray,
    k: int,
    fetch: int,
    q_doc: np.ndarray,
    db_doc: np.ndarray,
    db: np.ndarray,
    metric: str,
    max_fetch: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """`faiss_search` over the queries in batches of `batch_size` (on_batch(1) after each one). Returns
    (db positions, scores, rows searched again)."""
    n = len(q)
    pos = np.full((n, k), NEIGHBOR_PAD, np.int64)
    sc = np.full((n, k), -np.inf, np.float32)
    refetched = 0
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        pos[s:e], sc[s:e], st = faiss_search(
            index, q[s:e], k, fetch, q_doc[s:e], db_doc, db, metric, max_fetch
        )
        refetched += st["refetched_rows"]
        if on_batch is not None:
            on_batch(1)
    return pos, sc, refetched


def faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


_GPU_RES: list[Any] = []  # faiss GPU resources must outlive every index that uses them


def to_gpu(index: Any, device: int = 0) -> Any:
    """Move an IVF/flat index to GPU `device` (the worker's GPU: the caller resolves it; float16 PQ lookup
    tables: needed above 48 code bytes); layouts the GPU does not support stay on the CPU, with a warning."""
    import faiss

    try:
        if not _GPU_RES:
            _GPU_RES.append(faiss.StandardGpuResources())
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        return faiss.index_cpu_to_gpu(_GPU_RES[0], device, index, co)
    except (RuntimeError, AttributeError) as e:
        log.warning("faiss could not move %s to the GPU (%s); searching on the CPU", type(index).__name__, e)
        return index


def open_index(
    vectors: np.ndarray,
    metric: str,
    path: str | os.PathLike[str] | None = None,
    gpu: int | None = None,
    search_param: str | None = None,
    search_value: int | None = None,
) -> Any:
    """A search index: the saved one at `path`, or (path None) an exact IndexFlat over `vectors`; moved to
    GPU `gpu` (None: the CPU), with its search parameter (nprobe, efSearch) set when given."""
    import faiss

    if path is None:
        index = faiss.index_factory(vectors.shape[1], "Flat", faiss_metric(metric))
        index.add(vectors)
    else:
        index = faiss.read_index(os.fspath(path))
    if gpu is not None:
        index = to_gpu(index, gpu)
    if search_param:
        set_search_param(index, search_param, int(search_value or 0))
    return index


def set_search_param(index: Any, name: str, value: int) -> None:
    import faiss

    ps = faiss.GpuParameterSpace() if type(index).__name__.startswith("Gpu") else faiss.ParameterSpace()
    ps.set_index_parameter(index, name, int(value))


def default_pq_m(dim: int) -> int:
    """About 4 dimensions per sub-quantizer (96 bytes for 384 dims): the largest divisor of dim not above
    dim/4. Coarser codes (dim/8) lost 1.5-3 points of recall@10 at equal nprobe in our measurements."""
    target = max(1, dim // 4)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def build_index(
    vectors: np.ndarray,
    factory: str,
    metric: str,
    train_rows: np.ndarray | None = None,
    hnsw_m: int | None = None,
    gpu: int | None = None,
    seed: int | None = None,
    on_add: Callable[[int], None] | None = None,
    add_step: int = 1 << 16,
) -> tuple[Any, Any, float, float]:
    """A faiss index of `vectors` (float32 [N, d]) from a factory string, trained on vectors[train_rows]
    when given (IVF-PQ), with efConstruction max(40, 2 hnsw_m) when hnsw_m is given (HNSW), built on GPU
    `gpu` (None: the CPU) when the layout allows. `seed` (of the training sample) only appears in the log.

    Returns (index, work, train_s, add_s): `work` is the GPU clone that was trained and filled, or `index`
    itself on the CPU; `to_cpu(index, work)` gives the CPU index to save."""
    import faiss

    t0 = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], factory, faiss_metric(metric))
    if hnsw_m is not None:
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    work = to_gpu(index, gpu) if gpu is not None else index
    if train_rows is not None:
        log.info(
            "training %s on %d of %d database vectors (seed %s)", factory, len(train_rows), len(vectors), seed
        )
        work.train(np.ascontiguousarray(vectors[train_rows]))
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, len(vectors), add_step):
        work.add(np.ascontiguousarray(vectors[s : s + add_step]))
        if on_add is not None:
            on_add(min(add_step, len(vectors) - s))
    return index, work, t_train, time.perf_counter() - t0


def to_cpu(index: Any, work: Any) -> Any:
    """The CPU index of a `build_index` result (copied back from the GPU when it was built there)."""
    import faiss

    return faiss.index_gpu_to_cpu(work) if work is not index else index


def write_index(index: Any, path: str | os.PathLike[str]) -> None:
    """Save a CPU index atomically: a reader (a resumed build) never sees a half-written file."""
    import faiss

    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def search_ladder(kind: str, nlist: int | None, gpu: bool) -> list[int]:
    """The nprobe (ivfpq) or efSearch (hnsw) values tuning tries, smallest first."""
    if kind == "ivfpq":
        assert nlist is not None
        # steps of sqrt(2): 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, ... up to every list
        ladder = sorted({min(round(2 ** (i / 2)), nlist) for i in range(0, 2 * int(math.log2(nlist)) + 3)})
        if gpu:
            ladder = [v for v in ladder if v <= GPU_MAX_K] or [GPU_MAX_K]
        return ladder
    return [2**i for i in range(4, 13)]


def tune_search_param(
    index: Any,
    param: str,
    ladder: list[int],
    q: np.ndarray,
    q_doc: np.ndarray,
    db_doc: np.ndarray,
    db: np.ndarray,
    k: int,
    fetch: int,
    metric: str,
    max_fetch: int,
    recall_of: Callable[[np.ndarray], float],
    target_recall: float,
) -> tuple[int, list[list[float]]]:
    """The smallest value of `param` on the ladder whose recall (`recall_of` the db positions found for
    the queries q) reaches target_recall, and the curve of (value, recall) tried; the largest value
    when none does (then the curve's last recall is below the target)."""
    curve: list[list[float]] = []
    for v in ladder:
        set_search_param(index, param, v)
        got, _, _ = faiss_search(index, q, k, fetch, q_doc, db_doc, db, metric, max_fetch)
        r = recall_of(got)
        curve.append([v, round(r, 4)])
        log.info("tuning %s=%d: recall@%d %.4f", param, v, k, r)
        if r >= target_recall:
            return v, curve
    return ladder[-1], curve

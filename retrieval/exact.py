"""Exact dense nearest-neighbor search: blocked score products and exact row-wise top-k.

Scores are higher-is-better: the inner product (`ip`) or the negative squared L2 distance (`l2`).
Rows are ordered by score, ties broken by the higher position (the more recent chunk); -1 / -inf pad
what is not retrievable. torch is imported inside the functions that use it, so importing this module
costs numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

NEIGHBOR_PAD = (
    -1
)  # "no neighbor", the same value as pipeline.formats.NEIGHBOR_PAD (checked by tests/test_imports.py)
# Rows of the score block are chosen so that a block holds about this many scores.
BLOCK_ELEMS = 1 << 24
TIE_MARGIN = 8  # extra entries fetched by the float top-k to settle ties at the k-th score


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
    device: Any = "cpu",
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query over the database, excluding db positions [own_lo, own_hi) per query (the
    query's own document). `db` is a float32 torch tensor on `device`. Returns (db positions, scores).
    on_progress(n) is called after each block with the number of queries it held (a progress bar)."""
    import torch

    n, N = len(q), db.shape[0]
    out_pos = np.full((n, k), NEIGHBOR_PAD, np.int64)
    out_sc = np.full((n, k), -np.inf, np.float32)
    x_sq = (db * db).sum(1) if metric == "l2" else None
    rows = max(1, min(n, BLOCK_ELEMS // max(N, 1)))
    with torch.inference_mode():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            qb = torch.from_numpy(np.ascontiguousarray(q[s:e], np.float32)).to(device)
            sc = score_block(qb, db, metric, x_sq)
            mask_ranges(sc, own_lo[s:e], own_hi[s:e])
            out_pos[s:e], out_sc[s:e] = topk_rows(sc, k)
            if on_progress is not None:
                on_progress(e - s)
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
            # the document-causal rule (pipeline.formats.causal_retrievable, no examples): j <= i - 1 -
            # exclude_recent; spelled out here because this library does not import the pipeline, and
            # tests/test_imports.py checks that the two agree
            allowed = cand[None, : last + 1] <= np.arange(s, e)[:, None] - 1 - exclude_recent
            fill_masked(sc, ~allowed)
            out_pos[s:e], out_sc[s:e] = topk_rows(sc, k)
    return out_pos, out_sc


def causal_search_documents(
    x: np.ndarray,
    bounds: Sequence[tuple[int, int]],
    k: int,
    exclude_recent: int,
    metric: str,
    device: Any = "cpu",
    on_document: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Document-causal neighbors of the chunks of consecutive documents: x holds their embeddings (float32
    [n, d], numpy), `bounds` each document's row range [start, end). Each document is searched exactly on
    `device` (`causal_document_search`), then the neighbors are re-scored with `exact_rescore`, so the
    result does not depend on the device. Returns (row positions in x, scores), -1 / -inf padded;
    on_document(1) is called after each document."""
    import torch

    xt = torch.from_numpy(x).to(device)
    pos = np.full((len(x), k), NEIGHBOR_PAD, np.int64)
    for a, b in bounds:
        p, _ = causal_document_search(xt[a:b], k, exclude_recent, metric)
        pos[a:b] = np.where(p >= 0, p + a, NEIGHBOR_PAD)
        if on_document is not None:
            on_document(1)
    return exact_rescore(x, x, pos, metric)


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

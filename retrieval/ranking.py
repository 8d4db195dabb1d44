"""Ranking metrics against graded gold relevance, vectorised over queries (the paper's Table 3).

A query has a ranking (chunk ids, best first, -1 pads at the tail) and a gold set: chunk ids with a
positive grade (the scores table's delta > 0; other candidates and unscored chunks are not relevant).

  precision@k = |top-k ∩ gold| / k                        (k in the denominator even when fewer were retrieved)
  recall@k    = |top-k ∩ gold| / |gold|
  nDCG@k      = DCG@k / IDCG@k, DCG@k = sum_{r<k} grade(rank r) / log2(r + 2)   (linear gain: the grade itself)

These are ranx's `precision@k`, `recall@k` and `ndcg@k` (Järvelin-Kekäläinen nDCG with linear gains),
checked against ranx in tests/test_evaluate.py. ranx keeps integer grades only; here grades are floats,
so nDCG is graded by the delta itself. Queries without a gold chunk have no defined recall or nDCG:
callers leave them out (as trec_eval and ranx do for recall).
"""

from __future__ import annotations

import numpy as np

NEIGHBOR_PAD = -1  # "no neighbor", as pipeline.formats.NEIGHBOR_PAD (checked by tests/test_imports.py)


def _gains(ranked: np.ndarray, gold_ids: np.ndarray, gold_grades: np.ndarray) -> np.ndarray:
    """float [Q, R]: the grade of each ranked id (0 when it is not gold or a pad)."""
    match = (ranked[:, :, None] == gold_ids[:, None, :]) & (ranked[:, :, None] != NEIGHBOR_PAD)  # [Q, R, G]
    grades = np.where(gold_ids != NEIGHBOR_PAD, gold_grades, 0.0)
    return (match * grades[:, None, :]).max(axis=2, initial=0.0)


def _check(ranked: np.ndarray, gold_ids: np.ndarray, gold_grades: np.ndarray) -> None:
    if ranked.ndim != 2 or gold_ids.ndim != 2 or gold_ids.shape != gold_grades.shape:
        raise ValueError("expected ranked [Q, R], gold_ids [Q, G] and gold_grades [Q, G]")
    if len(ranked) != len(gold_ids):
        raise ValueError(f"{len(ranked)} rankings but {len(gold_ids)} gold rows")
    ok = gold_ids != NEIGHBOR_PAD
    if np.any(ok & ~(gold_grades > 0)):
        raise ValueError("gold grades must be > 0 (only positives are gold)")
    s = np.sort(ranked, axis=1)  # a ranking must not repeat an id (it would be counted twice)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] != NEIGHBOR_PAD)
    if dup.any():
        raise ValueError(f"the ranking of query row {int(np.argmax(dup.any(axis=1)))} repeats a chunk id")


def ranking_metrics(
    ranked: np.ndarray,
    gold_ids: np.ndarray,
    gold_grades: np.ndarray,
    precision_at: list[int] | tuple[int, ...] = (2,),
    recall_at: list[int] | tuple[int, ...] = (10,),
    ndcg_at: list[int] | tuple[int, ...] = (20,),
) -> dict[str, np.ndarray]:
    """Per-query metrics {"precision@2": float [Q], ...} for rankings [Q, R] (R >= every cut-off is not
    required: a shorter ranking simply retrieves nothing further) and gold [Q, G] (-1 pads)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    gold_ids = np.asarray(gold_ids, dtype=np.int64)
    gold_grades = np.asarray(gold_grades, dtype=np.float64)
    _check(ranked, gold_ids, gold_grades)
    gains = _gains(ranked, gold_ids, gold_grades)
    hits = gains > 0
    n_gold = (gold_ids != NEIGHBOR_PAD).sum(axis=1)
    out: dict[str, np.ndarray] = {}
    for k in precision_at:
        out[f"precision@{k}"] = hits[:, :k].sum(axis=1) / k
    for k in recall_at:
        out[f"recall@{k}"] = hits[:, :k].sum(axis=1) / np.maximum(n_gold, 1)
    if ndcg_at:
        ideal = -np.sort(-np.where(gold_ids != NEIGHBOR_PAD, gold_grades, 0.0), axis=1)
        for k in ndcg_at:
            disc = 1.0 / np.log2(np.arange(2, k + 2))
            g = gains[:, :k]
            dcg = (g * disc[: g.shape[1]]).sum(axis=1)
            i = ideal[:, :k]
            idcg = (i * disc[: i.shape[1]]).sum(axis=1)
            out[f"ndcg@{k}"] = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
    return out


def distinct_overlap(a: np.ndarray, b: np.ndarray, pad: int = NEIGHBOR_PAD) -> tuple[int, float]:
    """(number of distinct token ids of `b` that also occur in `a`, that number / distinct ids of `b`)."""
    sb = set(np.asarray(b)[np.asarray(b) != pad].tolist())
    if not sb:
        return 0, 0.0
    sa = set(np.asarray(a)[np.asarray(a) != pad].tolist())
    n = len(sa & sb)
    return n, n / len(sb)


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |got ∩ exact| / |exact| (chunk ids, -1 = none); queries with no exact neighbor skip.
    The recall of an approximate neighbor table against exact search (ungraded, unordered)."""
    if len(got) != len(exact):
        raise ValueError(f"recall: {len(got)} rows of neighbors against {len(exact)} rows of exact ones")
    total, n = 0.0, 0
    for g, e in zip(got, exact):
        e = e[e != NEIGHBOR_PAD]
        if len(e) == 0:
            continue
        total += len(np.intersect1d(g[g != NEIGHBOR_PAD], e)) / len(e)
        n += 1
    return total / n if n else 1.0


def merge_top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of candidates from several database shards: score descending, ties by the higher
    chunk id (the order of the bm25 kernels and of exact dense search), -1 / NaN pads last."""
    valid = ids >= 0
    key_s = np.where(valid, scores, -np.inf)
    order = np.lexsort((-ids, -key_s), axis=1)[:, :k] if ids.size else np.zeros((len(ids), 0), np.int64)
    out_i = np.take_along_axis(np.where(valid, ids, -1), order, 1)
    out_s = np.take_along_axis(np.where(valid, scores, np.nan), order, 1)
    return out_i, out_s

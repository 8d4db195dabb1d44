"""Neighbor and supervision tables, indexed by chunk id, and their mapping into sequence positions.

The model retrieves within its training sequence (the paper: "retrieval is over the encoded 16K
tokens of the batch"), so every neighbor / candidate chunk id is mapped to its position in the
sequence; it becomes -1 when it lies outside the sequence or breaks the document-causal rule
(`pipeline.formats.causal_retrievable`, with the bm25 table's exclude_recent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.formats import NEIGHBOR_PAD, causal_retrievable
from pipeline.store import Artifact


@dataclass
class ChunkTable:
    """Per chunk id (dense over all chunks of the chunks artifact): C ids (-1 pad) and values (NaN pad)."""

    ids: np.ndarray  # int64 [n_chunks, C]
    values: np.ndarray  # float32 [n_chunks, C]

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def head(self, c: int) -> ChunkTable:
        return ChunkTable(self.ids[:, :c], self.values[:, :c])


def _alloc(n_chunks: int, width: int, cache: Path | None, name: str) -> ChunkTable:
    """An all-pad table in memory, or (cache given) in two .npy files there, memory-mapped."""
    if cache is None:
        return ChunkTable(
            np.full((n_chunks, width), NEIGHBOR_PAD, dtype=np.int64),
            np.full((n_chunks, width), np.nan, dtype=np.float32),
        )
    cache.mkdir(parents=True, exist_ok=True)
    ids = np.lib.format.open_memmap(cache / f"{name}.ids.npy", "w+", np.int64, (n_chunks, width))
    vals = np.lib.format.open_memmap(cache / f"{name}.values.npy", "w+", np.float32, (n_chunks, width))
    ids[:] = NEIGHBOR_PAD
    vals[:] = np.nan
    return ChunkTable(ids, vals)


def _put(table: ChunkTable, query: np.ndarray, ids: np.ndarray, values: np.ndarray, source: str) -> None:
    n_chunks = table.ids.shape[0]
    if len(query) and (query.min() < 0 or query.max() >= n_chunks):
        raise InputError(f"{source}: chunk_id out of range [0, {n_chunks}); it was built from other chunks")
    w = ids.shape[1]
    table.ids[query, :w] = ids
    table.values[query, :w] = np.where(ids == NEIGHBOR_PAD, np.nan, values)


def _done(table: ChunkTable, cache: Path | None, name: str) -> ChunkTable:
    if cache is None:
        return table
    table.ids.flush()
    table.values.flush()
    return ChunkTable(
        np.load(cache / f"{name}.ids.npy", mmap_mode="r"),
        np.load(cache / f"{name}.values.npy", mmap_mode="r"),
    )


def load_neighbor_table(art: Artifact, n_chunks: int, cache: Path | None = None) -> ChunkTable:
    """A bm25/dense neighbor artifact as a ChunkTable (values: the neighbor scores). Read batch by batch;
    with `cache` (a local folder) the table is written there as .npy and returned memory-mapped, so a
    training process and its loader workers share one copy in the page cache instead of each its own."""
    table = None
    for b in art.iter_batches(columns=["chunk_id", "neighbor_ids", "neighbor_scores"]):
        k = int(b.schema.field("neighbor_ids").type.list_size)
        table = table or _alloc(n_chunks, k, cache, art.version)
        ids = b.column("neighbor_ids").flatten().to_numpy().reshape(-1, k)
        sc = b.column("neighbor_scores").flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        _put(table, b.column("chunk_id").to_numpy(), ids, sc.astype(np.float32), art.ref)
    return _done(table or _alloc(n_chunks, 1, cache, art.version), cache, art.version)


def load_scores_table(art: Artifact, n_chunks: int, cache: Path | None = None) -> ChunkTable:
    """A scores artifact as a ChunkTable (values: delta = log P(target | candidate) - log P(target | local)).
    Two passes over the batches (the width, then the values); `cache` as in `load_neighbor_table`."""
    width = 1
    for b in art.iter_batches(columns=["candidate_ids"]):
        lens = pc.list_value_length(b.column("candidate_ids")).to_numpy(zero_copy_only=False)
        if len(lens):
            width = max(width, int(lens.max()))
    table = _alloc(n_chunks, width, cache, art.version)
    for b in art.iter_batches(columns=["chunk_id", "candidate_ids", "delta"]):
        cand, delta = b.column("candidate_ids"), b.column("delta")
        lens = pc.list_value_length(cand).to_numpy(zero_copy_only=False)
        if not np.array_equal(lens, pc.list_value_length(delta).to_numpy(zero_copy_only=False)):
            raise InputError(f"{art.ref}: candidate_ids and delta differ in length in some rows")
        ids = np.full((len(lens), width), NEIGHBOR_PAD, dtype=np.int64)
        val = np.full((len(lens), width), np.nan, dtype=np.float32)
        mask = np.arange(width)[None, :] < lens[:, None]
        ids[mask] = pc.list_flatten(cand).to_numpy()
        val[mask] = pc.list_flatten(delta).to_numpy(zero_copy_only=False).astype(np.float32)
        _put(table, b.column("chunk_id").to_numpy(), ids, val, art.ref)
    return _done(table, cache, art.version)


def to_positions(ids: np.ndarray, first_chunk: int, n_chunks: int, exclude_recent: int) -> np.ndarray:
    """Chunk ids [l, C] of the sequence's chunks -> in-sequence positions (-1 outside / not retrievable)."""
    pos = ids - first_chunk
    i = np.arange(n_chunks)[:, None]
    ok = (ids != NEIGHBOR_PAD) & (pos >= 0) & (pos < n_chunks) & causal_retrievable(i, pos, exclude_recent)
    return np.where(ok, pos, -1)


def compact(pos: np.ndarray, values: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Keep the first k valid entries per row, in their original (rank) order; pad with -1 / NaN."""
    order = np.argsort(pos < 0, axis=1, kind="stable")[:, :k]
    p = np.take_along_axis(pos, order, axis=1)
    v = None if values is None else np.take_along_axis(values, order, axis=1)
    if p.shape[1] < k:
        p = np.pad(p, ((0, 0), (0, k - p.shape[1])), constant_values=-1)
        if v is not None:
            v = np.pad(v, ((0, 0), (0, k - v.shape[1])), constant_values=np.nan)
    if v is not None:
        v = np.where(p < 0, np.nan, v)
    return p, v


def exclude_recent_of(art: Artifact) -> int:
    """exclude_recent of a bm25 artifact (from its manifest config); the model must use the same."""
    cfg = art.manifest.config
    if "exclude_recent" not in cfg:
        raise InputError(f"{art.ref}: manifest config has no exclude_recent; is this a bm25 artifact?")
    scope = cfg.get("scope")
    if scope is not None and scope != "document-causal":
        raise InputError(
            f"{art.ref}: scope is {scope!r}; training retrieves within the document "
            "(bm25.scope=document-causal)"
        )
    return int(cfg["exclude_recent"])


def lex_targets(bm25: ChunkTable) -> ChunkTable:
    """RPT-Lex supervision from the supervision table (bm25, query chunk+target, best first): every
    top-k candidate that shares a term with the query (score > 0) is a positive, as the paper's R^pos
    (the top-20 BM25 chunks of (c_q, c_t)), graded by its rank r: target 1 - r/k (1 for the best).
    A candidate with score 0 gets target 0: a candidate, not a positive.

    Why graded: on the mechanism test (tests/test_mechanism.py) equal targets for all k positives
    reached recall@1 0.83 of the source chunk after 600 steps, the rank-graded ones 0.91 after 150 and
    0.96 after 600: with equal targets LambdaRank has no reason to put the best candidate first. Raw
    BM25 scores (10-30) are no option: with gain 2^t - 1 only the top candidate would count."""
    k = bm25.ids.shape[1]
    grade = (1.0 - np.arange(k, dtype=np.float32) / k)[None, :]
    vals = np.where(np.isnan(bm25.values), np.nan, np.where(bm25.values > 0, grade, 0.0)).astype(np.float32)
    return ChunkTable(bm25.ids, vals)


def supervision_stats(plan: Any, table: ChunkTable, exclude_recent: int) -> dict[str, float | None]:
    """How the supervision table fits the training examples, over the query chunks that have a
    retrievable chunk: candidates per query inside the example (and their share of the table's),
    the share of query chunks with at least one positive (target > 0) inside the example, and the
    retrievable chunks per query (the universe the retriever ranks in training)."""
    inside = listed = positive = universe = queries = 0
    for i in range(len(plan)):
        f, n = int(plan.first_chunk[i]), int(plan.n_real[i])
        ids, vals = table.ids[f : f + n], table.values[f : f + n]
        pos = to_positions(ids, f, n, exclude_recent)
        retr = np.maximum(np.arange(n) - exclude_recent, 0)
        ask = retr > 0
        ok = pos >= 0
        inside += int(ok[ask].sum())
        listed += int((ids[ask] != NEIGHBOR_PAD).sum())
        positive += int((ok & (vals > 0)).any(axis=1)[ask].sum())
        universe += int(retr.sum())
        queries += int(ask.sum())
    if not queries:
        return {
            "candidates_in_example": None,
            "candidate_share_in_example": None,
            "positive_share": None,
            "universe": None,
        }
    return {
        "candidates_in_example": round(inside / queries, 3),
        "candidate_share_in_example": round(inside / listed, 4) if listed else None,
        "positive_share": round(positive / queries, 4),
        "universe": round(universe / queries, 2),
    }

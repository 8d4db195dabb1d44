"""Neighbor and supervision tables, indexed by chunk id, and their mapping into sequence positions.

The model retrieves within its training sequence (the paper: "retrieval is over the encoded 16K
tokens of the batch"), so every neighbor / candidate chunk id is mapped to its position in the
sequence; it becomes -1 when it lies outside the sequence or breaks the document-causal rule
(`pipeline.formats.causal_retrievable`, with the bm25 table's exclude_recent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.formats import NEIGHBOR_PAD, causal_retrievable, read_neighbors
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


def dense_table(
    query: np.ndarray, ids: np.ndarray, values: np.ndarray, n_chunks: int, source: str
) -> ChunkTable:
    if len(query) and (query.min() < 0 or query.max() >= n_chunks):
        raise InputError(f"{source}: chunk_id out of range [0, {n_chunks}); it was built from other chunks")
    out_ids = np.full((n_chunks, ids.shape[1]), NEIGHBOR_PAD, dtype=np.int64)
    out_val = np.full((n_chunks, ids.shape[1]), np.nan, dtype=np.float32)
    out_ids[query] = ids
    out_val[query] = np.where(ids == NEIGHBOR_PAD, np.nan, values)
    return ChunkTable(out_ids, out_val)


def neighbor_table(art: Artifact, n_chunks: int) -> ChunkTable:
    """A bm25/dense neighbor artifact as a ChunkTable (values: the neighbor scores)."""
    q, ids, sc = read_neighbors(art)
    return dense_table(q, ids, sc.astype(np.float32), n_chunks, art.ref)


def scores_table(art: Artifact, n_chunks: int) -> ChunkTable:
    """A scores artifact as a ChunkTable (values: delta = log P(target | candidate) - log P(target | local))."""
    t = art.read(columns=["chunk_id", "candidate_ids", "delta"])
    q = t.column("chunk_id").to_numpy()
    cand = t.column("candidate_ids").combine_chunks()
    delta = t.column("delta").combine_chunks()
    lens = pc.list_value_length(cand).to_numpy(zero_copy_only=False)
    if not np.array_equal(lens, pc.list_value_length(delta).to_numpy(zero_copy_only=False)):
        raise InputError(f"{art.ref}: candidate_ids and delta differ in length in some rows")
    width = int(lens.max()) if len(lens) else 1
    ids = np.full((len(q), width), NEIGHBOR_PAD, dtype=np.int64)
    val = np.full((len(q), width), np.nan, dtype=np.float32)
    mask = np.arange(width)[None, :] < lens[:, None]
    ids[mask] = pc.list_flatten(cand).to_numpy()
    val[mask] = pc.list_flatten(delta).to_numpy(zero_copy_only=False).astype(np.float32)
    return dense_table(q, ids, val, n_chunks, art.ref)


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

"""The inputs as arrays: the corpus-scope database (train-split chunks and their embeddings), the
embeddings of query chunks (a range or a sample), each query's own-document range in the database, and
the per-process cache that keeps the database, its tensor and the search index between shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.formats import NEIGHBOR_PAD, ChunkReader, read_embeddings
from pipeline.stage import StageContext


@dataclass
class Database:
    """The corpus-scope database: train-split chunks in chunk-id order."""

    ids: np.ndarray  # chunk ids [N]
    doc: np.ndarray  # doc_idx per database row [N]
    emb: np.ndarray  # float32 [N, d]

    def chunk_ids(self, pos: np.ndarray) -> np.ndarray:
        """Database positions (-1 = none) to chunk ids (-1 = none)."""
        return np.where(pos >= 0, self.ids[pos.clip(0)], NEIGHBOR_PAD)


def cached(ctx: StageContext, key: tuple[str, ...], make: Any) -> Any:
    """The database, its tensor and the search index, built once per worker process (the worker cache
    holds the objects of one embeddings artifact at a time)."""
    return ctx.worker_cache(("dense", *key), make, owner=ctx.inputs["embeddings"].version)


def chunk_embeddings(ctx: StageContext, lo: int, hi: int) -> np.ndarray:
    """float32 embeddings of chunk ids [lo, hi), checked to be complete."""
    art = ctx.inputs["embeddings"]
    ids, emb = read_embeddings(art, lo, hi)
    if len(ids) != hi - lo or (len(ids) and (ids[0] != lo or ids[-1] != hi - 1)):
        raise InputError(
            f"{art.ref} lacks embeddings of chunk ids {lo}..{hi - 1} (found {len(ids)} of "
            f"{hi - lo}); rebuild it (rpt run embeddings) and check `rpt artifacts verify`"
        )
    return emb.astype(np.float32)


def sampled_embeddings(ctx: StageContext, q_ids: np.ndarray) -> np.ndarray:
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


def load_database(ctx: StageContext) -> Database:
    def make() -> Database:
        reader = ChunkReader(ctx.inputs["chunks"])
        emb = chunk_embeddings(ctx, 0, reader.n_chunks)
        docs = reader.docs("train")
        if not docs:
            raise InputError(
                f"{reader.art.ref} has no train-split chunks: the corpus scope retrieves from the "
                "train split (set documents.splits / split_lists, or use dense.scope: document-causal)"
            )
        ids = np.concatenate([d.chunk_ids for d in docs])
        doc = np.concatenate([np.full(d.n, d.doc_idx, np.int64) for d in docs])
        return Database(ids, doc, emb[ids])

    return cached(ctx, ("db", ctx.inputs["chunks"].version), make)


def database_tensor(ctx: StageContext, db: Database, device: Any) -> Any:
    """The database embeddings as a torch tensor on `device` (cached like the database)."""
    import torch

    return cached(
        ctx, ("dbt", ctx.inputs["chunks"].version, str(device)), lambda: torch.from_numpy(db.emb).to(device)
    )


def own_doc_ranges(
    reader: ChunkReader, db_ids: np.ndarray, q_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Database positions [lo, hi) of each query's own document (empty for non-train documents); `db_ids`:
    the database's chunk ids, ascending (`Database.ids`, or the ids of a sharded database)."""
    first = q_ids - reader.chunk_pos[q_ids]
    docs = reader.docs()
    starts = np.array([d.first for d in docs], np.int64)
    sizes = np.array([d.n for d in docs], np.int64)
    end = first + sizes[np.searchsorted(starts, first)]
    return np.searchsorted(db_ids, first), np.searchsorted(db_ids, end)

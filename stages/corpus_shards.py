"""A corpus-scope search over a sharded database, shared by `bm25` and `dense` (RETRO tables at cluster
scale): the database (train-split chunks, in chunk-id order) is cut into row shards; every (query group,
database shard) pair is one shard of the build, searched with that database shard only and written as a
partial top-k file; `finalize` merges a query group's partials into its `part-*` file.

Why pairs: a task's memory is then bounded by one database shard and one query group, never by the whole
database (Megatron's RETRO tools and MassiveDS do the same: search per shard, merge the top-k). The pairs
are ordered database-shard-major, so a worker's consecutive tasks reuse the database shard it holds.
Resume is per pair, like every stage: a killed build keeps its finished partials (their sidecars list
them). The partials are build scratch: merged, then dropped before the artifact is published.

The merge ranks by score descending and breaks ties by the higher chunk id, the order of the unsharded
kernels and of exact dense search (`retrieval.ranking.merge_top_k`), so a sharded table equals the unsharded one in exact modes.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.formats import ChunkReader, DocSpan, build_neighbor_table, neighbor_counts, neighbor_schema
from pipeline.progress import progress
from pipeline.stage import Shard, StageContext
from retrieval.ranking import merge_top_k

log = logging.getLogger("rpt.corpus_shards")

PARTIALS = "partial"  # the build's scratch folder of per-pair top-k files


def plan_groups(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """Greedy contiguous groups of documents with about `target` chunks each: [(lo, hi) doc ranges]."""
    groups: list[tuple[int, int]] = []
    lo, total = 0, 0
    for i, n in enumerate(sizes):
        if total and total + n > target:
            groups.append((lo, i))
            lo, total = i, 0
        total += n
    if lo < len(sizes):
        groups.append((lo, len(sizes)))
    return groups


def query_docs(reader: ChunkReader, query_splits: list[str] | None, setting: str) -> list[DocSpan]:
    """The documents whose chunks are the table's rows: every one, or those of `query_splits` (a RETRO
    database searched for the evaluation splits only). `setting` names the key in errors."""
    docs = reader.docs()
    if query_splits is None:
        return docs
    keep = [d for d in docs if d.split in query_splits]
    if not keep:
        have = sorted({d.split for d in docs})
        raise InputError(
            f"{setting}={query_splits} selects no document of {reader.art.ref} (its splits: "
            f"{', '.join(have)}); name one of those or leave it unset"
        )
    return keep


def database_ids(reader: ChunkReader, stage: str) -> np.ndarray:
    """Chunk ids of the corpus-scope database: the train-split chunks, ascending."""
    train = reader.docs("train")
    if not train:
        raise InputError(
            f"{stage} scope 'corpus' needs train-split chunks as its database, but {reader.art.ref} has "
            f"none; assign some documents to the train split (documents.split_lists) or use {stage}.scope: "
            "document-causal"
        )
    return np.concatenate([d.chunk_ids for d in train])


def db_bounds(n_db: int, shard_rows: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of the database shards: `shard_rows` each, the last one shorter."""
    step = max(1, shard_rows)
    return [(a, min(a + step, n_db)) for a in range(0, n_db, step)] or [(0, 0)]


def pair_shards(queries: list[dict[str, Any]], db: list[tuple[int, int]]) -> list[Shard]:
    """One shard per (query group, database shard), database-shard-major. `queries`: the payload of each
    query group (the stage's own: doc or chunk ranges); each pair's payload adds `q`, `s` and `db`."""
    total = len(queries) * len(db)
    out = []
    for s, (a, b) in enumerate(db):
        for q, payload in enumerate(queries):
            out.append(Shard(len(out), total, {**payload, "q": q, "s": s, "db": [a, b]}))
    return out


def own_in_shard(own: tuple[int, int] | np.ndarray, a: int, b: int) -> Any:
    """A query's own-document database rows [lo, hi) as rows of the shard [a, b) (empty when outside)."""
    lo = np.clip(np.asarray(own[0]) - a, 0, b - a)
    hi = np.clip(np.asarray(own[1]) - a, lo, b - a)
    return lo, hi


def partial_name(q: int, s: int) -> str:
    return f"{PARTIALS}/q{q:05d}-s{s:05d}.npz"


def write_partial(
    ctx: StageContext, shard: Shard, chunk_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray
) -> None:
    """The top-k (chunk ids, -1 padded; scores) of the query chunks `chunk_ids` within one database shard."""
    buf = io.BytesIO()
    np.savez(
        buf,
        chunk_id=np.asarray(chunk_ids, np.int64),
        ids=np.asarray(ids, np.int64),
        scores=np.asarray(scores, np.float64),
    )
    ctx.write_bytes(partial_name(shard.payload["q"], shard.payload["s"]), buf.getvalue())


def read_partial(ctx: StageContext, q: int, s: int) -> dict[str, np.ndarray]:
    with ctx.fs.open(ctx.path(partial_name(q, s)), "rb") as f, np.load(io.BytesIO(f.read())) as z:
        return {key: z[key] for key in ("chunk_id", "ids", "scores")}


def merge_partials(
    ctx: StageContext,
    n_q: int,
    n_s: int,
    k: int,
) -> dict[str, Any]:
    """Merge each of the `n_q` query groups' partials (one per database shard, `n_s`) into
    `part-<q>.parquet`, then drop the partials. Returns the merged table's neighbor counts."""
    counts: dict[str, int] = {}
    bar = progress(total=n_q, desc=f"{ctx.stage} merge {n_s} database shards", unit="group")
    for q in range(n_q):
        parts = [read_partial(ctx, q, s) for s in range(n_s)]
        q_ids = parts[0]["chunk_id"]
        for s, p in enumerate(parts[1:], 1):
            if not np.array_equal(p["chunk_id"], q_ids):
                raise RuntimeError(f"{ctx.stage}: partial q{q} s{s} holds other query chunks than s0")
        ids, scores = merge_top_k(
            np.concatenate([p["ids"] for p in parts], axis=1),
            np.concatenate([p["scores"] for p in parts], axis=1),
            k,
        )
        ctx.write_parquet(
            f"part-{q:05d}.parquet", build_neighbor_table(q_ids, ids, scores), schema=neighbor_schema(k)
        )
        for key, v in neighbor_counts(ids, k).items():
            counts[key] = counts.get(key, 0) + v
        bar.update(1)
    bar.close()
    ctx.drop(PARTIALS)
    return {**counts, "database_shards": n_s, "query_groups": n_q}

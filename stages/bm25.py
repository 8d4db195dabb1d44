"""Stage `bm25`: lexical neighbor tables (BM25 over token ids) for RPT self-retrieval and RETRO.

Scopes:
- `document-causal`: chunk i of a document retrieves chunks j of the same document with
  j <= i - 1 - exclude_recent (`pipeline.formats.causal_retrievable`). Statistics (IDF, average
  length) come from exactly those retrievable chunks (`stats: causal`, nothing from the future leaks)
  or from the whole document (`stats: document`, not causal; recorded in the manifest).
- `corpus`: the database is every train-split chunk, the queries are all chunks; the query's own
  document is excluded by id. Statistics come from the database.

Training examples (`example_chunks` L > 0, for the documents of `example_splits`): a document is cut
into examples of L chunks from its first chunk, and chunk i retrieves only chunks of its own example
(stages.supervision_table: the supervision table's candidates lie inside the training example). Each
example is scored as a document of its own, statistics included.

Scoring (variants, query forms, order, why numba kernels): `retrieval.bm25`, imported only inside
the functions that score, so loading this module for its Config (`rpt config`, the registry) does not
start numba.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import InputError
from pipeline.formats import (
    ChunkReader,
    DocSpan,
    build_neighbor_table,
    neighbor_counts,
    neighbor_rates,
    neighbor_schema,
)
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats
from pipeline.worker_cache import worker_cache

if TYPE_CHECKING:
    from retrieval.bm25 import CorpusIndex, Params

log = logging.getLogger("rpt.bm25")

ROWS_PER_WRITE = 65536  # neighbor rows buffered per Parquet row group


class Config(StageConfig):
    k: int = Field(20, ge=1, description="neighbors per query chunk")
    scope: Literal["document-causal", "corpus"] = Field(
        "document-causal",
        description="document-causal: earlier chunks of the same document (RPT); "
        "corpus: train-split chunks of other documents (RETRO)",
    )
    query: Literal["chunk", "chunk+target"] = Field(
        "chunk", description="chunk: c_i; chunk+target: c_i followed by c_{i+1} (supervision candidates)"
    )
    exclude_recent: int = Field(
        16, ge=0, description="document-causal: chunk i retrieves only j <= i - 1 - exclude_recent"
    )
    example_chunks: int = Field(
        0,
        ge=0,
        description="document-causal: > 0 cuts documents of example_splits into training examples of "
        "this many chunks; a chunk retrieves only within its example (stages.supervision_table)",
    )
    example_splits: list[str] = Field(
        default_factory=lambda: ["train"], description="splits whose documents example_chunks bounds"
    )
    variant: Literal["lucene", "okapi"] = Field(
        "lucene", description="lucene: positive IDF (bm25s 'lucene'); okapi: exactly rank-bm25 BM25Okapi"
    )
    k1: float = Field(1.5, ge=0)
    b: float = Field(0.75, ge=0, le=1)
    epsilon: float = Field(0.25, ge=0, description="okapi: negative IDFs become epsilon x mean IDF")
    stats: Literal["causal", "document"] = Field(
        "causal",
        description="document-causal: IDF and avgdl from exactly the retrievable chunks (causal) "
        "or from all chunks of the document (document: later chunks shape the statistics, not causal)",
    )
    overfetch: int = Field(
        0,
        ge=0,
        description="corpus: 0 masks the query's own document inside the scorer (exact); n > 0 "
        "instead takes the top k + n of the whole database, drops own-document chunks and pads with -1 "
        "(the classic over-fetch-and-filter, for comparison with library pipelines)",
    )
    shard_chunks: int = Field(
        16384,
        ge=1,
        description="documents are grouped into shards of about this many "
        "chunks (a longer document is a shard of its own)",
    )

    UNHASHED: ClassVar[frozenset[str]] = frozenset({"shard_chunks"})

    def hashed_dict(self) -> dict[str, Any]:
        # settings that cannot change this scope's/variant's output stay out of the version
        d = super().hashed_dict()
        if self.variant == "lucene":
            d.pop("epsilon")
        if self.scope == "corpus":
            d.pop("exclude_recent")
            d.pop("stats")
            d.pop("example_chunks")
        else:
            d.pop("overfetch")
        if not d.get("example_chunks"):
            d.pop("example_chunks", None)
            d.pop("example_splits")
        return d


def params_of(cfg: Config) -> Params:
    """The scoring settings of a bm25 config section."""
    from retrieval.bm25 import Params

    return Params(cfg.k, cfg.query, cfg.exclude_recent, cfg.variant, cfg.k1, cfg.b, cfg.epsilon, cfg.stats)


# ----------------------------------------------------------------------------------------- the stage


def corpus_index(reader: ChunkReader, p: Params) -> tuple[CorpusIndex, dict[int, tuple[int, int]]]:
    """The database index (built once per worker process: every shard of a build shares it; the worker
    cache holds one, a new key replaces it) and, per train document, its database row range."""
    train = reader.docs("train")
    if not train:
        raise InputError(
            f"bm25 scope 'corpus' needs train-split chunks as its database, but {reader.art.ref} has none; "
            "assign some documents to the train split (documents.split_lists) or use scope 'document-causal'"
        )
    key = ("bm25.corpus_index", reader.art.path, reader.art.version, p.variant, p.k1, p.b, p.epsilon)
    rows: dict[int, tuple[int, int]] = {}
    start = 0
    for d in train:
        rows[d.doc_idx] = (start, start + d.n)
        start += d.n
    return worker_cache(key, lambda: _build_corpus_index(reader, train, p), max_entries=1), rows


def _build_corpus_index(reader: ChunkReader, train: list[DocSpan], p: Params) -> CorpusIndex:
    from retrieval.bm25 import CorpusIndex

    t0 = time.perf_counter()
    ids = np.concatenate([d.chunk_ids for d in train])
    vocab = int(reader.tokens.max()) + 1
    index = CorpusIndex.build(reader.tokens[ids], ids, p, vocab)
    log.info(
        "corpus index: %s train chunks, %s postings, %d dense terms in %.1f s",
        f"{len(ids):,}",
        f"{len(index.p_rows):,}",
        index.dense_w.shape[0],
        time.perf_counter() - t0,
    )
    return index


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


class BM25Stage(Stage):
    name = "bm25"
    version = 1
    Config = Config
    description = "BM25 neighbor tables over token ids (document-causal or corpus scope)"
    # The kernels release the GIL (numba nogil), so threads run shards in parallel without a process's
    # start-up and memory per worker (measured: threads x2 faster than processes x2 on 2 cores).
    preferred_runner = "threads"

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"chunks": InputRef("chunks")}

    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        docs = ChunkReader(ctx.inputs["chunks"]).docs()
        groups = plan_groups([d.n for d in docs], cfg.shard_chunks)
        return [
            Shard(
                i,
                len(groups),
                {"docs": [lo, hi], "chunks": [docs[lo].first, docs[hi - 1].first + docs[hi - 1].n]},
            )
            for i, (lo, hi) in enumerate(groups)
        ]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        p = params_of(cfg)
        reader = ChunkReader(ctx.inputs["chunks"])
        lo, hi = shard.payload["docs"]
        docs = reader.docs()[lo:hi]
        stats = {"rows": 0, "full_rows": 0, "valid_neighbors": 0, "docs": len(docs), "score_s": 0.0}
        index = own_rows = None
        if cfg.scope == "corpus":  # index_s: building the database index (once per worker process)
            t0 = time.perf_counter()
            index, own_rows = corpus_index(reader, p)
            stats["index_s"] = time.perf_counter() - t0
        bar = progress(total=sum(d.n for d in docs), desc=f"bm25 shard {shard.name}", unit="chunk")

        def tables() -> Iterator[pa.Table]:
            buf: list[pa.Table] = []
            nbuf = 0
            for d in docs:
                t = self._document_table(reader, d, p, cfg, index, own_rows, stats)
                bar.update(d.n)
                buf.append(t)
                nbuf += t.num_rows
                if nbuf >= ROWS_PER_WRITE:
                    yield pa.concat_tables(buf)
                    buf, nbuf = [], 0
            if buf:
                yield pa.concat_tables(buf)

        try:
            ctx.write_parquet(f"part-{shard.name}.parquet", tables(), schema=neighbor_schema(cfg.k))
        finally:
            bar.close()
        log.debug(
            "shard %s: %d docs, %d chunks in %.2f s", shard.name, len(docs), stats["rows"], stats["score_s"]
        )
        return stats

    @staticmethod
    def _document_table(
        reader: ChunkReader,
        d: DocSpan,
        p: Params,
        cfg: Config,
        index: CorpusIndex | None,
        own_rows: dict[int, tuple[int, int]] | None,
        stats: dict[str, Any],
    ) -> pa.Table:
        tokens = np.asarray(reader.tokens[d.first : d.first + d.n])
        t0 = time.perf_counter()
        if index is None:
            from retrieval.bm25 import example_neighbors

            L = cfg.example_chunks if d.split in cfg.example_splits else 0
            pos, scores = example_neighbors(tokens, p, L)
            ids = np.where(pos >= 0, pos + d.first, -1)
        else:
            own = own_rows.get(d.doc_idx, (0, 0)) if own_rows else (0, 0)
            ids, scores = index.search(
                tokens, own, p, overfetch=cfg.overfetch, own_ids=(d.first, d.first + d.n)
            )
        stats["score_s"] += time.perf_counter() - t0
        counts = neighbor_counts(ids, p.k)
        for key in ("rows", "full_rows", "valid_neighbors"):  # no empty_rows in this manifest (dense has it)
            stats[key] += counts[key]
        return build_neighbor_table(d.chunk_ids, ids, scores)

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        s = merge_stats(r.stats for r in results)
        rows = s.get("rows", 0)
        s.update(neighbor_rates(s))
        s["chunks_per_cpu_s"] = round(rows / s["score_s"], 1) if s.get("score_s") else None
        s["k"] = ctx.cfg.k
        return s

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        causal = cfg.scope == "document-causal"
        return {
            "source": "bm25",
            "scope": cfg.scope,
            "query": cfg.query,
            "variant": cfg.variant,
            "stats": cfg.stats if causal else "database",
            "exclude_recent": cfg.exclude_recent if causal else None,
            "example_chunks": cfg.example_chunks if causal and cfg.example_chunks else None,
            "example_splits": list(cfg.example_splits) if causal and cfg.example_chunks else None,
            "k": cfg.k,
            "k1": cfg.k1,
            "b": cfg.b,
            "epsilon": cfg.epsilon if cfg.variant == "okapi" else None,
            "own_document": None if causal else ("over-fetch and filter" if cfg.overfetch else "masked"),
            "overfetch": None if causal else cfg.overfetch,
        }


STAGE = BM25Stage()

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

import io
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import ConfigError
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
from stages.corpus_shards import plan_groups

if TYPE_CHECKING:
    from retrieval.bm25 import CorpusIndex, CorpusStats, Params

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
    db_shard_chunks: int = Field(
        0,
        ge=0,
        description="corpus: > 0 cuts the database into shards of this many chunks, each (query group, "
        "database shard) pair a task whose memory is bounded by its shard (the same table); 0: one index "
        "of the whole database per worker",
    )
    query_splits: list[str] | None = Field(
        None, description="corpus: only chunks of these splits are queries (rows); None: every chunk"
    )

    UNHASHED: ClassVar[frozenset[str]] = frozenset({"shard_chunks", "db_shard_chunks"})

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
            d.pop("query_splits")
        if d.get("query_splits", 0) is None:  # every chunk: the versions from before the setting
            d.pop("query_splits")
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
    ids = database_ids(reader)
    key = ("bm25.corpus_index", reader.art.path, reader.art.version, p.variant, p.k1, p.b, p.epsilon)
    return worker_cache(key, lambda: _build_corpus_index(reader, ids, p), max_entries=1), own_rows(reader)


def own_rows(reader: ChunkReader) -> dict[int, tuple[int, int]]:
    """Each train document's database row range [lo, hi)."""
    rows: dict[int, tuple[int, int]] = {}
    start = 0
    for d in reader.docs("train"):
        rows[d.doc_idx] = (start, start + d.n)
        start += d.n
    return rows


def _build_corpus_index(reader: ChunkReader, ids: np.ndarray, p: Params) -> CorpusIndex:
    from retrieval.bm25 import CorpusIndex

    t0 = time.perf_counter()
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


def sharded(cfg: Config) -> bool:
    """A corpus-scope build over a sharded database (stages.corpus_shards)."""
    return cfg.scope == "corpus" and cfg.db_shard_chunks > 0


def query_docs(reader: ChunkReader, cfg: Config) -> list[DocSpan]:
    """The documents whose chunks are rows of the table: all, or (corpus scope) those of query_splits."""
    from stages.corpus_shards import query_docs as select

    return select(reader, cfg.query_splits if cfg.scope == "corpus" else None, "bm25.query_splits")


def database_ids(reader: ChunkReader) -> np.ndarray:
    from stages.corpus_shards import database_ids as ids

    return ids(reader, "bm25")


STATS_FILE = "database_stats.npz"  # sharded corpus scope: the whole database's BM25 statistics


def database_stats(ctx: StageContext, reader: ChunkReader, db: np.ndarray, cfg: Config) -> None:
    """The map-reduce pass of a sharded database: per shard (rows, total length, document frequencies),
    summed, with the vocabulary size of every chunk, written once into the build (a resumed build
    reuses it). Memory: one database shard's tokens at a time."""
    from retrieval.bm25 import CorpusStats
    from stages.corpus_shards import db_bounds

    if ctx.exists(STATS_FILE):
        return
    t0 = time.perf_counter()
    tokens = reader.tokens
    step = max(1, cfg.db_shard_chunks)
    vocab = 1 + max(int(tokens[a : a + step].max()) for a in range(0, len(tokens), step))
    bounds = db_bounds(len(db), cfg.db_shard_chunks)
    total = None
    for a, b in progress(bounds, desc="bm25 database statistics", unit="shard"):
        part = CorpusStats.of(tokens[db[a:b]], vocab)
        total = part if total is None else total + part
    assert total is not None
    buf = io.BytesIO()
    np.savez(buf, n=total.n, total_len=total.total_len, df=total.df)
    ctx.write_bytes(STATS_FILE, buf.getvalue())
    log.info(
        "database statistics: %s chunks in %d shards, %.1f s",
        f"{total.n:,}",
        len(bounds),
        time.perf_counter() - t0,
    )


def load_database_stats(ctx: StageContext) -> CorpusStats:
    from retrieval.bm25 import CorpusStats

    with ctx.fs.open(ctx.path(STATS_FILE), "rb") as f, np.load(io.BytesIO(f.read())) as z:
        return CorpusStats(int(z["n"]), int(z["total_len"]), z["df"].astype(np.int64))


def shard_index(
    ctx: StageContext, reader: ChunkReader, p: Params, a: int, b: int
) -> tuple[CorpusIndex, dict[int, tuple[int, int]]]:
    """The BM25 index of database rows [a, b) with the whole database's statistics (built once per worker
    process and shard: the worker cache holds one shard), and each train document's database rows."""
    from retrieval.bm25 import CorpusIndex

    db = database_ids(reader)

    def build() -> CorpusIndex:
        stats = load_database_stats(ctx)
        return CorpusIndex.build(reader.tokens[db[a:b]], db[a:b], p, len(stats.df), stats)

    key = ("bm25.db_shard", ctx.workdir, reader.art.version, p.variant, p.k1, p.b, p.epsilon, a, b)
    return worker_cache(key, build, max_entries=1), own_rows(reader)


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
        reader = ChunkReader(ctx.inputs["chunks"])
        docs = query_docs(reader, cfg)
        groups = plan_groups([d.n for d in docs], cfg.shard_chunks)
        queries = [
            {"docs": [lo, hi], "chunks": [docs[lo].first, docs[hi - 1].first + docs[hi - 1].n]}
            for lo, hi in groups
        ]
        if sharded(cfg):
            from stages.corpus_shards import db_bounds, pair_shards

            if cfg.overfetch:
                raise ConfigError(
                    f"bm25.overfetch={cfg.overfetch} applies to one index of the whole database; with "
                    "bm25.db_shard_chunks the own document is masked exactly: set overfetch 0"
                )
            db = database_ids(reader)
            database_stats(ctx, reader, db, cfg)  # the map-reduce pass, before any pair runs
            return pair_shards(queries, db_bounds(len(db), cfg.db_shard_chunks))
        return [Shard(i, len(queries), payload) for i, payload in enumerate(queries)]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        p = params_of(cfg)
        reader = ChunkReader(ctx.inputs["chunks"])
        lo, hi = shard.payload["docs"]
        docs = query_docs(reader, cfg)[lo:hi]
        if sharded(cfg):
            return self._run_pair(ctx, shard, reader, docs, p)
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

    @staticmethod
    def _run_pair(
        ctx: StageContext, shard: Shard, reader: ChunkReader, docs: list[DocSpan], p: Params
    ) -> dict[str, Any]:
        """One (query group, database shard) pair: the group's top-k within the shard, as a partial."""
        from stages.corpus_shards import own_in_shard, write_partial

        a, b = shard.payload["db"]
        t0 = time.perf_counter()
        index, own_rows = shard_index(ctx, reader, p, a, b)
        stats: dict[str, Any] = {"index_s": time.perf_counter() - t0, "score_s": 0.0}
        bar = progress(total=sum(d.n for d in docs), desc=f"bm25 pair {shard.name}", unit="chunk")
        q_ids, ids, scores = [], [], []
        for d in docs:
            t1 = time.perf_counter()
            lo, hi = own_in_shard(own_rows.get(d.doc_idx, (0, 0)), a, b)
            i, sc = index.search(np.asarray(reader.tokens[d.first : d.first + d.n]), (int(lo), int(hi)), p)
            stats["score_s"] += time.perf_counter() - t1
            q_ids.append(d.chunk_ids)
            ids.append(i)
            scores.append(sc)
            bar.update(d.n)
        bar.close()
        k = p.k
        write_partial(
            ctx,
            shard,
            np.concatenate(q_ids) if q_ids else np.zeros(0, np.int64),
            np.concatenate(ids) if ids else np.zeros((0, k), np.int64),
            np.concatenate(scores) if scores else np.zeros((0, k)),
        )
        return stats

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        s = merge_stats(r.stats for r in results)
        cfg: Config = ctx.cfg
        if sharded(cfg):
            from stages.corpus_shards import db_bounds, merge_partials

            reader = ChunkReader(ctx.inputs["chunks"])
            docs = query_docs(reader, cfg)
            n_q = len(plan_groups([d.n for d in docs], cfg.shard_chunks))
            n_s = len(db_bounds(len(database_ids(reader)), cfg.db_shard_chunks))
            t0 = time.perf_counter()
            s.update(merge_partials(ctx, n_q, n_s, cfg.k))
            s["merge_s"] = round(time.perf_counter() - t0, 3)
            s["docs"] = len(docs)
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

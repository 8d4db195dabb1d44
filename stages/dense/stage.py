"""The dense stage itself: its inputs, the plan (shards; for approximate corpus search the index, built
before any shard), `run_shard` (search.py), and the finalize that measures recall of the written table."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import RunConfigBase
from pipeline.errors import InputError
from pipeline.formats import (
    ChunkReader,
    DocSpan,
    build_neighbor_table,
    neighbor_counts,
    neighbor_rates,
    neighbor_schema,
)
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats
from stages.dense import sharded
from stages.dense.build_files import flat_info, read_index_info, recall_report, write_index_info
from stages.dense.config import Config
from stages.dense.database import Database, load_database
from stages.dense.index_build import build_and_save_index, index_ready
from stages.dense.index_plan import IndexPlan, plan_index, samples
from stages.dense.search import causal_shard, corpus_shard, exact_neighbors

log = logging.getLogger("rpt.dense")


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
            return self._doc_shards(reader.docs(), cfg.shard_chunks)
        if sharded.sharded(cfg):
            return sharded.plan(ctx)
        db = load_database(ctx)
        index_plan = plan_index(cfg, len(db.ids), db.emb.shape[1])
        if index_plan.kind != "flat" and not index_ready(ctx):
            self._build_index(ctx, db, index_plan, n)
        elif index_plan.kind == "flat":
            write_index_info(ctx, flat_info(index_plan, len(db.ids)))
        if cfg.query_splits is not None:  # the selected documents' chunk ranges
            return self._doc_shards(sharded.table_docs(ctx), cfg.shard_chunks)
        starts = list(range(0, n, cfg.shard_chunks))
        return [
            Shard(i, len(starts), {"lo": lo, "hi": min(lo + cfg.shard_chunks, n)})
            for i, lo in enumerate(starts)
        ]

    @staticmethod
    def _doc_shards(docs: list[DocSpan], budget: int) -> list[Shard]:
        """Chunk ranges of whole documents, neighbours merged while contiguous and within `budget` chunks."""
        groups: list[tuple[int, int]] = []
        for d in docs:
            if groups and groups[-1][1] == d.first and d.first + d.n - groups[-1][0] <= budget:
                groups[-1] = (groups[-1][0], d.first + d.n)
            else:
                groups.append((d.first, d.first + d.n))
        return [Shard(i, len(groups), {"lo": lo, "hi": hi}) for i, (lo, hi) in enumerate(groups)]

    def _build_index(self, ctx: StageContext, db: Database, index_plan: IndexPlan, n_queries: int) -> None:
        build_and_save_index(ctx, db, index_plan, n_queries)

    # ---- shards
    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        if sharded.sharded(cfg):
            return sharded.run_pair(ctx, shard)
        lo, hi = int(shard.payload["lo"]), int(shard.payload["hi"])
        import torch  # noqa: F401  (imported before the clock starts: search_s is search time)

        t0 = time.perf_counter()
        if cfg.scope == "document-causal":
            ids, scores, extra = causal_shard(ctx, lo, hi)
        else:
            ids, scores, extra = corpus_shard(ctx, lo, hi)
        ctx.write_parquet(
            f"part-{shard.name}.parquet",
            build_neighbor_table(np.arange(lo, hi), ids, scores),
            schema=neighbor_schema(cfg.k),
        )
        return {**neighbor_counts(ids, cfg.k), "search_s": time.perf_counter() - t0, **extra}

    # ---- finalize: stats and recall of what was written
    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        stats = merge_stats(r.stats for r in results)
        if sharded.sharded(cfg):
            from stages.corpus_shards import merge_partials

            t0 = time.perf_counter()
            stats.update(
                merge_partials(
                    ctx,
                    len(sharded.query_groups(ctx)),
                    (read_index_info(ctx) or {})["database_shards"],
                    cfg.k,
                )
            )
            stats["merge_s"] = round(time.perf_counter() - t0, 3)
        rows = stats.get("rows", 0)
        stats.update(neighbor_rates(stats))
        secs = stats.get("search_s", 0.0)
        stats["queries_per_s"] = round(rows / secs, 1) if secs else None
        if sharded.sharded(cfg):
            stats.update(sharded.recall_of_table(ctx))
        elif cfg.scope == "corpus":
            stats.update(self._recall(ctx))
        return stats

    def _recall(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        db = load_database(ctx)
        info = read_index_info(ctx) or {}
        rows = sharded.table_rows(ctx)
        _, _, held = samples(cfg, len(rows), len(db.ids), info.get("train_vectors") or 0)
        if not len(held):
            return {"recall_at_k": None, "recall_queries": 0}
        t0 = time.perf_counter()
        held_out = rows[held]
        exact, _ = exact_neighbors(ctx, db, held_out)
        return recall_report(ctx, held_out, db.chunk_ids(exact), t0)

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
            info = read_index_info(ctx) or {}
            out.update(
                index={k: v for k, v in info.items() if k != "sha256"},
                overfetch=cfg.overfetch,
                database="train split",
            )
        return out


STAGE = DenseStage()

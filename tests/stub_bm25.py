"""A stand-in `bm25` stage for the scores tests while the real one is not on main: same config keys and
output contract (pipeline.formats.neighbor_schema), candidates ranked by token overlap, document-causal."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.formats import TOKEN_PAD, ChunkReader, causal_retrievable, neighbor_schema, neighbor_table
from pipeline.stage import InputRef, Shard, Stage, StageContext


class Config(StageConfig):
    k: int = Field(20, ge=1)
    scope: Literal["document-causal", "corpus"] = "document-causal"
    query: Literal["chunk", "chunk+target"] = "chunk"
    exclude_recent: int = Field(16, ge=0)
    variant: Literal["lucene", "okapi"] = "lucene"
    k1: float = 1.5
    b: float = 0.75
    stats: Literal["causal", "document"] = "causal"


class StubBm25(Stage):
    name = "bm25"
    Config = Config
    preferred_runner = "serial"

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"chunks": InputRef("chunks")}

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        r = ChunkReader(ctx.inputs["chunks"])
        n = r.n_chunks
        ids = np.full((n, cfg.k), -1, dtype=np.int64)
        sc = np.zeros((n, cfg.k), dtype=np.float32)
        for d in r.docs():
            toks = [set(row[row != TOKEN_PAD].tolist()) for row in np.asarray(r.tokens[d.first : d.first + d.n])]
            for i in range(d.n):
                q = toks[i] | (toks[i + 1] if cfg.query == "chunk+target" and i + 1 < d.n else set())
                js = np.flatnonzero(causal_retrievable(i, np.arange(d.n), cfg.exclude_recent))
                s = np.array([len(q & toks[j]) for j in js], dtype=np.float32)
                order = np.lexsort((-js, -s))[: cfg.k]  # score desc, then the more recent first
                ids[d.first + i, : len(order)] = d.first + js[order]
                sc[d.first + i, : len(order)] = s[order]
        ctx.write_parquet("part-00000.parquet", neighbor_table(np.arange(n), ids, sc), schema=neighbor_schema(cfg.k))
        return {"rows": n}


STAGE = StubBm25()

"""A stand-in `bm25` stage for the train tests while the real one is not registered (same config keys
and output contract: pipeline.formats.neighbor_schema); candidates ranked by token overlap."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.formats import (
    TOKEN_PAD,
    ChunkReader,
    causal_retrievable,
    neighbor_schema,
    neighbor_table,
)
from pipeline.stage import InputRef, Shard, Stage, StageContext


def register_stubs() -> None:
    """Register the stand-in bm25 / scores stages where the real ones are not (this process only)."""
    from pipeline import config, registry

    stubs = {"bm25": "tests.stub_train_bm25", "scores": "tests.stub_train_scores"}
    missing = {k: v for k, v in stubs.items() if k not in registry.STAGES}
    if missing:
        registry.STAGES.update(missing)
        config.run_config_model.cache_clear()


def _token_sets(r: ChunkReader, first: int, n: int) -> list[set[int]]:
    return [set(row[row != TOKEN_PAD].tolist()) for row in np.asarray(r.tokens[first : first + n])]


class Bm25Config(StageConfig):
    k: int = Field(20, ge=1)
    scope: Literal["document-causal", "corpus"] = "document-causal"
    query: Literal["chunk", "chunk+target"] = "chunk"
    exclude_recent: int = Field(16, ge=0)


class StubBm25(Stage):
    """Candidates ranked by token overlap with the query (chunk, or chunk + next chunk)."""

    name = "bm25"
    Config = Bm25Config
    preferred_runner = "serial"

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"chunks": InputRef("chunks")}

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Bm25Config = ctx.cfg
        r = ChunkReader(ctx.inputs["chunks"])
        ids = np.full((r.n_chunks, cfg.k), -1, dtype=np.int64)
        sc = np.zeros((r.n_chunks, cfg.k), dtype=np.float32)
        for d in r.docs():
            toks = _token_sets(r, d.first, d.n)
            for i in range(d.n):
                q = toks[i] | (toks[i + 1] if cfg.query == "chunk+target" and i + 1 < d.n else set())
                js = np.flatnonzero(causal_retrievable(i, np.arange(d.n), cfg.exclude_recent))
                s = np.array([len(q & toks[j]) for j in js], dtype=np.float32)
                order = np.lexsort((-js, -s))[: cfg.k]
                ids[d.first + i, : len(order)] = d.first + js[order]
                sc[d.first + i, : len(order)] = s[order]
        table = neighbor_table(np.arange(r.n_chunks), ids, sc)
        ctx.write_parquet("part-00000.parquet", table, schema=neighbor_schema(cfg.k))
        return {"rows": r.n_chunks}


STAGE = StubBm25()

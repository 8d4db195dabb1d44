"""A stand-in `scores` stage for the train tests while the real one is not registered (same contract:
pipeline.formats.SCORES_SCHEMA); delta from token overlaps instead of a reference LM."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.formats import SCORES_SCHEMA, ChunkReader, read_neighbors
from pipeline.stage import InputRef, Shard, Stage, StageContext
from tests.stub_train_bm25 import _token_sets


class ScoresConfig(StageConfig):
    candidates: int = Field(20, ge=1)


class StubScores(Stage):
    """delta = overlap(candidate pair, target) - overlap(local pair, target), scaled to about [-1, 1]."""

    name = "scores"
    Config = ScoresConfig
    preferred_runner = "serial"

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        k = run.section("scores").candidates
        return {
            "chunks": InputRef("chunks"),
            "bm25": InputRef("bm25", {"scope": "document-causal", "query": "chunk+target", "k": k}),
        }

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        r = ChunkReader(ctx.inputs["chunks"])
        q, nb, _ = read_neighbors(ctx.inputs["bm25"])
        by_id = dict(zip(q.tolist(), nb))
        rows: dict[str, list] = {n: [] for n in SCORES_SCHEMA.names}
        for d in r.docs():
            toks = _token_sets(r, d.first, d.n)
            for i in range(d.n - 1):
                target = toks[i + 1]
                local = (toks[i - 2] if i >= 2 else set()) | (toks[i - 1] if i >= 1 else set())
                base = len(local & target)
                cands = [int(c) for c in by_id[d.first + i] if c >= 0]
                deltas = []
                for c in cands:
                    j = c - d.first
                    pair = toks[j] | (toks[j + 1] if j + 1 < d.n else set())
                    deltas.append((len(pair & target) - base) / 16.0)
                rows["chunk_id"].append(d.first + i)
                rows["candidate_ids"].append(cands)
                rows["logp_candidate"].append([float(x) for x in deltas])
                rows["logp_local"].append(0.0)
                rows["delta"].append([float(x) for x in deltas])
        ctx.write_parquet("part-00000.parquet", pa.table(rows, schema=SCORES_SCHEMA), schema=SCORES_SCHEMA)
        return {"rows": len(rows["chunk_id"])}


STAGE = StubScores()

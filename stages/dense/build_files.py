"""Files of this build's folder: index.json (what was built) read and written, and the neighbors the
shards wrote read back (to measure recall)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stage import StageContext
from retrieval.ranking import recall
from stages.dense.config import INDEX_INFO

log = logging.getLogger("rpt.dense")


def write_index_info(ctx: StageContext, info: dict[str, Any]) -> None:
    ctx.write_text(INDEX_INFO, json.dumps(info, indent=2, sort_keys=True))


def flat_info(plan: Any, n_db: int) -> dict[str, Any]:
    """index.json of exact search (`plan`: the IndexPlan, for its backend)."""
    return {"kind": "flat", "backend": plan.backend, "factory": "Flat", "exact": True, "database": n_db}


def read_index_info(ctx: StageContext) -> dict[str, Any] | None:
    if not ctx.exists(INDEX_INFO):
        return None
    with ctx.fs.open(ctx.path(INDEX_INFO), "r") as f:
        return json.load(f)


def written_neighbors(ctx: StageContext, q_ids: np.ndarray) -> np.ndarray:
    """The neighbor ids this build wrote for the given query chunk ids (read back from the parts)."""
    import pyarrow.dataset as pads

    parts = sorted(
        p for p in ctx.fs.ls(ctx.workdir, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")
    )
    t = pads.dataset(parts, format="parquet", filesystem=ctx.fs).to_table(
        columns=["chunk_id", "neighbor_ids"], filter=pc.field("chunk_id").isin(pa.array(q_ids, pa.int64()))
    )
    k = t.schema.field("neighbor_ids").type.list_size
    ids = t.column("chunk_id").to_numpy()
    nb = t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
    return nb[np.argsort(ids)]


def recall_report(ctx: StageContext, q_ids: np.ndarray, exact_ids: np.ndarray, t0: float) -> dict[str, Any]:
    """recall@k of the neighbors this build wrote for the held-out queries `q_ids` against their exact
    neighbors (chunk ids), logged, as manifest stats (`t0`: when the measurement started)."""
    k = ctx.cfg.k
    r = recall(written_neighbors(ctx, q_ids), exact_ids)
    log.info(
        "recall@%d of the written table against exact search on %d held-out queries: %.4f", k, len(q_ids), r
    )
    return {
        "recall_at_k": round(r, 6),
        "recall_k": k,
        "recall_queries": len(q_ids),
        "recall_s": round(time.perf_counter() - t0, 3),
    }

"""Rows of the evaluate artifact's metrics.parquet (`pipeline.formats.EVAL_METRICS_SCHEMA`: one row per
table x model x setting x neighbors x metric), and reading back the detail files this build wrote."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stage import StageContext


def metric_row(
    table: str, model: str, setting: str, k: int | None, metric: str, value: float, count: int | None
) -> dict:
    return {
        "table": table,
        "model": model,
        "setting": setting,
        "neighbors": k,
        "metric": metric,
        "value": value,
        "count": count,
    }


def read_parquet(ctx: StageContext, name: str) -> pa.Table:
    """A parquet file of this build (read from its bytes: see Artifact.read_file)."""
    with ctx.fs.open(ctx.path(name), "rb") as f:
        return pq.read_table(pa.BufferReader(f.read()))

"""Training rows (table `training` of metrics.parquet): what each train artifact says about its run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.stage import StageContext
from stages.evaluate.config import Config
from stages.evaluate.rows import metric_row


def training_rows(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, pa.Table]]:
    """Per variant: the train artifact's stats (steps, tokens, params, final loss, time, supervision)
    and the use diagnostics of its metrics.parquet; also those metrics tables (the training curves of
    the plots), by variant."""
    cfg: Config = ctx.cfg
    rows: list[dict[str, Any]] = []
    curves = {}
    for v in cfg.variants:
        art = ctx.inputs[f"train_{v}"]
        st = art.stats
        for met in ("steps", "tokens", "params", "final_lm_loss", "train_s"):
            if st.get(met) is not None:
                rows.append(metric_row("training", v, "final", None, met, float(st[met]), None))
        for key in ("positive_share", "universe", "candidates_in_example"):
            if st.get(f"supervision_{key}") is not None:
                rows.append(
                    metric_row(
                        "training",
                        v,
                        "final",
                        None,
                        f"supervision_{key}",
                        float(st[f"supervision_{key}"]),
                        None,
                    )
                )
        if art.has("metrics.parquet"):
            curves[v] = art.read_file("metrics.parquet")
            rows += _training_diagnostics(v, curves[v])
    return rows, curves


def _training_diagnostics(variant: str, table: pa.Table) -> list[dict[str, Any]]:
    """Use diagnostics at the end of training: means over the last quarter of the logged rows."""
    cols = table.to_pydict()
    n = len(cols.get("step", []))
    if not n:
        return []
    tail = slice(n - max(1, n // 4), n)
    out = []
    for met in ("gate_mean", "p_at_2", "recall_at_10", "positive_share", "universe"):
        vals = [x for x in (cols.get(met) or [])[tail] if x is not None and math.isfinite(x)]
        if vals:
            out.append(
                metric_row(
                    "training", variant, "final", None, f"train_{met}", float(np.mean(vals)), len(vals)
                )
            )
    ratios = [r for r in (cols.get("cca_ratio") or [])[tail] if r]
    for i in range(len(ratios[0]) if ratios else 0):
        vals = [r[i] for r in ratios if r[i] is not None and math.isfinite(r[i])]
        if vals:
            out.append(
                metric_row(
                    "training", variant, "final", i, "train_cca_ratio", float(np.mean(vals)), len(vals)
                )
            )
    return out

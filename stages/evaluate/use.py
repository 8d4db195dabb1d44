"""What retrieval adds (table `use` of metrics.parquet): a variant's NLL with its own neighbors minus
with none (`empty`) and minus the baseline's, with paired bootstrap intervals; and where (table
`repeats`): the NLL of every row on the tokens that continue a passage seen beyond the attention
window (stages.evaluate.repeats) and on all the others."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.bootstrap import paired_delta
from pipeline.stage import StageContext
from stages.evaluate.config import Config
from stages.evaluate.perplexity import EvalDoc
from stages.evaluate.rows import metric_row, read_parquet


def bootstrap_unit(ctx: StageContext, docs: list[EvalDoc]) -> str:
    """What the intervals resample: `bootstrap_unit`, or for auto documents when there are 8 or more."""
    cfg: Config = ctx.cfg
    if cfg.bootstrap_unit != "auto":
        return cfg.bootstrap_unit
    return "document" if len(docs) >= 8 else "block"


def use_rows(ctx: StageContext, docs: list[EvalDoc]) -> list[dict[str, Any]]:
    """What retrieval adds: per retrieval variant and own-neighbor setting, the NLL per token with its
    own neighbors minus with none (`empty`), and minus the baseline's, each with a 95% percentile
    bootstrap interval over units (documents, or blocks of chunks when there are few documents):
    resampled units, paired across the two rows, ratio of sums."""
    cfg: Config = ctx.cfg
    unit = bootstrap_unit(ctx, docs)
    tables = {v: read_parquet(ctx, f"details/perplexity-{v}.parquet").to_pylist() for v in cfg.variants}

    def per_unit(v: str, setting: str, k: int) -> dict[tuple[int, int], tuple[float, int]]:
        out: dict[tuple[int, int], tuple[float, int]] = {}
        for r in tables[v]:
            if r["setting"] == setting and r["neighbors"] == k:
                key = (r["doc_idx"], r["block"] if unit == "block" else 0)
                nll, n = out.get(key, (0.0, 0))
                out[key] = (nll + r["nll_sum"], n + r["tokens"])
        return out

    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    base = per_unit("baseline", "none", 0) if "baseline" in tables else None
    for v in cfg.variants:
        if v == "baseline":
            continue
        own = "bm25" if v == "retro_bm25" else "retriever"
        empty = per_unit(v, "empty", 0) if cfg.ablation else None
        for k in cfg.neighbors:
            a = per_unit(v, own, k)
            for ref_name, ref in (("empty", empty), ("baseline", base)):
                if not ref or set(ref) != set(a):
                    continue
                keys = sorted(a)
                point, lo, hi = paired_delta(
                    np.array([a[key][0] for key in keys]),
                    np.array([ref[key][0] for key in keys]),
                    np.array([a[key][1] for key in keys]),
                    rng,
                )
                met = f"nll_minus_{ref_name}"
                for name, val in ((met, point), (f"{met}_ci_low", lo), (f"{met}_ci_high", hi)):
                    rows.append(metric_row("use", v, own, k, name, float(val), len(keys)))
    return rows


def repeat_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """Per variant, setting and K: mean NLL on the repeated tokens (`repeat_nll`, count: how many) and on
    the others (`other_nll`), from the per-block details."""
    cfg: Config = ctx.cfg
    rows: list[dict[str, Any]] = []
    for v in cfg.variants:
        sums: dict[tuple[str, int], list[float]] = {}
        for r in read_parquet(ctx, f"details/perplexity-{v}.parquet").to_pylist():
            acc = sums.setdefault((r["setting"], r["neighbors"]), [0.0, 0, 0.0, 0])
            acc[0] += r["repeat_nll_sum"]
            acc[1] += r["repeat_tokens"]
            acc[2] += r["nll_sum"] - r["repeat_nll_sum"]
            acc[3] += r["tokens"] - r["repeat_tokens"]
        for (setting, k), (rep, n_rep, other, n_other) in sums.items():
            if n_rep:
                rows.append(metric_row("repeats", v, setting, k, "repeat_nll", rep / n_rep, int(n_rep)))
            if n_other:
                rows.append(metric_row("repeats", v, setting, k, "other_nll", other / n_other, int(n_other)))
    return rows

"""The evaluate artifact's plots (plots/*.png, linked from report.md): perplexity by row, retrieval
metrics, token overlap, the use diagnostics and the training curves. matplotlib is imported on use."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.evaluate.report import RETRIEVER_NAMES, Metrics


def write_plots(m: Metrics, curves: Mapping[str, Any], out_dir: Path) -> list[str]:
    """PNG plots into out_dir; returns their names. `curves`: variant -> a train artifact's metrics table
    (pyarrow) with step, tokens, lm_loss, ret_loss, recall_at_10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []

    rows = m.select("perplexity", metric="perplexity")
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [
            f"{r['model']}\n{r['setting']}" + (f" K={r['neighbors']}" if r["neighbors"] else "") for r in rows
        ]
        colors = [
            "#888888"
            if r["setting"] in ("none", "empty")
            else "#d62728"
            if r["setting"] == "oracle"
            else "#1f77b4"
            for r in rows
        ]
        ax.bar(range(len(rows)), [r["value"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("test perplexity")
        vals = [r["value"] for r in rows]
        lo, hi = min(vals), max(vals)
        ax.set_ylim(
            max(0.0, lo - 0.5 * (hi - lo + 1e-9) - 0.05 * lo), hi + 0.1 * (hi - lo + 1e-9) + 0.01 * hi
        )
        ax.set_title("Perplexity by variant and neighbors (blue: own neighbors, red: oracle, grey: none)")
        fig.tight_layout()
        fig.savefig(out_dir / "perplexity.png", dpi=110)
        plt.close(fig)
        names.append("perplexity.png")

    ret = m.select("retrieval")
    if ret:
        models = m.models("retrieval")
        metrics = list(dict.fromkeys(r["metric"] for r in ret))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            vals = [100 * (m.value("retrieval", model, "gold", None, met) or 0.0) for met in metrics]
            ax.bar([j + i * w for j in range(len(metrics))], vals, w, label=RETRIEVER_NAMES.get(model, model))
        ax.set_xticks([j + w * (len(models) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.set_ylabel("percent")
        ax.set_title("Retrieval against the scoring LM's gold")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "retrieval.png", dpi=110)
        plt.close(fig)
        names.append("retrieval.png")

    ov = m.models("overlap")
    if ov:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        q = [100 * (m.value("overlap", r, "top-1", None, "query_fraction") or 0.0) for r in ov]
        t = [100 * (m.value("overlap", r, "top-1", None, "target_fraction") or 0.0) for r in ov]
        ax.bar([i - 0.2 for i in range(len(ov))], q, 0.4, label="with query c_i")
        ax.bar([i + 0.2 for i in range(len(ov))], t, 0.4, label="with target c_i+1")
        ax.set_xticks(
            range(len(ov)), [RETRIEVER_NAMES.get(r, r) for r in ov], rotation=20, ha="right", fontsize=7
        )
        ax.set_ylabel("% of the chunk's distinct tokens")
        ax.set_title("Token overlap of the best neighbor")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "overlap.png", dpi=110)
        plt.close(fig)
        names.append("overlap.png")

    if curves and any("gate_mean" in tab.column_names for tab in curves.values()):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for variant, tab in curves.items():
            cols = tab.to_pydict()
            if variant == "baseline":
                continue
            gate = [x if x is not None else math.nan for x in cols.get("gate_mean", [])]
            ratio = [float(sum(r) / len(r)) if r else math.nan for r in cols.get("cca_ratio", [])]
            p2 = [x if x is not None else math.nan for x in cols.get("p_at_2", [])]
            axes[0].plot(cols["step"], gate, label=variant)
            axes[1].plot(cols["step"], ratio, label=variant)
            if any(not math.isnan(x) for x in p2):
                axes[2].plot(cols["step"], p2, label=variant)
        for ax, title in zip(
            axes, ("neighbor gate (mean)", "|CCA out| / |residual| (mean over layers)", "train P@2 vs gold")
        ):
            ax.set_xlabel("step")
            ax.set_title(title, fontsize=9)
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "use.png", dpi=110)
        plt.close(fig)
        names.append("use.png")

    if curves:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for variant, tab in curves.items():
            cols = tab.to_pydict()
            a1.plot(cols["tokens"], cols["lm_loss"], label=variant)
            rec = [x if x is not None else math.nan for x in cols.get("recall_at_10", [])]
            if any(not math.isnan(x) for x in rec):
                a2.plot(cols["step"], rec, label=variant)
        a1.set_xlabel("training tokens")
        a1.set_ylabel("LM loss (nats/token)")
        a1.set_title("Training LM loss")
        a1.legend(fontsize=7)
        a2.set_xlabel("step")
        a2.set_ylabel("recall@10 vs gold (train batches)")
        a2.set_title("Learned retriever during training")
        if a2.lines:
            a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "training.png", dpi=110)
        plt.close(fig)
        names.append("training.png")
    return names

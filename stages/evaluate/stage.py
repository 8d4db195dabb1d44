"""The evaluate stage itself: its inputs, the plan that checks they fit together, one shard per variant
(perplexity.py), and the finalize that writes metrics.parquet, report.md and the plots."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from model.config import RETRIEVER_VARIANTS
from pipeline.config import RunConfigBase
from pipeline.errors import InputError
from pipeline.formats import EVAL_METRICS_SCHEMA, ChunkReader
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext
from stages.evaluate.config import Config
from stages.evaluate.perplexity import perplexity_rows, select_documents, variant_passes
from stages.evaluate.retrieval_metrics import retrieval_rows, scorer_rows, universe_exclude_recent
from stages.evaluate.retrofit_rows import retrofit_rows
from stages.evaluate.training_diagnostics import training_rows
from stages.evaluate.use import bootstrap_unit, repeat_rows, use_rows


def _rank_inputs(run: RunConfigBase, cfg: Config) -> dict[str, InputRef]:
    """The bm25 (query = chunk) and dense tables, document-causal with the run's exclude_recent, at least
    `depth` deep (the run's own tables are reused when they are deep enough)."""
    exclude_recent = run.section("bm25").exclude_recent
    refs: dict[str, InputRef] = {}
    if "bm25" in cfg.retrievers or "retro_bm25" in cfg.variants:
        k = max(cfg.depth, run.section("bm25").k)
        refs["bm25"] = InputRef("bm25", {"scope": "document-causal", "query": "chunk", "k": k})
    if "dense" in cfg.retrievers:
        k = max(cfg.depth, run.section("dense").k)
        refs["dense"] = InputRef(
            "dense", {"scope": "document-causal", "exclude_recent": exclude_recent, "k": k}
        )
    return refs


class EvaluateStage(Stage):
    name = "evaluate"
    # 2: repeated-passage columns in details/perplexity-*.parquet, table `repeats`; 3: table `scorer`
    version = 3
    Config = Config
    description = "test perplexity of every variant, retrieval quality of every retriever, report and plots"
    preferred_runner = "serial"  # one model at a time; torch uses the cores (or the GPU)
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        cfg: Config = run.section("evaluate")
        refs = {"chunks": InputRef("chunks"), "scores": InputRef("scores"), **_rank_inputs(run, cfg)}
        for v in cfg.variants:
            refs[f"train_{v}"] = InputRef("train", {"variant": v})
        if cfg.retrofit:
            refs["retrofit"] = InputRef("retrofit")
        return refs

    def output_schema(self) -> pa.Schema:
        return EVAL_METRICS_SCHEMA

    # ---- plan: check the inputs fit together before any model runs
    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        reader = ChunkReader(ctx.inputs["chunks"])
        docs = select_documents(reader, cfg.split, cfg.max_docs, cfg.max_tokens, cfg.max_doc_tokens)
        if not docs:
            raise InputError(
                f"{ctx.inputs['chunks'].ref} has no {cfg.split!r} document with 2 or more tokens "
                "to evaluate; set documents.split_lists"
            )
        universe_w = universe_exclude_recent(ctx)
        for role in ("bm25", "dense"):
            if role in ctx.inputs:
                meta = ctx.inputs[role].meta
                if meta.get("scope") != "document-causal":
                    raise InputError(
                        f"{ctx.inputs[role].ref}: scope {meta.get('scope')!r}; evaluate ranks the "
                        "retrievable chunks of the query's document (scope document-causal)"
                    )
        scored = ctx.inputs["scores"].read(columns=["chunk_id"]).column("chunk_id").to_numpy()
        ids = np.concatenate([d.chunk_ids for d in docs])
        if not np.isin(ids, scored).any():
            raise InputError(
                f"{ctx.inputs['scores'].ref} has no rows for the {cfg.split!r} chunks, so there is no gold for "
                f"the oracle and the retrieval metrics: include '{cfg.split}' in scores.splits"
            )
        for v in cfg.variants:
            mc = _model_config(ctx.inputs[f"train_{v}"])
            if mc.get("variant") != v:
                raise InputError(
                    f"{ctx.inputs[f'train_{v}'].ref} holds variant {mc.get('variant')!r}, not {v!r}"
                )
            if mc.get("chunk_len") != reader.chunk_len:
                raise InputError(
                    f"{ctx.inputs[f'train_{v}'].ref} was trained on {mc.get('chunk_len')}-token chunks, "
                    f"{ctx.inputs['chunks'].ref} has {reader.chunk_len}"
                )
            if v in RETRIEVER_VARIANTS and mc.get("exclude_recent") != universe_w:
                raise InputError(
                    f"{ctx.inputs[f'train_{v}'].ref} retrieves with exclude_recent={mc.get('exclude_recent')}, "
                    f"the neighbor tables with {universe_w}: the retrievers would rank different chunks"
                )
        ctx.log.info(
            "evaluate: %d %s documents, %s tokens; %d variants",
            len(docs),
            cfg.split,
            f"{sum(d.scored for d in docs):,}",
            len(cfg.variants),
        )
        return [Shard(i, len(cfg.variants), {"variant": v}) for i, v in enumerate(cfg.variants)]

    # ---- one variant: perplexity rows (and its retriever's rankings)
    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        return variant_passes(ctx, shard.payload["variant"])

    # ---- all variants done: metrics, report, plots
    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        from stages.evaluate.plots import write_plots
        from stages.evaluate.report import PLOTS_DIR, REPORT_FILE, Metrics, render_markdown

        cfg: Config = ctx.cfg
        reader = ChunkReader(ctx.inputs["chunks"])
        docs = select_documents(reader, cfg.split, cfg.max_docs, cfg.max_tokens, cfg.max_doc_tokens)
        rows: list[dict[str, Any]] = []
        rows += perplexity_rows(ctx, docs)
        rows += use_rows(ctx, docs)
        rows += repeat_rows(ctx)
        ret_rows, per_query = retrieval_rows(ctx, reader, docs)
        rows += ret_rows + scorer_rows(ctx)
        train_rows, curves = training_rows(ctx)
        rows += train_rows
        if "retrofit" in ctx.inputs:
            rows += retrofit_rows(ctx.inputs["retrofit"], cfg.split)
        table = pa.Table.from_pylist(rows, schema=EVAL_METRICS_SCHEMA)
        ctx.write_parquet("metrics.parquet", table, EVAL_METRICS_SCHEMA)
        if per_query is not None:
            ctx.write_parquet("details/retrieval.parquet", per_query)
        m = Metrics(table.to_pylist())
        with ctx.local_dir(PLOTS_DIR) as d:
            plots = write_plots(m, curves, d)
        header = [
            f"Artifact `evaluate@{ctx.version}`; inputs: "
            + ", ".join(f"`{a.ref}`" for r, a in sorted(ctx.inputs.items()))
            + ".",
            f"Evaluated: {len(docs)} {cfg.split} document(s), {sum(d.n_chunks for d in docs):,} chunks, "
            f"{sum(d.scored for d in docs):,} predicted tokens.",
        ]
        ctx.write_text(
            REPORT_FILE, render_markdown(m, cfg.paper_column, header, [f"{PLOTS_DIR}/{p}" for p in plots])
        )
        stats: dict[str, Any] = {
            "docs": len(docs),
            "tokens": sum(d.scored for d in docs),
            "queries": int(per_query.num_rows // max(1, len(set(per_query.column("retriever").to_pylist()))))
            if per_query is not None
            else 0,
            "perplexity": {
                f"{r['model']}/{r['setting']}/{r['neighbors']}": round(r["value"], 4)
                for r in rows
                if r["table"] == "perplexity" and r["metric"] == "perplexity"
            },
            "retrieval": {
                f"{r['model']}/{r['metric']}": round(r["value"], 4) for r in rows if r["table"] == "retrieval"
            },
        }
        for r in results:
            stats.update(r.stats)
        return stats

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        return {
            "split": cfg.split,
            "variants": list(cfg.variants),
            "retrievers": [*cfg.retrievers, *[v for v in cfg.variants if v in RETRIEVER_VARIANTS]],
            "paper_column": cfg.paper_column,
            "exclude_recent": universe_exclude_recent(ctx),
            "gold": "scored candidates with delta > 0, graded by delta",
            "bootstrap_unit": bootstrap_unit(
                ctx,
                select_documents(
                    ChunkReader(ctx.inputs["chunks"]),
                    cfg.split,
                    cfg.max_docs,
                    cfg.max_tokens,
                    cfg.max_doc_tokens,
                ),
            ),
        }


def _model_config(art: Any) -> dict[str, Any]:
    from model.checkpoint import read_config

    return read_config(art.local_path())["model"]


STAGE = EvaluateStage()

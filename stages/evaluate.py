"""Stage `evaluate`: test perplexity of every trained variant and retrieval quality of every retriever,
as metrics.parquet, report.md and plots (the paper's Table 2, Table 3 and Fig. 4).

Perplexity. The evaluated text is a prefix of each document of the split (whole documents unless
`max_doc_tokens` / `max_tokens` / `max_docs` bound it, at chunk boundaries). A document prefix runs
through the model as one sequence: attention is windowed, and retrieval spans every earlier chunk of the
document (the paper's inference). Every token of the prefix except the document's first is predicted
once, from everything before it; the same tokens for every row. Perplexity = exp(sum NLL / tokens).
Neighbor sources per variant:
  baseline     none
  retro_bm25   BM25 top-K of the query chunk c_i (document-causal; the paper's inference query)
  rpt_lex/sem  the model's own retriever (top-K of its scores over the retrievable chunks), and
               `oracle`: the top-K gold chunks of the scores table (delta > 0, by delta), fed the same way
  all three    `empty` (ablation): CCA with no neighbor at all, only its null key/value
K takes every value of `neighbors` (2, 3, 4); the baseline and `empty` have one row (neighbors 0).

Retrieval (Table 3). Queries: the evaluated chunks c_i that have at least one gold chunk, i.e. a scored
candidate (BM25 chunk+target top-`scores.candidates`) with delta = log P(c_i+1 | c_j, c_j+1, c_i) -
log P(c_i+1 | c_i-2, c_i-1, c_i) > 0; grade = delta. Universe: the chunks c_i may retrieve (same document,
j <= i - 1 - exclude_recent). Rankings: the bm25 table (query = chunk), the dense table (frozen encoder,
document-causal) and the learned retrievers of rpt_lex / rpt_sem (their scores over the same universe).
Metrics: retrieval.ranking. Token overlap (Fig. 4): the best neighbor (c_j with c_j+1) against c_i and c_i+1.

Shards: one per variant (its perplexity rows, and its retriever's rankings); finalize computes the
retrieval metrics and writes the report. A killed evaluation resumes at the next variant.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from model.config import IGNORE, RETRIEVER_VARIANTS, VARIANTS, Variant
from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import ArtifactError, ConfigError, InputError
from pipeline.formats import (
    EVAL_METRICS_SCHEMA,
    NEIGHBOR_PAD,
    TOKEN_PAD,
    ChunkReader,
    causal_retrievable,
    neighbor_schema,
    neighbor_table,
)
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext

log = logging.getLogger("rpt.evaluate")

PPL_DETAIL_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("setting", pa.string()),
        ("neighbors", pa.int32()),
        ("doc_idx", pa.int64()),
        ("block", pa.int32()),  # block of `block_chunks` chunks of the document (the bootstrap unit)
        ("tokens", pa.int64()),
        ("nll_sum", pa.float64()),
    ]
)
BOOTSTRAP_SAMPLES = 2000


class Config(StageConfig):
    variants: list[Variant] = Field(
        default_factory=lambda: list(VARIANTS), description="train variants to evaluate"
    )
    neighbors: list[int] = Field(
        default_factory=lambda: [2, 3, 4], description="neighbors per chunk at inference"
    )
    oracle: bool = Field(
        True, description="also evaluate rpt_lex / rpt_sem with gold neighbors (the oracle rows)"
    )
    ablation: bool = Field(
        True,
        description="also evaluate each retrieval variant with CCA given no neighbors (setting `empty`): "
        "what retrieval itself adds, apart from how the training run went",
    )
    retrievers: list[Literal["bm25", "dense"]] = Field(
        default_factory=lambda: ["bm25", "dense"],
        description="neighbor tables compared with the learned retrievers in the retrieval table",
    )
    split: Literal["train", "valid", "test"] = "test"
    max_docs: int | None = Field(None, ge=1, description="evaluate at most this many documents of the split")
    max_tokens: int | None = Field(
        1 << 20, ge=2, description="at most this many tokens over all documents (whole chunks); None: all"
    )
    max_doc_tokens: int | None = Field(
        None, ge=2, description="evaluate at most this long a prefix of each document (bounds memory)"
    )
    bootstrap_unit: Literal["auto", "document", "block"] = Field(
        "auto",
        description="unit resampled for the confidence intervals of 'use' (own neighbors minus empty NLL): "
        "documents, blocks of block_chunks chunks, or auto (documents when there are at least 8)",
    )
    block_chunks: int = Field(16, ge=1, description="chunks per block (bootstrap unit 'block')")
    precision_at: list[int] = Field(default_factory=lambda: [2])
    recall_at: list[int] = Field(default_factory=lambda: [10])
    ndcg_at: list[int] = Field(default_factory=lambda: [20])
    paper_column: Literal["ArXiv", "Code", "PG19", "Books3"] = Field(
        "PG19", description="which dataset column of the paper's tables the report shows beside ours"
    )
    # how, not what
    device: str = Field("auto", description="auto (GPU when present), cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16")
    batch_docs: int = Field(1, ge=1, description="documents of equal length per forward pass")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")

    UNHASHED = frozenset({"device", "dtype", "batch_docs", "threads"})

    @field_validator("variants", "neighbors", "precision_at", "recall_at", "ndcg_at", "retrievers")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated entries in {v}")
        if any(isinstance(x, int) and x < 1 for x in v):
            raise ValueError(f"entries must be >= 1, got {v}")
        return v

    @field_validator("variants", "neighbors")
    @classmethod
    def _non_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("must not be empty")
        return v

    @property
    def depth(self) -> int:
        """Rank depth needed of every ranking: the largest neighbor count or cut-off."""
        return max([*self.neighbors, *self.precision_at, *self.recall_at, *self.ndcg_at])


# ------------------------------------------------------------------------------------------ what is evaluated
@dataclass(frozen=True)
class EvalDoc:
    doc_idx: int
    first: int  # chunk id of the document's chunk 0
    n_chunks: int  # chunks evaluated: a prefix of the document
    n_tokens: int  # real tokens in them

    @property
    def scored(self) -> int:
        """Predicted tokens: all but the first."""
        return self.n_tokens - 1

    @property
    def chunk_ids(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.n_chunks, dtype=np.int64)


def select_documents(
    reader: ChunkReader,
    split: str,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    max_doc_tokens: int | None = None,
) -> list[EvalDoc]:
    """The documents of `split` in doc_idx order, each cut to a prefix of whole chunks so that no prefix
    exceeds max_doc_tokens and all together stay within max_tokens. A pure function of the chunks and
    these settings, so every variant sees exactly the same tokens."""
    m = reader.chunk_len
    if max_doc_tokens is not None and max_doc_tokens < m:
        raise ConfigError(f"evaluate.max_doc_tokens={max_doc_tokens} is shorter than one chunk ({m} tokens)")
    out: list[EvalDoc] = []
    used = 0
    for d in sorted(reader.docs(split), key=lambda d: d.doc_idx):
        if max_docs is not None and len(out) >= max_docs:
            break
        n = d.n
        if max_doc_tokens is not None:
            n = min(n, max_doc_tokens // m)
        if max_tokens is not None:
            n = min(n, (max_tokens - used) // m)
        if n <= 0:
            break
        n_tok = int(reader.lengths(np.arange(d.first, d.first + n)).sum())
        if n_tok < 2:
            continue
        out.append(EvalDoc(d.doc_idx, d.first, n, n_tok))
        used += n_tok
    return out


@dataclass(frozen=True)
class Setting:
    source: Literal["none", "empty", "bm25", "retriever", "oracle"]
    k: int


def settings_for(variant: str, cfg: Config) -> list[Setting]:
    if variant == "baseline":
        return [Setting("none", 0)]
    out = [Setting("empty", 0)] if cfg.ablation else []
    if variant == "retro_bm25":
        return out + [Setting("bm25", k) for k in cfg.neighbors]
    out += [Setting("retriever", k) for k in cfg.neighbors]
    if cfg.oracle:
        out += [Setting("oracle", k) for k in cfg.neighbors]
    return out


def doc_batch(reader: ChunkReader, docs: list[EvalDoc]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, T] int64, labels [B, T]) of documents with the same number of evaluated chunks.
    labels[t] = tokens[t + 1] inside each document's prefix, IGNORE elsewhere (its last token and the
    padding of a short final chunk, which sits at the end and so changes no earlier prediction)."""
    n = docs[0].n_chunks
    if any(d.n_chunks != n for d in docs):
        raise ValueError("a batch needs documents with the same number of evaluated chunks")
    raw = np.stack([np.asarray(reader.tokens[d.first : d.first + n]) for d in docs]).reshape(len(docs), -1)
    raw = raw.astype(np.int64)
    labels = np.full_like(raw, IGNORE)
    for b, d in enumerate(docs):
        real = raw[b] != TOKEN_PAD
        if not real[: d.n_tokens].all() or real[d.n_tokens :].any():
            raise ArtifactError(
                f"chunks: document {d.doc_idx} has padding inside its first {n} chunks; "
                "only a document's last chunk may be short"
            )
        labels[b, : d.n_tokens - 1] = raw[b, 1 : d.n_tokens]
    return np.where(raw == TOKEN_PAD, 0, raw), labels


def gold_positions(pos: np.ndarray, delta: np.ndarray, k: int) -> np.ndarray:
    """The oracle's neighbors: per chunk the top-k candidates by delta among the gold ones (delta > 0 and
    retrievable, i.e. pos >= 0), ties in candidate order; -1 pads where fewer exist.
    pos [..., C] in-sequence positions (-1: none), delta [..., C] -> [..., k]."""
    score = np.where((pos >= 0) & (delta > 0), delta, -np.inf)  # NaN (no candidate) > 0 is False
    order = np.argsort(-score, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(pos, order, axis=-1)
    ok = np.isfinite(np.take_along_axis(score, order, axis=-1))
    out = np.where(ok, top, -1)
    if out.shape[-1] < k:
        out = np.concatenate([out, np.full((*out.shape[:-1], k - out.shape[-1]), -1, out.dtype)], axis=-1)
    return out


# ------------------------------------------------------------------------------------------ the stage
def _rank_inputs(run: RunConfigBase, cfg: Config) -> dict[str, InputRef]:
    """The bm25 (query = chunk) and dense tables, document-causal with the run's exclude_recent, at least
    `depth` deep (the run's own tables are reused when they are deep enough)."""
    w = run.section("bm25").exclude_recent
    refs: dict[str, InputRef] = {}
    if "bm25" in cfg.retrievers or "retro_bm25" in cfg.variants:
        k = max(cfg.depth, run.section("bm25").k)
        refs["bm25"] = InputRef("bm25", {"scope": "document-causal", "query": "chunk", "k": k})
    if "dense" in cfg.retrievers:
        k = max(cfg.depth, run.section("dense").k)
        refs["dense"] = InputRef("dense", {"scope": "document-causal", "exclude_recent": w, "k": k})
    return refs


class EvaluateStage(Stage):
    name = "evaluate"
    version = 1
    Config = Config
    description = "test perplexity of every variant, retrieval quality of every retriever, report and plots"
    preferred_runner = "serial"  # one model at a time; torch uses the cores (or the GPU)
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        cfg: Config = run.section("evaluate")
        refs = {"chunks": InputRef("chunks"), "scores": InputRef("scores"), **_rank_inputs(run, cfg)}
        for v in cfg.variants:
            refs[f"train_{v}"] = InputRef("train", {"variant": v})
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
        universe_w = _universe_exclude_recent(ctx)
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
        import torch

        from data.neighbors import compact, scores_table, to_positions
        from data.neighbors import neighbor_table as neighbor_chunk_table
        from model.checkpoint import load_checkpoint
        from model.retriever import topk_positions
        from pipeline.devices import resolve_device, resolve_dtype

        cfg: Config = ctx.cfg
        variant = shard.payload["variant"]
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        art = ctx.inputs[f"train_{variant}"]
        model, mcfg = load_checkpoint(art.local_path(), device)
        reader = ChunkReader(ctx.inputs["chunks"])
        docs = select_documents(reader, cfg.split, cfg.max_docs, cfg.max_tokens, cfg.max_doc_tokens)
        settings = settings_for(variant, cfg)
        w = mcfg.exclude_recent
        bm25 = neighbor_chunk_table(ctx.inputs["bm25"], reader.n_chunks) if variant == "retro_bm25" else None
        cand = (
            scores_table(ctx.inputs["scores"], reader.n_chunks)
            if any(s.source == "oracle" for s in settings)
            else None
        )
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        depth = cfg.depth
        ctx.log.info(
            "evaluate %s (%s, %s params) on %s: %s",
            variant,
            art.ref,
            f"{model.num_params():,}",
            device,
            ", ".join(f"{s.source}/{s.k}" for s in settings),
        )

        groups: dict[int, list[EvalDoc]] = {}
        for d in docs:
            groups.setdefault(d.n_chunks, []).append(d)
        batches = [
            g[i : i + cfg.batch_docs] for g in groups.values() for i in range(0, len(g), cfg.batch_docs)
        ]
        rows: dict[str, list[Any]] = {f.name: [] for f in PPL_DETAIL_SCHEMA}
        rank_q, rank_ids, rank_sc = [], [], []
        bar = progress(total=len(batches) * len(settings), desc=f"evaluate {variant}", unit="pass")
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                n = batch[0].n_chunks
                tok_np, lab_np = doc_batch(reader, batch)
                tokens = torch.from_numpy(tok_np).to(device)
                labels = torch.from_numpy(lab_np).to(device)
                ranked = False
                for s in settings:
                    kw: dict[str, Any] = {"k": s.k} if s.k else {}
                    if s.source == "none":
                        kw["source"] = "none"
                    elif s.source == "retriever":
                        kw["source"] = "retriever"
                    elif s.source == "empty":  # CCA attends only to its null key/value
                        kw.update(source="given", k=1)
                        kw["neighbor_pos"] = torch.full((len(batch), n, 1), -1, device=device)
                    else:  # given neighbors: BM25's of the query chunk, or the gold (oracle)
                        pos = []
                        for d in batch:
                            if s.source == "bm25":
                                p = to_positions(bm25.ids[d.first : d.first + n], d.first, n, w)
                                pos.append(compact(p, None, s.k)[0])
                            else:
                                p = to_positions(cand.ids[d.first : d.first + n], d.first, n, w)
                                pos.append(gold_positions(p, cand.values[d.first : d.first + n], s.k))
                        kw["source"] = "given"
                        kw["neighbor_pos"] = torch.from_numpy(np.stack(pos)).to(device)
                    with autocast:
                        out = model(tokens, labels, **kw)
                    bc = cfg.block_chunks * reader.chunk_len
                    n_blocks = -(-tokens.shape[1] // bc)
                    pad = n_blocks * bc - tokens.shape[1]
                    nll = torch.nn.functional.pad(out.token_nll.double(), (0, pad)).view(
                        len(batch), n_blocks, bc
                    )
                    nll = nll.sum(dim=2).cpu().numpy()
                    lab = torch.nn.functional.pad(labels != IGNORE, (0, pad)).view(len(batch), n_blocks, bc)
                    counted = lab.sum(dim=2).cpu().numpy()
                    for b, d in enumerate(batch):
                        if int(counted[b].sum()) != d.scored:
                            raise ArtifactError(
                                f"evaluate: {counted[b].sum()} labels for document {d.doc_idx}, expected {d.scored}"
                            )
                        for blk in range(n_blocks):
                            if counted[b, blk] == 0:
                                continue
                            rows["model"].append(variant)
                            rows["setting"].append(s.source)
                            rows["neighbors"].append(s.k)
                            rows["doc_idx"].append(d.doc_idx)
                            rows["block"].append(blk)
                            rows["tokens"].append(int(counted[b, blk]))
                            rows["nll_sum"].append(float(nll[b, blk]))
                    if s.source == "retriever" and not ranked:  # the scores do not depend on K
                        top = topk_positions(out.ret_scores.float(), depth)
                        val = torch.gather(out.ret_scores.float(), -1, top.clamp(min=0)).cpu().numpy()
                        top = top.cpu().numpy()
                        for b, d in enumerate(batch):
                            rank_q.append(d.chunk_ids)
                            rank_ids.append(np.where(top[b] >= 0, top[b] + d.first, NEIGHBOR_PAD))
                            rank_sc.append(val[b])
                        ranked = True
                    bar.update(1)
        bar.close()
        table = pa.table(rows, schema=PPL_DETAIL_SCHEMA)
        ctx.write_parquet(f"details/perplexity-{variant}.parquet", table, PPL_DETAIL_SCHEMA)
        if rank_q:
            ctx.write_parquet(
                f"rankings/{variant}.parquet",
                neighbor_table(np.concatenate(rank_q), np.concatenate(rank_ids), np.concatenate(rank_sc)),
                neighbor_schema(depth),
            )
        stats: dict[str, Any] = {"seconds_" + variant: round(time.perf_counter() - t0, 2)}
        for s in settings:
            sel = [
                i
                for i in range(len(rows["model"]))
                if rows["setting"][i] == s.source and rows["neighbors"][i] == s.k
            ]
            ppl = math.exp(sum(rows["nll_sum"][i] for i in sel) / sum(rows["tokens"][i] for i in sel))
            ctx.log.info("evaluate %s %s K=%d: perplexity %.3f", variant, s.source, s.k, ppl)
        return stats

    # ---- all variants done: metrics, report, plots
    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        from pipeline.report import Metrics, render_markdown, write_plots

        cfg: Config = ctx.cfg
        reader = ChunkReader(ctx.inputs["chunks"])
        docs = select_documents(reader, cfg.split, cfg.max_docs, cfg.max_tokens, cfg.max_doc_tokens)
        rows: list[dict[str, Any]] = []
        rows += _perplexity_rows(ctx, docs)
        rows += _use_rows(ctx, docs)
        ret_rows, per_query = _retrieval_rows(ctx, reader, docs)
        rows += ret_rows
        curves = {}
        for v in cfg.variants:
            art = ctx.inputs[f"train_{v}"]
            st = art.stats
            for met in ("steps", "tokens", "params", "final_lm_loss", "train_s"):
                if st.get(met) is not None:
                    rows.append(_row("training", v, "final", None, met, float(st[met]), None))
            for key in ("positive_share", "universe", "candidates_in_example"):
                if st.get(f"supervision_{key}") is not None:
                    rows.append(
                        _row(
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
        table = pa.Table.from_pylist(rows, schema=EVAL_METRICS_SCHEMA)
        ctx.write_parquet("metrics.parquet", table, EVAL_METRICS_SCHEMA)
        if per_query is not None:
            ctx.write_parquet("details/retrieval.parquet", per_query)
        m = Metrics(table.to_pylist())
        with ctx.local_dir("plots") as d:
            plots = write_plots(m, curves, d)
        header = [
            f"Artifact `evaluate@{ctx.version}`; inputs: "
            + ", ".join(f"`{a.ref}`" for r, a in sorted(ctx.inputs.items()))
            + ".",
            f"Evaluated: {len(docs)} {cfg.split} document(s), {sum(d.n_chunks for d in docs):,} chunks, "
            f"{sum(d.scored for d in docs):,} predicted tokens.",
        ]
        ctx.write_text(
            "report.md", render_markdown(m, cfg.paper_column, header, [f"plots/{p}" for p in plots])
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
            "exclude_recent": _universe_exclude_recent(ctx),
            "gold": "scored candidates with delta > 0, graded by delta",
            "bootstrap_unit": _bootstrap_units(
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


# ------------------------------------------------------------------------------------------ finalize helpers
def _row(
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


def _model_config(art: Any) -> dict[str, Any]:
    from model.checkpoint import read_config

    return read_config(art.local_path())["model"]


def _universe_exclude_recent(ctx: StageContext) -> int:
    """exclude_recent of the retrieval universe: the neighbor tables' (the run's bm25 setting)."""
    for role in ("bm25", "dense"):
        if role in ctx.inputs:
            return int(ctx.inputs[role].manifest.config["exclude_recent"])
    return int(ctx.run.section("bm25").exclude_recent)


def _read(ctx: StageContext, name: str) -> pa.Table:
    """A parquet file of this build (read from its bytes: see Artifact.read_file)."""
    with ctx.fs.open(ctx.path(name), "rb") as f:
        return pq.read_table(pa.BufferReader(f.read()))


def _perplexity_rows(ctx: StageContext, docs: list[EvalDoc]) -> list[dict[str, Any]]:
    cfg: Config = ctx.cfg
    expected = {d.doc_idx: d.scored for d in docs}
    total = sum(expected.values())
    out = []
    for v in cfg.variants:
        t = _read(ctx, f"details/perplexity-{v}.parquet").to_pylist()
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in t:
            groups.setdefault((r["setting"], r["neighbors"]), []).append(r)
        for (setting, k), rs in groups.items():
            got: dict[int, int] = {}
            for r in rs:
                got[r["doc_idx"]] = got.get(r["doc_idx"], 0) + r["tokens"]
            if got != expected:  # every row must cover exactly the same tokens
                raise ArtifactError(
                    f"evaluate: {v} {setting} K={k} scored other tokens than the plan "
                    f"({sum(got.values()):,} vs {total:,}); delete the partial build and rerun"
                )
            nll = sum(r["nll_sum"] for r in rs) / total
            out.append(_row("perplexity", v, setting, k, "perplexity", math.exp(nll), total))
            out.append(_row("perplexity", v, setting, k, "nll", nll, total))
    return out


def _bootstrap_units(ctx: StageContext, docs: list[EvalDoc]) -> str:
    cfg: Config = ctx.cfg
    if cfg.bootstrap_unit != "auto":
        return cfg.bootstrap_unit
    return "document" if len(docs) >= 8 else "block"


def _use_rows(ctx: StageContext, docs: list[EvalDoc]) -> list[dict[str, Any]]:
    """What retrieval adds: per retrieval variant and own-neighbor setting, the NLL per token with its
    own neighbors minus with none (`empty`), and minus the baseline's, each with a 95% percentile
    bootstrap interval over units (documents, or blocks of chunks when there are few documents):
    resampled units, paired across the two rows, ratio of sums."""
    cfg: Config = ctx.cfg
    unit = _bootstrap_units(ctx, docs)
    tables = {v: _read(ctx, f"details/perplexity-{v}.parquet").to_pylist() for v in cfg.variants}

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
                na = np.array([a[key][0] for key in keys])
                nr = np.array([ref[key][0] for key in keys])
                tok = np.array([a[key][1] for key in keys], dtype=np.float64)
                point = (na.sum() - nr.sum()) / tok.sum()
                idx = rng.integers(0, len(keys), (BOOTSTRAP_SAMPLES, len(keys)))
                boot = (na[idx].sum(1) - nr[idx].sum(1)) / tok[idx].sum(1)
                lo, hi = np.percentile(boot, [2.5, 97.5])
                met = f"nll_minus_{ref_name}"
                for name, val in ((met, point), (f"{met}_ci_low", lo), (f"{met}_ci_high", hi)):
                    rows.append(_row("use", v, own, k, name, float(val), len(keys)))
    return rows


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
                _row("training", variant, "final", None, f"train_{met}", float(np.mean(vals)), len(vals))
            )
    ratios = [r for r in (cols.get("cca_ratio") or [])[tail] if r]
    for i in range(len(ratios[0]) if ratios else 0):
        vals = [r[i] for r in ratios if r[i] is not None and math.isfinite(r[i])]
        if vals:
            out.append(
                _row("training", variant, "final", i, "train_cca_ratio", float(np.mean(vals)), len(vals))
            )
    return out


def _retrieval_rows(
    ctx: StageContext, reader: ChunkReader, docs: list[EvalDoc]
) -> tuple[list[dict[str, Any]], pa.Table | None]:
    """Table 3 and Fig. 4 rows, and the per-query table (details/retrieval.parquet)."""
    from data.neighbors import neighbor_table as neighbor_chunk_table
    from data.neighbors import scores_table
    from retrieval.ranking import distinct_overlap, ranking_metrics

    cfg: Config = ctx.cfg
    w = _universe_exclude_recent(ctx)
    n_all = reader.n_chunks
    split_docs = {d.doc_idx for d in reader.docs(cfg.split)}
    ids = np.concatenate([d.chunk_ids for d in docs])
    if not np.isin(
        reader.chunk_doc[ids], list(split_docs)
    ).all():  # never a chunk of another split as a query
        raise ArtifactError(f"evaluate: a query chunk outside the {cfg.split} split")
    gold = scores_table(ctx.inputs["scores"], n_all)
    g_ids, g_delta = gold.ids[ids], gold.values[ids]
    ok = (g_ids != NEIGHBOR_PAD) & (g_delta > 0) & _retrievable(reader, ids, g_ids, w)
    keep = ok.any(axis=1)
    q = ids[keep]
    g_ids = np.where(ok, g_ids, NEIGHBOR_PAD)[keep]
    g_delta = np.where(ok, g_delta, 0.0)[keep]
    if not len(q):
        log.warning(
            "evaluate: no %s query chunk has a gold chunk (delta > 0); no retrieval metrics", cfg.split
        )
        return [], None

    rankings: dict[str, np.ndarray] = {}
    for role in cfg.retrievers:
        rankings[role] = neighbor_chunk_table(ctx.inputs[role], n_all).ids[q, : cfg.depth]
    for v in cfg.variants:
        if v in RETRIEVER_VARIANTS:
            t = _read(ctx, f"rankings/{v}.parquet")
            full = np.full((n_all, cfg.depth), NEIGHBOR_PAD, dtype=np.int64)
            rq = t.column("chunk_id").to_numpy()
            full[rq] = t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(-1, cfg.depth)
            if not np.isin(q, rq).all():
                raise ArtifactError(f"evaluate: rankings/{v}.parquet misses some evaluated query chunks")
            rankings[v] = full[q]
    for name, r in rankings.items():
        bad = (r != NEIGHBOR_PAD) & ~_retrievable(reader, q, r, w)
        if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            raise ArtifactError(
                f"evaluate: the {name} ranking of chunk {q[i]} holds a chunk it may not retrieve "
                f"(other document, or within exclude_recent={w})"
            )

    toks = reader.tokens
    best_gold = g_ids[np.arange(len(q)), np.argmax(np.where(g_ids != NEIGHBOR_PAD, g_delta, -np.inf), axis=1)]
    tops = {**{name: r[:, 0] for name, r in rankings.items()}, "gold": best_gold}
    rows: list[dict[str, Any]] = []
    per_query: dict[str, list[Any]] = {"retriever": [], "chunk_id": [], "n_gold": []}
    n_gold = (g_ids != NEIGHBOR_PAD).sum(axis=1)
    for name, r in rankings.items():
        mets = ranking_metrics(r, g_ids, g_delta, cfg.precision_at, cfg.recall_at, cfg.ndcg_at)
        for met, vals in mets.items():
            rows.append(_row("retrieval", name, "gold", None, met, float(vals.mean()), len(q)))
            per_query.setdefault(met, []).extend(vals.tolist())
        per_query["retriever"] += [name] * len(q)
        per_query["chunk_id"] += q.tolist()
        per_query["n_gold"] += n_gold.tolist()
    # what a uniformly random ranking of the same universe scores in expectation: P@k = gold min(k, U) / (U k),
    # R@k = min(k, universe) / universe, per query, averaged (the chance level the retrievers must beat)
    universe = np.maximum(reader.chunk_pos[q] - w, 1).astype(np.float64)
    chance = {f"precision@{k}": n_gold * np.minimum(k, universe) / (universe * k) for k in cfg.precision_at}
    chance |= {f"recall@{k}": np.minimum(k, universe) / universe for k in cfg.recall_at}
    for met, vals in chance.items():
        rows.append(_row("retrieval", "random", "gold", None, met, float(vals.mean()), len(q)))
    for name, best in tops.items():
        stats = []
        for qi, j in zip(q.tolist(), best.tolist()):
            if (
                j == NEIGHBOR_PAD
                or qi + 1 >= reader.n_chunks
                or reader.chunk_doc[qi + 1] != reader.chunk_doc[qi]
            ):
                continue
            nb = (
                np.concatenate([toks[j], toks[j + 1]])
                if reader.chunk_doc[j + 1] == reader.chunk_doc[j]
                else toks[j]
            )
            stats.append(distinct_overlap(nb, toks[qi]) + distinct_overlap(nb, toks[qi + 1]))
        if stats:
            a = np.asarray(stats, dtype=np.float64)
            for col, met in enumerate(("query_tokens", "query_fraction", "target_tokens", "target_fraction")):
                rows.append(_row("overlap", name, "top-1", None, met, float(a[:, col].mean()), len(a)))
    return rows, pa.table(per_query)


def _retrievable(reader: ChunkReader, query: np.ndarray, cand: np.ndarray, w: int) -> np.ndarray:
    """[Q, C] bool: cand[q, c] is a chunk of query q's document that q may retrieve (-1 pads: False)."""
    c = np.clip(cand, 0, reader.n_chunks - 1)
    same = reader.chunk_doc[c] == reader.chunk_doc[query][:, None]
    causal = causal_retrievable(reader.chunk_pos[query][:, None], reader.chunk_pos[c], w)
    return (cand != NEIGHBOR_PAD) & same & causal


STAGE = EvaluateStage()

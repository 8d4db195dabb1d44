"""Stage `scores`: retriever supervision from the reference LM (RPT section 3.2).

For a query chunk c_q = c_i with target c_t = c_{i+1}, each candidate c_j of the supervision table
(`stages.supervision_table`: bm25 document-causal, query chunk+target, train chunks bounded to their
training example) gets
    s = log P(c_t | c_j, c_{j+1}, c_q) - log P(c_t | c_{i-2}, c_{i-1}, c_q),
log-probabilities summed over the target's tokens; positives are s > 0.

The scoring is `model.lm_scoring` (how it is fast: each prefix's key/value states are computed once per
shard of documents and reused by every pair that starts with it); this module is the stage around it:
shards of whole documents, candidates from the bm25 table, chunk tokens (re-tokenized when the LM has
its own tokenizer), the scores table and its statistics.

Edge conventions (see docs/supervision.md): a document's last chunk has no target and gets no row; the
local context is whatever of (c_{i-2}, c_{i-1}) exists (nothing for i = 0); a candidate's continuation is
dropped when c_j ends its document; a query without candidates still gets its row (empty lists).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.devices import DeviceSetting, DtypeSetting, resolve_device, resolve_dtype
from pipeline.errors import InputError
from pipeline.formats import (
    NEIGHBOR_PAD,
    REFERENCE_MODEL_DIR,
    SCORES_SCHEMA,
    TOKEN_PAD,
    TOKENIZER_FILE,
    ChunkReader,
    load_tokenizer,
)
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats
from pipeline.worker_cache import worker_cache
from stages.supervision_table import supervision_bm25

if TYPE_CHECKING:
    from model.lm_scoring import QueryScores, ScoringLM

log = logging.getLogger("rpt.scores")

HEADROOM_K = (1, 2, 5, 10, 20)  # fraction of queries with a positive among the top-K candidates (Fig. 5)


class Config(StageConfig):
    candidates: int = Field(20, ge=1, description="bm25 candidates scored per query (the paper: 20)")
    splits: list[str] = Field(
        default_factory=lambda: ["train", "valid", "test"], description="splits whose query chunks are scored"
    )
    batch_tokens: int = Field(16384, ge=64, description="forward tokens per batch")
    kv_cache_mb: int = Field(4096, ge=1, description="memory for the prefix key/value states held at once")
    shard_chunks: int = Field(
        20000, ge=1, description="chunks per shard (whole documents; the unit of resume)"
    )
    device: DeviceSetting = Field(
        "auto", description="auto (this worker's GPU when present), cpu, cuda, cuda:N"
    )
    dtype: DtypeSetting = Field(
        "auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"
    )
    workers: int | None = Field(
        None, ge=1, description="CPU threads for torch in each worker (None: torch default)"
    )

    UNHASHED = frozenset({"batch_tokens", "kv_cache_mb", "shard_chunks", "device", "dtype", "workers"})


# ------------------------------------------------------------------------------------------ the scoring LM
# The scoring itself (batching, prefix key/value reuse, the LM forward) is model.lm_scoring; this module
# is the stage around it: candidates and tokens from artifacts in, the scores table out.


def scoring_lm(model_dir: str, device: Any, dtype: Any) -> ScoringLM:
    """The model, loaded once per worker process (shards that run in the same worker reuse it)."""

    def load() -> ScoringLM:
        from model.lm_scoring import ScoringLM

        log.info("scores: loading the reference LM from %s on %s (%s)", model_dir, device, dtype)
        return ScoringLM.load(model_dir, device, dtype)

    return worker_cache(("scores.lm", model_dir, str(device), str(dtype)), load)


# ------------------------------------------------------------------------------------------ the table


def build_scores_table(qs: QueryScores) -> pa.Table:
    offs = np.concatenate([[0], np.cumsum([len(c) for c in qs.candidates])]).astype(np.int32)
    flat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    cands = flat(qs.candidates, np.int64)
    lpc = flat(qs.logp_candidate, np.float64)
    local = np.asarray(qs.logp_local, dtype=np.float64)
    delta = lpc - np.repeat(local, np.diff(offs))
    lists = lambda v: pa.ListArray.from_arrays(pa.array(offs), pa.array(v))  # noqa: E731
    return pa.table(
        {
            "chunk_id": pa.array(np.asarray(qs.chunk_id, dtype=np.int64)),
            "candidate_ids": lists(cands),
            "logp_candidate": lists(lpc.astype(np.float32)),
            "logp_local": pa.array(local.astype(np.float32)),
            "delta": lists(delta.astype(np.float32)),
        },
        schema=SCORES_SCHEMA,
    )


def headroom_counts(delta: list[np.ndarray]) -> dict[str, int]:
    """Queries with at least one positive among their top-K candidates, for K in HEADROOM_K."""
    out = {}
    for k in HEADROOM_K:
        out[str(k)] = int(sum(1 for d in delta if len(d) and (d[:k] > 0).any()))
    return out


# ------------------------------------------------------------------------------------------ the stage


def document_bounds(reader: ChunkReader) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last chunk id of every chunk's document (int64 [n_chunks] each)."""
    docs = reader.docs()
    first = np.asarray([d.first for d in docs], dtype=np.int64)
    n = np.asarray([d.n for d in docs], dtype=np.int64)
    start = np.repeat(first, n)
    return start, start + np.repeat(n, n)


class ChunkTokens:
    """Token ids of chunks under the scoring LM's tokenizer: the stored ids when the LM shares the
    pipeline's tokenizer, else the chunk texts re-tokenized with the LM's tokenizer (chunk by chunk)."""

    def __init__(self, reader: ChunkReader, lo: int, hi: int, lm_tokenizer: Any = None):
        self.lo = lo
        if lm_tokenizer is None:
            rows = np.asarray(reader.tokens[lo:hi])
            self._seqs = [r[r != TOKEN_PAD].astype(np.int64) for r in rows]
        else:
            texts = reader.texts(np.arange(lo, hi))
            encs = lm_tokenizer.encode_batch(texts, add_special_tokens=False)
            self._seqs = [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def __call__(self, chunk_id: int) -> np.ndarray:
        return self._seqs[chunk_id - self.lo]


class ScoresStage(Stage):
    name = "scores"
    version = 1
    Config = Config
    description = "score bm25 candidates with the reference LM: log P(target | candidate pair, query) - local"
    preferred_runner = "serial"  # one model per worker; a GPU (or all CPU cores) per worker
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {
            "chunks": InputRef("chunks"),
            "reference": InputRef("reference"),
            "bm25": InputRef("bm25", supervision_bm25(run)),
        }

    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        reader = ChunkReader(ctx.inputs["chunks"])
        groups: list[list[int]] = []  # [first chunk id, end chunk id, docs]
        for d in reader.docs():
            if d.split not in cfg.splits:
                continue
            if (
                groups
                and groups[-1][1] == d.first
                and groups[-1][1] - groups[-1][0] + d.n <= cfg.shard_chunks
            ):
                groups[-1][1] += d.n
                groups[-1][2] += 1
            else:
                groups.append([d.first, d.first + d.n, 1])
        return [
            Shard(i, len(groups), {"lo": lo, "hi": hi, "docs": n}) for i, (lo, hi, n) in enumerate(groups)
        ]

    def _tokenizer_differs(self, ctx: StageContext) -> bool:
        ref = ctx.inputs["reference"].manifest
        same_source = ref.inputs.get("tokenizer") == ctx.inputs["chunks"].manifest.inputs.get("tokenizer")
        return bool(ref.meta.get("tokenizer_differs", True)) or not same_source

    def _candidates(self, ctx: StageContext, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        bm25 = ctx.inputs["bm25"]
        t = bm25.read(
            columns=["chunk_id", "neighbor_ids"],
            filter=(pc.field("chunk_id") >= lo) & (pc.field("chunk_id") < hi),
        )
        k = t.schema.field("neighbor_ids").type.list_size
        ids = t.column("chunk_id").to_numpy()
        nb = (
            t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
            if len(ids)
            else np.zeros((0, k), np.int64)
        )
        order = np.argsort(ids)
        return ids[order], nb[order]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        import torch

        cfg: Config = ctx.cfg
        threads = torch.get_num_threads()
        if cfg.workers:
            torch.set_num_threads(cfg.workers)
        try:
            return self._score_shard(ctx, shard)
        finally:
            torch.set_num_threads(threads)

    def _score_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        t0 = time.perf_counter()
        lo, hi = int(shard.payload["lo"]), int(shard.payload["hi"])
        reader = ChunkReader(ctx.inputs["chunks"])
        doc_start, doc_end = document_bounds(reader)
        ids = np.arange(lo, hi, dtype=np.int64)
        queries = ids[ids + 1 < doc_end[lo:hi]]  # a document's last chunk has no target
        bm_ids, bm_nb = self._candidates(ctx, lo, hi)
        pos = np.searchsorted(bm_ids, queries)
        ok = (pos < len(bm_ids)) & (bm_ids[np.minimum(pos, len(bm_ids) - 1)] == queries)
        if not ok.all():
            raise InputError(
                f"{ctx.inputs['bm25'].ref} has no row for query chunk {int(queries[~ok][0])}; "
                "rebuild bm25 from the same chunks artifact"
            )
        nb = bm_nb[pos][:, : cfg.candidates]
        cands = [row[row != NEIGHBOR_PAD] for row in nb]
        for q, c in zip(queries.tolist(), cands):
            bad = c[(c >= q) | (c < doc_start[q])]
            if len(bad):
                raise InputError(
                    f"{ctx.inputs['bm25'].ref}: query chunk {q} has candidate {int(bad[0])}, which "
                    "is not an earlier chunk of its document; scores needs scope=document-causal"
                )
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        model_dir = ctx.local_input("reference", REFERENCE_MODEL_DIR)
        lm = scoring_lm(str(model_dir), device, dtype)
        differs = self._tokenizer_differs(ctx)
        tokens = ChunkTokens(reader, lo, hi, load_tokenizer(model_dir / TOKENIZER_FILE) if differs else None)
        from model import lm_scoring  # torch and transformers, loaded by the shards that score

        bar = progress(total=0, desc=f"scores shard {shard.name}", unit="pair")
        try:
            qs, counts = lm_scoring.score_queries(
                lm, queries, cands, doc_start, doc_end, tokens, cfg.batch_tokens, cfg.kv_cache_mb, bar
            )
        finally:
            bar.close()
        table = build_scores_table(qs)
        ctx.write_parquet(f"part-{shard.name}.parquet", table, schema=SCORES_SCHEMA)
        delta = [lp - loc for lp, loc in zip(qs.logp_candidate, qs.logp_local)]
        seconds = time.perf_counter() - t0
        n_pos = int(sum((d > 0).sum() for d in delta))
        log.info(
            "scores shard %s: %d queries, %d pairs, %d positives in %.1f s",
            shard.name,
            len(queries),
            counts["pairs"],
            n_pos,
            seconds,
        )
        return {
            "docs": int(shard.payload["docs"]),
            "queries": len(queries),
            "queries_without_candidates": int(sum(1 for c in cands if not len(c))),
            "candidates": int(sum(len(c) for c in cands)),
            "positives": n_pos,
            "queries_with_positive_at": headroom_counts(delta),
            **counts,
            "score_s": seconds,
        }

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        stats = merge_stats(r.stats for r in results)
        q = stats.get("queries", 0)
        at = stats.pop("queries_with_positive_at", {})
        stats["fraction_with_positive_at"] = {k: (v / q if q else None) for k, v in at.items()}
        stats["fraction_with_positive"] = at.get(str(max(HEADROOM_K)), 0) / q if q else None
        stats["positive_rate"] = stats["positives"] / stats["candidates"] if stats.get("candidates") else None
        secs = stats.get("score_s", 0)
        stats["pairs_per_s"] = stats["pairs"] / secs if secs else None
        fwd = stats.get("prefix_tokens", 0) + stats.get("suffix_tokens", 0)
        stats["forward_tokens"] = fwd
        stats["forward_tokens_per_pair"] = fwd / stats["pairs"] if stats.get("pairs") else None
        return stats

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        bm = ctx.inputs["bm25"].manifest
        return {
            "source": "reference-lm",
            "reference": ctx.inputs["reference"].ref,
            "candidates": cfg.candidates,
            "bm25": bm.ref,
            "exclude_recent": bm.config.get("exclude_recent"),
            "positive": "delta > 0",
            "tokenizer_differs": self._tokenizer_differs(ctx),
            "splits": cfg.splits,
        }

    def output_schema(self) -> pa.Schema:
        return SCORES_SCHEMA


STAGE = ScoresStage()

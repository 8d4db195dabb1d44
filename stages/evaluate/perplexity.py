"""Perplexity: which text is evaluated, with which neighbors, and the NLL passes over it.

The evaluated text is a prefix of each document of the split (`select_documents`); every variant runs
each of its settings (`settings_for`) over the same tokens, one document prefix per sequence
(`doc_batch`), and writes the NLL per block of `block_chunks` chunks (the bootstrap unit of use.py).
`perplexity_rows` sums them into the perplexity table of metrics.parquet.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from model.config import IGNORE
from pipeline.errors import ArtifactError, ConfigError
from pipeline.formats import NEIGHBOR_PAD, TOKEN_PAD, ChunkReader, build_neighbor_table, neighbor_schema
from pipeline.progress import progress
from pipeline.stage import StageContext
from stages.evaluate.config import Config
from stages.evaluate.rows import metric_row, read_parquet

PPL_DETAIL_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("setting", pa.string()),
        ("neighbors", pa.int32()),
        ("doc_idx", pa.int64()),
        ("block", pa.int32()),  # block of `block_chunks` chunks of the document (the bootstrap unit)
        ("tokens", pa.int64()),
        ("nll_sum", pa.float64()),
        ("repeat_tokens", pa.int64()),  # of `tokens`, those continuing a passage seen beyond the window
        ("repeat_nll_sum", pa.float64()),  # (stages.evaluate.repeats)
    ]
)


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
    """One perplexity row of a variant: where its neighbors come from (`source`) and how many (`k`).

    Names, in one place. `source` is stored as it is (the `setting` column of metrics.parquet and of
    details/perplexity-*.parquet, chosen by the config flags `oracle` and `ablation`), so it keeps the
    evaluation's words, not the model's. What each one feeds `RPT.forward(source=...)` (model/rpt.py):

      setting     model source   neighbor_pos
      none        "none"         - (the baseline: no CCA)
      empty       "given"        all -1, k = 1: CCA attends only to its null key/value (the ablation)
      bm25        "given"        the BM25 top-k of the query chunk (the bm25 input)
      retriever   "retriever"    - (the model's own top-k)
      oracle      "given"        `oracle_positions` below: the top-k gold chunks of the scores table

    `oracle` makes the same choice as the model's source "gold" (model.losses.gold_positions; the tests
    check they agree), but from the scores table's delta for every variant, fed as "given"; the model's
    "gold" is training's teacher forcing (scheduled sampling: p_gold, used_gold in the train metrics)
    over the variant's own targets (BM25 grades for rpt_lex), and evaluation never passes it. Here
    "gold" always means the scoring LM's judgments, the scored candidates with delta > 0: the oracle's
    neighbors, the `gold` setting of the retrieval table, and the `gold` row of the overlap table (the
    top positive).
    """

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


def oracle_positions(pos: np.ndarray, delta: np.ndarray, k: int) -> np.ndarray:
    """The oracle's neighbors: per chunk the top-k candidates by delta among the gold ones (delta > 0 and
    retrievable, i.e. pos >= 0), ties in candidate order; -1 pads where fewer exist.
    pos [..., C] in-sequence positions (-1: none), delta [..., C] -> [..., k]."""
    score = np.where((pos >= 0) & (delta > 0), delta, -np.inf)  # NaN (no candidate) > 0 is False
    order = np.argsort(-score, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(pos, order, axis=-1)
    ok = np.isfinite(np.take_along_axis(score, order, axis=-1))
    out = np.where(ok, top, NEIGHBOR_PAD)
    if out.shape[-1] < k:
        pad = np.full((*out.shape[:-1], k - out.shape[-1]), NEIGHBOR_PAD, out.dtype)
        out = np.concatenate([out, pad], axis=-1)
    return out


def variant_passes(ctx: StageContext, variant: str) -> dict[str, Any]:
    """One shard: every setting of `variant` over the evaluated documents, as
    details/perplexity-<variant>.parquet (NLL per document block), and for a learned retriever its
    rankings (rankings/<variant>.parquet, the top `depth` of its scores; they do not depend on K).
    Returns the shard's stats."""
    import torch

    from data.neighbors import compact, load_neighbor_table, load_scores_table, to_positions
    from model.checkpoint import load_checkpoint
    from model.retriever import topk_positions
    from pipeline.devices import resolve_device, resolve_dtype
    from stages.evaluate.repeats import repeat_mask

    cfg: Config = ctx.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    art = ctx.inputs[f"train_{variant}"]
    model, mcfg = load_checkpoint(art.local_path(), device)
    reader = ChunkReader(ctx.inputs["chunks"])
    docs = select_documents(reader, cfg.split, cfg.max_docs, cfg.max_tokens, cfg.max_doc_tokens)
    settings = settings_for(variant, cfg)
    exclude_recent = mcfg.exclude_recent
    bm25 = load_neighbor_table(ctx.inputs["bm25"], reader.n_chunks) if variant == "retro_bm25" else None
    cand = (
        load_scores_table(ctx.inputs["scores"], reader.n_chunks)
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
    batches = [g[i : i + cfg.batch_docs] for g in groups.values() for i in range(0, len(g), cfg.batch_docs)]
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
            repeats = torch.from_numpy(
                np.stack([repeat_mask(tok_np[b], d.n_tokens, mcfg.window) for b, d in enumerate(batch)])
            ).to(device)
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
                            p = to_positions(bm25.ids[d.first : d.first + n], d.first, n, exclude_recent)
                            pos.append(compact(p, None, s.k)[0])
                        else:
                            p = to_positions(cand.ids[d.first : d.first + n], d.first, n, exclude_recent)
                            pos.append(oracle_positions(p, cand.values[d.first : d.first + n], s.k))
                    kw["source"] = "given"
                    kw["neighbor_pos"] = torch.from_numpy(np.stack(pos)).to(device)
                with autocast:
                    out = model(tokens, labels, **kw)
                bc = cfg.block_chunks * reader.chunk_len
                n_blocks = -(-tokens.shape[1] // bc)
                pad = n_blocks * bc - tokens.shape[1]
                nll = torch.nn.functional.pad(out.token_nll.double(), (0, pad)).view(len(batch), n_blocks, bc)
                rep = torch.nn.functional.pad(repeats, (0, pad)).view(len(batch), n_blocks, bc)
                rep_nll = (nll * rep).sum(dim=2).cpu().numpy()
                rep_n = rep.sum(dim=2).cpu().numpy()
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
                        rows["repeat_tokens"].append(int(rep_n[b, blk]))
                        rows["repeat_nll_sum"].append(float(rep_nll[b, blk]))
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
            build_neighbor_table(np.concatenate(rank_q), np.concatenate(rank_ids), np.concatenate(rank_sc)),
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


def perplexity_rows(ctx: StageContext, docs: list[EvalDoc]) -> list[dict[str, Any]]:
    cfg: Config = ctx.cfg
    expected = {d.doc_idx: d.scored for d in docs}
    total = sum(expected.values())
    out = []
    for v in cfg.variants:
        t = read_parquet(ctx, f"details/perplexity-{v}.parquet").to_pylist()
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
            out.append(metric_row("perplexity", v, setting, k, "perplexity", math.exp(nll), total))
            out.append(metric_row("perplexity", v, setting, k, "nll", nll, total))
    return out

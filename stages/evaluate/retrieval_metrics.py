"""Retrieval against the scoring LM's gold (Table 3) and the token overlap of the best neighbor (Fig. 4).

Queries: the evaluated chunks with at least one gold chunk (a scored candidate with delta > 0 that the
chunk may retrieve); grade = delta. Universe: the chunks of the query's document it may retrieve
(j <= i - 1 - exclude_recent). Metrics: retrieval.ranking.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from model.config import RETRIEVER_VARIANTS
from pipeline.errors import ArtifactError
from pipeline.formats import NEIGHBOR_PAD, ChunkReader, causal_retrievable
from pipeline.stage import StageContext
from stages.evaluate.config import Config
from stages.evaluate.perplexity import EvalDoc
from stages.evaluate.rows import metric_row, read_parquet

log = logging.getLogger("rpt.evaluate")


def universe_exclude_recent(ctx: StageContext) -> int:
    """exclude_recent of the retrieval universe: the neighbor tables' (the run's bm25 setting)."""
    for role in ("bm25", "dense"):
        if role in ctx.inputs:
            return int(ctx.inputs[role].manifest.config["exclude_recent"])
    return int(ctx.run.section("bm25").exclude_recent)


def retrieval_rows(
    ctx: StageContext, reader: ChunkReader, docs: list[EvalDoc]
) -> tuple[list[dict[str, Any]], pa.Table | None]:
    """Table 3 and Fig. 4 rows, and the per-query table (details/retrieval.parquet)."""
    from data.neighbors import load_neighbor_table, load_scores_table
    from retrieval.ranking import distinct_overlap, ranking_metrics

    cfg: Config = ctx.cfg
    exclude_recent = universe_exclude_recent(ctx)
    n_all = reader.n_chunks
    split_docs = {d.doc_idx for d in reader.docs(cfg.split)}
    ids = np.concatenate([d.chunk_ids for d in docs])
    if not np.isin(
        reader.chunk_doc[ids], list(split_docs)
    ).all():  # never a chunk of another split as a query
        raise ArtifactError(f"evaluate: a query chunk outside the {cfg.split} split")
    gold = load_scores_table(ctx.inputs["scores"], n_all)
    g_ids, g_delta = gold.ids[ids], gold.values[ids]
    ok = (g_ids != NEIGHBOR_PAD) & (g_delta > 0) & retrievable(reader, ids, g_ids, exclude_recent)
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
        rankings[role] = load_neighbor_table(ctx.inputs[role], n_all).ids[q, : cfg.depth]
    for v in cfg.variants:
        if v in RETRIEVER_VARIANTS:
            t = read_parquet(ctx, f"rankings/{v}.parquet")
            full = np.full((n_all, cfg.depth), NEIGHBOR_PAD, dtype=np.int64)
            rq = t.column("chunk_id").to_numpy()
            full[rq] = t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(-1, cfg.depth)
            if not np.isin(q, rq).all():
                raise ArtifactError(f"evaluate: rankings/{v}.parquet misses some evaluated query chunks")
            rankings[v] = full[q]
    for name, r in rankings.items():
        bad = (r != NEIGHBOR_PAD) & ~retrievable(reader, q, r, exclude_recent)
        if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            raise ArtifactError(
                f"evaluate: the {name} ranking of chunk {q[i]} holds a chunk it may not retrieve "
                f"(other document, or within exclude_recent={exclude_recent})"
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
            rows.append(metric_row("retrieval", name, "gold", None, met, float(vals.mean()), len(q)))
            per_query.setdefault(met, []).extend(vals.tolist())
        per_query["retriever"] += [name] * len(q)
        per_query["chunk_id"] += q.tolist()
        per_query["n_gold"] += n_gold.tolist()
    # what a uniformly random ranking of the same universe scores in expectation: P@k = gold min(k, U) / (U k),
    # R@k = min(k, universe) / universe, per query, averaged (the chance level the retrievers must beat)
    universe = np.maximum(reader.chunk_pos[q] - exclude_recent, 1).astype(np.float64)
    chance = {f"precision@{k}": n_gold * np.minimum(k, universe) / (universe * k) for k in cfg.precision_at}
    chance |= {f"recall@{k}": np.minimum(k, universe) / universe for k in cfg.recall_at}
    for met, vals in chance.items():
        rows.append(metric_row("retrieval", "random", "gold", None, met, float(vals.mean()), len(q)))
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
                rows.append(metric_row("overlap", name, "top-1", None, met, float(a[:, col].mean()), len(a)))
    return rows, pa.table(per_query)


def retrievable(reader: ChunkReader, query: np.ndarray, cand: np.ndarray, exclude_recent: int) -> np.ndarray:
    """[Q, C] bool: cand[q, c] is a chunk of query q's document that q may retrieve (-1 pads: False)."""
    c = np.clip(cand, 0, reader.n_chunks - 1)
    same = reader.chunk_doc[c] == reader.chunk_doc[query][:, None]
    causal = causal_retrievable(reader.chunk_pos[query][:, None], reader.chunk_pos[c], exclude_recent)
    return (cand != NEIGHBOR_PAD) & same & causal


SCORER_METRICS = ("copy_first_nll", "copy_repeat_nll", "copy_gain")


def scorer_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """Table `scorer`: the in-context copy probe of the LM whose scores are the gold above (from the
    reference manifest, `stages.reference.lm.copy_probe`), so the report says whether that gold can
    point at the chunk that holds a continuation. None for a reference built before the probe existed."""
    ref = ctx.inputs["scores"].manifest.inputs.get("reference")
    if not ref:
        return []
    stats = ctx.store.resolve(ref).manifest.stats
    if stats.get("copy_gain") is None:
        return []
    n = int(stats["copy_passages"])
    mets = SCORER_METRICS + (("copy_gain_lm",) if stats.get("copy_gain_lm") is not None else ())
    return [metric_row("scorer", "reference", "copy", None, met, float(stats[met]), n) for met in mets]

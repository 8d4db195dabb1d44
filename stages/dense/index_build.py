"""The approximate index of a corpus-scope build (ivfpq, hnsw): trained on a seeded sample of the
database, nprobe/efSearch tuned on a sample of queries to reach `target_recall` (unless given), saved as
index.faiss with its description in index.json, and reused by a resumed build whose checksum matches."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pipeline.formats import ChunkReader
from pipeline.progress import progress
from pipeline.stage import StageContext
from retrieval.faiss_index import (
    GPU_MAX_K,
    build_index,
    search_ladder,
    to_cpu,
    tune_search_param,
    write_index,
)
from retrieval.ranking import recall
from stages.dense.build_files import read_index_info, write_index_info
from stages.dense.config import INDEX_FILE, Config
from stages.dense.database import Database, sampled_embeddings
from stages.dense.index_plan import IndexPlan, faiss_gpu, faiss_module, samples
from stages.dense.search import exact_neighbors

log = logging.getLogger("rpt.dense")


def index_ready(ctx: StageContext) -> bool:
    """A resumed build reuses the saved index when its checksum still matches."""
    info = read_index_info(ctx)
    if not info or info.get("kind") == "flat" or not ctx.exists(INDEX_FILE):
        return False
    ok = ctx.file_entry(INDEX_FILE).sha256 == info.get("sha256")
    if ok:
        log.info("reusing the trained %s index of this partial build", info.get("factory"))
    return ok


def build_and_save_index(ctx: StageContext, db: Database, plan: IndexPlan, n_queries: int) -> None:
    """Train and fill the planned index, tune its search parameter, write index.faiss and index.json."""
    faiss_module()  # a missing faiss is a ConfigError naming the extras, before any work

    cfg: Config = ctx.cfg
    dim = db.emb.shape[1]
    factory = plan.factory(dim, cfg.hnsw_m)
    gpu = faiss_gpu(cfg.device) if plan.kind == "ivfpq" else None  # faiss has no GPU HNSW
    train, tune_q, _ = samples(cfg, n_queries, len(db.ids), plan.n_train)
    bar = progress(total=len(db.ids), desc=f"dense: adding to {factory}", unit="vec")
    index, work, t_train, t_add = build_index(
        db.emb,
        factory,
        cfg.metric,
        train_rows=train if plan.kind == "ivfpq" else None,
        hnsw_m=cfg.hnsw_m if plan.kind == "hnsw" else None,
        gpu=gpu,
        seed=cfg.seed,
        on_add=bar.update,
    )
    bar.close()
    param = "nprobe" if plan.kind == "ivfpq" else "efSearch"
    given = cfg.nprobe if plan.kind == "ivfpq" else cfg.ef_search
    t0 = time.perf_counter()
    value, curve = (given, []) if given else tune(ctx, work, db, plan, tune_q, param, gpu is not None)
    t_tune = time.perf_counter() - t0
    on_gpu = work is not index
    index = to_cpu(index, work)
    with ctx.local_dir("") as root:
        write_index(index, root / INDEX_FILE)
    info = {
        "kind": plan.kind,
        "backend": "faiss",
        "factory": factory,
        "exact": False,
        "database": len(db.ids),
        "metric": cfg.metric,
        "nlist": plan.nlist,
        "pq_m": plan.pq_m,
        "hnsw_m": cfg.hnsw_m if plan.kind == "hnsw" else None,
        "ef_construction": index.hnsw.efConstruction if plan.kind == "hnsw" else None,
        "train_vectors": len(train) if plan.kind == "ivfpq" else None,
        "search_param": param,
        "search_value": int(value),
        "tuned": given is None,
        "target_recall": cfg.target_recall,
        "tuning_queries": len(tune_q),
        "tuning_curve": curve,
        "trained_on_gpu": on_gpu,
        "train_s": round(t_train, 3),
        "add_s": round(t_add, 3),
        "tune_s": round(t_tune, 3),
        "sha256": ctx.file_entry(INDEX_FILE).sha256,
    }
    write_index_info(ctx, info)
    log.info("built %s (%s=%s) in %.1f s", factory, param, value, t_train + t_add + t_tune)


def tune(
    ctx: StageContext,
    index: Any,
    db: Database,
    plan: IndexPlan,
    tune_q: np.ndarray,
    param: str,
    gpu: bool,
) -> tuple[int, list[list[float]]]:
    """The smallest nprobe/efSearch on a geometric ladder whose recall@k on the tuning queries reaches
    target_recall (the largest tried when none does)."""
    cfg: Config = ctx.cfg
    ladder = search_ladder(plan.kind, plan.nlist, gpu)
    if not len(tune_q):
        return ladder[-1], []
    exact, _ = exact_neighbors(ctx, db, tune_q)
    value, curve = tune_search_param(
        index,
        param,
        ladder,
        sampled_embeddings(ctx, tune_q),
        ChunkReader(ctx.inputs["chunks"]).chunk_doc[tune_q],
        db.doc,
        db.emb,
        cfg.k,
        cfg.k + cfg.overfetch,
        cfg.metric,
        GPU_MAX_K if gpu else len(db.ids),
        lambda got: recall(db.chunk_ids(got), db.chunk_ids(exact)),
        cfg.target_recall,
    )
    if curve[-1][1] < cfg.target_recall:
        log.warning(
            "no %s reached recall@%d >= %.2f (best %.4f at %s=%d); raise dense.overfetch or use a finer "
            "index",
            param,
            cfg.k,
            cfg.target_recall,
            curve[-1][1],
            param,
            ladder[-1],
        )
    return value, curve

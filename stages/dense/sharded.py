"""Corpus-scope dense search over a sharded database (`dense.db_shard_chunks` > 0; the pairs, partials and
merge are stages.corpus_shards, shared with bm25).

- Exact (`flat`): each pair scores its query group against one database shard (torch or faiss IndexFlat),
  own document masked; the merged table equals the unsharded one.
- IVF-PQ: one quantizer and PQ codebook trained in the plan on a seeded sample of the whole database and
  saved empty as index.faiss; each database shard is added to a copy of it by the first task that needs
  it and kept as `index/shard-<s>.faiss` in the artifact (a resumed or concurrent task reuses the file;
  two tasks racing build the same bytes). Every shard is searched with the same nprobe, so a query probes
  the same lists in every shard: the union of the shards' candidates contains the unsharded index's, and
  after the exact re-scoring the merged neighbors are at least as good. nprobe, when not given, is tuned
  on database shard 0: the smallest that finds the shard's share of the merged top-k (`tuning_k`).
- HNSW graphs do not shard this way (a graph per shard, searched separately, is a different index):
  refused with a ConfigError.

Memory of a task: its database shard (embeddings float32, ids, doc ids, and its index) plus its query
group; the plan holds one training sample; the recall check in finalize streams the shards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.devices import resolve_device
from pipeline.errors import ConfigError
from pipeline.formats import NEIGHBOR_PAD, ChunkReader, DocSpan
from pipeline.stage import Shard, StageContext
from retrieval.exact import exact_corpus_search, exact_rescore
from retrieval.faiss_index import open_index, tune_search_param, write_index
from retrieval.ranking import merge_top_k, recall
from stages.corpus_shards import (
    database_ids,
    db_bounds,
    own_in_shard,
    pair_shards,
    plan_groups,
    query_docs,
    write_partial,
)
from stages.dense.build_files import flat_info, read_index_info, recall_report, write_index_info
from stages.dense.config import INDEX_FILE, Config
from stages.dense.database import chunk_embeddings, own_doc_ranges, sampled_embeddings
from stages.dense.index_plan import IndexPlan, faiss_gpu, faiss_module, plan_index, samples
from stages.dense.search import faiss_neighbors

log = logging.getLogger("rpt.dense")


def sharded(cfg: Config) -> bool:
    return cfg.scope == "corpus" and cfg.db_shard_chunks > 0


def index_shard_file(s: int) -> str:
    return f"index/shard-{s:05d}.faiss"


def table_docs(ctx: StageContext) -> list[DocSpan]:
    cfg: Config = ctx.cfg
    return query_docs(ChunkReader(ctx.inputs["chunks"]), cfg.query_splits, "dense.query_splits")


def table_rows(ctx: StageContext) -> np.ndarray:
    """Chunk ids of the table's rows (ascending): every chunk, or those of query_splits."""
    if ctx.cfg.query_splits is None:
        return np.arange(ChunkReader(ctx.inputs["chunks"]).n_chunks)
    return np.concatenate([d.chunk_ids for d in table_docs(ctx)])


def query_groups(ctx: StageContext) -> list[tuple[int, int]]:
    return plan_groups([d.n for d in table_docs(ctx)], ctx.cfg.shard_chunks)


def range_embeddings(ctx: StageContext, ids: np.ndarray) -> np.ndarray:
    """float32 embeddings of ascending chunk ids, read as the one chunk-id range they span."""
    if not len(ids):
        return np.zeros((0, 0), np.float32)
    emb = chunk_embeddings(ctx, int(ids[0]), int(ids[-1]) + 1)
    return emb[ids - ids[0]]


# ----------------------------------------------------------------------------------------- plan
def plan(ctx: StageContext) -> list[Shard]:
    """The (query group, database shard) pairs; for IVF-PQ the trained index first (once per build)."""
    cfg: Config = ctx.cfg
    reader = ChunkReader(ctx.inputs["chunks"])
    db = database_ids(reader, "dense")
    dim = range_embeddings(ctx, db[:1]).shape[1]
    index_plan = plan_index(cfg, len(db), dim)
    if index_plan.kind == "hnsw":
        raise ConfigError(
            "dense.index: hnsw does not shard (a graph per database shard is another index); with "
            "dense.db_shard_chunks use dense.index: ivfpq or flat, or set db_shard_chunks: 0"
        )
    bounds = db_bounds(len(db), cfg.db_shard_chunks)
    info = read_index_info(ctx)
    if index_plan.kind == "flat":
        write_index_info(ctx, {**flat_info(index_plan, len(db)), "database_shards": len(bounds)})
    elif not info or not ctx.exists(INDEX_FILE) or ctx.file_entry(INDEX_FILE).sha256 != info.get("sha256"):
        train_index(ctx, reader, db, bounds, index_plan, dim)
    else:
        log.info("reusing the trained %s of this partial build", info.get("factory"))
    docs = table_docs(ctx)
    queries = [{"docs": [lo, hi]} for lo, hi in plan_groups([d.n for d in docs], cfg.shard_chunks)]
    return pair_shards(queries, bounds)


def train_index(
    ctx: StageContext,
    reader: ChunkReader,
    db: np.ndarray,
    bounds: list[tuple[int, int]],
    plan: IndexPlan,
    dim: int,
) -> None:
    """Train the quantizer and PQ codebook on a seeded sample of the database; save it empty; tune nprobe
    on database shard 0 unless given."""
    faiss = faiss_module()
    cfg: Config = ctx.cfg
    factory = plan.factory(dim, cfg.hnsw_m)
    train_rows, tune_q, _ = samples(cfg, reader.n_chunks, len(db), plan.n_train)
    t0 = time.perf_counter()
    sample = sampled_embeddings(ctx, db[train_rows])
    index = faiss.index_factory(dim, factory, _metric(faiss, cfg.metric))
    log.info("training %s on %d of %d database vectors (seed %s)", factory, len(sample), len(db), cfg.seed)
    index.train(np.ascontiguousarray(sample))
    del sample
    t_train = time.perf_counter() - t0
    with ctx.local_dir("") as root:
        write_index(index, root / INDEX_FILE)
    t0 = time.perf_counter()
    value, curve = (
        (cfg.nprobe, []) if cfg.nprobe else _tune_on_shard0(ctx, reader, db, bounds[0], plan, tune_q)
    )
    write_index_info(
        ctx,
        {
            "kind": plan.kind,
            "backend": "faiss",
            "factory": factory,
            "exact": False,
            "database": len(db),
            "database_shards": len(bounds),
            "metric": cfg.metric,
            "nlist": plan.nlist,
            "pq_m": plan.pq_m,
            "train_vectors": len(train_rows),
            "search_param": "nprobe",
            "search_value": int(value),
            "tuned": not cfg.nprobe,
            "tuned_on": None if cfg.nprobe else "database shard 0",
            "tuning_k": None if cfg.nprobe else tuning_k(cfg.k, *bounds[0], len(db)),
            "target_recall": cfg.target_recall,
            "tuning_queries": len(tune_q),
            "tuning_curve": curve,
            "train_s": round(t_train, 3),
            "tune_s": round(time.perf_counter() - t0, 3),
            "sha256": ctx.file_entry(INDEX_FILE).sha256,
        },
    )


def _metric(faiss: Any, metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _tune_on_shard0(
    ctx: StageContext,
    reader: ChunkReader,
    db: np.ndarray,
    bound: tuple[int, int],
    plan: IndexPlan,
    tune_q: np.ndarray,
) -> tuple[int, list[list[float]]]:
    from retrieval.faiss_index import search_ladder

    cfg: Config = ctx.cfg
    ladder = search_ladder("ivfpq", plan.nlist, False)
    if not len(tune_q):
        return ladder[-1], []
    part = DbShard.load(ctx, db, *bound)
    index = part.ivf_index(ctx, 0, None)
    q = sampled_embeddings(ctx, tune_q)
    lo, hi = own_in_shard(own_doc_ranges(reader, db, tune_q), *bound)
    # The merged top-k holds about k x (shard's share of the database) of this shard's chunks, its own
    # top-k' for that k': what the shard's search must find. Tuning against the shard's whole top-k asked
    # for ~8x the lists the merged table needed (docs/corpus-scale.md).
    exact, _ = exact_corpus_search(
        q, part.tensor("cpu"), tuning_k(cfg.k, *bound, len(db)), lo, hi, cfg.metric
    )
    return tune_search_param(
        index,
        "nprobe",
        ladder,
        q,
        reader.chunk_doc[tune_q],
        part.doc,
        part.emb,
        cfg.k,
        cfg.k + cfg.overfetch,
        cfg.metric,
        len(part.ids),
        lambda got: recall(part.chunk_ids(got), part.chunk_ids(exact)),
        cfg.target_recall,
    )


def tuning_k(k: int, a: int, b: int, n_db: int) -> int:
    """The shard-[a, b) neighbors that nprobe tuning must find: ceil(k x (b - a) / n_db), at least 1."""
    return max(1, -(-k * (b - a) // max(n_db, 1)))


# ----------------------------------------------------------------------------------------- one database shard
@dataclass
class DbShard:
    """Rows [a, b) of the database: chunk ids, doc ids, float32 embeddings (and their search structures)."""

    a: int
    b: int
    ids: np.ndarray
    doc: np.ndarray
    emb: np.ndarray

    @classmethod
    def load(cls, ctx: StageContext, db: np.ndarray, a: int, b: int) -> DbShard:
        ids = db[a:b]
        reader = ChunkReader(ctx.inputs["chunks"])
        return cls(a, b, ids, reader.chunk_doc[ids], range_embeddings(ctx, ids))

    def chunk_ids(self, pos: np.ndarray) -> np.ndarray:
        return np.where(pos >= 0, self.ids[pos.clip(0)], NEIGHBOR_PAD)

    def tensor(self, device: Any) -> Any:
        import torch

        if not hasattr(self, "_tensor"):
            self._tensor = torch.from_numpy(self.emb).to(device)
        return self._tensor

    def ivf_index(self, ctx: StageContext, s: int, gpu: int | None) -> Any:
        """The trained index with this shard's vectors: the saved index/shard-<s>.faiss, or built and saved."""
        import faiss

        name = index_shard_file(s)
        if ctx.exists(name):
            with ctx.local_file(name) as path:
                index = faiss.read_index(str(path))
        else:
            with ctx.local_file(INDEX_FILE) as path:
                index = faiss.read_index(str(path))
            index.add(np.ascontiguousarray(self.emb))
            with ctx.local_dir("index") as folder:
                write_index(index, folder / name.split("/", 1)[1])
        return _to_device(index, gpu)


def _to_device(index: Any, gpu: int | None) -> Any:
    from retrieval.faiss_index import to_gpu

    return to_gpu(index, gpu) if gpu is not None else index


def shard_searcher(ctx: StageContext, db: np.ndarray, a: int, b: int, s: int) -> tuple[DbShard, Any, bool]:
    """This worker's database shard s and its search index (None: torch exact), cached (one shard a worker)."""
    cfg: Config = ctx.cfg
    info = read_index_info(ctx) or {}

    def make() -> tuple[DbShard, Any, bool]:
        part = DbShard.load(ctx, db, a, b)
        if info.get("kind") == "flat" and info.get("backend") == "torch":
            return part, None, False
        faiss_module()
        gpu = faiss_gpu(cfg.device)
        if info.get("kind") == "flat":
            return part, open_index(part.emb, cfg.metric, None, gpu), gpu is not None
        index = part.ivf_index(ctx, s, gpu)
        from retrieval.faiss_index import set_search_param

        set_search_param(index, "nprobe", int(info["search_value"]))
        return part, index, gpu is not None

    key = ("dense.db_shard", ctx.workdir, str(info.get("sha256")), a, b, cfg.metric, cfg.device)
    return ctx.worker_cache(key, make, max_entries=1)


# ----------------------------------------------------------------------------------------- pairs
def run_pair(ctx: StageContext, shard: Shard) -> dict[str, Any]:
    """One (query group, database shard) pair: the group's top-k within the shard, as a partial."""
    cfg: Config = ctx.cfg
    reader = ChunkReader(ctx.inputs["chunks"])
    db = database_ids(reader, "dense")
    lo_d, hi_d = shard.payload["docs"]
    a, b = shard.payload["db"]
    t0 = time.perf_counter()
    q_ids = np.concatenate([d.chunk_ids for d in table_docs(ctx)[lo_d:hi_d]])
    q = (
        range_embeddings(ctx, q_ids)
        if len(q_ids) == q_ids[-1] - q_ids[0] + 1
        else sampled_embeddings(ctx, q_ids)
    )
    part, index, gpu = shard_searcher(ctx, db, a, b, int(shard.payload["s"]))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    own_lo, own_hi = own_in_shard(own_doc_ranges(reader, db, q_ids), a, b)
    extra: dict[str, Any] = {}
    if index is None:
        device = resolve_device(cfg.device, "dense.device")
        pos, _ = exact_corpus_search(q, part.tensor(device), cfg.k, own_lo, own_hi, cfg.metric, device)
    else:
        q_doc = reader.chunk_doc[q_ids]
        pos, extra["refetched_rows"] = faiss_neighbors(
            cfg, index, gpu, q, q_doc, part.doc, part.emb, f"dense pair {shard.name}"
        )
    pos, sc = exact_rescore(q, part.emb, pos, cfg.metric)
    write_partial(ctx, shard, q_ids, part.chunk_ids(pos), sc)
    return {"search_s": time.perf_counter() - t0, "load_s": load_s, **extra}


# ----------------------------------------------------------------------------------------- finalize
def recall_of_table(ctx: StageContext) -> dict[str, Any]:
    """recall@k of the merged table against exact search over every database shard (streamed: one shard
    in memory at a time) on held-out queries of the table."""
    cfg: Config = ctx.cfg
    reader = ChunkReader(ctx.inputs["chunks"])
    db = database_ids(reader, "dense")
    rows = table_rows(ctx)
    info = read_index_info(ctx) or {}
    _, _, held = samples(cfg, len(rows), len(db), info.get("train_vectors") or 0)
    if not len(held):
        return {"recall_at_k": None, "recall_queries": 0}
    t0 = time.perf_counter()
    q_ids = rows[held]
    q = sampled_embeddings(ctx, q_ids)
    own = own_doc_ranges(reader, db, q_ids)
    ids, scores = [], []
    for a, b in db_bounds(len(db), cfg.db_shard_chunks):
        part = DbShard.load(ctx, db, a, b)
        lo, hi = own_in_shard(own, a, b)
        pos, sc = exact_corpus_search(q, part.tensor("cpu"), cfg.k, lo, hi, cfg.metric)
        pos, sc = exact_rescore(q, part.emb, pos, cfg.metric)
        ids.append(part.chunk_ids(pos))
        scores.append(sc)
    exact, _ = merge_top_k(np.concatenate(ids, 1), np.concatenate(scores, 1).astype(np.float64), cfg.k)
    return recall_report(ctx, q_ids, exact, t0)

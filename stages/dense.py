"""Stage `dense`: nearest-neighbor tables over chunk embeddings (RETRO-style frozen-encoder retrieval).

Two scopes, with the same output schema as `bm25` (`pipeline.formats.neighbor_table`):

- `corpus` (RETRO): the database is every train-split chunk, the queries are all chunks; a query's
  own document is excluded by doc id. Exact search (`flat`) is a blocked matrix product + top-k with
  the own document masked out. Approximate search (`ivfpq`, `hnsw`, faiss) over-fetches
  `k + overfetch` candidates, drops the own document, re-scores the survivors exactly from the
  stored embeddings, and re-fetches more for rows that are still short; -1 pads what is left.
  The index is trained on a seeded random sample, saved as `index.faiss` (reused on resume), and
  `nprobe` / `efSearch` are tuned on a sample of queries to reach `target_recall` unless given.
  Recall@k of what was written, against exact search, is measured on a held-out sample of queries.
- `document-causal` (RPT self-retrieval): chunk i retrieves chunks j of its own document with
  j <= i - 1 - exclude_recent (`pipeline.formats.causal_retrievable`); exact, one matrix product
  per document, no index.

Scores are higher-is-better: the inner product (`metric: ip`) or the negative squared L2 distance
(`metric: l2`). Rows are ordered by score, ties broken by the more recent chunk (higher chunk_id),
as in the bm25 tables.

The search kernels are a library: exact search in `retrieval.exact`, faiss indexes in
`retrieval.faiss_index`; this module is the stage around them (samples, files, shards, stats).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import ConfigError, InputError
from pipeline.formats import (
    NEIGHBOR_PAD,
    ChunkReader,
    neighbor_counts,
    neighbor_rates,
    neighbor_schema,
    neighbor_table,
    read_embeddings,
)
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats
from retrieval.exact import causal_document_search, exact_corpus_search, exact_rescore
from retrieval.faiss_index import (
    GPU_MAX_K,
    build_index,
    default_pq_m,
    faiss_metric,
    faiss_search,
    search_ladder,
    set_search_param,
    to_cpu,
    to_gpu,
    tune_search_param,
    write_index,
)
from retrieval.ranking import recall

log = logging.getLogger("rpt.dense")

INDEX_FILE = "index.faiss"
INDEX_INFO = "index.json"


class Config(StageConfig):
    k: int = Field(20, ge=1, le=4096, description="neighbors per query chunk")
    scope: Literal["corpus", "document-causal"] = Field(
        "corpus",
        description="corpus: train-split database, own document excluded (RETRO); "
        "document-causal: earlier chunks of the query's own document (RPT)",
    )
    exclude_recent: int = Field(
        16, ge=0, description="document-causal: chunk i retrieves j <= i-1-exclude_recent"
    )
    index: Literal["auto", "flat", "ivfpq", "hnsw"] = Field(
        "auto", description="corpus scope; auto: flat (exact) up to flat_max database vectors, ivfpq above"
    )
    flat_max: int = Field(
        200_000, ge=0, description="index: auto uses exact search up to this many database vectors"
    )
    metric: Literal["ip", "l2"] = Field(
        "ip", description="inner product (cosine on normalised embeddings) or L2"
    )
    nlist: int | None = Field(None, ge=1, description="IVF lists; None: 4*sqrt(N), at most N/39")
    nprobe: int | None = Field(None, ge=1, description="IVF lists probed; None: tuned to reach target_recall")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantizers (bytes per vector); None: dim/4")
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW neighbors per node")
    ef_search: int | None = Field(None, ge=1, description="HNSW efSearch; None: tuned to reach target_recall")
    target_recall: float = Field(
        0.95, gt=0, le=1, description="recall@k that nprobe/ef_search tuning aims for"
    )
    train_sample: int | None = Field(
        None,
        ge=1,
        description="IVF training vectors (seeded random sample); None: min(N, max(256*nlist, 65536))",
    )
    overfetch: int = Field(100, ge=0, description="extra candidates fetched before the own-document filter")
    recall_sample: int = Field(1000, ge=0, description="held-out queries for measuring (and tuning) recall")
    seed: int = Field(0, description="seed of the training, tuning and recall samples")
    backend: Literal["auto", "faiss", "torch"] = Field(
        "auto",
        description="exact search engine: torch matmul+top-k (exact own-doc mask) or faiss IndexFlat; "
        "ivfpq/hnsw always use faiss; auto: torch",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: GPU when torch/faiss see one")
    batch_size: int = Field(4096, ge=1, description="queries per search call")
    shard_chunks: int = Field(65536, ge=1, description="query chunks per shard (unit of resume)")

    UNHASHED = frozenset({"backend", "device", "batch_size", "shard_chunks"})


# ----------------------------------------------------------------------------------------- faiss
# The search itself is retrieval.faiss_index; what stays here turns a missing faiss or GPU into a
# ConfigError that names the settings to change.


def faiss_module() -> Any:
    """The `faiss` module, from whichever extra is installed (`cpu` or `gpu`: both provide it)."""
    try:
        import faiss
    except ImportError as e:
        raise ConfigError(
            "the dense stage needs faiss: install one extra, `pip install -e '.[cpu]'` or `.[gpu]` "
            "(make setup FAISS=cpu|gpu), or set dense.backend: torch for exact search without faiss"
        ) from e
    return faiss


def use_faiss_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    faiss = faiss_module()

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and n == 0:
        raise ConfigError(
            "dense.device=cuda but faiss sees no GPU (install the `gpu` extra: faiss-gpu==1.15.1) "
            "or use dense.backend: torch for exact search on the GPU"
        )
    return n > 0


# ----------------------------------------------------------------------------------------- data


@dataclass
class Database:
    """The corpus-scope database: train-split chunks in chunk-id order."""

    ids: np.ndarray  # chunk ids [N]
    doc: np.ndarray  # doc_idx per database row [N]
    emb: np.ndarray  # float32 [N, d]

    def chunk_ids(self, pos: np.ndarray) -> np.ndarray:
        """Database positions (-1 = none) to chunk ids (-1 = none)."""
        return np.where(pos >= 0, self.ids[pos.clip(0)], NEIGHBOR_PAD)


_CACHE: dict[tuple[str, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


def _cached(ctx: StageContext, key: tuple[str, ...], make: Any) -> Any:
    """Per-process cache of the database, its tensor and the search index, so shards run in one worker
    load them once. It holds the objects of one embeddings artifact at a time."""
    owner = ctx.inputs["embeddings"].version
    with _CACHE_LOCK:
        if any(k[0] != owner for k in _CACHE):
            _CACHE.clear()
        full = (owner, *key)
        if full not in _CACHE:
            _CACHE[full] = make()
        return _CACHE[full]


def _embeddings(ctx: StageContext, lo: int, hi: int) -> np.ndarray:
    """float32 embeddings of chunk ids [lo, hi), checked to be complete."""
    art = ctx.inputs["embeddings"]
    ids, emb = read_embeddings(art, lo, hi)
    if len(ids) != hi - lo or (len(ids) and (ids[0] != lo or ids[-1] != hi - 1)):
        raise InputError(
            f"{art.ref} lacks embeddings of chunk ids {lo}..{hi - 1} (found {len(ids)} of "
            f"{hi - lo}); rebuild it (rpt run embeddings) and check `rpt artifacts verify`"
        )
    return emb.astype(np.float32)


def load_database(ctx: StageContext) -> Database:
    def make() -> Database:
        reader = ChunkReader(ctx.inputs["chunks"])
        emb = _embeddings(ctx, 0, reader.n_chunks)
        docs = reader.docs("train")
        if not docs:
            raise InputError(
                f"{reader.art.ref} has no train-split chunks: the corpus scope retrieves from the "
                "train split (set documents.splits / split_lists, or use dense.scope: document-causal)"
            )
        ids = np.concatenate([d.chunk_ids for d in docs])
        doc = np.concatenate([np.full(d.n, d.doc_idx, np.int64) for d in docs])
        return Database(ids, doc, emb[ids])

    return _cached(ctx, ("db", ctx.inputs["chunks"].version), make)


def own_doc_ranges(reader: ChunkReader, db: Database, q_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Database positions [lo, hi) of each query's own document (empty for non-train documents)."""
    first = q_ids - reader.chunk_pos[q_ids]
    docs = reader.docs()
    starts = np.array([d.first for d in docs], np.int64)
    sizes = np.array([d.n for d in docs], np.int64)
    end = first + sizes[np.searchsorted(starts, first)]
    return np.searchsorted(db.ids, first), np.searchsorted(db.ids, end)


# ----------------------------------------------------------------------------------------- index choice


@dataclass
class IndexPlan:
    kind: str  # flat | ivfpq | hnsw
    backend: str  # torch | faiss
    nlist: int | None = None
    pq_m: int | None = None
    n_train: int | None = None

    def factory(self, dim: int, hnsw_m: int) -> str:
        if self.kind == "ivfpq":
            return f"IVF{self.nlist},PQ{self.pq_m}np"  # np: skip polysemous training (unused, slow)
        if self.kind == "hnsw":
            return f"HNSW{hnsw_m},Flat"
        return "Flat"


def plan_index(cfg: Config, n_db: int, dim: int) -> IndexPlan:
    """Resolve index/backend choices and check the training constraints before any work is done."""
    kind = cfg.index
    if kind == "auto":
        kind = "flat" if n_db <= cfg.flat_max else "ivfpq"
    backend = cfg.backend
    if kind != "flat":
        if backend == "torch":
            raise ConfigError(
                f"dense.backend=torch does exact search only, but dense.index resolves to {kind}; "
                "use dense.index: flat, or dense.backend: auto/faiss"
            )
        backend = "faiss"
    elif backend == "auto":
        backend = "torch"
    if kind != "ivfpq":
        return IndexPlan(kind, backend)
    pq_m = cfg.pq_m or default_pq_m(dim)
    if dim % pq_m:
        raise ConfigError(
            f"dense.pq_m={pq_m} must divide the embedding dimension {dim}; e.g. dense.pq_m: {default_pq_m(dim)}"
        )
    avail = min(cfg.train_sample or n_db, n_db)
    nlist = cfg.nlist or max(1, min(round(4 * math.sqrt(n_db)), avail // 39))
    n_train = min(n_db, cfg.train_sample) if cfg.train_sample else min(n_db, max(256 * nlist, 65536))
    if n_train < 30 * nlist:
        raise ConfigError(
            f"dense: IVF training needs at least 30 vectors per list, but nlist={nlist} has only {n_train} training "
            f"vectors ({n_train / nlist:.1f} per list; the database has {n_db} train-split chunks). "
            f"Lower dense.nlist to at most {max(1, n_train // 30)}"
            + ("" if n_train >= n_db else f", or raise dense.train_sample to at least {30 * nlist}")
            + ", or use dense.index: flat (exact search)."
        )
    if n_train < 256:
        raise ConfigError(
            f"dense: PQ training needs at least 256 vectors (8-bit codes), the sample has {n_train}; "
            "use dense.index: flat for a database this small"
        )
    return IndexPlan(kind, backend, nlist, pq_m, n_train)


def _samples(
    cfg: Config, n_queries: int, n_db: int, n_train: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded samples: training rows of the database, and two disjoint sets of query chunk ids, one to
    tune nprobe/efSearch on and one held out to measure recall on."""
    rng = np.random.default_rng(cfg.seed)
    train = np.sort(rng.choice(n_db, size=n_train, replace=False)) if n_train else np.zeros(0, np.int64)
    queries = rng.permutation(n_queries)
    m = min(cfg.recall_sample, n_queries // 2)
    return train, np.sort(queries[:m]), np.sort(queries[m : 2 * m])


# ----------------------------------------------------------------------------------------- the stage


class DenseStage(Stage):
    name = "dense"
    version = 1
    Config = Config
    description = "dense neighbor tables over chunk embeddings (exact or faiss IVF-PQ/HNSW)"
    preferred_runner = "serial"  # torch/faiss already use every core within a shard
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"embeddings": InputRef("embeddings"), "chunks": InputRef("chunks")}

    def output_schema(self) -> pa.Schema | None:
        return None  # k is in the config; the parts carry the schema

    # ---- plan: shards, and (corpus scope, approximate) the index
    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        reader = ChunkReader(ctx.inputs["chunks"])
        n = reader.n_chunks
        rows = ctx.inputs["embeddings"].manifest.rows
        if rows != n:
            raise InputError(
                f"{ctx.inputs['embeddings'].ref} has {rows} rows but {reader.art.ref} has {n} chunks; "
                "they do not belong together: rebuild embeddings from these chunks"
            )
        if cfg.scope == "document-causal":
            return self._doc_shards(reader, cfg.shard_chunks)
        db = load_database(ctx)
        ip = plan_index(cfg, len(db.ids), db.emb.shape[1])
        if ip.kind != "flat" and not self._index_ready(ctx):
            self._build_index(ctx, db, ip, n)
        elif ip.kind == "flat":
            self._write_info(
                ctx,
                {
                    "kind": "flat",
                    "backend": ip.backend,
                    "factory": "Flat",
                    "exact": True,
                    "database": len(db.ids),
                },
            )
        starts = list(range(0, n, cfg.shard_chunks))
        return [
            Shard(i, len(starts), {"lo": lo, "hi": min(lo + cfg.shard_chunks, n)})
            for i, lo in enumerate(starts)
        ]

    @staticmethod
    def _doc_shards(reader: ChunkReader, budget: int) -> list[Shard]:
        groups: list[tuple[int, int]] = []
        for d in reader.docs():
            if groups and groups[-1][1] == d.first and d.first + d.n - groups[-1][0] <= budget:
                groups[-1] = (groups[-1][0], d.first + d.n)
            else:
                groups.append((d.first, d.first + d.n))
        return [Shard(i, len(groups), {"lo": lo, "hi": hi}) for i, (lo, hi) in enumerate(groups)]

    def _write_info(self, ctx: StageContext, info: dict[str, Any]) -> None:
        ctx.write_text(INDEX_INFO, json.dumps(info, indent=2, sort_keys=True))

    def _read_info(self, ctx: StageContext) -> dict[str, Any] | None:
        if not ctx.exists(INDEX_INFO):
            return None
        with ctx.fs.open(ctx.path(INDEX_INFO), "r") as f:
            return json.load(f)

    def _index_ready(self, ctx: StageContext) -> bool:
        """A resumed build reuses the saved index when its checksum still matches."""
        info = self._read_info(ctx)
        if not info or info.get("kind") == "flat" or not ctx.exists(INDEX_FILE):
            return False
        ok = ctx.file_entry(INDEX_FILE).sha256 == info.get("sha256")
        if ok:
            log.info("reusing the trained %s index of this partial build", info.get("factory"))
        return ok

    def _build_index(self, ctx: StageContext, db: Database, ip: IndexPlan, n_queries: int) -> None:
        faiss_module()  # a missing faiss is a ConfigError naming the extras, before any work

        cfg: Config = ctx.cfg
        dim = db.emb.shape[1]
        factory = ip.factory(dim, cfg.hnsw_m)
        gpu = ip.kind == "ivfpq" and use_faiss_gpu(cfg.device)  # faiss has no GPU HNSW
        train, tune_q, _ = _samples(cfg, n_queries, len(db.ids), ip.n_train)
        bar = progress(total=len(db.ids), desc=f"dense: adding to {factory}", unit="vec")
        index, work, t_train, t_add = build_index(
            db.emb,
            factory,
            cfg.metric,
            train_rows=train if ip.kind == "ivfpq" else None,
            hnsw_m=cfg.hnsw_m if ip.kind == "hnsw" else None,
            gpu=gpu,
            seed=cfg.seed,
            on_add=bar.update,
        )
        bar.close()
        param = "nprobe" if ip.kind == "ivfpq" else "efSearch"
        given = cfg.nprobe if ip.kind == "ivfpq" else cfg.ef_search
        t0 = time.perf_counter()
        value, curve = (given, []) if given else self._tune(ctx, work, db, ip, tune_q, param, gpu)
        t_tune = time.perf_counter() - t0
        on_gpu = work is not index
        index = to_cpu(index, work)
        with ctx.local_dir("") as root:
            write_index(index, root / INDEX_FILE)
        info = {
            "kind": ip.kind,
            "backend": "faiss",
            "factory": factory,
            "exact": False,
            "database": len(db.ids),
            "metric": cfg.metric,
            "nlist": ip.nlist,
            "pq_m": ip.pq_m,
            "hnsw_m": cfg.hnsw_m if ip.kind == "hnsw" else None,
            "ef_construction": index.hnsw.efConstruction if ip.kind == "hnsw" else None,
            "train_vectors": len(train) if ip.kind == "ivfpq" else None,
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
        self._write_info(ctx, info)
        log.info("built %s (%s=%s) in %.1f s", factory, param, value, t_train + t_add + t_tune)

    def _tune(
        self,
        ctx: StageContext,
        index: Any,
        db: Database,
        ip: IndexPlan,
        tune_q: np.ndarray,
        param: str,
        gpu: bool,
    ) -> tuple[int, list[list[float]]]:
        """The smallest nprobe/efSearch on a geometric ladder whose recall@k on the tuning queries reaches
        target_recall (the largest tried when none does)."""
        cfg: Config = ctx.cfg
        ladder = search_ladder(ip.kind, ip.nlist, gpu)
        if not len(tune_q):
            return ladder[-1], []
        exact, _ = self._exact(ctx, db, tune_q)
        value, curve = tune_search_param(
            index,
            param,
            ladder,
            _embeddings_at(ctx, tune_q),
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

    def _exact(self, ctx: StageContext, db: Database, q_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact corpus-scope neighbors (database positions, scores) of the given query chunk ids."""
        cfg: Config = ctx.cfg
        device = _torch_device(cfg.device)
        reader = ChunkReader(ctx.inputs["chunks"])
        lo, hi = own_doc_ranges(reader, db, q_ids)
        dbt = _db_tensor(ctx, db, device)
        return exact_corpus_search(_embeddings_at(ctx, q_ids), dbt, cfg.k, lo, hi, cfg.metric, device)

    # ---- shards
    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        lo, hi = int(shard.payload["lo"]), int(shard.payload["hi"])
        import torch  # noqa: F401  (imported before the clock starts: search_s is search time)

        t0 = time.perf_counter()
        if cfg.scope == "document-causal":
            ids, scores, extra = self._causal_shard(ctx, lo, hi)
        else:
            ids, scores, extra = self._corpus_shard(ctx, lo, hi)
        ctx.write_parquet(
            f"part-{shard.name}.parquet",
            neighbor_table(np.arange(lo, hi), ids, scores),
            schema=neighbor_schema(cfg.k),
        )
        return {**neighbor_counts(ids, cfg.k), "search_s": time.perf_counter() - t0, **extra}

    def _causal_shard(
        self, ctx: StageContext, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        import torch

        cfg: Config = ctx.cfg
        device = _torch_device(cfg.device)
        emb_np = _embeddings(ctx, lo, hi)
        emb = torch.from_numpy(emb_np).to(device)
        out_ids = np.full((hi - lo, cfg.k), NEIGHBOR_PAD, np.int64)
        out_sc = np.full((hi - lo, cfg.k), np.nan, np.float32)
        docs = [d for d in ChunkReader(ctx.inputs["chunks"]).docs() if lo <= d.first < hi]
        for d in progress(docs, desc=f"dense causal {lo}..{hi}", unit="doc"):
            a, b = d.first - lo, d.first - lo + d.n
            p, s = causal_document_search(emb[a:b], cfg.k, cfg.exclude_recent, cfg.metric)
            out_ids[a:b] = np.where(p >= 0, p + d.first, NEIGHBOR_PAD)
            out_sc[a:b] = s
        rel, out_sc = exact_rescore(
            emb_np, emb_np, np.where(out_ids >= 0, out_ids - lo, NEIGHBOR_PAD), cfg.metric
        )
        out_ids = np.where(rel >= 0, rel + lo, NEIGHBOR_PAD)
        return out_ids, out_sc, {"docs": len(docs)}

    def _corpus_shard(
        self, ctx: StageContext, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        cfg: Config = ctx.cfg
        db = load_database(ctx)
        reader = ChunkReader(ctx.inputs["chunks"])
        q = _embeddings(ctx, lo, hi)
        q_ids = np.arange(lo, hi)
        info = self._read_info(ctx) or {}
        pos = np.full((hi - lo, cfg.k), NEIGHBOR_PAD, np.int64)
        sc = np.full((hi - lo, cfg.k), -np.inf, np.float32)
        extra: dict[str, Any] = {}
        if info.get("kind") == "flat" and info.get("backend") == "torch":
            device = _torch_device(cfg.device)
            own_lo, own_hi = own_doc_ranges(reader, db, q_ids)
            bar = progress(total=len(q), desc=f"dense exact {lo}..{hi}", unit="query")
            pos, sc = exact_corpus_search(
                q,
                _db_tensor(ctx, db, device),
                cfg.k,
                own_lo,
                own_hi,
                cfg.metric,
                device,
                on_progress=bar.update,
            )
            bar.close()
        else:
            index, gpu = self._search_index(ctx, db, info)
            q_doc = reader.chunk_doc[lo:hi]
            fetch = cfg.k + cfg.overfetch
            refetched = 0
            for s in progress(
                range(0, hi - lo, cfg.batch_size),
                desc=f"dense {info.get('factory')} {lo}..{hi}",
                unit="batch",
            ):
                e = min(hi - lo, s + cfg.batch_size)
                pos[s:e], sc[s:e], st = faiss_search(
                    index,
                    q[s:e],
                    cfg.k,
                    fetch,
                    q_doc[s:e],
                    db.doc,
                    db.emb,
                    cfg.metric,
                    GPU_MAX_K if gpu else len(db.ids),
                )
                refetched += st["refetched_rows"]
            extra["refetched_rows"] = refetched
        pos, sc = exact_rescore(q, db.emb, pos, cfg.metric)
        return db.chunk_ids(pos), sc, extra

    def _search_index(self, ctx: StageContext, db: Database, info: dict[str, Any]) -> tuple[Any, bool]:
        """The shard's faiss index, loaded once per process: the saved one, or an IndexFlat over the database."""
        faiss = faiss_module()

        cfg: Config = ctx.cfg
        gpu = info.get("kind") != "hnsw" and use_faiss_gpu(cfg.device)  # faiss has no GPU HNSW

        def make() -> Any:
            if info.get("kind") == "flat":
                index = faiss.index_factory(db.emb.shape[1], "Flat", faiss_metric(cfg.metric))
                index.add(db.emb)
            else:
                index = faiss.read_index(_local_file(ctx, INDEX_FILE))
            if gpu:
                index = to_gpu(index)
            if info.get("search_param"):
                set_search_param(index, info["search_param"], info["search_value"])
            return index

        key = ("index", ctx.workdir, str(info.get("sha256")), cfg.metric, str(gpu))
        return _cached(ctx, key, make), gpu

    # ---- finalize: stats and recall of what was written
    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        stats = merge_stats(r.stats for r in results)
        rows = stats.get("rows", 0)
        stats.update(neighbor_rates(stats))
        secs = stats.get("search_s", 0.0)
        stats["queries_per_s"] = round(rows / secs, 1) if secs else None
        if cfg.scope == "corpus":
            stats.update(self._recall(ctx))
        return stats

    def _recall(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        db = load_database(ctx)
        info = self._read_info(ctx) or {}
        reader = ChunkReader(ctx.inputs["chunks"])
        _, _, held_out = _samples(cfg, reader.n_chunks, len(db.ids), info.get("train_vectors") or 0)
        if not len(held_out):
            return {"recall_at_k": None, "recall_queries": 0}
        t0 = time.perf_counter()
        exact, _ = self._exact(ctx, db, held_out)
        r = recall(_written_neighbors(ctx, held_out), db.chunk_ids(exact))
        log.info(
            "recall@%d of the written table against exact search on %d held-out queries: %.4f",
            cfg.k,
            len(held_out),
            r,
        )
        return {
            "recall_at_k": round(r, 6),
            "recall_k": cfg.k,
            "recall_queries": len(held_out),
            "recall_s": round(time.perf_counter() - t0, 3),
        }

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        emb_meta = ctx.inputs["embeddings"].meta
        causal = cfg.scope == "document-causal"
        out: dict[str, Any] = {  # source, scope, query, k, exclude_recent: the same keys as bm25's
            "source": "dense",
            "scope": cfg.scope,
            "query": "chunk",
            "k": cfg.k,
            "exclude_recent": cfg.exclude_recent if causal else None,
            "metric": cfg.metric,
            "score": "inner product" if cfg.metric == "ip" else "negative squared L2 distance",
            "encoder": (emb_meta.get("encoder") or {}).get("name"),
            "normalized": emb_meta.get("normalize"),
        }
        if causal:
            out["index"] = {"kind": "exact-per-document", "exact": True}
        else:
            info = self._read_info(ctx) or {}
            out.update(
                index={k: v for k, v in info.items() if k != "sha256"},
                overfetch=cfg.overfetch,
                database="train split",
            )
        return out


# ----------------------------------------------------------------------------------------- helpers


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dense.device=cuda but torch sees no CUDA device; use dense.device: auto or cpu")
    return device


def _db_tensor(ctx: StageContext, db: Database, device: str) -> Any:
    import torch

    return _cached(
        ctx, ("dbt", ctx.inputs["chunks"].version, device), lambda: torch.from_numpy(db.emb).to(device)
    )


def _embeddings_at(ctx: StageContext, q_ids: np.ndarray) -> np.ndarray:
    """float32 embeddings of arbitrary chunk ids (a sample)."""
    art = ctx.inputs["embeddings"]
    t = art.read(
        columns=["chunk_id", "embedding"], filter=pc.field("chunk_id").isin(pa.array(q_ids, pa.int64()))
    )
    dim = t.schema.field("embedding").type.list_size
    ids = t.column("chunk_id").to_numpy()
    emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    order = np.argsort(ids)
    if not np.array_equal(ids[order], q_ids):
        raise InputError(f"{art.ref} lacks embeddings of some sampled chunk ids; rebuild it")
    return emb[order].astype(np.float32)


def _written_neighbors(ctx: StageContext, q_ids: np.ndarray) -> np.ndarray:
    """The neighbor ids this build wrote for the given query chunk ids (read back from the parts)."""
    import pyarrow.dataset as pads

    parts = sorted(
        p for p in ctx.fs.ls(ctx.workdir, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")
    )
    t = pads.dataset(parts, format="parquet", filesystem=ctx.fs).to_table(
        columns=["chunk_id", "neighbor_ids"], filter=pc.field("chunk_id").isin(pa.array(q_ids, pa.int64()))
    )
    k = t.schema.field("neighbor_ids").type.list_size
    ids = t.column("chunk_id").to_numpy()
    nb = t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
    return nb[np.argsort(ids)]


def _local_file(ctx: StageContext, name: str) -> str:
    """A local path of a file in this build's folder (downloaded to a temporary file on remote stores)."""
    if ctx.store.is_local:
        return ctx.path(name)
    import tempfile

    tmp = os.path.join(tempfile.mkdtemp(prefix="rpt-dense-"), name)
    ctx.fs.get(ctx.path(name), tmp)
    return tmp


STAGE = DenseStage()

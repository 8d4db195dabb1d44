"""The `dense:` section of a run config (docs/dense.md lists every key), and the names of the index files
a corpus-scope build keeps in its folder."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.devices import DeviceSetting

INDEX_FILE = "index.faiss"  # the trained faiss index (approximate search), published with the table
INDEX_INFO = "index.json"  # what was built: kind, factory, search parameter, tuning curve, checksum


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
    device: DeviceSetting = Field("auto", description="auto: GPU when torch/faiss see one")
    batch_size: int = Field(4096, ge=1, description="queries per search call")
    shard_chunks: int = Field(65536, ge=1, description="query chunks per shard (unit of resume)")
    db_shard_chunks: int = Field(
        0,
        ge=0,
        description="corpus: > 0 cuts the database into shards of this many chunks, each (query group, "
        "database shard) pair a task whose memory is bounded by its shard (stages.dense.sharded); 0: the "
        "whole database in every worker",
    )
    query_splits: list[str] | None = Field(
        None, description="corpus, sharded: only chunks of these splits are queries (rows); None: every chunk"
    )

    UNHASHED = frozenset({"backend", "device", "batch_size", "shard_chunks", "db_shard_chunks"})

    def hashed_dict(self) -> dict[str, Any]:
        d = super().hashed_dict()
        if d.get("query_splits") is None:  # every chunk: the versions from before the setting
            d.pop("query_splits")
        return d

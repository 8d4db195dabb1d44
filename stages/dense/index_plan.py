"""What a corpus-scope build searches with, decided before any work: the index kind and search backend
(`plan_index`, which refuses settings faiss cannot train), the seeded samples (training rows, tuning and
held-out queries), and faiss itself: a missing faiss or GPU becomes a ConfigError that names the settings
to change (the search is `retrieval.faiss_index`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.devices import resolve_device
from pipeline.errors import ConfigError
from retrieval.faiss_index import default_pq_m
from stages.dense.config import Config

# ----------------------------------------------------------------------------------------- faiss


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


def faiss_gpu(device: str) -> int | None:
    """The GPU faiss runs on: this worker's (`pipeline.devices`), None for the CPU."""
    if device == "cpu":
        return None
    faiss = faiss_module()

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device.startswith("cuda") and n == 0:
        raise ConfigError(
            f"dense.device={device} but faiss sees no GPU (install the `gpu` extra: faiss-gpu==1.15.1) "
            "or use dense.backend: torch for exact search on the GPU"
        )
    if n == 0:
        return None
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    dev = resolve_device("auto")  # faiss numbers the GPUs as torch does; without torch's CUDA: GPU 0
    return dev.index if dev.type == "cuda" else 0


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


def samples(
    cfg: Config, n_queries: int, n_db: int, n_train: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded samples: training rows of the database, and two disjoint sets of query chunk ids, one to
    tune nprobe/efSearch on and one held out to measure recall on."""
    rng = np.random.default_rng(cfg.seed)
    train = np.sort(rng.choice(n_db, size=n_train, replace=False)) if n_train else np.zeros(0, np.int64)
    queries = rng.permutation(n_queries)
    m = min(cfg.recall_sample, n_queries // 2)
    return train, np.sort(queries[:m]), np.sort(queries[m : 2 * m])

"""The artifact contract in code: file names, Arrow schemas and readers that several stages share.

Stages never import each other; what one stage writes and another reads is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import ArtifactError
from pipeline.store import Artifact

# ------------------------------------------------------------------------------ documents
DOCUMENTS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("doc_idx", pa.int64()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("n_chars", pa.int64()),
    ]
)
SPLITS = ("train", "valid", "test")

# ------------------------------------------------------------------------------ tokenizer
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(art: Artifact | str | Path) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer artifact or a tokenizer.json path."""
    from tokenizers import Tokenizer

    path = art.local_path(TOKENIZER_FILE) if isinstance(art, Artifact) else Path(art)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers error names no file
        raise ArtifactError(f"{path}: cannot be loaded as a tokenizer.json ({e})") from e
    # documents are tokenized whole: a truncation or padding setting (fixed-length model exports carry
    # them) would cut and pad them without a word; the tokenizer stage also removes them when adopting
    tok.no_truncation()
    tok.no_padding()
    return tok


# ------------------------------------------------------------------------------ chunks
DOC_INDEX = "doc_index.parquet"
TOKENS_NPY = "tokens.npy"
TOKEN_PAD = -1

CHUNKS_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.int64()),
        ("doc_idx", pa.int64()),
        ("split", pa.string()),
        ("chunk_idx", pa.int32()),
        ("tokens", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("text", pa.string()),
    ]
)
DOC_INDEX_SCHEMA = pa.schema(
    [
        ("doc_idx", pa.int64()),
        ("split", pa.string()),
        ("first_chunk_id", pa.int64()),
        ("n_chunks", pa.int64()),
        ("n_tokens", pa.int64()),
    ]
)


@dataclass
class DocSpan:
    doc_idx: int
    split: str
    first: int  # chunk_id of the document's chunk 0
    n: int  # number of chunks

    @property
    def chunk_ids(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.n, dtype=np.int64)


class ChunkReader:
    """Random access to a chunks artifact: chunk ids are dense, documents are contiguous ranges."""

    def __init__(self, art: Artifact):
        self.art = art
        self.chunk_len: int = int(art.manifest.config["chunk_len"])

    @cached_property
    def tokens(self) -> np.ndarray:
        """int32 [n_chunks, chunk_len], -1 padded; memory-mapped."""
        return np.load(self.art.local_path(TOKENS_NPY), mmap_mode="r")

    @cached_property
    def doc_index(self) -> pa.Table:
        return self.art.read_file(DOC_INDEX)

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        t = self.doc_index
        return {
            "doc_idx": t.column("doc_idx").to_numpy(),
            "first": t.column("first_chunk_id").to_numpy(),
            "n": t.column("n_chunks").to_numpy(),
            "split": np.asarray(t.column("split").to_pylist(), dtype=object),
        }

    @property
    def n_chunks(self) -> int:
        return int(self.tokens.shape[0])

    def docs(self, split: str | None = None) -> list[DocSpan]:
        a = self._arrays
        return [
            DocSpan(int(d), str(s), int(f), int(n))
            for d, s, f, n in zip(a["doc_idx"], a["split"], a["first"], a["n"])
            if split is None or s == split
        ]

    @cached_property
    def chunk_doc(self) -> np.ndarray:
        """doc_idx of every chunk (int64 [n_chunks])."""
        a = self._arrays
        return np.repeat(a["doc_idx"], a["n"])

    @cached_property
    def chunk_pos(self) -> np.ndarray:
        """chunk_idx (position within its document) of every chunk."""
        a = self._arrays
        starts = np.repeat(a["first"], a["n"])
        return np.arange(len(starts), dtype=np.int64) - starts

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        return (self.tokens[ids] != TOKEN_PAD).sum(-1)

    def texts(self, ids: list[int] | np.ndarray) -> list[str]:
        """Texts of the given chunk ids (reads only the needed row groups via a filter)."""
        import pyarrow.compute as pc

        ids = np.asarray(ids, dtype=np.int64)
        t = self.art.read(columns=["chunk_id", "text"], filter=pc.field("chunk_id").isin(pa.array(ids)))
        lookup = dict(zip(t.column("chunk_id").to_pylist(), t.column("text").to_pylist()))
        return [lookup[int(i)] for i in ids]


# ------------------------------------------------------------------------------ neighbor tables (bm25, dense)
NEIGHBOR_PAD = -1


def neighbor_schema(k: int) -> pa.Schema:
    """Shared by bm25 and dense tables: one row per query chunk, k neighbors, -1 padded at the tail."""
    return pa.schema(
        [
            ("chunk_id", pa.int64()),
            ("neighbor_ids", pa.list_(pa.int64(), k)),
            ("neighbor_scores", pa.list_(pa.float32(), k)),
        ]
    )


def build_neighbor_table(chunk_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """Build a neighbor table from int64 [n] query ids, int64 [n, k] neighbor ids and float [n, k] scores.
    Padded slots must hold id -1; their score is stored as NaN."""
    _n, k = ids.shape
    scores = np.where(ids == NEIGHBOR_PAD, np.nan, scores).astype(np.float32)
    return pa.table(
        {
            "chunk_id": pa.array(np.asarray(chunk_ids, dtype=np.int64)),
            "neighbor_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int64).ravel()), k),
            "neighbor_scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), k),
        },
        schema=neighbor_schema(k),
    )


def read_neighbors(art: Artifact) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query chunk ids [n], neighbor ids [n, k], scores [n, k]) of a bm25/dense artifact."""
    t = art.read(columns=["chunk_id", "neighbor_ids", "neighbor_scores"])
    k = t.schema.field("neighbor_ids").type.list_size
    q = t.column("chunk_id").to_numpy()
    ids = t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
    sc = t.column("neighbor_scores").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    return q, ids, sc


def neighbor_counts(ids: np.ndarray, k: int) -> dict[str, int]:
    """Slot counts of neighbor ids [n, k] (-1 padded), to sum over shards (pipeline.stage.merge_stats):
    rows, full_rows (all k filled), valid_neighbors (filled slots), empty_rows (none filled)."""
    valid = (ids != NEIGHBOR_PAD).sum(1)
    return {
        "rows": len(ids),
        "full_rows": int((valid == k).sum()),
        "valid_neighbors": int(valid.sum()),
        "empty_rows": int((valid == 0).sum()),
    }


def neighbor_rates(counts: dict[str, Any]) -> dict[str, float | None]:
    """fill_rate (rows with all k filled) and mean_valid_neighbors (per row) of summed neighbor_counts."""
    rows = counts.get("rows", 0)
    return {
        "fill_rate": round(counts.get("full_rows", 0) / rows, 6) if rows else None,
        "mean_valid_neighbors": round(counts.get("valid_neighbors", 0) / rows, 4) if rows else None,
    }


def causal_retrievable(
    query_pos: int | np.ndarray, cand_pos: int | np.ndarray, exclude_recent: int, example_chunks: int = 0
) -> Any:
    """The document-causal rule shared by bm25, dense, the model's retriever and the data layer:
    chunk i (position in its document) may retrieve chunk j of the same document iff
    j <= i - 1 - exclude_recent (the chunks it already sees through attention are not retrievable),
    and, with example_chunks = L > 0, j lies in i's example: j // L == i // L (stages.supervision_table)."""
    q, c = np.asarray(query_pos), np.asarray(cand_pos)
    ok = c <= q - 1 - exclude_recent
    if example_chunks > 0:
        ok = ok & (c // example_chunks == q // example_chunks)
    return ok


# ------------------------------------------------------------------------------ embeddings
def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([("chunk_id", pa.int64()), ("embedding", pa.list_(pa.float16(), dim))])


def read_embeddings(
    art: Artifact, lo: int | None = None, hi: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(chunk ids [n], float16 embeddings [n, d]) of an embeddings artifact, optionally only the
    chunk ids in [lo, hi) (row groups outside the range are skipped by their statistics)."""
    import pyarrow.compute as pc

    flt = None
    if lo is not None:
        flt = pc.field("chunk_id") >= lo
    if hi is not None:
        upper = pc.field("chunk_id") < hi
        flt = upper if flt is None else flt & upper
    t = art.read(columns=["chunk_id", "embedding"], filter=flt)
    dim = t.schema.field("embedding").type.list_size
    ids = t.column("chunk_id").to_numpy()
    if t.num_rows == 0:
        return ids.astype(np.int64), np.zeros((0, dim), np.float16)
    emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    order = np.argsort(ids, kind="stable")
    if len(ids) and np.any(order != np.arange(len(ids))):
        ids, emb = ids[order], emb[order]
    return ids, emb


# ------------------------------------------------------------------------------ scores
SCORES_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.int64()),  # the query c_i; the target is c_{i+1}
        ("candidate_ids", pa.list_(pa.int64())),
        ("logp_candidate", pa.list_(pa.float32())),
        ("logp_local", pa.float32()),
        ("delta", pa.list_(pa.float32())),
    ]
)


# ------------------------------------------------------------------------------ evaluate
# metrics.parquet of an evaluate artifact: one row per table x model x setting x neighbors x metric.
#   table      perplexity | retrieval | overlap | training
#   model      a train variant (perplexity, training) or a retriever: bm25, dense, rpt_lex, rpt_sem, gold
#   setting    perplexity: none | empty | bm25 | retriever | oracle (the neighbor source); retrieval: gold (what it is
#              measured against); overlap: top-1; training: final
#   neighbors  neighbors per chunk at inference (perplexity; 0 without retrieval), null elsewhere
#   count      what the value averages over: test tokens (perplexity) or query chunks (retrieval, overlap)
EVAL_METRICS_SCHEMA = pa.schema(
    [
        ("table", pa.string()),
        ("model", pa.string()),
        ("setting", pa.string()),
        ("neighbors", pa.int32()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("count", pa.int64()),
    ]
)
# ------------------------------------------------------------------------------ reference (scoring LM)
REFERENCE_MODEL_DIR = "model"  # a Hugging Face causal-LM folder (safetensors) with its tokenizer.json
# Files of a Hugging Face causal-LM folder that decide its outputs (weights, architecture, tokenizer): what
# a given model folder's content digest covers (reference.path, retrofit.base_path).
CAUSAL_LM_FILES = (
    "*.safetensors",
    "*.bin",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def causal_lm_digest(path: str | Path, setting: str) -> str:
    """The content digest of a given Hugging Face causal-LM folder (what enters a version instead of its
    path); `setting` names the config key in the error when the folder is not a model folder."""
    from pipeline.errors import ConfigError
    from pipeline.versioning import tree_digest

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{setting}: {path} is not a Hugging Face model folder (no config.json)")
    return tree_digest(p, CAUSAL_LM_FILES)


def tokenizer_identity(spec: str | dict[str, Any]) -> dict[str, Any]:
    """The parts of a tokenizer.json (its text or parsed dict) that decide which ids a text gets:
    vocabulary, merges, special tokens, normalizer, pre-tokenizer (not padding/truncation/decoder)."""
    import json

    if isinstance(spec, str):
        spec = json.loads(spec)
    return {
        "model": spec.get("model"),
        "added_tokens": sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or []),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
    }


def same_tokenizer(a: str | Path, b: str | Path) -> bool:
    """True when two tokenizer.json files map every text to the same ids."""
    read = lambda p: Path(p).read_text(encoding="utf-8")  # noqa: E731
    return tokenizer_identity(read(a)) == tokenizer_identity(read(b))

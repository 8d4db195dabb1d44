"""Stage `chunks`: tokenize documents and cut each into fixed-length chunks, one row per chunk.

Chunk texts are cut from the document at the tokens' character offsets, so the texts of a
document's chunks concatenate to exactly its text (a multi-byte character split between two
tokens goes to the chunk holding its first token boundary). Beside the Parquet parts:
`doc_index.parquet` (first chunk id and chunk count per document) and `tokens.npy`, an int32
[n_chunks, chunk_len] array padded with -1, memory-mappable for training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.formats import CHUNKS_SCHEMA, DOC_INDEX, DOC_INDEX_SCHEMA, TOKEN_PAD, TOKENS_NPY, load_tokenizer
from pipeline.parquet import coalesce, iter_row_groups
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats

log = logging.getLogger("rpt.chunks")

SCHEMA = CHUNKS_SCHEMA
PAD = TOKEN_PAD


class Config(StageConfig):
    chunk_len: int = Field(64, ge=1, le=4096, description="tokens per chunk (the paper: 64)")
    batch_docs: int = Field(
        8, ge=1, description="documents per tokenizer batch (parallel within a batch; memory grows with it)"
    )

    UNHASHED = frozenset({"batch_docs"})


def chunk_document(
    ids: list[int],
    offsets: list[tuple[int, int]],
    text: str,
    chunk_len: int,
) -> tuple[np.ndarray, list[str]]:
    """Split one document's token ids into chunks; returns (ids as int32, chunk texts)."""
    arr = np.asarray(ids, dtype=np.int32)
    n_chunks = -(-len(arr) // chunk_len)
    # character offset where each chunk starts (monotone, so the texts partition the document)
    starts = [offsets[k * chunk_len][0] for k in range(1, n_chunks)]
    bounds = np.maximum.accumulate(np.asarray([0, *starts, len(text)], dtype=np.int64)).tolist()
    return arr, [text[bounds[k] : bounds[k + 1]] for k in range(n_chunks)]


def chunk_batch(batch: pa.RecordBatch, tok: Any, chunk_len: int) -> tuple[pa.Table, dict[str, Any]]:
    """Tokenize a batch of documents (in parallel inside `tokenizers`) and chunk them."""
    texts = batch.column("text").to_pylist()
    encs = tok.encode_batch(texts, add_special_tokens=False)
    ids_l, texts_l, doc_l, split_l, pos_l, lens_l = [], [], [], [], [], []
    empty = 0
    split_chunks: dict[str, int] = {}
    for doc_idx, split, text, enc in zip(
        batch.column("doc_idx").to_pylist(), batch.column("split").to_pylist(), texts, encs
    ):
        if not enc.ids:
            empty += 1
            continue
        arr, ctexts = chunk_document(enc.ids, enc.offsets, text, chunk_len)
        n = len(ctexts)
        ids_l.append(arr)
        texts_l.extend(ctexts)
        doc_l.append(np.full(n, doc_idx, np.int64))
        split_l.extend([split] * n)
        pos_l.append(np.arange(n, dtype=np.int32))
        lens = np.full(n, chunk_len, np.int32)
        lens[-1] = len(arr) - chunk_len * (n - 1)
        lens_l.append(lens)
        split_chunks[split] = split_chunks.get(split, 0) + n
    flat = np.concatenate(ids_l) if ids_l else np.zeros(0, np.int32)
    lens = np.concatenate(lens_l) if lens_l else np.zeros(0, np.int32)
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    table = pa.table(
        {
            "chunk_id": pa.array(np.zeros(len(lens), np.int64)),  # set by the caller
            "doc_idx": pa.array(np.concatenate(doc_l) if doc_l else np.zeros(0, np.int64)),
            "split": pa.array(split_l, pa.string()),
            "chunk_idx": pa.array(np.concatenate(pos_l) if pos_l else np.zeros(0, np.int32)),
            "tokens": pa.ListArray.from_arrays(pa.array(offs), pa.array(flat)),
            "n_tokens": pa.array(lens),
            "text": pa.array(texts_l, pa.string()),
        },
        schema=SCHEMA,
    )
    stats = {
        "docs": batch.num_rows,
        "empty_docs": empty,
        "chunks": len(lens),
        "tokens": int(lens.sum()),
        "short_chunks": int((lens < chunk_len).sum()),
        "split_chunks": split_chunks,
    }
    return table, stats


class ChunksStage(Stage):
    name = "chunks"
    version = 1
    Config = Config
    description = "tokenize documents and cut them into fixed-length chunks"
    preferred_runner = "serial"  # the tokenizer already uses every core within a batch

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"documents": InputRef("documents"), "tokenizer": InputRef("tokenizer")}

    def plan(self, ctx: StageContext) -> list[Shard]:
        parts = [p.rsplit("/", 1)[-1] for p in ctx.inputs["documents"].parts()]
        return [Shard(i, len(parts), {"part": p}) for i, p in enumerate(parts)]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        tok = load_tokenizer(ctx.inputs["tokenizer"])
        docs = ctx.inputs["documents"]
        t0 = time.perf_counter()
        stats: list[dict[str, Any]] = []

        def tables() -> Any:  # streamed: memory is bounded by one batch of documents
            n = 0
            with docs.fs.open(docs.file(shard.payload["part"]), "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(
                    batch_size=cfg.batch_docs, columns=["doc_idx", "split", "text"]
                ):
                    t, st = chunk_batch(batch, tok, cfg.chunk_len)
                    t = t.set_column(0, "chunk_id", pa.array(np.arange(n, n + t.num_rows, dtype=np.int64)))
                    n += t.num_rows
                    stats.append(st)
                    yield t

        # chunk ids are shard-local here; finalize offsets them into global, dense ids
        ctx.write_parquet(f"_local/chunks-{shard.name}.parquet", tables(), schema=SCHEMA)
        out = merge_stats(stats)
        out["tokenize_s"] = time.perf_counter() - t0
        return out

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        L = cfg.chunk_len
        total = sum(r.stats["chunks"] for r in results)
        index_rows: dict[str, list[Any]] = {n: [] for n in DOC_INDEX_SCHEMA.names}
        offset = 0
        with ctx.local_dir("") as root:
            tokens = np.lib.format.open_memmap(root / TOKENS_NPY, mode="w+", dtype=np.int32, shape=(total, L))

            def renumbered(local: str, base: int, tokens: np.ndarray = tokens) -> Iterator[pa.Table]:
                # one row group in memory at a time: shard-local chunk ids 0..n-1 become base..base+n-1
                nonlocal offset
                for t in iter_row_groups(ctx.path(local), ctx.fs):
                    t = t.set_column(0, "chunk_id", pc.add(t.column("chunk_id"), pa.scalar(base, pa.int64())))
                    add_rows(t, tokens)
                    offset += t.num_rows
                    yield t

            def add_rows(t: pa.Table, tokens: np.ndarray) -> None:
                # fixed-width export for training
                lens = t.column("n_tokens").to_numpy()
                flat = pc.list_flatten(t.column("tokens")).to_numpy()
                block = np.full((t.num_rows, L), PAD, dtype=np.int32)
                mask = np.arange(L)[None, :] < lens[:, None]
                block[mask] = flat
                tokens[offset : offset + t.num_rows] = block
                # per-document index; a document may continue from the previous row group
                doc = t.column("doc_idx").to_numpy()
                if not len(doc):
                    return
                starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
                ends = np.r_[starts[1:], len(doc)]
                splits = t.column("split").to_pylist()
                csum = np.r_[0, np.cumsum(lens)]
                for s, e in zip(starts, ends):
                    if s == 0 and index_rows["doc_idx"] and index_rows["doc_idx"][-1] == int(doc[0]):
                        index_rows["n_chunks"][-1] += int(e)
                        index_rows["n_tokens"][-1] += int(csum[e])
                        continue
                    index_rows["doc_idx"].append(int(doc[s]))
                    index_rows["split"].append(splits[s])
                    index_rows["first_chunk_id"].append(offset + int(s))
                    index_rows["n_chunks"].append(int(e - s))
                    index_rows["n_tokens"].append(int(csum[e] - csum[s]))

            for r in results:
                local = f"_local/chunks-{r.index:05d}.parquet"
                ctx.write_parquet(
                    f"part-{r.index:05d}.parquet", coalesce(renumbered(local, offset)), schema=SCHEMA
                )
            tokens.flush()
            del tokens
        ctx.fs.rm(ctx.path("_local"), recursive=True)
        ctx.write_parquet(DOC_INDEX, pa.table(index_rows, schema=DOC_INDEX_SCHEMA), schema=DOC_INDEX_SCHEMA)
        stats = merge_stats(r.stats for r in results)
        tok_s = stats.pop("tokenize_s", 0.0)
        stats["tokens_per_s"] = round(stats["tokens"] / tok_s, 1) if tok_s else None
        stats["chunk_len"] = L
        # token slots of tokens.npy that hold a token (only documents' last chunks are short)
        stats["fill_rate"] = (
            round(stats["tokens"] / (stats["chunks"] * L), 6) if stats.get("chunks") else None
        )
        return stats

    def output_schema(self) -> pa.Schema:
        return SCHEMA


STAGE = ChunksStage()

"""Stage `chunks`: tokenize documents and cut each into fixed-length chunks, one row per chunk.

Chunk texts are cut from the document at the tokens' character offsets, so the texts of a
document's chunks concatenate to exactly its text (a multi-byte character split between two
tokens goes to the chunk holding its first token boundary). Beside the Parquet parts:
`doc_index.parquet` (first chunk id and chunk count per document) and `tokens.npy`, an int32
[n_chunks, chunk_len] array padded with -1, memory-mappable for training.

A document longer than `piece_bytes` is encoded in pieces (`pipeline.pieces`) whose tokens are exactly
those of the whole document, and its chunks are written as the pieces come: memory is bounded by
`batch_docs` pieces, not by the longest document (encoding costs ~150 bytes per byte of text).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.formats import CHUNKS_SCHEMA, DOC_INDEX, DOC_INDEX_SCHEMA, TOKEN_PAD, TOKENS_NPY, load_tokenizer
from pipeline.parquet import coalesce, iter_row_groups
from pipeline.pieces import DocBytes, DocTokenizer, Piece, Segment, cut_pattern, plan_pieces, safe_cut_chars
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats

log = logging.getLogger("rpt.chunks")

SCHEMA = CHUNKS_SCHEMA
# a piece's encoding holds ~150 bytes per byte of text: ~40 MB, times batch_docs pieces per batch
PIECE_BYTES = 1 << 18


class Config(StageConfig):
    chunk_len: int = Field(64, ge=1, le=4096, description="tokens per chunk (the paper: 64)")
    batch_docs: int = Field(
        8,
        ge=1,
        description="documents (or pieces of long documents) per tokenizer batch (parallel within a batch; "
        "memory grows with it)",
    )
    piece_bytes: int | None = Field(
        PIECE_BYTES,
        ge=1024,
        description="encode a document longer than this (bytes of UTF-8) in pieces of about this size, so "
        "memory does not grow with the longest document; the tokens are those of the whole document. "
        "null: encode every document whole",
    )

    # neither changes a row: pieces give the whole document's tokens
    UNHASHED = frozenset({"batch_docs", "piece_bytes"})


class _Rows:
    """Chunk rows gathered between two tables."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.ids: list[np.ndarray] = []
        self.lens: list[np.ndarray] = []
        self.doc: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.split: list[str] = []
        self.text: list[str] = []

    def add(
        self, doc_idx: int, split: str, first: int, ids: np.ndarray, lens: np.ndarray, texts: list[str]
    ) -> None:
        n = len(texts)
        self.ids.append(ids)
        self.lens.append(lens)
        self.doc.append(np.full(n, doc_idx, np.int64))
        self.pos.append(np.arange(first, first + n, dtype=np.int32))
        self.split.extend([split] * n)
        self.text.extend(texts)

    def table(self) -> pa.Table:
        lens = np.concatenate(self.lens) if self.lens else np.zeros(0, np.int32)
        offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        flat = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int32)
        table = pa.table(
            {
                "chunk_id": pa.array(np.zeros(len(lens), np.int64)),  # set by the caller
                "doc_idx": pa.array(np.concatenate(self.doc) if self.doc else np.zeros(0, np.int64)),
                "split": pa.array(self.split, pa.string()),
                "chunk_idx": pa.array(np.concatenate(self.pos) if self.pos else np.zeros(0, np.int32)),
                "tokens": pa.ListArray.from_arrays(pa.array(offs), pa.array(flat)),
                "n_tokens": pa.array(lens),
                "text": pa.array(self.text, pa.string()),
            },
            schema=SCHEMA,
        )
        self.clear()
        return table


class DocChunker:
    """Cuts one document's token stream, fed as consecutive segments, into chunks of `chunk_len`.

    A chunk's text runs from its first token's start offset to the next chunk's (the running maximum,
    so texts partition the document), hence a full chunk is written once the next chunk's first token
    is known; the tokens and text after the last written chunk wait for the next segment."""

    def __init__(self, doc_idx: int, split: str, chunk_len: int, rows: _Rows):
        self.doc_idx, self.split, self.L, self.rows = doc_idx, split, chunk_len, rows
        self.pending = np.zeros(0, np.int32)  # tokens of the chunk being filled
        self.start = 0  # its text's character offset
        self.tail = ""  # text from `start` to the end of what was fed
        self.fed = 0
        self.n_chunks = 0
        self.n_tokens = 0

    def add(self, seg: Segment) -> None:
        L, lp = self.L, len(self.pending)
        text, base = self.tail + seg.text, self.start
        self.fed += len(seg.text)
        self.n_tokens += len(seg.ids)
        ids = np.concatenate([self.pending, seg.ids]) if lp else seg.ids
        m = (len(ids) - 1) // L if len(ids) else 0  # chunks whose successor's first token is here
        if m == 0:
            self.pending, self.tail = ids, text
            return
        firsts = seg.starts[np.arange(1, m + 1) * L - lp]
        bounds = np.maximum.accumulate(np.r_[self.start, np.minimum(firsts, self.fed)]).tolist()
        texts = [text[bounds[k] - base : bounds[k + 1] - base] for k in range(m)]
        self.rows.add(self.doc_idx, self.split, self.n_chunks, ids[: m * L], np.full(m, L, np.int32), texts)
        self.n_chunks += m
        self.pending = ids[m * L :].copy()  # not a view that keeps the piece's ids alive
        self.start = bounds[m]
        self.tail = text[bounds[m] - base :]

    def finish(self) -> None:
        if len(self.pending):
            n = len(self.pending)
            self.rows.add(
                self.doc_idx, self.split, self.n_chunks, self.pending, np.array([n], np.int32), [self.tail]
            )
            self.n_chunks += 1


def _doc_bytes(arr: pa.Array) -> Iterator[DocBytes]:
    """Each string of an Arrow string array as a view of its UTF-8 bytes."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    if not len(arr):
        return
    _, offsets, data = arr.buffers()
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offs = np.frombuffer(offsets, width)[arr.offset : arr.offset + len(arr) + 1]
    view = memoryview(data) if data is not None else memoryview(b"")
    for k in range(len(arr)):
        yield DocBytes(view[int(offs[k]) : int(offs[k + 1])])


def chunk_batches(
    batches: Iterable[pa.RecordBatch],
    tok: Any,
    chunk_len: int,
    piece_bytes: int | None = PIECE_BYTES,
    batch_docs: int = 8,
    stats: dict[str, Any] | None = None,
) -> Iterator[pa.Table]:
    """Tokenize and chunk documents (record batches with doc_idx, split, text), yielding chunk tables of
    at most `batch_docs` pieces' worth of chunks. `stats` (if given) is filled as they go."""
    st = stats if stats is not None else {}
    st.update(
        docs=0,
        empty_docs=0,
        chunks=0,
        tokens=0,
        short_chunks=0,
        split_chunks={},
        pieces=0,
        pieced_docs=0,
        regrown_windows=0,
    )
    pattern = cut_pattern(safe_cut_chars(tok)) if piece_bytes else None
    rows = _Rows()

    def pieces() -> Iterator[tuple[DocTokenizer, DocChunker, Piece]]:
        for batch in batches:
            docs = _doc_bytes(batch.column("text"))
            for doc_idx, split, doc in zip(
                batch.column("doc_idx").to_pylist(), batch.column("split").to_pylist(), docs
            ):
                dt = DocTokenizer(doc, tok)
                dc = DocChunker(doc_idx, split, chunk_len, rows)
                for piece in plan_pieces(doc, pattern, piece_bytes):
                    yield dt, dc, piece

    def finish(dt: DocTokenizer, dc: DocChunker) -> None:
        dc.finish()
        st["docs"] += 1
        st["pieces"] += dt.pieces
        st["pieced_docs"] += dt.pieces > 1
        st["regrown_windows"] += dt.regrown
        if not dc.n_chunks:
            st["empty_docs"] += 1
            return
        st["chunks"] += dc.n_chunks
        st["tokens"] += dc.n_tokens
        st["short_chunks"] += dc.n_tokens % chunk_len != 0
        st["split_chunks"][dc.split] = st["split_chunks"].get(dc.split, 0) + dc.n_chunks

    group: list[tuple[DocTokenizer, DocChunker, Piece, str]] = []

    def flush() -> Iterator[pa.Table]:
        encs = tok.encode_batch([g[3] for g in group], add_special_tokens=False)
        for (dt, dc, piece, text), enc in zip(group, encs):
            for seg in dt.feed(piece, text, enc):
                dc.add(seg)
            if piece.doc_end:
                finish(dt, dc)
        group.clear()
        del encs
        if rows.text:
            yield rows.table()

    for dt, dc, piece in pieces():
        group.append((dt, dc, piece, dt.doc.decode(piece.start, piece.end)))
        if len(group) >= batch_docs:
            yield from flush()
    if group:
        yield from flush()


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
        stats: dict[str, Any] = {}

        def tables() -> Iterator[pa.Table]:  # streamed: memory is bounded by one batch of pieces
            n = 0
            with docs.fs.open(docs.file(shard.payload["part"]), "rb") as f:
                batches = pq.ParquetFile(f).iter_batches(
                    batch_size=cfg.batch_docs, columns=["doc_idx", "split", "text"]
                )
                for t in chunk_batches(batches, tok, cfg.chunk_len, cfg.piece_bytes, cfg.batch_docs, stats):
                    t = t.set_column(0, "chunk_id", pa.array(np.arange(n, n + t.num_rows, dtype=np.int64)))
                    n += t.num_rows
                    yield t

        # chunk ids are shard-local here; finalize offsets them into global, dense ids
        ctx.write_parquet(f"_local/chunks-{shard.name}.parquet", tables(), schema=SCHEMA)
        stats["tokenize_s"] = time.perf_counter() - t0
        return stats

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
                block = np.full((t.num_rows, L), TOKEN_PAD, dtype=np.int32)
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

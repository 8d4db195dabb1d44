"""Parquet conventions of the artifact contract: zstd, row groups of tens of MB, atomic writes, checksums."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import FileEntry
from pipeline.versioning import sha256_file

TARGET_ROW_GROUP_BYTES = 48 << 20
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3


def _row_group_rows(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 1024
    per_row = max(1, table.nbytes // table.num_rows)
    return int(max(1024, TARGET_ROW_GROUP_BYTES // per_row))


def iter_row_groups(path: str, fs: Any) -> Iterator[pa.Table]:
    """The row groups of one Parquet file, one in memory at a time."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg)


def coalesce(tables: Iterable[pa.Table], target_bytes: int = TARGET_ROW_GROUP_BYTES) -> Iterator[pa.Table]:
    """Join consecutive small tables into ones of about `target_bytes` (one row group each), so a
    stream of small batches still gets the contract's row groups of tens of MB, in bounded memory."""
    buf: list[pa.Table] = []
    size = 0
    for t in tables:
        buf.append(t)
        size += t.nbytes
        if size >= target_bytes:
            yield pa.concat_tables(buf).combine_chunks()
            buf, size = [], 0
    if buf:
        yield pa.concat_tables(buf).combine_chunks()


def write_parquet(
    data: pa.Table | Iterable[pa.RecordBatch | pa.Table],
    path: str,
    fs: Any,
    schema: pa.Schema | None = None,
    relpath: str | None = None,
) -> FileEntry:
    """Write `data` to `path` atomically (temp name + rename) and return its FileEntry.

    A crash mid-write leaves only a `*.tmp-*` file, which no reader or resume check trusts.
    """
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rows = 0
    writer: pq.ParquetWriter | None = None
    tables = [data] if isinstance(data, pa.Table) else data
    try:
        with fs.open(tmp, "wb") as f:
            for t in tables:
                if isinstance(t, pa.RecordBatch):
                    t = pa.Table.from_batches([t])
                if schema is not None and t.schema != schema:
                    t = (
                        t.cast(schema)
                        if t.schema.names == schema.names
                        else t.select(schema.names).cast(schema)
                    )
                if writer is None:
                    writer = pq.ParquetWriter(
                        f, schema or t.schema, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL
                    )
                writer.write_table(t, row_group_size=_row_group_rows(t))
                rows += t.num_rows
            if writer is None:  # no data at all: still a valid, empty file with the schema
                if schema is None:
                    raise ValueError(f"cannot write {path}: no data and no schema")
                writer = pq.ParquetWriter(
                    f, schema, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL
                )
            writer.close()
        fs.mv(tmp, path)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return FileEntry(
        path=relpath or os.path.basename(path), bytes=fs.size(path), sha256=sha256_file(path, fs), rows=rows
    )


def parquet_rows(path: str, fs: Any) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def parquet_schema(path: str, fs: Any) -> pa.Schema:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def parquet_bytes(table: pa.Table) -> bytes:
    """A small table as the bytes of a zstd Parquet file (metrics written into checkpoints and artifacts)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()

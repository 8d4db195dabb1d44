"""Streaming readers of corpus files (.txt(.gz), .jsonl(.gz), .parquet): one document (or one bad record,
as a Skip) at a time, so memory is bounded by the largest document.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError
from stages.documents.decoding import (
    UnknownEncoding,
    bom_encoding,
    decode,
    decode_as,
    looks_binary,
    normalize_newlines,
)
from stages.documents.discovery import SUPPORTED, InputFile
from stages.documents.gutenberg import strip_gutenberg


@dataclass
class RawDoc:
    doc_id: str
    source: str
    title: str
    text: str
    encoding: str = "utf-8"
    gutenberg: bool = False  # a Gutenberg header was found and stripped


class Skip(Exception):
    """A recoverable bad record; the caller raises or counts it according to documents.on_error."""

    def __init__(self, reason: str, message: str, path: str, line: int | None = None):
        super().__init__(message)
        self.reason, self.path, self.line = reason, path, line

    def as_error(self) -> InputError:
        return InputError(
            str(self) + " (set documents.on_error=skip to skip and count such input)",
            path=self.path,
            line=self.line,
        )


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise Skip("unreadable", f"cannot read file: {e}", path) from None


def read_text_file(f: InputFile, strip: bool) -> RawDoc:
    data = _read_bytes(f.path)
    if not data.strip():
        raise Skip("empty", "file is empty", f.path)
    if bom_encoding(data) is None and looks_binary(data):
        raise Skip(
            "binary",
            "file looks binary (NUL or control bytes), not text (UTF-16/32 text needs a byte-order mark, "
            "or convert it to UTF-8)",
            f.path,
        )
    try:
        text, enc = decode(data)
    except UnknownEncoding as e:
        raise Skip("encoding", str(e), f.path) from None
    text = normalize_newlines(text)
    title = None
    had = False
    if strip:
        s = strip_gutenberg(text)
        text, title, had = s.text, s.title, s.had_header
    stem = Path(f.rel).name
    for ext in SUPPORTED:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return RawDoc(f.rel, f.rel, title or stem, text, enc, had)


def iter_jsonl(
    f: InputFile,
    text_field: str,
    id_field: str | None,
    title_field: str | None,
    strip: bool,
) -> Iterator[RawDoc | Skip]:
    opener = gzip.open if f.path.endswith(".gz") else open
    try:
        fh = opener(f.path, "rb")
    except OSError as e:
        yield Skip("unreadable", f"cannot read file: {e}", f.path)
        return
    n_records = 0
    legacy: str | None = None  # the file's non-UTF-8 encoding, decided once on its first such line
    with fh:
        try:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                n_records += 1
                try:
                    line, enc = decode(raw) if legacy is None else decode_as(raw, legacy)
                    # lock only an encoding that was detected: a line read as cp1252 (the fallback, which
                    # never fails) may be punctuation that cp1251 and others share with it
                    if enc not in ("utf-8", "utf-8-sig", "cp1252"):
                        legacy = enc
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Skip("bad_json", f"malformed JSON ({e.msg} at column {e.colno})", f.path, lineno)
                    continue
                except UnknownEncoding as e:
                    yield Skip("encoding", str(e), f.path, lineno)
                    continue
                if not isinstance(rec, dict) or text_field not in rec:
                    keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                    yield Skip(
                        "no_text_field",
                        f"record has no '{text_field}' field (has: {keys}); set documents.text_field",
                        f.path,
                        lineno,
                    )
                    continue
                text = rec[text_field]
                if not isinstance(text, str):
                    yield Skip(
                        "bad_text", f"'{text_field}' is {type(text).__name__}, not a string", f.path, lineno
                    )
                    continue
                text = normalize_newlines(text)
                title = (
                    str(rec.get(title_field)) if title_field and rec.get(title_field) is not None else None
                )
                if strip:
                    s = strip_gutenberg(text)
                    text, title = s.text, title or s.title
                doc_id = f"{f.rel}:{lineno}" if not id_field else str(rec.get(id_field, f"{f.rel}:{lineno}"))
                yield RawDoc(doc_id, f.rel, title or doc_id, text, enc)
        except (OSError, EOFError) as e:  # truncated gzip and the like
            yield Skip("unreadable", f"cannot read past this point: {e}", f.path)
    if n_records == 0:
        yield Skip("empty", "file is empty", f.path)


def iter_parquet(
    f: InputFile,
    text_field: str,
    id_field: str | None,
    title_field: str | None,
    strip: bool,
) -> Iterator[RawDoc | Skip]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:
        yield Skip("unreadable", f"not a readable Parquet file: {e}", f.path)
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        yield Skip(
            "no_text_field",
            f"Parquet file has no '{text_field}' column (columns: {', '.join(names)}); "
            "set documents.text_field",
            f.path,
        )
        return
    cols = [c for c in (text_field, id_field, title_field) if c and c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        d = batch.to_pydict()
        for i, text in enumerate(d[text_field]):
            row += 1
            if text is None:
                yield Skip("bad_text", f"row {row - 1}: '{text_field}' is null", f.path)
                continue
            text = normalize_newlines(text)
            title = d[title_field][i] if title_field and title_field in d else None
            if strip:
                s = strip_gutenberg(text)
                text, title = s.text, title or s.title
            doc_id = str(d[id_field][i]) if id_field and id_field in d else f"{f.rel}:{row - 1}"
            yield RawDoc(doc_id, f.rel, str(title) if title else doc_id, text)
    if row == 0:
        yield Skip("empty", "Parquet file has no rows", f.path)


def iter_file(
    f: InputFile,
    text_field: str,
    id_field: str | None,
    title_field: str | None,
    strip: bool,
) -> Iterator[RawDoc | Skip]:
    if f.kind in (".txt", ".txt.gz"):
        try:
            yield read_text_file(f, strip)
        except Skip as s:
            yield s
    elif f.kind in (".jsonl", ".jsonl.gz"):
        yield from iter_jsonl(f, text_field, id_field, title_field, strip)
    elif f.kind == ".parquet":
        yield from iter_parquet(f, text_field, id_field, title_field, strip)
    else:  # pragma: no cover - discover() filters these
        raise InputError("unsupported file type", path=f.path)

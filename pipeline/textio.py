"""Reading raw corpora: file discovery, decoding, Gutenberg boilerplate, and streaming readers.

Every reader yields one document at a time, so memory is bounded by the largest document.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

log = logging.getLogger("rpt.documents")

SUPPORTED = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


# ------------------------------------------------------------------------------------------ decoding


def _latin1_for_undefined(err: UnicodeDecodeError) -> tuple[str, int]:
    # cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined; Latin-1 maps them to the same code points.
    return "".join(chr(b) for b in err.object[err.start : err.end]), err.end


codecs.register_error("rpt_latin1", _latin1_for_undefined)


# Longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
_BOMS = [
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
]
_BOM_OF = {enc: bom for bom, enc in _BOMS}
# Single-byte encodings of scripts other than Latin that files still come in (Cyrillic, Greek, Hebrew,
# Arabic, Baltic/Turkish are Latin and so left to Windows-1252).
OTHER_SCRIPTS = [
    "cp1251",
    "koi8_r",
    "koi8_u",
    "iso8859_5",
    "cp866",
    "mac_cyrillic",
    "cp1253",
    "iso8859_7",
    "cp1255",
    "iso8859_8",
    "cp1256",
    "iso8859_6",
]


class UnknownEncoding(ValueError):
    """Bytes that are not UTF-8 and whose single-byte encoding cannot be told with confidence."""


def bom_encoding(data: bytes) -> str | None:
    return next((enc for bom, enc in _BOMS if data.startswith(bom)), None)


def decode(data: bytes) -> tuple[str, str]:
    """Text and the encoding used: by byte-order mark (UTF-8/16/32); else UTF-8; else Windows-1252, which
    is what files labelled Latin-1 almost always are (WHATWG decodes 'iso-8859-1' the same way; its five
    undefined bytes fall back to Latin-1), unless that reading is mojibake of another script, when the
    encoding is detected (charset-normalizer: cp1251, KOI8-R, cp1253, ...). Raises UnknownEncoding rather
    than return garbled text."""
    bom = bom_encoding(data)
    if bom is not None:
        try:
            return data[len(_BOM_OF[bom]) :].decode(bom), bom
        except UnicodeDecodeError as e:
            if bom != "utf-8-sig":
                raise UnknownEncoding(f"starts with a {bom} byte-order mark but is not {bom} ({e})") from None
            data = data[3:]
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    text = data.decode("cp1252", errors="rpt_latin1")
    foreign = foreign_words(text)
    if not foreign:
        return text, "cp1252"
    from charset_normalizer import from_bytes

    # only scripts whose letters Windows-1252 turns into accented Latin: a Western text must never be
    # switched to another Latin code page (a Portuguese list came out as cp1250 'năo, măe')
    best = from_bytes(data, cp_isolation=OTHER_SCRIPTS).best()
    if best is None:
        raise UnknownEncoding(
            f"not UTF-8, and read as Windows-1252 it holds words such as {' '.join(foreign[:3])!r} (mojibake "
            "of another script) whose encoding cannot be told: convert the file to UTF-8"
        )
    return str(best), best.encoding


def decode_as(data: bytes, encoding: str) -> tuple[str, str]:
    """UTF-8 if the bytes are UTF-8, else the given legacy encoding (strict, except cp1252's five undefined
    bytes, which are read as Latin-1 like everywhere else here)."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode(encoding, errors="rpt_latin1" if encoding == "cp1252" else "strict"), encoding
    except UnicodeDecodeError as e:
        raise UnknownEncoding(
            f"not UTF-8 and not {encoding} like the file's earlier lines ({e}): convert the file to UTF-8"
        ) from None


_WORD = re.compile(r"[^\W\d_]{3,}")


def foreign_words(text: str) -> list[str]:
    """Words of three or more letters made of non-ASCII letters only, when they are at least a fifth of
    the words that hold any: in Western text an accented letter sits among ASCII ones ('déjà', 'ÉTÉ'),
    while Cyrillic, Greek or Hebrew read as Windows-1252 gives whole words of them ('Ïðèâåò')."""
    accented = [w for w in _WORD.findall(text) if not w.isascii()]
    whole = [w for w in accented if not any(c.isascii() for c in w)]
    return whole if whole and len(whole) >= 0.2 * len(accented) else []


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


_CONTROL = set(range(0, 32)) - {9, 10, 12, 13}


def looks_binary(data: bytes, sample: int = 8192) -> bool:
    head = data[:sample]
    if not head:
        return False
    if b"\x00" in head:
        return True
    ctrl = sum(1 for b in head if b in _CONTROL)
    return ctrl / len(head) > 0.05


# ------------------------------------------------------------------------------------------ Gutenberg

_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$"
    r"|^[ \t]*\*END\*THE SMALL PRINT![^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$"
    r"|^[ \t]*End of (?:the )?Project Gutenberg(?:['’]s)?[ \t]+(?:E-?Book|E-?text|Etext|work)?[^\n]*$"
    r"|^[ \t]*End of (?:the )?Project Gutenberg(?:['’]s)? [^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_TITLE = re.compile(r"^Title:[ \t]*(.+)$", re.MULTILINE)


@dataclass
class Stripped:
    text: str
    title: str | None
    had_header: bool
    had_footer: bool


def strip_gutenberg(text: str) -> Stripped:
    """Remove the Project Gutenberg header (through the START line) and the licence footer (from the
    first END line). Text that carries no START marker is returned unchanged."""
    m = _START.search(text)
    if m is None:
        return Stripped(text, None, False, False)
    header = text[: m.start()]
    t = _TITLE.search(header)
    title = t.group(1).strip() if t else None
    body_start = m.end()
    e = _END.search(text, body_start)
    body = text[body_start : e.start()] if e else text[body_start:]
    return Stripped(body.strip("\n"), title, True, e is not None)


# ------------------------------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    rel: str  # stable name: relative to the folder or glob anchor that found it

    @property
    def kind(self) -> str:
        for ext in SUPPORTED:
            if self.path.endswith(ext):
                return ext
        return ""


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def discover(
    paths: list[str], on_error: str = "raise"
) -> tuple[list[InputFile], list[str], list[tuple[InputFile, str]]]:
    """Expand files, folders (recursively) and globs. Returns (supported files, ignored files,
    unreadable files with the reason). A path that matches nothing is an error naming it. A file found
    inside a folder or glob that cannot be read (permissions, a broken link) is an error too, or with
    on_error="skip" returned among the unreadable ones, to be counted."""
    files: dict[str, InputFile] = {}
    names_of: dict[str, str] = {}  # real path -> the document name it was first found under
    ignored: list[str] = []
    unreadable_files: list[tuple[InputFile, str]] = []

    def unreadable(message: str, f: InputFile) -> None:
        if on_error != "skip":
            raise InputError(
                message + " (set documents.on_error=skip to skip and count such input)", path=f.path
            )
        unreadable_files.append((f, message))

    for raw in paths:
        spec = os.path.expanduser(raw)
        if _has_magic(spec):
            anchor = spec
            while _has_magic(anchor):
                anchor = os.path.dirname(anchor)
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError("glob matches no files; check the path in documents.paths", path=raw)
            base = Path(anchor or ".").absolute()
            cands = [(Path(m).absolute(), Path(m).absolute().relative_to(base)) for m in matches]
            prefix = base.name
        elif os.path.isdir(spec):
            base = Path(spec).absolute()
            cands = [(p, p.relative_to(base)) for p in sorted(base.rglob("*")) if not p.is_dir()]
            prefix = base.name
        elif os.path.exists(spec):
            p = Path(spec).absolute()
            if not any(p.name.endswith(ext) for ext in SUPPORTED):
                raise InputError(f"unsupported file type (supported: {', '.join(SUPPORTED)})", path=raw)
            cands = [(p, Path(p.name))]
            prefix = ""
        else:
            raise InputError("no such file or folder; check documents.paths", path=raw)
        for p, rel in cands:
            if p.is_dir():
                continue
            name = f"{prefix}/{rel.as_posix()}" if prefix else rel.as_posix()
            f = InputFile(str(p), name)
            if not p.exists():
                unreadable("cannot read: broken symbolic link or vanished file", f)
                continue
            if not f.kind:
                ignored.append(str(p))
                continue
            if not os.access(p, os.R_OK):
                unreadable("file is not readable (permissions)", f)
                continue
            real = os.path.realpath(p)
            first = names_of.setdefault(real, name)
            if first != name:
                # a folder and a file inside it (or two overlapping globs): one file, one document
                log.warning(
                    "%s is listed twice in documents.paths (as %s and %s); reading it once", p, first, name
                )
                continue
            prev = files.get(name)
            if prev is not None and prev.path != f.path:
                raise InputError(
                    f"two inputs share the document name '{name}' ({prev.path}); "
                    "give their parent folders instead",
                    path=str(p),
                )
            files[name] = f
    return sorted(files.values(), key=lambda f: f.rel), ignored, unreadable_files


# ------------------------------------------------------------------------------------------ readers


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


# ------------------------------------------------------------------------------------------ stdlib corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_units(include: list[str] | None, exclude: list[str]) -> list[tuple[str, list[Path]]]:
    """Top-level packages (and single-module files) of the running interpreter's standard library,
    each as (name, sorted .py files). Test folders are left out, like a deduplicated code corpus."""
    root = stdlib_root()
    units = []
    skip_dirs = {"__pycache__", "test", "tests", "idle_test"}
    for entry in sorted(root.iterdir()):
        name = entry.name
        key = name[:-3] if name.endswith(".py") else name
        if include is not None and key not in include:
            continue
        private = name.startswith(("_", "."))
        if key in exclude or (private and include is None):
            continue
        if entry.is_dir():
            files = sorted(
                p for p in entry.rglob("*.py") if not (set(p.relative_to(entry).parts[:-1]) & skip_dirs)
            )
            if files:
                units.append((key, files))
        elif name.endswith(".py"):
            units.append((key, [entry]))
    return units


def read_stdlib_unit(name: str, files: list[Path]) -> RawDoc:
    """One document per package: its files concatenated with a path header before each file."""
    root = stdlib_root()
    parts = []
    for p in files:
        text, _ = decode(p.read_bytes())
        parts.append(f"# ---- {p.relative_to(root).as_posix()} ----\n{normalize_newlines(text)}")
    body = "\n".join(parts)
    return RawDoc(f"stdlib/{name}", "stdlib", name, body)


def stdlib_doc_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)

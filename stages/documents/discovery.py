"""Finding the input files: files, folders (recursively) and globs of documents.paths, each with a stable
document name."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

log = logging.getLogger("rpt.documents")

SUPPORTED = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


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

"""The embedded corpus (documents.paths empty): the running interpreter's standard library, one document
per top-level package."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from stages.documents.decoding import decode, normalize_newlines
from stages.documents.readers import RawDoc


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

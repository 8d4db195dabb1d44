"""Content-addressed versions: a short hash of what determines an artifact, never of paths or mtimes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

VERSION_LEN = 12


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def short_hash(obj: Any, n: int = VERSION_LEN) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:n]


def artifact_version(
    stage: str, stage_version: int, config: dict[str, Any], inputs: dict[str, str], fingerprint: Any
) -> str:
    """version = hash(stage name, stage VERSION, canonical config section, input versions, content fingerprint)."""
    return short_hash(
        {
            "stage": stage,
            "stage_version": stage_version,
            "config": config,
            "inputs": inputs,
            "fingerprint": fingerprint,
        }
    )


def sha256_file(path: str | os.PathLike[str], fs: Any = None, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of an external input file. Memoised per process on (path, size, mtime) so a large
    corpus or model folder is hashed once; the mtime only keys the memo, it never enters a version."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    d = _DIGEST_CACHE.get(key)
    if d is None:
        d = _DIGEST_CACHE[key] = sha256_file(p)
    return d


def tree_digest(root: str | os.PathLike[str], patterns: tuple[str, ...] = ("*",)) -> str:
    """Digest of the files under a folder (relative names + contents), e.g. a model checkpoint folder."""
    root = Path(root)
    entries = []
    for pat in patterns:
        for p in sorted(root.rglob(pat)):
            if p.is_file():
                entries.append((p.relative_to(root).as_posix(), file_digest(p)))
    return short_hash(sorted(set(entries)), n=64)

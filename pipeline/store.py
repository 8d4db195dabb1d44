"""The versioned artifact store: `<root>/<stage>/<version>/` folders, each made real by its manifest.

Layout under the root (a local path or an fsspec URI):
  <stage>/<version>/manifest.json + data files      published, immutable
  <stage>/.partial-<version>/                        work in progress (shards resume from here)
  <stage>/refs/<name>                                named refs, e.g. `latest`, holding a version
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import ArtifactError
from pipeline.manifest import MANIFEST_NAME, Manifest
from pipeline.versioning import sha256_file

log = logging.getLogger("rpt.store")

PARTIAL_PREFIX = ".partial-"
REFS_DIR = "refs"


class ArtifactStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for process/dask runners
        return (ArtifactStore, (self.uri,))

    # ---- paths
    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def stage_dir(self, stage: str) -> str:
        return self.join(stage)

    def version_dir(self, stage: str, version: str) -> str:
        return self.join(stage, version)

    def partial_dir(self, stage: str, version: str) -> str:
        return self.join(stage, PARTIAL_PREFIX + version)

    # ---- reading
    def _read_manifest(self, folder: str) -> Manifest | None:
        path = f"{folder}/{MANIFEST_NAME}"
        try:
            with self.fs.open(path, "r") as f:
                return Manifest.model_validate_json(f.read())
        except FileNotFoundError:
            return None
        except Exception as e:  # a corrupt manifest means "does not exist", loudly
            log.warning("ignoring %s: unreadable manifest (%s)", path, e)
            return None

    def exists(self, stage: str, version: str) -> bool:
        return self._read_manifest(self.version_dir(stage, version)) is not None

    def get(self, stage: str, version: str) -> Artifact:
        m = self._read_manifest(self.version_dir(stage, version))
        if m is None:
            raise ArtifactError(f"artifact {stage}@{version} not found under {self.uri}")
        return Artifact(self, m)

    def versions(self, stage: str) -> list[Manifest]:
        d = self.stage_dir(stage)
        if not self.fs.exists(d):
            return []
        out = []
        for entry in self.fs.ls(d, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or name == REFS_DIR:
                continue
            m = self._read_manifest(entry.rstrip("/"))
            if m is not None:
                out.append(m)
        return sorted(out, key=lambda m: m.created_at)

    def stages(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = (
            e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.root, detail=False) if self.fs.isdir(e)
        )
        return sorted(
            n for n in names if not n.startswith(".")
        )  # dot-folders hold tool state (.prefect-cache)

    def partials(self, stage: str) -> list[str]:
        d = self.stage_dir(stage)
        if not self.fs.exists(d):
            return []
        return [
            e.rstrip("/").rsplit("/", 1)[-1][len(PARTIAL_PREFIX) :]
            for e in self.fs.ls(d, detail=False)
            if e.rstrip("/").rsplit("/", 1)[-1].startswith(PARTIAL_PREFIX)
        ]

    def resolve(self, spec: str) -> Artifact:
        """'stage', 'stage@<version or unique prefix>' or 'stage@<ref>' (default ref: latest)."""
        stage, _, sel = spec.partition("@")
        sel = sel or "latest"
        ref = self.get_ref(stage, sel)
        if ref is not None:
            return self.get(stage, ref)
        matches = [m for m in self.versions(stage) if m.version.startswith(sel)]
        if len(matches) == 1:
            return Artifact(self, matches[0])
        if not matches:
            known = ", ".join(m.version for m in self.versions(stage)) or "none"
            raise ArtifactError(f"no artifact {stage}@{sel} under {self.uri} (versions: {known})")
        raise ArtifactError(f"{stage}@{sel} is ambiguous: {', '.join(m.version for m in matches)}")

    # ---- refs
    def set_ref(self, stage: str, name: str, version: str) -> None:
        d = self.join(stage, REFS_DIR)
        self.fs.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{name}.tmp-{os.getpid()}"
        with self.fs.open(tmp, "w") as f:
            f.write(version + "\n")
        self.fs.mv(tmp, f"{d}/{name}")

    def get_ref(self, stage: str, name: str) -> str | None:
        try:
            with self.fs.open(self.join(stage, REFS_DIR, name), "r") as f:
                return f.read().strip() or None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def refs(self, stage: str) -> dict[str, str]:
        d = self.join(stage, REFS_DIR)
        if not self.fs.exists(d):
            return {}
        out = {}
        for e in self.fs.ls(d, detail=False):
            name = e.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("."):
                v = self.get_ref(stage, name)
                if v:
                    out[name] = v
        return out

    # ---- publishing
    def publish(self, workdir: str, manifest: Manifest) -> Artifact:
        """Write the manifest last, then move the folder into place (atomic on local filesystems)."""
        tmp = f"{workdir}/.{MANIFEST_NAME}.tmp"
        with self.fs.open(tmp, "w") as f:
            f.write(manifest.to_json())
        self.fs.mv(tmp, f"{workdir}/{MANIFEST_NAME}")
        final = self.version_dir(manifest.stage, manifest.version)
        if self.exists(manifest.stage, manifest.version):
            log.info("%s was published concurrently; keeping the existing one", manifest.ref)
            self.fs.rm(workdir, recursive=True)
        else:
            if self.fs.exists(final):  # a folder without a valid manifest is garbage
                self.fs.rm(final, recursive=True)
            if self.is_local:
                os.rename(workdir, final)
            else:
                self.fs.mv(workdir, final, recursive=True)
        self.set_ref(manifest.stage, "latest", manifest.version)
        return self.get(manifest.stage, manifest.version)


class Artifact:
    """Read access to one published artifact."""

    def __init__(self, store: ArtifactStore, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self.stage = manifest.stage
        self.version = manifest.version
        self.path = store.version_dir(self.stage, self.version)

    def __repr__(self) -> str:
        return f"Artifact({self.ref})"

    @property
    def ref(self) -> str:
        return f"{self.stage}@{self.version}"

    @property
    def fs(self) -> Any:
        return self.store.fs

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest.stats

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.meta

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def has(self, name: str) -> bool:
        return any(f.path == name for f in self.manifest.files)

    def parts(self, prefix: str = "part-") -> list[str]:
        """Paths of the data shards, in order."""
        names = sorted(
            f.path for f in self.manifest.files if f.path.startswith(prefix) and f.path.endswith(".parquet")
        )
        return [self.file(n) for n in names]

    def dataset(self, prefix: str = "part-") -> pads.Dataset:
        parts = self.parts(prefix)
        if not parts:
            raise ArtifactError(f"{self.ref} has no {prefix}*.parquet files")
        return pads.dataset(parts, format="parquet", filesystem=self.fs)

    def read(self, columns: list[str] | None = None, prefix: str = "part-", filter: Any = None) -> pa.Table:
        return self.dataset(prefix).to_table(columns=columns, filter=filter)

    def read_file(self, name: str, columns: list[str] | None = None) -> pa.Table:
        # A path, or the file's bytes: pyarrow reading through a Python file object can leave cleanup
        # work that aborts the interpreter at exit (apache/arrow#33975, #34314).
        if self.store.is_local:
            return pq.read_table(self.file(name), columns=columns)
        with self.fs.open(self.file(name), "rb") as f:
            return pq.read_table(pa.BufferReader(f.read()), columns=columns)

    def iter_batches(
        self, columns: list[str] | None = None, batch_size: int = 65536, prefix: str = "part-"
    ) -> Iterator[pa.RecordBatch]:
        for path in self.parts(prefix):
            with self.fs.open(path, "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def scan(self, prefix: str = "part-") -> Any:
        """A polars LazyFrame over the data shards."""
        import polars as pl

        parts = self.parts(prefix)
        if self.store.is_local:
            return pl.scan_parquet(parts)
        return pl.from_arrow(self.read(prefix=prefix)).lazy()

    def local_path(self, name: str = "") -> Path:
        """A local filesystem path to a file or sub-folder (downloaded to a cache for remote stores)."""
        if self.store.is_local:
            return Path(self.file(name) if name else self.path)
        cache = (
            Path(os.environ.get("RPT_CACHE", Path(tempfile.gettempdir()) / "rpt-cache"))
            / self.stage
            / self.version
        )
        target = cache / name if name else cache
        if not target.exists():  # versions are immutable, so a cached copy never goes stale
            target.parent.mkdir(parents=True, exist_ok=True)
            src = self.file(name) if name else self.path
            if self.fs.isdir(src):
                for f in self.fs.find(src):
                    out = target / f[len(src.rstrip("/")) + 1 :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(f, str(out))
            else:
                self.fs.get_file(src, str(target))
        return target

    def json(self, name: str) -> Any:
        with self.fs.open(self.file(name), "r") as f:
            return json.load(f)

    def verify(self) -> list[str]:
        """Recompute every file's checksum; returns a list of problems (empty when intact)."""
        problems = []
        for entry in self.manifest.files:
            path = self.file(entry.path)
            if not self.fs.exists(path):
                problems.append(f"{self.ref}: missing file {entry.path}")
                continue
            size = self.fs.size(path)
            if size != entry.bytes:
                problems.append(f"{self.ref}: {entry.path} has {size} bytes, manifest says {entry.bytes}")
                continue
            if sha256_file(path, self.fs) != entry.sha256:
                problems.append(f"{self.ref}: {entry.path} checksum mismatch")
        return problems

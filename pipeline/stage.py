"""The stage contract. A stage is a small object (datatrove-style) with a config model, its inputs,
a shard plan, a per-shard worker and a finalize step. Stages know nothing of Prefect or of how
their shards are scheduled; `pipeline.executor` runs them serially, in threads, processes or Dask.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import pyarrow as pa

from pipeline.manifest import FileEntry
from pipeline.parquet import write_parquet
from pipeline.versioning import sha256_file
from pipeline.worker_cache import worker_cache

if TYPE_CHECKING:
    from pipeline.config import RunConfigBase, StageConfig
    from pipeline.store import Artifact, ArtifactStore

T = TypeVar("T")


@dataclass(frozen=True)
class InputRef:
    """An upstream artifact: a stage, with optional changes to that stage's config section.

    E.g. `scores` needs `InputRef("bm25", {"scope": "document-causal", "query": "chunk+target"})`
    whatever the run's own bm25 section says; the input's version follows from the changed section.
    """

    stage: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.stage, tuple(sorted((k, repr(v)) for k, v in self.overrides.items()))))


@dataclass(frozen=True)
class Shard:
    """One unit of work and of resume. `payload` is small, JSON-able data (file names, doc ranges)."""

    index: int
    total: int
    payload: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


@dataclass
class ShardResult:
    index: int
    files: list[FileEntry]
    stats: dict[str, Any]
    seconds: float


@dataclass
class StageContext:
    """Everything a stage's code may use while building one artifact version. Picklable."""

    stage: str
    version: str
    cfg: StageConfig
    run: RunConfigBase
    inputs: dict[str, Artifact]
    store: ArtifactStore
    workdir: str
    # what the version was computed from (Stage.fingerprint): a stage that reads external files checks
    # that what it reads is still that content
    fingerprint: Any = None
    # files written through this context (the executor gives each shard a fresh list)
    written: list[FileEntry] = field(default_factory=list, repr=False)

    @property
    def fs(self) -> Any:
        return self.store.fs

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"rpt.{self.stage}")

    def path(self, name: str) -> str:
        return f"{self.workdir}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def write_parquet(
        self, name: str, data: pa.Table | Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema | None = None
    ) -> FileEntry:
        path = self.path(name)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        entry = write_parquet(data, path, self.fs, schema=schema, relpath=name)
        self.written.append(entry)
        return entry

    def write_bytes(self, name: str, data: bytes) -> FileEntry:
        path = self.path(name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)
        entry = self.file_entry(name)
        self.written.append(entry)
        return entry

    def write_text(self, name: str, text: str) -> FileEntry:
        return self.write_bytes(name, text.encode("utf-8"))

    def file_entry(self, name: str, rows: int | None = None) -> FileEntry:
        path = self.path(name)
        return FileEntry(path=name, bytes=self.fs.size(path), sha256=sha256_file(path, self.fs), rows=rows)

    @contextmanager
    def local_dir(self, name: str) -> Iterator[Path]:
        """A local folder for libraries that need a real path (torch, HF save_pretrained, faiss).
        On a local store it is the artifact's own sub-folder; on a remote one it is uploaded on exit."""
        if self.store.is_local:
            p = Path(self.path(name))
            p.mkdir(parents=True, exist_ok=True)
            yield p
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"rpt-{self.stage}-"))
        dest = self.path(name).rstrip("/") if name else self.workdir
        try:
            yield tmp
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    target = f"{dest}/{p.relative_to(tmp).as_posix()}"
                    self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    self.fs.put_file(str(p), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def local_input(self, role: str, name: str = "") -> Path:
        """A local path of an input artifact's file (fetched once into the local cache on remote stores)."""
        return self.inputs[role].local_path(name)

    def drop(self, name: str) -> None:
        """Remove a scratch file or folder of this build (e.g. its training checkpoints) before publishing."""
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)

    @contextmanager
    def local_file(self, name: str) -> Iterator[Path]:
        """A local path of a file already written to this build's folder, for libraries that read only
        real paths (faiss), valid inside the `with`: the file itself on a local store, a temporary copy
        on a remote one (removed on exit: read what you need inside)."""
        if self.store.is_local:
            yield Path(self.path(name))
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"rpt-{self.stage}-"))
        try:
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(self.path(name), str(dest))
            yield dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def worker_cache(
        self,
        key: tuple[Hashable, ...],
        factory: Callable[[], T],
        *,
        owner: Hashable = None,
        max_entries: int | None = None,
    ) -> T:
        """An object built once per worker process and shared by the shards it runs (a model, an index):
        `pipeline.worker_cache`. key = (kind, ...); `owner` / `max_entries` bound the entries of a kind."""
        return worker_cache(key, factory, owner=owner, max_entries=max_entries)


class Stage:
    """Base class of every stage. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]]
    description: ClassVar[str] = ""
    # Where shards run by default when runner.kind is "auto".
    preferred_runner: ClassVar[Literal["serial", "threads", "processes"]] = "threads"
    # GPU stages get one worker per GPU under the flows' runners.
    uses_gpu: ClassVar[bool] = False

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        """Upstream artifacts by role. May depend on the run config (e.g. the train variant)."""
        return {}

    def fingerprint(self, cfg: StageConfig) -> Any:
        """Content identity of external inputs (corpus files, a given tokenizer or model). JSON-able."""
        return None

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0, 1)]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        """Do one shard's work, writing files with ctx.write_parquet/...; return JSON-able stats."""
        raise NotImplementedError

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        """After all shards: merge stats, write indexes. Returns the manifest stats."""
        return merge_stats(r.stats for r in results)

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        """Stage-specific facts for the manifest (source, scope, query mode, ...)."""
        return {}

    def output_schema(self) -> pa.Schema | None:
        return None


def merge_stats(stats: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum numeric stats (recursively for nested dicts); keep the first value of anything else."""
    out: dict[str, Any] = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
                out.setdefault(k, v)
            elif isinstance(v, dict):
                out[k] = merge_stats([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out

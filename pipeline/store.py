"""The versioned artifact store: `<root>/<stage>/<version>/` folders, each made real by its manifest.

Layout under the root (a local path or an fsspec URI):
  <stage>/<version>/manifest.json + data files      published, immutable
  <stage>/.partial-<version>/                        work in progress (shards resume from here)
  <stage>/refs/<name>                                named refs, e.g. `latest`, holding a version
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import uuid
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

# Stage names, versions and ref names are single path components under the root: a '/', '..' or a
# leading '.' (tool state, temp files) would let a spec reach outside its stage folder or another store.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def is_plain_name(name: str) -> bool:
    return bool(_PLAIN_NAME.fullmatch(name or ""))


def check_name(kind: str, name: str) -> str:
    """`name` when it is a plain name for a `kind` (stage, version, ref); otherwise an ArtifactError."""
    if not is_plain_name(name):
        raise ArtifactError(
            f"{kind} {name!r} is not a plain name: use letters, digits and '_', '-', '.', '+' "
            "(not empty, no '/', not starting with '.')"
        )
    return name


def check_root(uri: str) -> None:
    """One clear error for a root that cannot be a store: a file, or a protocol whose package is missing."""
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ArtifactError(
                f"artifact store root {uri} is a file, not a folder: point artifacts_root in the config "
                "(or RPT_ARTIFACTS, or --root) at a folder"
            )
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        s3 = protocol in ("s3", "s3a")
        extra = " (the s3 extra: pip install 'rpt-pipeline[s3]', or pip install s3fs)" if s3 else ""
        raise ArtifactError(
            f"artifact store root {uri}: {protocol}:// needs a package that is not installed{extra}: {e}"
        ) from None
    except ValueError:
        raise ArtifactError(
            f"artifact store root {uri}: unknown protocol {protocol!r} (a local path, s3://, gs://, ...)"
        ) from None


class ArtifactStore:
    def __init__(self, uri: str):
        check_root(uri)
        self.uri = uri
        # No listings cache: shard workers, other builds and a killed run's rerun write to the same store
        # from other processes, and a cached listing would hide their files (or show deleted ones).
        self.fs, root = fsspec.core.url_to_fs(uri, use_listings_cache=False)
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
                m = Manifest.model_validate_json(f.read())
        except FileNotFoundError:
            return None
        except Exception as e:  # a corrupt manifest means "does not exist", loudly
            log.warning("ignoring %s: unreadable manifest (%s)", path, e)
            return None
        if not self.is_local:
            # An object store has no atomic rename: trust a manifest only when its files are all there.
            problems = list(self._file_problems(folder, m).values())
            if problems:
                log.warning("ignoring %s: %s", path, "; ".join(problems[:3]))
                return None
        return m

    def _file_problems(self, folder: str, manifest: Manifest) -> dict[str, str]:
        """{file: problem} for the files `manifest` lists that are absent from `folder` or of another size
        (one listing; the checksums are left to `verify`, as reading every byte on each lookup would be
        too slow)."""
        try:
            found = self.fs.find(folder, detail=True)
        except FileNotFoundError:
            found = {}
        base = self.fs._strip_protocol(folder).rstrip("/") + "/"
        sizes = {self.fs._strip_protocol(p)[len(base) :]: info.get("size") for p, info in found.items()}
        problems = {}
        for e in manifest.files:
            if e.path not in sizes:
                problems[e.path] = f"missing file {e.path}"
            elif sizes[e.path] != e.bytes:
                problems[e.path] = f"{e.path} has {sizes[e.path]} bytes, manifest says {e.bytes}"
        return problems

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
        check_name("stage", stage)
        sel = sel or "latest"
        check_name("version or ref", sel)
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
        check_name("stage", stage)
        check_name("ref name", name)
        check_name("version", version)
        d = self.join(stage, REFS_DIR)
        self.fs.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{name}.tmp-{os.getpid()}"
        try:
            with self.fs.open(tmp, "w") as f:
                f.write(version + "\n")
            self.fs.mv(tmp, f"{d}/{name}")
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
            raise

    def get_ref(self, stage: str, name: str) -> str | None:
        """The version a ref holds; None when there is no such ref, an ArtifactError when it is garbage."""
        path = self.join(stage, REFS_DIR, name)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read(4096)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        try:
            version = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            version = None
        if version == "":
            return None
        if version is None or not is_plain_name(version):
            raise ArtifactError(
                f"ref {stage}@{name} ({path}) is corrupt: it should hold one version, it holds {raw[:24]!r}. "
                f"Point it again with `rpt artifacts ref {stage}@VERSION {name}`, or delete that file"
            )
        return version

    def delete_ref(self, stage: str, name: str) -> None:
        check_name("ref name", name)
        with contextlib.suppress(FileNotFoundError):  # removed concurrently: the outcome is the same
            self.fs.rm_file(self.join(stage, REFS_DIR, name))

    def refs(self, stage: str) -> dict[str, str]:
        d = self.join(stage, REFS_DIR)
        if not self.fs.exists(d):
            return {}
        out = {}
        for e in self.fs.ls(d, detail=False):
            name = e.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("."):
                try:
                    v = self.get_ref(stage, name)
                except ArtifactError as err:  # a corrupt ref must not take a listing down with it
                    log.warning("%s", err)
                    continue
                if v:
                    out[name] = v
        return out

    # ---- publishing
    def publish(self, workdir: str, manifest: Manifest) -> Artifact:
        """Make the work folder the artifact `manifest` describes, the manifest landing last.

        Local: the manifest goes into the work folder, which is renamed into place (atomic).
        Object store (no rename; `mv` is copy-then-delete): see `_publish_by_copy`.
        """
        final = self.version_dir(manifest.stage, manifest.version)
        if self.exists(manifest.stage, manifest.version):
            log.info("%s was published concurrently; keeping the existing one", manifest.ref)
            self.fs.rm(workdir, recursive=True)
        elif self.is_local:
            tmp = f"{workdir}/.{MANIFEST_NAME}.tmp"
            with self.fs.open(tmp, "w") as f:
                f.write(manifest.to_json())
            self.fs.mv(tmp, f"{workdir}/{MANIFEST_NAME}")
            if self.fs.exists(final):  # a folder without a valid manifest is garbage
                self.fs.rm(final, recursive=True)
            os.rename(workdir, final)
        else:
            self._publish_by_copy(workdir, final, manifest)
        self.set_ref(manifest.stage, "latest", manifest.version)
        return self.get(manifest.stage, manifest.version)

    def _publish_by_copy(self, workdir: str, final: str, manifest: Manifest) -> None:
        """Copy the listed files to the final prefix, check them, then write the manifest in one PUT.

        Until the manifest lands the prefix does not exist for readers, and a manifest is trusted only
        with all its files present (`_read_manifest`), so a kill at any point leaves nothing trusted
        that is incomplete. The work folder, shard sidecars included, is removed only after the
        manifest: a rerun after a kill mid-publish resumes from it and publishes again over the debris.
        """
        manifest_path = f"{final}/{MANIFEST_NAME}"
        if self.fs.exists(final):
            # Debris of an interrupted publish, or a manifest whose files went missing. The stale
            # manifest goes first, so that no later state of the prefix pairs it with new files.
            if self.fs.exists(manifest_path):
                self.fs.rm_file(manifest_path)
            with contextlib.suppress(FileNotFoundError):  # the manifest was its only object
                self.fs.rm(final, recursive=True)
        names = [e.path for e in manifest.files]
        if names:
            self.fs.copy([f"{workdir}/{n}" for n in names], [f"{final}/{n}" for n in names])
        problems = list(self._file_problems(final, manifest).values())
        if problems:
            raise ArtifactError(
                f"publishing {manifest.ref} to {self.fs.unstrip_protocol(final)} failed, the manifest was "
                f"not written: {'; '.join(problems[:5])}"
            )
        self.fs.pipe_file(manifest_path, manifest.to_json().encode("utf-8"))
        self.fs.rm(workdir, recursive=True)


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
        name = name.strip("/")
        wanted = [
            e for e in self.manifest.files if not name or e.path == name or e.path.startswith(name + "/")
        ]
        if not wanted:
            raise ArtifactError(f"{self.ref} has no file or folder {name!r} (see its {MANIFEST_NAME})")
        # Versions are immutable, so a cached file of the listed size never goes stale. Whether a folder
        # is complete is decided file by file from the manifest, not by the folder existing: an
        # interrupted download, or an earlier request for one file inside it, leaves it partial.
        for e in wanted:
            target = cache / e.path
            if target.is_file() and target.stat().st_size == e.bytes:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                self.fs.get_file(self.file(e.path), str(tmp))
                os.replace(tmp, target)  # atomic: a reader never sees half a file
            finally:
                tmp.unlink(missing_ok=True)
        if not name and not (cache / MANIFEST_NAME).is_file():
            tmp = cache / f".{MANIFEST_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.write_text(self.manifest.to_json())
            os.replace(tmp, cache / MANIFEST_NAME)
        return cache / name if name else cache

    def json(self, name: str) -> Any:
        with self.fs.open(self.file(name), "r") as f:
            return json.load(f)

    def _size_problems(self) -> dict[str, str]:
        return {f: f"{self.ref}: {p}" for f, p in self.store._file_problems(self.path, self.manifest).items()}

    def size_problems(self) -> list[str]:
        """Files of the manifest that are missing or of another size (no file is read)."""
        return list(self._size_problems().values())

    def verify(self) -> list[str]:
        """Recompute every file's checksum; returns a list of problems (empty when intact)."""
        broken = self._size_problems()
        problems = list(broken.values())
        for entry in self.manifest.files:
            if entry.path not in broken and sha256_file(self.file(entry.path), self.fs) != entry.sha256:
                problems.append(f"{self.ref}: {entry.path} checksum mismatch")
        return problems

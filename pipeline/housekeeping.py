"""Housekeeping of an artifact store: what is in it, what a set of refs and configs keeps, garbage
collection (`rpt artifacts gc`), removal (`rpt artifacts rm`), and the artifact a config resolves to.

What garbage collection keeps:
  - the target of every named ref (`latest` too, unless told otherwise);
  - for each config given, every stage's version as `rpt run STAGE -c CONFIG` computes it, with the
    inputs of each. That covers what `rpt flow full|neighbors -c CONFIG` builds (the flows resolve
    the same DAG), but not what was built with extra `--set`s, nor train variants that `rpt flow
    train` built beyond `evaluate.variants`: name those with a ref to keep them;
  - the full lineage of everything kept: the inputs named in its manifest, recursively;
  - the partial build of a kept version that is not published yet: its finished shards are what a
    rerun resumes from.
Everything else that is published is removed. Debris (partial builds of other versions, version
folders without a valid manifest, temporary ref files) is removed only once nothing under it has
changed for `older_than`, because a build that is running right now looks the same as a killed one:
its partial folder is not kept by any ref or config given here when it belongs to another config, and
deleting it under the build would fail that build or, in the worst race, publish what was left. A
running build writes into its folder at least once per finished shard, so a folder untouched for a
day (the default) is taken to be dead; `older_than=0` removes all debris when no build is running. On a
local store the build lock adds to the clock, it does not replace it: a folder whose version lock a
running build holds is spared at any age; one whose lock is free falls under the same age rule as one
whose lock cannot be told (an object store), because the finished shards of a build killed minutes ago
are what its rerun resumes from (hours of work), whoever's config it was. Removal holds the lock.

Never removed: a version folder whose manifest cannot be read (an I/O, permission or throttling
error: its state is unknown, not broken), and while one exists no published artifact either (it may be
an input of that one); and a broken or incomplete version folder that a ref, config or lineage keeps
(a rebuild replaces it). `apply_gc` looks at each entry again under its lock and leaves alone what
changed since the plan: a folder published since, one whose files changed, one that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pipeline.errors import ArtifactError, ConfigError, RptError
from pipeline.locks import unless_building
from pipeline.manifest import MANIFEST_NAME, Manifest
from pipeline.store import PARTIAL_PREFIX, REFS_DIR, Artifact, ArtifactStore, check_name, is_plain_name

log = logging.getLogger("rpt.artifacts")

if TYPE_CHECKING:
    from pipeline.config import RunConfigBase

REMOVING_PREFIX = ".removing-"  # a folder renamed out of the way, then deleted
DEFAULT_OLDER_THAN = "24h"

# Kinds of entries under a stage folder.
ARTIFACT = "artifact"  # <version>/ with a valid manifest
BROKEN = "broken"  # <version>/ whose manifest.json is unreadable or describes another artifact
INCOMPLETE = "incomplete"  # <version>/ without manifest.json: an interrupted (or, on S3, running) publish
PARTIAL = "partial"  # .partial-<version>/: a build in progress or a killed one
REMOVING = "removing"  # .removing-*: a removal that was interrupted
REF_TEMP = "ref-temp"  # refs/.<name>.tmp-<pid>: a ref write that was interrupted
VERSION_KINDS = (ARTIFACT, BROKEN, INCOMPLETE)


@dataclass
class Entry:
    """One thing under `<root>/<stage>/`."""

    stage: str
    name: str  # the folder (or file) name under the stage (under refs/ for REF_TEMP)
    kind: str
    path: str
    manifest: Manifest | None = None
    problem: str = ""
    unreadable: bool = False  # BROKEN only: the manifest could not be read (state unknown, not broken)

    @property
    def version(self) -> str | None:
        if self.kind in VERSION_KINDS:
            return self.name
        if self.kind == PARTIAL:
            return self.name[len(PARTIAL_PREFIX) :]
        return None

    @property
    def ref(self) -> str:
        """stage@version, or stage/<folder> for debris that has no version."""
        v = self.version
        return f"{self.stage}@{v}" if v is not None else f"{self.stage}/{self.name}"

    @property
    def label(self) -> str:
        if self.kind == PARTIAL:
            return f"{self.stage}/{self.name}"
        if self.kind == REF_TEMP:
            return f"{self.stage}/{REFS_DIR}/{self.name}"
        return self.ref

    @property
    def manifest_bytes(self) -> int:
        """Bytes of the data files the manifest lists (no filesystem access)."""
        return sum(f.bytes for f in self.manifest.files) if self.manifest else 0


# ------------------------------------------------------------------------------------------ listing


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _summarize(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic: the first problems, without the long URL lines
        try:
            return "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'json'}: {err['msg']}" for err in errors()[:3]
            )
        except Exception:  # an error object that does not follow pydantic's format
            pass
    return f"{type(e).__name__}: {e}".splitlines()[0]


def read_manifest_state(store: ArtifactStore, stage: str, version: str) -> tuple[Manifest | None, str, bool]:
    """(manifest, "", False) when valid, (None, "", False) when there is none, (None, problem, unreadable)
    when it is broken or cannot be read; `unreadable` is True when the manifest could not be read at all
    (an OSError: permissions, the network, a throttled object store): then its state is unknown, and gc
    must not take it for broken.

    Unlike the store's readers, which treat a bad manifest as no artifact (correctly: nothing may be
    built on it), listing and verification must show it, or an artifact would vanish without a word."""
    path = f"{store.version_dir(stage, version)}/{MANIFEST_NAME}"
    try:
        with store.fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, "", False
    except (IsADirectoryError, NotADirectoryError) as e:  # not a file: broken, whatever happens next
        return None, f"{MANIFEST_NAME} cannot be read ({_summarize(e)})", False
    except OSError as e:
        return None, f"{MANIFEST_NAME} cannot be read ({_summarize(e)})", True
    try:
        m = Manifest.model_validate_json(raw)
    except Exception as e:  # invalid JSON, bytes that are not UTF-8, missing or mistyped fields
        return None, f"{MANIFEST_NAME} is not a valid manifest ({_summarize(e)})", False
    if (m.stage, m.version) != (stage, version):
        return (
            None,
            f"{MANIFEST_NAME} describes {m.ref}, not {stage}@{version} (a copied or moved folder?)",
            False,
        )
    return m, "", False


def stages(store: ArtifactStore) -> list[str]:
    """Stage folders under the root (names that are not plain, e.g. with spaces, are not stages)."""
    return [s for s in store.stages() if is_plain_name(s)]


def entries(store: ArtifactStore, stage: str) -> list[Entry]:
    """Everything under one stage folder: artifacts (oldest first), broken and incomplete version
    folders, partial builds, interrupted removals and temporary ref files."""
    check_name("stage", stage)
    d = store.stage_dir(stage)
    try:
        listing = store.fs.ls(d, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    arts, others = [], []
    for info in listing:
        name = _basename(info["name"])
        path = f"{d}/{name}"
        is_dir = info.get("type") == "directory"
        if name == REFS_DIR:
            if is_dir:
                others.extend(
                    Entry(stage, n, REF_TEMP, f"{path}/{n}")
                    for n in sorted(_basename(p) for p in store.fs.ls(path, detail=False))
                    if n.startswith(".") and ".tmp-" in n
                )
        elif name.startswith(PARTIAL_PREFIX):
            others.append(Entry(stage, name, PARTIAL, path))
        elif name.startswith(REMOVING_PREFIX):
            others.append(Entry(stage, name, REMOVING, path))
        elif name.startswith(".") or not is_dir or not is_plain_name(name):
            continue  # tool state and stray files are not ours to list
        else:
            m, problem, unreadable = read_manifest_state(store, stage, name)
            if m is not None:
                arts.append(Entry(stage, name, ARTIFACT, path, manifest=m))
            elif problem:
                others.append(Entry(stage, name, BROKEN, path, problem=problem, unreadable=unreadable))
            else:
                others.append(Entry(stage, name, INCOMPLETE, path, problem=f"no {MANIFEST_NAME}"))
    arts.sort(key=lambda e: (e.manifest.created_at if e.manifest else "", e.name))
    order = {k: i for i, k in enumerate((BROKEN, INCOMPLETE, PARTIAL, REMOVING, REF_TEMP))}
    others.sort(key=lambda e: (order[e.kind], e.name))
    return arts + others


def all_entries(store: ArtifactStore, only: Sequence[str] | None = None) -> list[Entry]:
    return [e for s in (only if only is not None else stages(store)) for e in entries(store, s)]


def ref_names(store: ArtifactStore, stage: str) -> list[str]:
    d = store.join(stage, REFS_DIR)
    try:
        names = [_basename(p) for p in store.fs.ls(d, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if not n.startswith("."))


def read_refs(store: ArtifactStore, stage: str) -> tuple[dict[str, str], list[str]]:
    """({ref name: version}, [problems of refs that cannot be read])."""
    good, bad = {}, []
    for name in ref_names(store, stage):
        try:
            v = store.get_ref(stage, name)
        except ArtifactError as e:
            bad.append(str(e))
            continue
        if v:
            good[name] = v
    return good, bad


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, str):
            try:
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def tree_info(store: ArtifactStore, path: str) -> tuple[int, float | None]:
    """(bytes of the files under `path`, the newest modification time of anything there, or None)."""
    try:
        found = store.fs.find(path, withdirs=True, detail=True)
        infos = [*found.values(), store.fs.info(path)]
    except FileNotFoundError:
        return 0, None
    size = sum(int(i.get("size") or 0) for i in infos if i.get("type") == "file")
    times = [t for t in map(_mtime, infos) if t is not None]
    return size, max(times) if times else None


def remove_folder(store: ArtifactStore, path: str) -> None:
    """Remove a version or work folder so that no reader sees half of it.

    Local: renamed out of the way first (atomic; a build writing into it fails instead of writing into
    a folder that is being emptied), then deleted. Object store: the manifest goes first, so the
    prefix stops being an artifact before its data files go.
    """
    try:
        if store.is_local:
            parent, name = path.rstrip("/").rsplit("/", 1)
            if not name.startswith(REMOVING_PREFIX):
                trash = f"{parent}/{REMOVING_PREFIX}{name.lstrip('.')}-{os.getpid()}"
                os.rename(path, trash)
                path = trash
        else:
            manifest = f"{path}/{MANIFEST_NAME}"
            if store.fs.exists(manifest):
                store.fs.rm_file(manifest)
        store.fs.rm(path, recursive=True)
    except FileNotFoundError:  # removed concurrently (another gc or rm): the outcome is the same
        pass


# ------------------------------------------------------------------------------------------ sizes, ages


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """'0', '90s', '30m', '6h', '2d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not m or (not m.group(2) and float(m.group(1)) != 0):
        raise ConfigError(
            f"--older-than {text!r}: expected a number with a unit s, m, h or d (e.g. 30m, 6h, 2d) or 0"
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def format_age(seconds: float) -> str:
    if math.isinf(seconds):
        return "unknown age"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}".replace(".0 ", " ")
    return f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------ keeping


def resolved_versions(label: str, run: RunConfigBase) -> list[str]:
    """stage@version of every stage under `run` and of their inputs, as the executor computes them."""
    from pipeline.executor import resolve

    memo: dict[str, Any] = {}
    refs: dict[str, None] = {}
    for stage in run.registry.names():
        try:
            node = resolve(stage, run, memo)
        except RptError as e:
            # Keeping less than the config means would delete what it still uses: stop instead.
            raise ConfigError(
                f"{label}: cannot resolve stage '{stage}' ({e}). gc keeps what each config resolves "
                "to and stops rather than guess: fix the config, or leave it out and name what you "
                "want kept with `rpt artifacts ref STAGE@VERSION NAME`"
            ) from None
        for n in node.walk():
            refs.setdefault(n.ref)
    return list(refs)


def kept(
    store: ArtifactStore,
    runs: Iterable[tuple[str, RunConfigBase]],
    arts: Iterable[Entry],
    keep_latest: bool = True,
) -> tuple[dict[str, str], list[str]]:
    """({stage@version: why it is kept}, [problems of refs that cannot be read])."""
    keep: dict[str, str] = {}
    bad: list[str] = []
    for stage in stages(store):
        good, problems = read_refs(store, stage)
        bad.extend(problems)
        for name, v in good.items():
            if name != "latest" or keep_latest:
                keep.setdefault(f"{stage}@{v}", f"ref {name}")
    for label, run in runs:
        for ref in resolved_versions(label, run):
            keep.setdefault(ref, f"config {label}")
    manifests = {e.ref: e.manifest for e in arts if e.kind == ARTIFACT and e.manifest is not None}
    todo = list(keep)
    while todo:
        ref = todo.pop()
        m = manifests.get(ref)
        for inp in m.inputs.values() if m is not None else ():
            if inp not in keep:
                keep[inp] = f"input of {ref}"
                todo.append(inp)
    return keep, bad


@dataclass
class Item:
    entry: Entry
    bytes: int
    why: str
    mtime: float | None = None  # the newest change under it when planned (debris only)


@dataclass
class GcPlan:
    remove: list[Item] = field(default_factory=list)
    spared: list[Item] = field(default_factory=list)  # what gc leaves alone, each with the reason
    keep: dict[str, str] = field(default_factory=dict)  # published stage@version -> why
    drop_refs: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, ref name, version)
    bad_refs: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.remove)


def plan_gc(
    store: ArtifactStore,
    runs: Iterable[tuple[str, RunConfigBase]] = (),
    older_than: float = parse_age(DEFAULT_OLDER_THAN),
    keep_latest: bool = True,
    now: float | None = None,
) -> GcPlan:
    """What `rpt artifacts gc` removes (nothing is touched here)."""
    now = time.time() if now is None else now
    every = all_entries(store)
    keep, bad = kept(store, runs, every, keep_latest)
    published = {e.ref for e in every if e.kind == ARTIFACT}
    plan = GcPlan(keep={r: why for r, why in keep.items() if r in published}, bad_refs=bad)
    # A manifest that cannot be read may name inputs that nothing else keeps: remove no artifact then.
    unknown = [e.ref for e in every if e.kind == BROKEN and e.unreadable]
    for e in every:
        if e.kind == ARTIFACT:
            if e.ref in keep:
                continue
            size = tree_info(store, e.path)[0]
            if unknown:
                why = f"kept by nothing known, but may be an input of {unknown[0]}, whose manifest cannot be read"
                plan.spared.append(Item(e, size, why))
            else:
                plan.remove.append(Item(e, size, "kept by no ref, config or lineage"))
            continue
        if e.kind == PARTIAL and e.ref in keep and e.ref not in published:
            continue  # the resume state of a build someone still wants
        size, mtime = tree_info(store, e.path)
        age = now - mtime if mtime is not None else math.inf
        why = {
            PARTIAL: "leftover work folder of a published version"
            if e.ref in published
            else "unfinished build of a version nothing keeps",
            BROKEN: e.problem,
            INCOMPLETE: f"no {MANIFEST_NAME} (an interrupted publish)",
            REMOVING: "left by an interrupted removal",
            REF_TEMP: "temporary file of an interrupted ref write",
        }[e.kind]
        if e.kind == BROKEN and e.unreadable:
            plan.spared.append(Item(e, size, f"{why}: its state is unknown, so it is left alone"))
            continue
        if e.kind in (BROKEN, INCOMPLETE) and e.ref in keep:
            plan.spared.append(Item(e, size, f"{why}; kept by {keep[e.ref]} (a rebuild replaces it)"))
            continue
        with unless_building(store, e.stage, e.version or "") as free:
            pass  # a snapshot for the plan; apply_gc asks again while it removes
        if free is False:
            plan.spared.append(Item(e, size, f"{why}; a running build holds its lock"))
        elif e.kind == REMOVING or age >= older_than:
            lock = "; no build holds its lock" if free else ""
            plan.remove.append(Item(e, size, f"{why}; untouched for {format_age(age)}{lock}", mtime))
        else:
            maybe = (
                "no build holds its lock, but a rerun may resume from it"
                if free
                else "a build may be running"
            )
            plan.spared.append(Item(e, size, f"{why}; changed {format_age(age)} ago, {maybe}"))
    gone = {i.entry.ref for i in plan.remove if i.entry.kind in VERSION_KINDS}
    for stage in stages(store):
        for name, v in read_refs(store, stage)[0].items():
            if f"{stage}@{v}" in gone:
                plan.drop_refs.append((stage, name, v))
    return plan


def _changed_since_plan(store: ArtifactStore, item: Item) -> str:
    """Why a planned removal must not go ahead after all ("" when it may): checked under its lock."""
    e = item.entry
    if not store.fs.exists(e.path):
        return "it is gone"
    if e.kind in (BROKEN, INCOMPLETE):
        m, problem, unreadable = read_manifest_state(store, e.stage, e.name)
        if m is not None:
            return "it was published since the plan"
        if unreadable:
            return problem
    if e.kind != ARTIFACT:
        mtime = tree_info(store, e.path)[1]
        if mtime is not None and (item.mtime is None or mtime > item.mtime):
            return "it changed since the plan"
    return ""


def apply_gc(store: ArtifactStore, plan: GcPlan) -> int:
    """Carry out a plan; returns the bytes freed. Each item is looked at again under its version's
    lock and left alone (moved to `plan.spared`) when it changed since the plan; the refs to a version
    go just before its folder, so none points at a half-removed folder."""
    drops: dict[str, list[tuple[str, str, str]]] = {}
    for stage, name, v in plan.drop_refs:
        drops.setdefault(f"{stage}@{v}", []).append((stage, name, v))
    done: list[Item] = []
    dropped: list[tuple[str, str, str]] = []
    for item in plan.remove:
        e = item.entry
        if e.kind == REF_TEMP:
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm_file(e.path)
            done.append(item)
            continue
        # holding the version's lock while removing: a build that starts now waits, then starts afresh
        with unless_building(store, e.stage, e.version or "") as free:
            reason = "a build holds its lock now" if free is False else _changed_since_plan(store, item)
            if reason:
                log.info("gc: %s: %s; left alone", e.label, reason)
                plan.spared.append(Item(e, item.bytes, f"{item.why}; but {reason}, so it is left alone"))
                continue
            for stage, name, v in drops.get(e.ref, []) if e.kind in VERSION_KINDS else []:
                try:
                    still = store.get_ref(stage, name) == v
                except ArtifactError:  # rewritten since the plan, badly: not ours to judge now
                    still = False
                if still:
                    store.delete_ref(stage, name)
                    dropped.append((stage, name, v))
            remove_folder(store, e.path)
            done.append(item)
    plan.remove[:] = done
    plan.drop_refs[:] = dropped
    return plan.total


# ------------------------------------------------------------------------------------------ rm, lookups


def find_version(store: ArtifactStore, spec: str) -> Entry:
    """The version folder `STAGE@SELECTOR` names (a ref, a version or a unique prefix of one), whether
    its manifest is valid or not."""
    stage, at, sel = spec.partition("@")
    check_name("stage", stage)
    if not at or not sel:
        raise ArtifactError(f"{spec!r}: give STAGE@VERSION (a unique prefix or a ref name is enough)")
    check_name("version or ref", sel)
    cands = [e for e in entries(store, stage) if e.kind in VERSION_KINDS]
    target = store.get_ref(stage, sel)
    if target is not None:
        match = [e for e in cands if e.name == target]
        if not match:
            raise ArtifactError(f"ref {stage}@{sel} points to {target}, which is not under {store.uri}")
        return match[0]
    match = [e for e in cands if e.name == sel] or [e for e in cands if e.name.startswith(sel)]
    if len(match) == 1:
        return match[0]
    if not match:
        known = ", ".join(e.name for e in cands) or "none"
        raise ArtifactError(f"no artifact {stage}@{sel} under {store.uri} (versions: {known})")
    raise ArtifactError(f"{stage}@{sel} is ambiguous: {', '.join(e.name for e in match)}")


def dependents(store: ArtifactStore, ref: str) -> list[str]:
    """Published artifacts whose manifest names `ref` as an input."""
    return [
        e.ref
        for e in all_entries(store)
        if e.kind == ARTIFACT and e.manifest is not None and ref in e.manifest.inputs.values()
    ]


def remove_version(store: ArtifactStore, spec: str, force: bool = False) -> tuple[Entry, int, list[str]]:
    """Remove one version folder and the refs that point to it: (the entry, bytes freed, refs removed).

    Refuses while another artifact names it as an input (unless `force`): its lineage would break,
    and a rerun of that artifact's config would rebuild this one anyway.
    """
    e = find_version(store, spec)
    users = [r for r in dependents(store, e.ref) if r != e.ref]
    if users and not force:
        raise ArtifactError(
            f"{e.ref} is an input of {', '.join(users)}: remove those first, or pass --force "
            "(they would then name an input that no longer exists)"
        )
    size = tree_info(store, e.path)[0]
    refs = [n for n, v in read_refs(store, e.stage)[0].items() if v == e.name]
    for name in refs:
        store.delete_ref(e.stage, name)
    remove_folder(store, e.path)
    return e, size, refs


def config_artifact(stage: str, run: RunConfigBase, root: str | None = None) -> Artifact:
    """The artifact of `stage` that `run` resolves to (not whatever `latest` points at)."""
    from pipeline.executor import resolve

    check_name("stage", stage)
    node = resolve(stage, run)
    store = ArtifactStore(root or run.root())
    if store.exists(stage, node.version):
        return store.get(stage, node.version)
    src = f" -c {run.source_file}" if run.source_file else ""
    which = run.source_file or "the default config"
    partial = (
        " (a partial build of it exists; building resumes it)"
        if node.version in store.partials(stage)
        else ""
    )
    raise ArtifactError(
        f"{node.ref}, the {stage} artifact of {which}, is not built under {store.uri}{partial}. "
        f"Build it with `rpt run {stage}{src} --with-deps` (with the same --set options), "
        f"or name a built version as {stage}@VERSION (`rpt artifacts ls {stage}` lists them)"
    )


def uri(store: ArtifactStore, path: str) -> str:
    """A path in the store as the user addresses it: a local path, or a URI with its protocol."""
    return path if store.is_local else store.fs.unstrip_protocol(path)

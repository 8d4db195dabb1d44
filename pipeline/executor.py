"""Resolve a stage's version from the config DAG, and build it shard by shard with resume.

The build API, one for `rpt run` and the Prefect flows: `resolve` (versions), `open_plan` (open the work
folder, plan, find the shards a killed build finished), `run_shard` (one shard, anywhere: a thread, a
process, a Dask or Ray worker, a Prefect task), `finish` (finalize and publish). `build` chains them
with this module's runners for the CLI; the flows map the shards over their task runner instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.config import RunConfigBase
from pipeline.devices import on_gpu, visible_gpus
from pipeline.errors import ArtifactError
from pipeline.locks import build_lock
from pipeline.manifest import FileEntry, Manifest, host_info, package_versions, schema_to_dict
from pipeline.parquet import parquet_rows, parquet_schema
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext
from pipeline.store import Artifact, ArtifactStore
from pipeline.versioning import artifact_version, canonical_json, sha256_file

log = logging.getLogger("rpt.executor")

SHARDS_DIR = "_shards"


@dataclass
class Node:
    """One artifact in the DAG: a stage, the run config it sees, its inputs and its version."""

    stage: str
    run: RunConfigBase
    inputs: dict[str, Node]
    input_refs: dict[str, InputRef]
    version: str
    fingerprint: Any = None

    @property
    def ref(self) -> str:
        return f"{self.stage}@{self.version}"

    @property
    def impl(self) -> Stage:
        return self.run.registry.get(self.stage)

    @property
    def cfg(self) -> Any:
        return self.run.section(self.stage)

    def walk(self) -> list[Node]:
        """This node and its ancestors, dependencies first, each once."""
        seen: dict[str, Node] = {}

        def visit(n: Node) -> None:
            for c in n.inputs.values():
                visit(c)
            seen.setdefault(n.ref, n)

        visit(self)
        return list(seen.values())


def resolve(stage: str, run: RunConfigBase, _memo: dict[str, Node] | None = None) -> Node:
    """Compute the version of `stage` under `run` and of everything it depends on (no store access)."""
    memo = {} if _memo is None else _memo
    key = stage + "|" + canonical_json(run.model_dump(mode="json"))
    if key in memo:
        return memo[key]
    impl = run.registry.get(stage)
    refs = impl.inputs(run)
    inputs = {
        role: resolve(ref.stage, run.with_section(ref.stage, ref.overrides), memo)
        for role, ref in refs.items()
    }
    cfg = run.section(stage)
    fp = impl.fingerprint(cfg)
    version = artifact_version(
        stage, impl.version, cfg.hashed_dict(), {r: n.ref for r, n in sorted(inputs.items())}, fp
    )
    node = memo[key] = Node(stage, run, inputs, refs, version, fp)
    return node


# ----------------------------------------------------------------------------------------- building


# (store, ref) of the inputs whose files passed their checksums in this process
_VERIFIED: set[tuple[str, str]] = set()


def check_inputs(node: Node, inputs: dict[str, Artifact]) -> None:
    """A stage never builds on an input whose files disagree with its manifest: a flipped bit in a tokens
    file would otherwise become a wrong result cached under a trusted version. Sizes always; checksums
    unless runner.verify_inputs=size, memoised per process (a flow reads the chunks many times)."""
    level = node.run.runner.verify_inputs
    for role, art in inputs.items():
        key = (art.store.uri, art.ref)
        cheap = level == "size" or key in _VERIFIED  # sizes are rechecked every time, they cost no reading
        problems = art.size_problems() if cheap else art.verify()
        if problems:
            shown = "; ".join(problems[:3]) + (
                f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            )
            raise ArtifactError(
                f"{node.stage} will not build on its input '{role}' = {art.ref}: {shown}. The artifact was "
                f"changed or damaged after it was published: remove it (`rpt artifacts rm {art.ref}`) and "
                "rebuild it with --with-deps"
            )
        if level == "checksum":
            _VERIFIED.add(key)


def open_build(node: Node, inputs: dict[str, Artifact]) -> StageContext:
    check_inputs(node, inputs)
    store = ArtifactStore(node.run.root())
    workdir = store.partial_dir(node.stage, node.version)
    store.fs.makedirs(f"{workdir}/{SHARDS_DIR}", exist_ok=True)
    for p in _ls(store.fs, workdir):  # debris of a killed writer
        if ".tmp-" in p.rsplit("/", 1)[-1]:
            store.fs.rm(p)
    return StageContext(
        node.stage, node.version, node.cfg, node.run, inputs, store, workdir, fingerprint=node.fingerprint
    )


def _ls(fs: Any, folder: str) -> list[str]:
    """The entries of a folder; none for a folder that does not exist yet (on an object store a prefix
    exists only once an object is under it, whatever `makedirs` was called)."""
    try:
        return fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []


def _sidecar(ctx: StageContext, shard: Shard) -> str:
    return ctx.path(f"{SHARDS_DIR}/{shard.name}.json")


def completed_shard(ctx: StageContext, shard: Shard) -> ShardResult | None:
    """A shard is done when its sidecar exists and every file it lists passes its checksum."""
    path = _sidecar(ctx, shard)
    if not ctx.fs.exists(path):
        return None
    try:
        with ctx.fs.open(path, "r") as f:
            rec = json.load(f)
        if rec.get("payload") != json.loads(canonical_json(dict(shard.payload))):
            return None  # the plan changed under this shard: recompute
        files = [FileEntry(**e) for e in rec["files"]]
        for e in files:
            p = ctx.path(e.path)
            if not ctx.fs.exists(p) or ctx.fs.size(p) != e.bytes or sha256_file(p, ctx.fs) != e.sha256:
                log.warning("%s shard %s: %s failed its check; recomputing", ctx.stage, shard.name, e.path)
                return None
        return ShardResult(shard.index, files, rec["stats"], rec["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s shard %s: unreadable sidecar (%s); recomputing", ctx.stage, shard.name, e)
        return None


def pending_shards(ctx: StageContext, shards: list[Shard]) -> tuple[list[Shard], list[ShardResult]]:
    todo, done = [], []
    for s in shards:
        r = completed_shard(ctx, s)
        if r is None:
            todo.append(s)
        else:
            done.append(r)
    return todo, done


def run_shard(ctx: StageContext, shard: Shard) -> ShardResult:
    """Run one shard and record it as done. Safe to call in another thread, process or Dask worker."""
    impl = ctx.run.registry.get(ctx.stage)
    t0 = time.perf_counter()
    sctx = dataclasses.replace(ctx, written=[])
    stats = impl.run_shard(sctx, shard) or {}
    written = sctx.written
    seconds = time.perf_counter() - t0
    rec = {
        "index": shard.index,
        "payload": json.loads(canonical_json(dict(shard.payload))),
        "files": [e.model_dump() for e in written],
        "stats": stats,
        "seconds": seconds,
    }
    tmp = _sidecar(ctx, shard) + f".tmp-{os.getpid()}"
    with ctx.fs.open(tmp, "w") as f:
        json.dump(rec, f)
    ctx.fs.mv(tmp, _sidecar(ctx, shard))
    return ShardResult(shard.index, written, stats, seconds)


def _scan_files(ctx: StageContext) -> list[FileEntry]:
    entries = []
    for p in sorted(ctx.fs.find(ctx.workdir)):
        rel = p[len(ctx.workdir.rstrip("/")) + 1 :] if p.startswith(ctx.workdir) else p.rsplit("/", 1)[-1]
        base = rel.rsplit("/", 1)[-1]
        if (
            rel.startswith(SHARDS_DIR + "/")
            or base.startswith(".")
            or ".tmp-" in base
            or base == "manifest.json"
        ):
            continue
        rows = parquet_rows(p, ctx.fs) if base.endswith(".parquet") else None
        entries.append(FileEntry(path=rel, bytes=ctx.fs.size(p), sha256=sha256_file(p, ctx.fs), rows=rows))
    return entries


def drop_stale_parts(ctx: StageContext, results: list[ShardResult]) -> list[str]:
    """Remove `part-*` files that no shard of the current plan wrote.

    A killed build keeps its shard files for the rerun; when the rerun plans differently (an unhashed
    setting such as shard_chunks changed, so there are fewer shards), the old parts above the new count
    would otherwise be published beside the new ones, duplicating rows. Stages that write their parts in
    `finalize` (documents, chunks) get a clean slate too: every unclaimed part is theirs to rewrite.
    """
    claimed = {e.path for r in results for e in r.files}
    stale = []
    for p in _ls(ctx.fs, ctx.workdir):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base not in claimed:
            ctx.fs.rm(p, recursive=True)
            stale.append(base)
    if stale:
        log.info("%s@%s: removed %d part file(s) of an earlier plan", ctx.stage, ctx.version, len(stale))
    return stale


@dataclass
class OpenPlan:
    """A missing artifact's open build: its context and the shards still to run (finished ones resume)."""

    ctx: StageContext
    todo: list[Shard]
    done: list[ShardResult]
    plan_s: float
    started: float  # time.time() once planned: the shards may run in other processes


def open_plan(node: Node, inputs: dict[str, Artifact] | None = None) -> OpenPlan:
    """Open the build of `node` (its inputs: given, or read from the store), plan its shards and sort out
    those a killed build already finished. The caller holds the build lock (pipeline.locks.build_lock)."""
    if inputs is None:
        store = ArtifactStore(node.run.root())
        inputs = {role: store.get(c.stage, c.version) for role, c in node.inputs.items()}
    ctx = open_build(node, inputs)
    t0 = time.perf_counter()
    shards = node.impl.plan(ctx)
    plan_s = time.perf_counter() - t0
    todo, done = pending_shards(ctx, shards)
    if done:
        log.info("%s: resuming, %d of %d shards already done", node.ref, len(done), len(shards))
    return OpenPlan(ctx, todo, done, plan_s, time.time())


def finish(node: Node, plan: OpenPlan, results: list[ShardResult]) -> Artifact:
    """Finalize and publish the build `plan` opened, given the results of the shards it had left."""
    results = plan.done + list(results)
    timings = {
        "plan_s": plan.plan_s,
        "shards_wall_s": time.time() - plan.started,
        "shards_cpu_s": sum(r.seconds for r in results),
    }
    return publish(plan.ctx, node, results, timings)


def publish(ctx: StageContext, node: Node, results: list[ShardResult], timings: dict[str, float]) -> Artifact:
    impl = node.impl
    results = sorted(results, key=lambda r: r.index)
    drop_stale_parts(ctx, results)
    t0 = time.perf_counter()
    stats = impl.finalize(ctx, results) or {}
    timings = {**timings, "finalize_s": time.perf_counter() - t0}
    files = _scan_files(ctx)
    schema = impl.output_schema()
    parts = [f for f in files if f.path.startswith("part-") and f.path.endswith(".parquet")]
    if schema is None and parts:
        schema = parquet_schema(ctx.path(parts[0].path), ctx.fs)
    manifest = Manifest(
        stage=node.stage,
        version=node.version,
        stage_version=impl.version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=ctx.cfg.model_dump(mode="json"),
        inputs={role: n.ref for role, n in sorted(node.inputs.items())},
        fingerprint=node.fingerprint,
        schema=schema_to_dict(schema) if schema is not None else None,
        files=files,
        stats=stats,
        timings={k: round(v, 4) for k, v in timings.items()},
        meta=impl.meta(ctx),
        shards=[{"index": r.index, "seconds": round(r.seconds, 4), "stats": r.stats} for r in results],
        packages=package_versions(),
        host=host_info(),
    )
    if ctx.store.is_local:  # the folder is renamed into place whole: the sidecars must not go with it
        ctx.fs.rm(ctx.path(SHARDS_DIR), recursive=True)
    # else the store copies only the manifest's files and drops the work folder after the manifest, so
    # a kill mid-publish keeps the sidecars and the rerun skips the finished shards
    art = ctx.store.publish(ctx.workdir, manifest)
    log.info(
        "built %s: %s rows, %d files in %.1f s",
        art.ref,
        f"{manifest.rows:,}",
        len(files),
        sum(v for k, v in timings.items() if k in ("plan_s", "shards_wall_s", "finalize_s")),
    )
    return art


# ----------------------------------------------------------------------------------------- runners


def _runner_kind(node: Node) -> str:
    kind = node.run.runner.kind
    return node.impl.preferred_runner if kind == "auto" else kind


def _workers(node: Node, n_tasks: int) -> int:
    w = node.run.runner.workers or os.cpu_count() or 1
    return max(1, min(w, n_tasks))


def run_shard_on(ctx: StageContext, shard: Shard, gpu: int | None) -> ShardResult:
    """`run_shard` on GPU lane `gpu` (None: no lane): what a runner calls for a GPU stage's shard."""
    with on_gpu(gpu):
        return run_shard(ctx, shard)


def run_on_lanes(pools: list[cf.Executor], ctx: StageContext, shards: list[Shard]) -> Iterator[ShardResult]:
    """Run the shards on lanes, one pool of one worker per lane (lane i = GPU i): at most one shard per
    GPU at a time, and a lane's shards always in the same thread or process, so what a worker caches for
    its GPU (a model, an index) stays on that one GPU. The same lanes the flows give GPU shards."""
    queue = list(shards)
    free = list(range(len(pools)))
    running: dict[cf.Future[ShardResult], int] = {}
    while queue or running:
        while queue and free:
            lane = free.pop(0)
            running[pools[lane].submit(run_shard_on, ctx, queue.pop(0), lane)] = lane
        done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
        for f in done:
            free.append(running.pop(f))
            yield f.result()


def _pool(kind: str, workers: int) -> cf.Executor:
    if kind == "threads":
        return cf.ThreadPoolExecutor(workers)
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


def run_shards(node: Node, ctx: StageContext, shards: list[Shard]) -> list[ShardResult]:
    """Run the shards on `runner.kind`. On the thread and process runners a GPU stage's shards run on
    lanes, one per visible GPU (`run_on_lanes`); one shard at a time (serial) resolves its GPU as any
    worker does (LOCAL_RANK, else a claimed free GPU: pipeline.devices.resolve_device); on Dask each
    worker does the same, and Ray gives each GPU shard one GPU."""
    if not shards:
        return []
    kind = _runner_kind(node)
    workers = _workers(node, len(shards))
    gpus = visible_gpus(node.run) if node.impl.uses_gpu else 0
    if gpus and kind in ("threads", "processes"):
        workers = min(workers, gpus)
    bar = progress(total=len(shards), desc=f"{node.stage} shards", unit="shard")
    results: list[ShardResult] = []
    try:
        if kind == "serial" or workers == 1 or len(shards) == 1:
            for s in shards:
                results.append(run_shard(ctx, s))
                bar.update(1)
        elif kind in ("threads", "processes") and gpus:
            pools = [_pool(kind, 1) for _ in range(workers)]
            try:
                for r in run_on_lanes(pools, ctx, shards):
                    results.append(r)
                    bar.update(1)
            finally:
                for p in pools:
                    p.shutdown(wait=True)
        elif kind in ("threads", "processes"):
            with _pool(kind, workers) as pool:
                futs = [pool.submit(run_shard, ctx, s) for s in shards]
                for f in cf.as_completed(futs):
                    results.append(f.result())
                    bar.update(1)
        elif kind == "dask":
            from distributed import Client, LocalCluster, as_completed

            cluster = (
                None
                if node.run.runner.address
                else LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
                )
            )
            with Client(node.run.runner.address or cluster) as client:
                futs = client.map(run_shard, [ctx] * len(shards), shards, pure=False)
                for f in as_completed(futs):
                    results.append(f.result())
                    bar.update(1)
            if cluster is not None:
                cluster.close()
        elif kind == "ray":
            try:
                import ray
            except ImportError:
                raise ArtifactError("runner.kind=ray but ray is not installed (pip install ray)") from None
            ray.init(address=node.run.runner.address, ignore_reinit_error=True)
            # Ray hides every GPU from a task that asks for none
            remote = ray.remote(num_gpus=1)(run_shard) if gpus else ray.remote(run_shard)
            for r in ray.get([remote.remote(ctx, s) for s in shards]):
                results.append(r)
                bar.update(1)
        else:
            raise ValueError(f"unknown runner kind {kind}")
    finally:
        bar.close()
    return results


# ----------------------------------------------------------------------------------------- build


def missing_input_error(node: Node, role: str, child: Node) -> ArtifactError:
    over = node.input_refs[role].overrides
    sets = " ".join(f"--set {child.stage}.{k}={v}" for k, v in over.items())
    src = f" -c {node.run.source_file}" if node.run.source_file else ""
    return ArtifactError(
        f"{node.stage} needs input '{role}' = {child.ref}, which is not built. "
        f"Run `rpt run {child.stage}{src} {sets}`".rstrip()
        + " first, or add --with-deps."
    )


def build_node(node: Node, with_deps: bool = False) -> Artifact:
    store = ArtifactStore(node.run.root())
    if store.exists(node.stage, node.version):
        art = store.get(node.stage, node.version)
        log.info("%s is up to date", art.ref)
        return art
    inputs: dict[str, Artifact] = {}
    for role, child in node.inputs.items():
        if store.exists(child.stage, child.version):
            inputs[role] = store.get(child.stage, child.version)
        elif with_deps:
            inputs[role] = build_node(child, with_deps=True)
        else:
            raise missing_input_error(node, role, child)
    with build_lock(store, node.stage, node.version):
        if store.exists(node.stage, node.version):  # a concurrent build of the same version finished it
            log.info("%s was built by another process meanwhile", node.ref)
            return store.get(node.stage, node.version)
        plan = open_plan(node, inputs)
        return finish(node, plan, run_shards(node, plan.ctx, plan.todo))


def build(stage: str, run: RunConfigBase, with_deps: bool = False) -> Artifact:
    """Build (or find) the artifact of `stage` under `run`. A rerun with the same config and inputs is a no-op."""
    return build_node(resolve(stage, run), with_deps=with_deps)


def status(node: Node) -> dict[str, str]:
    """For each node of the DAG: 'built', 'partial' or 'missing'."""
    store = ArtifactStore(node.run.root())
    out = {}
    for n in node.walk():
        if store.exists(n.stage, n.version):
            out[n.ref] = "built"
        elif n.version in store.partials(n.stage):
            out[n.ref] = "partial"
        else:
            out[n.ref] = "missing"
    return out

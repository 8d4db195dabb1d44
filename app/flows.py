"""Prefect flows over the stage DAG: neighbors, supervision, train, evaluate, retrofit, full (and `stages`, any stages).

Thin by design: a flow resolves the artifact DAG from the run config (`pipeline.executor.resolve`), and
for each artifact submits Prefect tasks that call the executor's build API (`open_plan`, `run_shard`,
`finish`), the same one `rpt run` chains; stages know nothing of Prefect.

- One *stage task* per artifact, whose Prefect cache key is the artifact version (`Node.version`: stage,
  VERSION, hashed config section, input versions, fingerprint). Its cache records live in the artifact
  store (`<root>/.prefect-cache/`), next to what they describe. The store stays the truth: a stage whose
  artifact is missing from the store is rebuilt and its cache record overwritten, whatever Prefect remembers.
- A missing artifact is built by a *plan* task and one *shard* task per shard, mapped over the task runner
  named in the config (`runner.kind`: threads by default, processes, dask, ray); the stage task then
  publishes. Shards resume from their sidecars, so a failed or killed flow rerun redoes only missing shards.
- Tasks exchange small objects (nodes, shard payloads, `StageSummary`), never arrays or frames.
- Every stage task publishes a Prefect table artifact of its manifest stats (and an artifact's report.md
  as a markdown artifact); running stages show progress artifacts; `rpt.*` loggers reach Prefect.
- Tasks retry transient failures (I/O and network errors, lost workers) with exponential backoff, never
  user errors; `runner.timeouts` bounds each task of a stage.

The flows are a parent flow (loads the config, picks the task runner) and one child flow that does the
work under that runner, because a Prefect flow's task runner is fixed when it starts.
"""

from __future__ import annotations

import os

# Before prefect is imported anywhere in this process (and inherited by Dask/process workers).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rpt")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # rpt.* logs outside any flow run
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib
import logging
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, NoReturn

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.task_engine import TaskRunTimeoutError
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff
from pydantic import BaseModel, Field

from model.config import VARIANTS, Variant
from pipeline.config import RunConfigBase
from pipeline.dag import Target, resolve_targets, waves
from pipeline.devices import Lanes, visible_gpus
from pipeline.errors import ConfigError, RptError, StageTimeoutError
from pipeline.executor import Node, OpenPlan, finish, open_plan, run_shard_on
from pipeline.locks import build_lock
from pipeline.progress import Tick, report_progress
from pipeline.stage import Shard, ShardResult, StageContext
from pipeline.store import Artifact, ArtifactStore
from stages import REGISTRY, load_config
from stages.evaluate.report import REPORT_FILE
from stages.supervision_table import supervision_bm25

log = logging.getLogger("rpt.flows")

# Literal types (model.config.Variant, StageName) make Prefect's parameter schema list the choices, so
# the UI form offers them.
TRAIN_VARIANTS: tuple[Variant, ...] = VARIANTS
StageName = Literal[tuple(REGISTRY.names())]  # type: ignore[valid-type]
CACHE_DIR = ".prefect-cache"  # inside the artifact store root; dot-folders are not stages


# ------------------------------------------------------------------------------------------ targets


def flow_targets(
    name: str, variants: list[str] | None = None, stages: list[str] | None = None
) -> list[Target]:
    """What each flow builds (everything upstream of these comes with them)."""
    neighbors = [
        Target("bm25", {"query": "chunk"}),
        Target("bm25", supervision_bm25),  # the supervision table (stages.supervision_table)
        Target("dense"),
    ]
    supervision = [Target("scores")]
    train = [Target("train", {"variant": v}) for v in (variants or TRAIN_VARIANTS)]
    evaluate = [Target("evaluate")]
    table = {
        "retrofit": [Target("retrofit")],
        "neighbors": neighbors,
        "supervision": supervision,
        "train": train,
        "evaluate": evaluate,
        # everything the evaluation needs (its neighbor tables, the supervision, the variants
        # evaluate.variants names, which come with it as its inputs; --variants adds trainings); the
        # dense table only when evaluate.retrievers names it (`neighbors` builds it regardless)
        "full": supervision + (train if variants else []) + evaluate,
        "stages": [Target(s) for s in (stages or [])],
    }
    if name not in table:
        raise ConfigError(f"unknown flow '{name}' (flows: {', '.join(table)})")
    unknown = sorted(set(variants or ()) - set(TRAIN_VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)} (variants: {', '.join(TRAIN_VARIANTS)})")
    if name == "stages" and not stages:
        raise ConfigError("flow 'stages' needs at least one stage (rpt flow stages --target chunks)")
    for t in table[name]:
        if t.stage not in REGISTRY:
            raise ConfigError(
                f"flow '{name}' needs stage '{t.stage}', which is not registered in stages.REGISTRY (stages/__init__.py) "
                f"(registered: {', '.join(REGISTRY)}). Build what exists with `rpt flow stages --target STAGE`."
            )
    return table[name]


# ------------------------------------------------------------------------------------------ runners


def task_runner_for(run: RunConfigBase) -> TaskRunner[Any]:
    """The Prefect task runner named by `runner.kind` (auto means threads under the flows)."""
    rc = run.runner
    workers = rc.workers or os.cpu_count() or 1
    if rc.kind in ("auto", "threads"):
        return ThreadPoolTaskRunner(max_workers=workers)
    if rc.kind == "serial":
        return ThreadPoolTaskRunner(max_workers=1)
    if rc.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    if rc.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if rc.address:
            return DaskTaskRunner(address=rc.address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": ":0",
                # A task whose worker died never reports to Prefect, so no Prefect retry can follow it:
                # the scheduler reruns it on another worker instead, as often as runner.retries says.
                "scheduler_kwargs": {"allowed_failures": rc.retries},
            },
        )
    if rc.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "runner.kind=ray needs prefect-ray (pip install prefect-ray), "
                "or set runner.kind to threads, processes or dask"
            ) from None
        return RayTaskRunner(address=rc.address) if rc.address else RayTaskRunner()
    raise ConfigError(f"runner.kind={rc.kind!r} is not supported by the flows")


# ------------------------------------------------------------------------------------------ retries, timeouts


# OSErrors that state a fact about the input or the store, which a retry would only meet again.
PERMANENT_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# A worker that died under a task (by class name: Dask and the process pool need not be importable).
LOST_WORKER_ERRORS = frozenset({"KilledWorker", "CommClosedError", "BrokenProcessPool", "WorkerLostError"})


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: an I/O or network error or a lost worker, never a user error
    (`RptError`: bad config, bad input, a missing artifact), a programming error or a stage timeout."""
    if isinstance(exc, (RptError, TaskRunTimeoutError)):
        return False
    if any(c.__name__ in LOST_WORKER_ERRORS for c in type(exc).__mro__):
        return True
    # ConnectionError and TimeoutError are OSErrors too
    return isinstance(exc, OSError) and not isinstance(exc, PERMANENT_OS_ERRORS)


def retry_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's `retry_condition_fn`: retry only transient failures. A plain function, as Prefect
    calls only functions (a callable object or partial would be taken as "never retry")."""
    exc = state.data
    retry = isinstance(exc, BaseException) and is_transient(exc)
    if isinstance(exc, BaseException) and not retry:
        log.info("%s: %s is not transient; not retrying", task_run.name, type(exc).__name__)
    return retry


def task_options(run: RunConfigBase, stage: str) -> dict[str, Any]:
    """Retry and timeout options of a stage's plan and shard tasks, from the `runner` section (publish is
    not retried: its task sets retries to 0)."""
    rc = run.runner
    return {
        "retries": rc.retries,
        "retry_delay_seconds": exponential_backoff(rc.retry_delay_s)(rc.retries) if rc.retry_delay_s else 0,
        "retry_condition_fn": retry_transient,
        "timeout_seconds": rc.timeouts.get(stage),
    }


def raise_timeout(node: Node, exc: TaskRunTimeoutError) -> NoReturn:
    """Prefect's timeout says neither which stage nor which setting; this error says both."""
    limit = node.run.runner.timeouts.get(node.stage)
    where = f" in {node.run.source_file}" if node.run.source_file else ""
    raise StageTimeoutError(
        f"{node.ref}: a task of stage '{node.stage}' ran past runner.timeouts.{node.stage} = {limit:g} s"
        f"{where}; raise it (--set runner.timeouts.{node.stage}=SECONDS) or remove it"
    ) from exc


def result_of(fut: PrefectFuture[Any], node: Node) -> Any:
    """A task's result, or its exception, a timeout turned into a `StageTimeoutError` naming the stage."""
    try:
        return fut.result()
    except TaskRunTimeoutError as e:
        raise_timeout(node, e)


# ------------------------------------------------------------------------------------------ UI artifacts


@contextmanager
def progress_artifacts(run: RunConfigBase, label: str) -> Iterator[None]:
    """Show the progress bars of the stage code run in this context as Prefect progress artifacts of
    the current task run, updated at most every `runner.progress_s` seconds."""
    artifacts: dict[int, uuid.UUID] = {}

    def hook(t: Tick) -> None:
        # only from the task's own thread: elsewhere Prefect's run context (and API settings) is missing
        if t.percent is None or TaskRunContext.get() is None:
            return
        text = f"{label} · {t.desc}: {t.done:,.0f} / {t.total:,.0f} {t.unit}"
        if t.bar in artifacts:
            update_progress_artifact(artifacts[t.bar], t.percent, description=text)
        elif not t.final:
            artifacts[t.bar] = create_progress_artifact(t.percent, description=text)
        if t.final:
            artifacts.pop(t.bar, None)

    with report_progress(hook, run.runner.progress_s):
        yield


def publish_report(art: Artifact) -> None:
    """An artifact's report.md (evaluate's) as a Prefect markdown artifact, with where the artifact lies."""
    if not art.has(REPORT_FILE):
        return
    with art.fs.open(art.file(REPORT_FILE), "r", encoding="utf-8") as f:
        text = f.read()
    folder = Path(art.path).resolve().as_uri() if art.store.is_local else art.path
    # the report's relative links (plots/...) point into the artifact folder, which the UI cannot show
    # inline: make them links to the files
    text = re.sub(
        r"!?\[([^\]]*)\]\((?![a-z][a-z0-9+.-]*:|/|#)([^)]+)\)", lambda m: f"[{m[1]}]({folder}/{m[2]})", text
    )
    header = f"Artifact `{art.ref}` in [`{art.path}`]({folder})\n\n"
    create_markdown_artifact(
        markdown=header + text, key=f"{art.stage}-report", description=f"{REPORT_FILE} of `{art.ref}`"
    )


# ------------------------------------------------------------------------------------------ tasks


class StageSummary(BaseModel):
    """What a stage task returns and Prefect caches: the manifest's headline, never the data."""

    stage: str
    version: str
    ref: str
    path: str
    status: str = Field(
        description="built (here), found (in the store, built elsewhere) or cached (by Prefect)"
    )
    rows: int
    files: int
    bytes: int
    stats: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, art: Artifact, status: str) -> StageSummary:
        m = art.manifest
        return cls(
            stage=m.stage,
            version=m.version,
            ref=m.ref,
            path=art.path,
            status=status,
            rows=m.rows,
            files=len(m.files),
            bytes=sum(f.bytes for f in m.files),
            stats=m.stats,
            timings=m.timings,
            meta=m.meta,
        )


class ArtifactVersion(CachePolicy):
    """Cache key = the artifact version of the task's `node` parameter: nothing else decides what it builds."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        node: Node = inputs["node"]
        return f"{node.stage}-{node.version}"


def route_logs() -> None:
    """Make sure `rpt.*` records reach Prefect's API in this process (a Dask or process worker included)."""
    from prefect.logging.handlers import APILogHandler

    lg = logging.getLogger("rpt")
    if lg.level == logging.NOTSET:
        lg.setLevel(os.environ.get("RPT_LOG_LEVEL", "INFO").upper())
    if not any(isinstance(h, APILogHandler) for h in lg.handlers):
        lg.addHandler(APILogHandler())


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(node: Node) -> OpenPlan:
    """Open the build of a missing artifact and list the shards that still have to run."""
    route_logs()
    with progress_artifacts(node.run, f"{node.ref}/plan"):
        return open_plan(node)


@task(name="shard", cache_policy=NO_CACHE)
def shard_task(ctx: StageContext, shard: Shard, gpu: int | None = None) -> ShardResult:
    """One shard of one stage, through the executor (resumable: it records a sidecar when done)."""
    route_logs()
    with progress_artifacts(ctx.run, f"{ctx.stage}@{ctx.version}/{shard.name}"):
        return run_shard_on(ctx, shard, gpu)  # the executor's, as `rpt run` calls it on a lane


@task(name="stage", persist_result=True, result_serializer="json")
def stage_task(
    node: Node,
    plan: OpenPlan | None = None,
    results: list[ShardResult] | None = None,
    upstream: list[StageSummary] | None = None,
) -> StageSummary:
    """Publish a built artifact (plan given) or report the one in the store; cached on the artifact version."""
    route_logs()
    store = ArtifactStore(node.run.root())
    if plan is None or store.exists(node.stage, node.version):
        art = store.get(node.stage, node.version)
        status = "found"
    else:
        with progress_artifacts(node.run, node.ref):
            art = finish(node, plan, results or [])
        status = "built"
    summary = StageSummary.of(art, status)
    publish_stats(summary)
    publish_report(art)
    return summary


def publish_stats(s: StageSummary) -> None:
    """A Prefect table artifact of the manifest's headline, keyed by stage so the UI keeps its history."""
    create_table_artifact(
        table=stats_table(s), key=f"{s.stage}-stats", description=f"`{s.ref}` ({s.status}) at `{s.path}`"
    )


def stats_table(s: StageSummary) -> list[dict[str, str]]:
    """Manifest facts as (field, value) rows: rows, files, stats (flattened), meta, timings."""
    rows = [
        {"field": "artifact", "value": s.ref},
        {"field": "rows", "value": f"{s.rows:,}"},
        {"field": "files", "value": str(s.files)},
        {"field": "bytes", "value": f"{s.bytes:,}"},
    ]

    def flat(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                flat(f"{prefix}{k}.", v)
            else:
                rows.append(
                    {"field": f"{prefix}{k}", "value": f"{v:.4g}" if isinstance(v, float) else str(v)}
                )

    flat("stats.", s.stats)
    flat("meta.", s.meta)
    flat("timings.", s.timings)
    return rows


# ------------------------------------------------------------------------------------------ the DAG flow


def _cache_storage(root: str) -> Any:
    """Where stage tasks keep their cache records and results: beside the artifacts they describe."""
    store = ArtifactStore(root)
    if store.is_local:
        return Path(store.join(CACHE_DIR))
    # Prefect wants remote result storage as a block saved on its server
    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(basepath=store.join(CACHE_DIR))
    block.save(f"rpt-cache-{hashlib.sha256(root.encode()).hexdigest()[:12]}", overwrite=True)
    return block


def ray_gpu_request(kind: str, gpu: bool) -> AbstractContextManager[Any]:
    """Ray hides every GPU from a task that asks for none (CUDA_VISIBLE_DEVICES=""), so a GPU shard
    asks Ray for one; Ray then also keeps two GPU shards off one GPU."""
    if kind != "ray" or not gpu:
        return nullcontext()
    from prefect_ray.context import remote_options  # type: ignore[import-not-found]

    return remote_options(num_gpus=1)


def submit_build(
    node: Node, plan: OpenPlan, plan_fut: PrefectFuture[Any], kind: str, gpus: int, gpu_lanes: Lanes | None
) -> list[PrefectFuture[Any]]:
    """Map one shard task per pending shard: GPU stages on the flow's GPU lanes, serial-preferring stages
    (under runner.kind auto) on a lane of their own, the rest all at once."""
    impl = node.impl
    lanes = (
        gpu_lanes
        if impl.uses_gpu and gpu_lanes is not None
        else Lanes(1)
        if kind == "auto" and impl.preferred_runner == "serial"
        else None
    )
    futs: list[PrefectFuture[Any]] = []
    for shard in plan.todo:
        lane, after = lanes.take() if lanes is not None else (None, None)
        gpu = lane if impl.uses_gpu and gpus > 0 else None
        with ray_gpu_request(kind, gpu is not None):
            named = shard_task.with_options(
                task_run_name=f"{node.ref}/{shard.name}", **task_options(node.run, node.stage)
            )
            fut = named.submit(
                plan.ctx, shard, gpu, wait_for=[plan_fut] + ([after] if after is not None else [])
            )
        if lanes is not None:
            lanes.put(lane, fut)
        futs.append(fut)
    return futs


@flow(name="rpt-dag", flow_run_name="{flow_name}-dag")
def dag_flow(
    flow_name: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    variants: list[str] | None = None,
    stages: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Build every artifact of a flow's DAG, wave by wave, under the task runner this flow was given."""
    route_logs()
    run = load_config(config, overrides or [])
    _, nodes = resolve_targets(run, flow_targets(flow_name, variants, stages))
    store = ArtifactStore(run.root())
    storage = _cache_storage(run.root())
    cached_stage = stage_task.with_options(result_storage=storage, cache_policy=ArtifactVersion())
    gpus = visible_gpus(run) if any(n.impl.uses_gpu for n in nodes) else 0
    # One worker per GPU across the whole flow. Without a GPU, GPU stages take turns on one lane, or with
    # runner.cpu_lanes > 1 are not chained at all: the task runner's workers bound how many run at once
    # (work-conserving: a chain of lanes leaves one idle behind a long task on the other).
    gpu_lanes = Lanes(gpus) if gpus or run.runner.cpu_lanes == 1 else None
    futs: dict[str, PrefectFuture[StageSummary]] = {}
    helpers: dict[str, list[PrefectFuture[Any]]] = {}  # each building stage's plan and shard tasks

    by_ref = {n.ref: n for n in nodes}

    # Build locks of the versions this flow builds, held by this (the orchestrating) process from before
    # the plan task until the stage is published, since plan, shards and publish run in other processes.
    locks: dict[str, ExitStack] = {}

    def release(ref: str) -> None:
        if ref in locks:
            # Prefect fails a stage task as soon as one of its shards fails, while the other shards still
            # run in the workers: the lock is freed only once every task of the build has ended
            for h in helpers.get(ref, []):
                h.wait()
            locks.pop(ref).close()

    def outcome(ref: str) -> StageSummary:
        """The stage's summary; when it failed, the root cause (a failed shard's own exception)."""
        fut = futs[ref]
        fut.wait()
        release(ref)
        if not fut.state.is_completed():
            for h in helpers.get(ref, []):  # release() has waited for each of them
                if h.state.is_failed() or h.state.is_crashed():
                    result_of(h, by_ref[ref])  # raises the shard's exception
        return StageSummary.model_validate(result_of(fut, by_ref[ref]))  # a cache hit reads back JSON

    try:
        for wave in waves(nodes):
            for n in wave:  # inputs come from earlier waves; a failed one stops the flow with its own error
                for c in n.inputs.values():
                    outcome(c.ref)
            # in ref order, so that two flows wanting the same versions queue instead of deadlocking
            for n in sorted(wave, key=lambda n: n.ref):
                if not store.exists(n.stage, n.version):
                    locks[n.ref] = ExitStack()
                    locks[n.ref].enter_context(build_lock(store, n.stage, n.version))
            missing = [n for n in wave if not store.exists(n.stage, n.version)]  # a twin may have built some
            building = {n.ref for n in missing}
            for n in wave:
                if n.ref not in building:
                    release(n.ref)
            plans = {
                n.ref: plan_task.with_options(
                    task_run_name=f"{n.ref}/plan", **task_options(run, n.stage)
                ).submit(n)
                for n in missing
            }
            for n in wave:
                upstream = [futs[c.ref] for c in n.inputs.values()]
                # publish is not retried: it consumes the shard records and work files it reads, so a
                # second attempt could not succeed; a rerun of the flow rebuilds what is missing
                named = cached_stage.with_options(
                    task_run_name=n.ref, **{**task_options(run, n.stage), "retries": 0}
                )
                if n.ref in plans:
                    plan = result_of(plans[n.ref], n)
                    shard_futs = submit_build(n, plan, plans[n.ref], run.runner.kind, gpus, gpu_lanes)
                    helpers[n.ref] = [plans[n.ref], *shard_futs]
                    # the store lacks it: ignore (and then overwrite) whatever Prefect has cached for this version
                    futs[n.ref] = named.with_options(refresh_cache=True).submit(n, plan, shard_futs, upstream)
                else:
                    futs[n.ref] = named.submit(n, None, [], upstream)
        summaries = {n.ref: outcome(n.ref) for n in nodes}
    finally:  # a failed flow must not keep its locks (a test, or a caller that retries, lives on)
        for ref in list(locks):
            release(ref)
    report = []
    for n in nodes:
        s = summaries[n.ref]
        status = "cached" if futs[n.ref].state.name == "Cached" else s.status
        if status == "cached":  # the task did not run, so its stats table (and report) come from here
            publish_stats(s.model_copy(update={"status": status}))
            publish_report(store.get(n.stage, n.version))
        report.append(
            {
                "stage": n.stage,
                "version": n.version,
                "ref": n.ref,
                "status": status,
                "rows": s.rows,
                "path": s.path,
            }
        )
    create_table_artifact(
        table=[{k: str(v) for k, v in r.items()} for r in report],
        key=f"{flow_name}-summary",
        description=f"artifacts of flow `{flow_name}` under {store.uri}",
    )
    return report


def config_label(config: str | None) -> str:
    """A config's short name for run names: its file's stem, or `defaults`."""
    return Path(config).stem if config else "defaults"


def dag_run_name(flow_name: str, config: str | None, roots: list[Node]) -> str:
    """The child run's name: flow, config and what it builds (the target's version, or a digest of the
    targets'), so runs of one flow with other configs or settings are told apart in the UI."""
    if len(roots) == 1:
        what = roots[0].ref
    else:
        refs = sorted({r.ref for r in roots})
        what = f"{len(refs)} targets #{hashlib.sha256(','.join(refs).encode()).hexdigest()[:12]}"
    return f"{flow_name}-dag {config_label(config)} {what}"


def parent_run_name() -> str:
    """The parent run's name: flow, config and overrides (Prefect calls this when the run starts)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    sets = " ".join(params.get("overrides") or ())
    return f"{flow_run.flow_name} {config_label(params.get('config'))} {sets}".strip()[:120]


def run_flow(
    flow_name: str,
    config: str | None = None,
    overrides: Sequence[str] = (),
    variants: Sequence[str] | None = None,
    stages: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Check the flow's stages are installed, then run the DAG under the config's task runner."""
    config = config or None  # "" (a form left empty) means every default
    variants = list(variants) if variants else None
    stages = list(stages) if stages else None
    run = load_config(config, overrides)
    targets = flow_targets(flow_name, variants, stages)  # fail fast, before a server or a cluster starts
    roots, _ = resolve_targets(run, targets)
    child = dag_flow.with_options(
        task_runner=task_runner_for(run), flow_run_name=dag_run_name(flow_name, config, roots)
    )
    return child(flow_name, config, list(overrides), variants, stages)


# ------------------------------------------------------------------------------------------ the flows
# Plain typed parameters with defaults (no Optional, no config object): Prefect builds each deployment's
# form from these types and the docstrings' Args.


@flow(name="neighbors", flow_run_name=parent_run_name)
def neighbors(config: str = "", overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """documents -> tokenizer -> chunks -> bm25 (query chunk and chunk+target) + embeddings -> dense.

    Args:
        config: run config, a YAML path relative to the working directory; empty: every default
        overrides: settings over the config, each `section.key=value` as with `--set` (e.g. bm25.k=10)
    """
    return run_flow("neighbors", config, overrides)


@flow(name="supervision", flow_run_name=parent_run_name)
def supervision(config: str = "", overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """reference LM -> scores of the bm25 (chunk+target) candidates, with everything upstream.

    Args:
        config: run config, a YAML path relative to the working directory; empty: every default
        overrides: settings over the config, each `section.key=value` as with `--set` (e.g. bm25.k=10)
    """
    return run_flow("supervision", config, overrides)


@flow(name="train", flow_run_name=parent_run_name)
def train(
    config: str = "", overrides: Sequence[str] = (), variants: Sequence[Variant] = TRAIN_VARIANTS
) -> list[dict[str, Any]]:
    """One checkpoint per model variant.

    Args:
        config: run config, a YAML path relative to the working directory; empty: every default
        overrides: settings over the config, each `section.key=value` as with `--set` (e.g. bm25.k=10)
        variants: the model variants to train
    """
    return run_flow("train", config, overrides, variants)


@flow(name="evaluate", flow_run_name=parent_run_name)
def evaluate(config: str = "", overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The evaluation report, with every checkpoint and table it reads.

    Args:
        config: run config, a YAML path relative to the working directory; empty: every default
        overrides: settings over the config, each `section.key=value` as with `--set` (e.g. bm25.k=10)
    """
    return run_flow("evaluate", config, overrides)


@flow(name="retrofit", flow_run_name=parent_run_name)
def retrofit(config: str = "", overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A frozen causal LM (the reference LM, or retrofit.base_path) RETROfitted: CCA and a neighbor encoder
    trained on the chosen neighbor table, measured against the frozen LM (stages.retrofit).

    Args:
        config: run config, a YAML path relative to the working directory; empty: every default
        overrides: settings over the config, each `section.key=value` as with `--set` (e.g. retrofit.steps=300)
    """
    return run_flow("retrofit", config, overrides)


@flow(name="full", flow_run_name=parent_run_name)
def full(
    config: str = "", overrides: Sequence[str] = (), variants: Sequence[Variant] = ()
) -> list[dict[str, Any]]:
    """Everything: neighbors, supervision, the trained variants and their evaluation.

    Args:
        config: run config, a YAML path relative to the working directory; empty: every default
        overrides: settings over the config, each `section.key=value` as with `--set` (e.g. bm25.k=10)
        variants: model variants to train beside those evaluate.variants names (which are always trained)
    """
    return run_flow("full", config, overrides, variants)


@flow(name="stages", flow_run_name=parent_run_name)
def stages(
    targets: Sequence[StageName], config: str = "", overrides: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Any stages with their dependencies (e.g. ["chunks"]), for stages that belong to no other flow.

    Args:
        targets: the stages to build, each with everything it reads
        config: run config, a YAML path relative to the working directory; empty: every default
        overrides: settings over the config, each `section.key=value` as with `--set` (e.g. bm25.k=10)
    """
    return run_flow("stages", config, overrides, stages=targets)


FLOWS = {
    "neighbors": neighbors,
    "supervision": supervision,
    "train": train,
    "evaluate": evaluate,
    "retrofit": retrofit,
    "full": full,
    "stages": stages,
}


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect API; without one, start one temporary local server for this run.

    Prefect's own ephemeral mode would do that too, but its address stays inside this process, so every
    Dask or process-pool worker would start a server of its own; this one is exported to the workers."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()  # the process's default server, the one ephemeral mode would use
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # drain queued logs while the server still listens
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def run_named(
    name: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    variants: list[str] | None = None,
    targets: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Entry point of `rpt flow NAME`: run the named parent flow."""
    if name not in FLOWS:
        raise ConfigError(f"unknown flow '{name}' (flows: {', '.join(FLOWS)})")
    if variants and name not in ("train", "full"):
        raise ConfigError(f"--variant applies to the train and full flows, not '{name}'")
    if targets and name != "stages":
        raise ConfigError(f"--target applies to the stages flow, not '{name}'")
    load_config(config, overrides or [])  # a bad config fails before any server starts
    flow_targets(name, variants, targets)
    cfg, sets = config or "", list(overrides or [])
    with prefect_api():
        if name == "stages":
            return stages(targets or [], cfg, sets)
        if name == "train":
            return FLOWS[name](cfg, sets, variants or TRAIN_VARIANTS)
        if name == "full":  # evaluate.variants come with the evaluation; --variant adds trainings
            return FLOWS[name](cfg, sets, variants or ())
        return FLOWS[name](cfg, sets)

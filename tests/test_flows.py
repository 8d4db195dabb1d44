"""Prefect flows: the neighbors flow builds what the executor builds; a rerun hits the cache for every task; a
changed bm25 setting reruns bm25 only; a deleted artifact is rebuilt; a failed shard resumes; Dask with two
worker processes gives the same bytes as threads; the CLI and the deployments. Operations: transient
failures are retried and user errors are not, a stage timeout names the stage and its setting, the
evaluation report and progress bars reach the UI as artifacts, typed parameters and distinct run names.
One Prefect test server.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import flows  # first: it sets Prefect's logging environment before prefect is imported
from pipeline.errors import ArtifactError, ConfigError, InputError, StageTimeoutError
from pipeline.executor import build, resolve
from pipeline.store import ArtifactStore
from stages import REGISTRY, load_config
from stages.supervision_table import supervision_bm25
from tests.conftest import TINY_REFERENCE

REPO = Path(__file__).resolve().parents[1]
NEIGHBORS = ["documents", "tokenizer", "chunks", "bm25", "bm25", "embeddings", "dense"]
SUPERVISION = ["documents", "tokenizer", "chunks", "bm25", "reference", "scores"]


@pytest.fixture(scope="session")
def write_config(tiny_encoder: Path) -> Callable[..., str]:
    """Writes `<dir>/run.yaml` for a store in `<dir>/store`: four small standard-library packages (~700
    chunks; one document per shard), small k, and the tiny random encoder, so a whole flow takes seconds."""
    base: dict[str, Any] = {
        "documents": {
            "stdlib_include": ["json", "wsgiref", "textwrap", "colorsys"],
            "split_lists": {"valid": ["stdlib/textwrap"]},
            "shard_bytes": 15_000,
        },
        "tokenizer": {"vocab_size": 1024},
        "bm25": {"k": 4, "exclude_recent": 2, "shard_chunks": 150},
        "embeddings": {"model": str(tiny_encoder), "shard_chunks": 200},
        "dense": {"k": 4},
    }

    def write(d: Path, **sections: dict[str, Any]) -> str:
        data: dict[str, Any] = {"artifacts_root": str(d / "store"), **json.loads(json.dumps(base))}
        for name, sec in sections.items():
            data[name] = {**data.get(name, {}), **sec}
        d.mkdir(parents=True, exist_ok=True)
        (d / "run.yaml").write_text(yaml.safe_dump(data))
        return str(d / "run.yaml")

    return write


def file_digests(root: Path, ref: str) -> list[tuple[str, str]]:
    stage, version = ref.split("@")
    m = ArtifactStore(str(root)).get(stage, version).manifest
    return sorted((f.path, f.sha256) for f in m.files)


def statuses(report: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(stage, status) in DAG order."""
    return [(r["stage"], r["status"]) for r in report]


def ref_of(report: list[dict[str, Any]], stage: str) -> str:
    return next(r["ref"] for r in report if r["stage"] == stage)


# ------------------------------------------------------------------------------ Prefect API helpers


def latest_dag_run() -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["rpt-dag"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    return runs[0]


def task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def run_logs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def run_artifacts(flow_run_id: Any, kind: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return [a for a in arts if a.type == kind]


def table_artifacts(flow_run_id: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for a in run_artifacts(flow_run_id, "table"):
        out.setdefault(a.key, []).append(a)
    return out


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def keep_rpt_logger() -> Any:
    """The CLI and the flows configure the `rpt` logger; give other test modules (caplog) theirs back."""
    lg = logging.getLogger("rpt")
    saved = (list(lg.handlers), lg.propagate, lg.level)
    yield
    lg.handlers[:], lg.propagate, lg.level = saved[0], saved[1], saved[2]


@pytest.fixture(scope="session")
def prefect_server() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def thread_run(
    prefect_server: Any, write_config: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The neighbors flow built once with the default (thread) runner, and its child flow run."""
    d = tmp_path_factory.mktemp("flow-threads")
    cfg = write_config(d)
    report = flows.neighbors(cfg)
    return {"cfg": cfg, "root": d / "store", "report": report, "dag": latest_dag_run()}


# ------------------------------------------------------------------------------ flow runs


@pytest.mark.prefect
def test_neighbors_flow_builds_what_the_executor_builds(
    thread_run: dict[str, Any], write_config: Any, tmp_path: Path
) -> None:
    report = thread_run["report"]
    assert statuses(report) == [(s, "built") for s in NEIGHBORS]
    store = ArtifactStore(str(thread_run["root"]))
    arts = {r["ref"]: store.get(r["stage"], r["version"]) for r in report}
    for r in report:
        assert arts[r["ref"]].verify() == [] and arts[r["ref"]].manifest.rows == r["rows"]
    bm25 = sorted(a.manifest.meta["query"] for a in arts.values() if a.stage == "bm25")
    assert bm25 == ["chunk", "chunk+target"]  # both query modes

    # the executor alone (the CLI path; threads, as process pools start slowly here) builds the same
    # versions and the same bytes
    run = load_config(write_config(tmp_path, runner={"kind": "threads"}))
    built = [
        build("bm25", run.with_section("bm25", {"query": "chunk"}), with_deps=True),
        build("bm25", run.with_section("bm25", supervision_bm25(run)), with_deps=True),
    ]
    built.append(build("dense", run, with_deps=True))
    built += [build(s, run) for s in ("documents", "tokenizer", "chunks", "embeddings")]
    assert sorted(a.ref for a in built) == sorted(arts)
    for ref in arts:
        assert file_digests(tmp_path / "store", ref) == file_digests(thread_run["root"], ref)

    # Prefect saw one plan task and one task per shard, every stage published its stats table, and
    # the project's rpt.* logs reached the run's logs
    names = [t.name for t in task_runs(thread_run["dag"].id)]
    chunks = ref_of(report, "chunks")
    assert names.count(f"{chunks}/plan") == 1 and sum(n.startswith(f"{chunks}/0") for n in names) == 4
    tables = table_artifacts(thread_run["dag"].id)
    assert len(tables["bm25-stats"]) == 2 and "neighbors-summary" in tables
    rows = {row["field"]: row["value"] for row in json.loads(tables["dense-stats"][0].data)}
    assert rows["rows"] == f"{arts[ref_of(report, 'dense')].manifest.rows:,}" and "meta.source" in rows
    assert any(log.name.startswith("rpt.") for log in run_logs(thread_run["dag"].id))


@pytest.mark.prefect
def test_rerun_hits_the_cache_for_every_task(thread_run: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    store = ArtifactStore(str(thread_run["root"]))
    created = {
        r["ref"]: store.get(r["stage"], r["version"]).manifest.created_at for r in thread_run["report"]
    }
    out = CliRunner().invoke(app, ["flow", "neighbors", "-c", thread_run["cfg"]])
    assert out.exit_code == 0, out.output
    lines = [ln.split() for ln in out.output.splitlines() if ln.startswith(("cached", "built", "found"))]
    assert sorted((ln[0], ln[1]) for ln in lines) == sorted(("cached", ref) for ref in created)
    dag = latest_dag_run()
    runs = task_runs(dag.id)
    assert sorted(t.name for t in runs) == sorted(created)  # no plan or shard task ran
    assert all(t.state.name == "Cached" for t in runs)
    tables = table_artifacts(dag.id)  # cached stages still show their stats in this run
    assert all(
        "(cached)" in a.description for key, arts in tables.items() if key.endswith("-stats") for a in arts
    )
    assert sum(len(arts) for key, arts in tables.items() if key.endswith("-stats")) == len(created)
    assert {ref: store.get(*ref.split("@")).manifest.created_at for ref in created} == created


@pytest.mark.prefect
def test_changed_setting_reruns_only_what_depends_on_it(thread_run: dict[str, Any]) -> None:
    cfg = thread_run["cfg"]
    report = flows.neighbors(cfg, ["bm25.exclude_recent=1"])
    assert statuses(report) == [(s, "built" if s == "bm25" else "cached") for s in NEIGHBORS]
    report = flows.neighbors(cfg, ["chunks.chunk_len=32"])
    assert statuses(report) == [
        (s, "cached" if s in ("documents", "tokenizer") else "built") for s in NEIGHBORS
    ]
    # unhashed settings (how, not what) change no version
    report = flows.neighbors(cfg, ["bm25.shard_chunks=100", "embeddings.batch_size=7", "runner.workers=1"])
    assert statuses(report) == [(s, "cached") for s in NEIGHBORS]


@pytest.mark.prefect
def test_changed_bm25_setting_reruns_bm25_and_its_dependents(
    prefect_server: Any, write_config: Any, tmp_path: Path
) -> None:
    """In the supervision flow scores depends on bm25: a bm25 setting rebuilds both, nothing else."""
    cfg = write_config(tmp_path, reference=TINY_REFERENCE, scores={"candidates": 4})
    first = flows.supervision(cfg)
    assert sorted(statuses(first)) == sorted((s, "built") for s in SUPERVISION)
    again = flows.supervision(cfg, ["bm25.k1=1.2"])
    assert sorted(statuses(again)) == sorted(
        (s, "built" if s in ("bm25", "scores") else "cached") for s in SUPERVISION
    )
    changed = {r["stage"] for r in again if r["ref"] not in {x["ref"] for x in first}}
    assert changed == {"bm25", "scores"}
    store = ArtifactStore(str(tmp_path / "store"))
    scores = store.get("scores", ref_of(again, "scores").split("@")[1])
    assert scores.manifest.inputs["bm25"] == ref_of(again, "bm25")


@pytest.mark.prefect
def test_deleted_artifact_is_rebuilt_despite_the_cache(thread_run: dict[str, Any]) -> None:
    ref = ref_of(thread_run["report"], "embeddings")
    before = file_digests(thread_run["root"], ref)
    shutil.rmtree(thread_run["root"] / "embeddings" / ref.split("@")[1])
    report = flows.neighbors(thread_run["cfg"])
    # dense still exists (its version does not change), so only embeddings is rebuilt
    assert statuses(report) == [(s, "built" if s == "embeddings" else "cached") for s in NEIGHBORS]
    assert file_digests(thread_run["root"], ref) == before


@pytest.mark.prefect
def test_failed_shard_resumes_on_rerun(
    thread_run: dict[str, Any], write_config: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bm25 = REGISTRY.get("bm25")
    real = bm25.run_shard
    calls: list[tuple[str, int]] = []

    def failing(ctx: Any, shard: Any) -> Any:
        calls.append((ctx.version, shard.index))
        if shard.index == 1:
            raise RuntimeError("shard 1 died")
        return real(ctx, shard)

    def counting(ctx: Any, shard: Any) -> Any:
        calls.append((ctx.version, shard.index))
        return real(ctx, shard)

    sets = ["bm25.k1=1.2"]  # changes both tables (bm25.k would not: the supervision table's k is scores')
    monkeypatch.setattr(bm25, "run_shard", failing)
    with pytest.raises(Exception, match="shard 1 died"):
        flows.neighbors(thread_run["cfg"], sets)
    assert sorted(i for _, i in calls) == [0, 0, 1, 1, 2, 2, 3, 3]  # both modes; the other shards finished
    calls.clear()
    monkeypatch.setattr(bm25, "run_shard", counting)
    report = flows.neighbors(thread_run["cfg"], sets)
    assert [s for s in statuses(report) if s[0] == "bm25"] == [("bm25", "built")] * 2
    assert sorted(i for _, i in calls) == [1, 1]  # the finished shards resumed from their sidecars
    run = load_config(write_config(tmp_path, bm25={"k1": 1.2}, runner={"kind": "threads"}))
    art = build("bm25", run.with_section("bm25", {"query": "chunk"}), with_deps=True)
    assert file_digests(tmp_path / "store", art.ref) == file_digests(thread_run["root"], art.ref)


@pytest.mark.prefect
def test_dask_two_workers_match_threads_byte_for_byte(
    thread_run: dict[str, Any], write_config: Any, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path)
    report = flows.neighbors(cfg, ["runner.kind=dask", "runner.workers=2"])
    assert statuses(report) == [(s, "built") for s in NEIGHBORS]
    assert [r["ref"] for r in report] == [r["ref"] for r in thread_run["report"]]
    for r in report:
        assert file_digests(tmp_path / "store", r["ref"]) == file_digests(thread_run["root"], r["ref"])
    runs = task_runs(latest_dag_run().id)
    assert sum(t.name.startswith(f"{ref_of(report, 'documents')}/0") for t in runs) == 4
    assert all(t.state.is_completed() for t in runs)


# ------------------------------------------------------------------------------ no server needed


def test_flows_need_registered_stages(
    monkeypatch: pytest.MonkeyPatch, write_config: Any, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path)
    load_config(cfg)  # the config model is built once, with every stage; alone this test would build it here
    monkeypatch.delitem(REGISTRY.modules, "dense")
    with pytest.raises(ConfigError, match=r"needs stage 'dense'.*stages.REGISTRY"):
        flows.flow_targets("neighbors")
    with pytest.raises(ConfigError, match="needs stage 'dense'"):  # before any server or cluster starts
        flows.run_named("neighbors", cfg)
    with pytest.raises(ConfigError, match="unknown flow 'neighbours'"):
        flows.run_named("neighbours", cfg)
    with pytest.raises(ConfigError, match="--variant applies"):
        flows.run_named("stages", cfg, variants=["baseline"], targets=["chunks"])
    with pytest.raises(ConfigError, match="unknown variant"):  # before the flow's parameter check
        flows.run_named("train", cfg, variants=["rpt_semm"])


def test_rpt_flow_passes_variants_as_each_flow_reads_them(
    monkeypatch: pytest.MonkeyPatch, write_config: Any, tmp_path: Path
) -> None:
    """`rpt flow train` without --variant trains all four; `rpt flow full` without it passes none, so the
    evaluation's variants decide (passing all four trained a variant the evaluation did not read)."""
    from contextlib import nullcontext

    cfg = write_config(tmp_path)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(flows, "prefect_api", nullcontext)
    for name in ("train", "full"):
        monkeypatch.setitem(flows.FLOWS, name, lambda c, s, v, name=name: seen.update({name: tuple(v)}))
    flows.run_named("train", cfg)
    flows.run_named("full", cfg)
    assert seen == {"train": tuple(flows.TRAIN_VARIANTS), "full": ()}
    flows.run_named("full", cfg, variants=["rpt_lex"])
    assert seen["full"] == ("rpt_lex",)


def test_flow_dags(write_config: Any, tmp_path: Path) -> None:
    """Each flow's DAG: inputs in earlier waves, every artifact once, the artifacts each flow promises."""
    run = load_config(write_config(tmp_path))
    for name in ("neighbors", "supervision", "train", "evaluate", "retrofit", "full"):
        roots, nodes = flows.resolve_targets(run, flows.flow_targets(name))
        wave_of = {n.ref: i for i, w in enumerate(flows.waves(nodes)) for n in w}
        assert sorted(wave_of) == sorted(n.ref for n in nodes) and len(set(wave_of)) == len(nodes)
        for n in nodes:
            assert all(wave_of[c.ref] < wave_of[n.ref] for c in n.inputs.values())
        assert roots[0].version == resolve(roots[0].stage, roots[0].run).version
    stages_of = {
        name: sorted(n.stage for n in flows.resolve_targets(run, flows.flow_targets(name))[1])
        for name in ("supervision", "train", "full")
    }
    assert stages_of["supervision"] == sorted(SUPERVISION)
    assert stages_of["train"].count("train") == len(flows.TRAIN_VARIANTS)
    # every stage but retrofit, which joins the evaluation when evaluate.retrofit is set (its own flow otherwise)
    assert set(stages_of["full"]) == set(REGISTRY) - {"retrofit"} and stages_of["full"].count("evaluate") == 1
    with_retrofit = run.with_section("evaluate", {"retrofit": True})
    full = sorted(n.stage for n in flows.resolve_targets(with_retrofit, flows.flow_targets("full"))[1])
    assert set(full) == set(REGISTRY)
    # full trains the variants the evaluation names (every one by default), and --variants adds more
    two = run.with_section("evaluate", {"variants": ["baseline", "rpt_sem"]})
    trained = lambda r, v=None: sorted(  # noqa: E731
        n.cfg.variant
        for n in flows.resolve_targets(r, flows.flow_targets("full", v))[1]
        if n.stage == "train"
    )
    assert trained(run) == sorted(flows.TRAIN_VARIANTS)
    assert trained(two) == ["baseline", "rpt_sem"]
    assert trained(two, ["rpt_lex"]) == ["baseline", "rpt_lex", "rpt_sem"]
    _, nodes = flows.resolve_targets(run, flows.flow_targets("neighbors"))
    assert sorted(n.stage for n in nodes) == sorted(NEIGHBORS)
    assert sorted(n.cfg.query for n in nodes if n.stage == "bm25") == ["chunk", "chunk+target"]


def test_train_flow_targets_every_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY.modules, "train", "stages.train")  # only the name is checked here
    assert [dict(t.overrides) for t in flows.flow_targets("train")] == [
        {"variant": v} for v in flows.TRAIN_VARIANTS
    ]
    assert [t.overrides["variant"] for t in flows.flow_targets("train", ["rpt_sem"])] == ["rpt_sem"]


def test_task_runner_follows_the_config(write_config: Any, tmp_path: Path) -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    run = load_config(write_config(tmp_path))

    def runner(**kw: Any) -> Any:
        return flows.task_runner_for(run.model_copy(update={"runner": run.runner.model_copy(update=kw)}))

    assert isinstance(runner(kind="auto"), ThreadPoolTaskRunner)
    assert runner(kind="threads", workers=3)._max_workers == 3
    assert runner(kind="serial")._max_workers == 1
    assert isinstance(runner(kind="processes", workers=2), ProcessPoolTaskRunner)
    local = runner(kind="dask", workers=2, retries=1)
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 2
    assert local.cluster_kwargs["scheduler_kwargs"] == {"allowed_failures": 1}  # lost workers: runner.retries
    assert runner(kind="dask", address="tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="prefect-ray"):
            runner(kind="ray")


def test_gpu_lanes_give_each_gpu_one_shard_at_a_time() -> None:
    lanes = flows.Lanes(2)
    taken = []
    for k in range(5):  # e.g. three shards of one GPU stage, then two of another
        lane, after = lanes.take()
        taken.append((lane, after))
        lanes.put(lane, f"task{k}")
    assert taken == [(0, None), (1, None), (0, "task0"), (1, "task1"), (0, "task2")]
    cpu = flows.Lanes(0)  # no GPU: one lane, GPU stages take turns on the CPU
    assert [cpu.take()[0] for _ in range(3)] == [0, 0, 0]


def test_prefect_yaml_deploys_every_flow() -> None:
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployed = {}
    for d in spec["deployments"]:
        # a module entrypoint: the flow's tasks pickle as app.flows.*, which a remote Dask or Ray worker
        # imports from the installed package (a file entrypoint would load the file as module `flows`)
        path, _, name = d["entrypoint"].partition(":")
        assert path == "app.flows"
        fl = load_flow_from_entrypoint(d["entrypoint"])
        assert fl is getattr(flows, name) and fl.fn.__module__ == "app.flows"
        assert isinstance(fl, Flow) and fl is flows.FLOWS[fl.name]
        assert d["work_pool"]["name"] == "rpt-process"
        assert set(d.get("parameters", {})) <= set(fl.parameters.properties)
        fl.validate_parameters(d.get("parameters", {}))  # what a deployment run would be refused for
        deployed[fl.name] = d["name"]
    assert set(deployed) == set(flows.FLOWS)


def test_a_gpu_lane_decides_every_gpu_stages_device(monkeypatch) -> None:
    """On a machine with several GPUs (faked here), a shard on lane k runs on cuda:k in every GPU stage:
    reference/scores/evaluate (pipeline.devices), embeddings and train; torchrun's LOCAL_RANK wins."""
    import threading

    import torch

    from pipeline.devices import lane_slot, on_gpu, resolve_device
    from stages.embeddings import resolve_device as embeddings_device

    current = {"dev": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["dev"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.update(dev=d))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    seen: dict[int, tuple] = {}

    def shard(slot: int) -> None:
        with on_gpu(slot):
            seen[slot] = (
                resolve_device("auto"),
                embeddings_device("auto"),
                resolve_device("cuda", "train.device"),
            )

    threads = [threading.Thread(target=shard, args=(s,)) for s in (1, 3)]
    for t in threads:
        t.start()
        t.join()
    assert seen == {
        1: (torch.device("cuda", 1),) * 3,
        3: (torch.device("cuda", 3),) * 3,
    }
    assert lane_slot() is None and current["dev"] == 0  # the lane ends with the shard
    with on_gpu(2):
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert resolve_device("auto") == torch.device("cuda", 1) == resolve_device("cuda", "train.device")


def test_ray_gives_gpu_shards_a_gpu(monkeypatch) -> None:
    """Under runner.kind=ray a GPU shard asks Ray for one GPU (else Ray hides every GPU from it)."""
    import sys
    import types
    from contextlib import contextmanager

    asked: list[dict] = []

    @contextmanager
    def remote_options(**kw: Any) -> Any:
        asked.append(kw)
        yield

    fake = types.ModuleType("prefect_ray.context")
    fake.remote_options = remote_options  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "prefect_ray", types.ModuleType("prefect_ray"))
    monkeypatch.setitem(sys.modules, "prefect_ray.context", fake)
    for kind, gpu in [("ray", False), ("threads", True), ("dask", True), ("ray", True)]:
        with flows.ray_gpu_request(kind, gpu):
            pass
    assert asked == [{"num_gpus": 1}]


# ------------------------------------------------------------------------------ operations


def latest_run(flow_name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )[0]


def documents_shards(
    monkeypatch: pytest.MonkeyPatch, fail: Callable[[int, int], BaseException | None]
) -> Any:
    """Patch the documents stage's shards: `fail(shard index, attempt)` may return an error to raise."""
    stage = REGISTRY.get("documents")
    real = stage.run_shard
    calls: dict[int, int] = {}

    def patched(ctx: Any, shard: Any) -> Any:
        calls[shard.index] = calls.get(shard.index, 0) + 1
        err = fail(shard.index, calls[shard.index])
        if err is not None:
            raise err
        return real(ctx, shard)

    monkeypatch.setattr(stage, "run_shard", patched)
    return calls


@pytest.mark.prefect
def test_transient_failure_is_retried_and_a_user_error_is_not(
    prefect_server: Any, write_config: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runner = {"retries": 2, "retry_delay_s": 0.1}
    calls = documents_shards(monkeypatch, lambda i, k: OSError("NFS hiccup") if i == 0 and k == 1 else None)
    report = flows.stages(["documents"], write_config(tmp_path / "a", runner=runner))
    assert statuses(report) == [("documents", "built")]
    assert calls[0] == 2 and all(n == 1 for i, n in calls.items() if i) and len(calls) == 4
    names = [t.name for t in task_runs(latest_dag_run().id)]
    assert names.count(f"{report[0]['ref']}/00000") == 1  # one task run, retried (not a second task)

    calls = documents_shards(
        monkeypatch, lambda i, k: InputError("bad bytes", path="x.py") if i == 0 else None
    )
    with pytest.raises(InputError, match="x.py: bad bytes"):
        flows.stages(["documents"], write_config(tmp_path / "b", runner=runner))
    assert calls[0] == 1


@pytest.mark.prefect
def test_a_lost_dask_worker_is_retried(
    prefect_server: Any, write_config: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker process that dies under a shard never reports to Prefect: the scheduler reruns the task
    on another worker (runner.retries times), and Prefect takes the rerun of the same task run."""
    mark = tmp_path / "killed"
    preload = tmp_path / "die_once.py"  # runs in each Dask worker process as it starts
    preload.write_text(
        "import os\n"
        "from pathlib import Path\n"
        "from stages import REGISTRY\n"
        "stage = REGISTRY.get('documents')\n"
        "real = type(stage).run_shard.__get__(stage)\n"
        "def dying(ctx, shard):\n"
        f"    if shard.index == 0 and not Path({str(mark)!r}).exists():\n"
        f"        Path({str(mark)!r}).write_text('x')\n"
        "        os._exit(1)\n"
        "    return real(ctx, shard)\n"
        "stage.run_shard = dying\n"
    )
    real_runner = flows.task_runner_for

    def with_preload(run: Any) -> Any:
        runner = real_runner(run)
        runner.cluster_kwargs["preload"] = [str(preload)]
        return runner

    monkeypatch.setattr(flows, "task_runner_for", with_preload)
    cfg = write_config(tmp_path, runner={"kind": "dask", "workers": 2, "retries": 1})
    report = flows.stages(["documents"], cfg)
    assert mark.exists() and statuses(report) == [("documents", "built")]
    assert ArtifactStore(str(tmp_path / "store")).get(*report[0]["ref"].split("@")).verify() == []


@pytest.mark.prefect
def test_a_stage_timeout_names_the_stage_and_the_setting(
    prefect_server: Any, write_config: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import time

    finished: list[int] = []

    def slow(i: int, k: int) -> None:
        for _ in range(600):  # 30 s in short sleeps: Prefect interrupts a worker thread between them
            time.sleep(0.05)
        finished.append(i)

    calls = documents_shards(monkeypatch, slow)
    cfg = write_config(tmp_path, runner={"timeouts": {"documents": 1.0}, "retry_delay_s": 0})
    with pytest.raises(
        StageTimeoutError, match=r"stage 'documents' ran past runner\.timeouts\.documents = 1 s"
    ):
        flows.stages(["documents"], cfg)
    # the flow ends only once every shard task has: none ran to its end, and none was retried
    assert calls and finished == [] and set(calls.values()) == {1}


@pytest.mark.prefect
def test_evaluate_flow_publishes_its_report_and_progress(
    prefect_server: Any, write_config: Any, tmp_path: Path
) -> None:
    """The evaluate flow (one tiny baseline) leaves report.md as a markdown artifact naming the artifact's
    folder, and progress artifacts of its train and evaluate shards (updated on every step here)."""
    cfg = write_config(
        tmp_path,
        documents={"split_lists": {"valid": ["stdlib/textwrap"], "test": ["stdlib/colorsys"]}},
        reference=TINY_REFERENCE,
        scores={"candidates": 4, "splits": ["test"]},
        train={
            "steps": 2,
            "seq_len": 256,
            "batch_size": 1,
            "warmup_steps": 1,
            "workers": 0,
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "window": 128, "stride": 64},
        },
        evaluate={"variants": ["baseline"], "retrievers": [], "neighbors": [2], "threads": 1},
        bm25={"exclude_recent": 1},
        runner={"progress_s": 0},
    )
    report = flows.evaluate(cfg)
    ev = ref_of(report, "evaluate")
    dag = latest_dag_run()
    assert dag.name == f"evaluate-dag run {ev}"
    (md,) = run_artifacts(dag.id, "markdown")
    art = ArtifactStore(str(tmp_path / "store")).get(*ev.split("@"))
    assert (
        md.key == "evaluate-report" and f"`{ev}`" in md.data and Path(art.path).resolve().as_uri() in md.data
    )
    assert md.data.split("\n\n", 1)[1].startswith(art.local_path("report.md").read_text()[:200])
    bars = [
        a
        for a in run_artifacts(dag.id, "progress")
        if "train" in a.description or "evaluate" in a.description
    ]
    assert {a.description.split(" · ")[0].split("@")[0] for a in bars} >= {"train", "evaluate"}
    assert all(a.data == 100 for a in bars)


def test_only_transient_failures_are_retried(write_config: Any, tmp_path: Path) -> None:
    from concurrent.futures.process import BrokenProcessPool

    from prefect.client.schemas.objects import State
    from prefect.task_engine import TaskRunTimeoutError

    class KilledWorker(Exception):  # matched by name, as distributed's is
        pass

    transient = [OSError("EIO"), ConnectionResetError(), TimeoutError(), BrokenProcessPool(), KilledWorker()]
    permanent = [
        InputError("bad row", path="x.parquet"),
        ConfigError("bm25.k: bad"),
        ArtifactError("missing"),
        FileNotFoundError("corpus/x.txt"),
        PermissionError(),
        ValueError(),
        RuntimeError("CUDA out of memory"),
        TaskRunTimeoutError("timed out"),
    ]
    assert [flows.is_transient(e) for e in transient] == [True] * len(transient)
    assert [flows.is_transient(e) for e in permanent] == [False] * len(permanent)

    class Run:
        name = "documents@v/00000"

    assert flows.retry_transient(None, Run(), State(type="FAILED", data=OSError()))  # type: ignore[arg-type]
    assert not flows.retry_transient(None, Run(), State(type="FAILED", data=InputError("x")))  # type: ignore[arg-type]

    run = load_config(
        write_config(tmp_path), ["runner.retries=3", "runner.retry_delay_s=2", "runner.timeouts.train=60"]
    )
    opts = flows.task_options(run, "train")
    assert opts["retries"] == 3 and opts["retry_delay_seconds"] == [2, 4, 8] and opts["timeout_seconds"] == 60
    assert opts["retry_condition_fn"] is flows.retry_transient
    assert flows.task_options(run, "bm25")["timeout_seconds"] is None
    with pytest.raises(ConfigError, match="unknown stage 'trian'"):
        load_config(write_config(tmp_path), ["runner.timeouts.trian=60"])


def test_progress_bars_report_through_a_rate_limited_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages' bars call the hook a flow installs at most once per interval (never per batch) and once at
    the end; a bar that ends within the interval reports nothing, and a failing hook fails no stage."""
    import pipeline.progress as pp

    clock = {"t": 0.0}
    monkeypatch.setattr(pp.time, "monotonic", lambda: clock["t"])
    ticks: list[Any] = []
    with pp.report_progress(ticks.append, every_s=10):
        bar = pp.progress(total=1000, desc="embeddings", unit="chunk")
        for _ in range(1000):  # 1000 batches over 31.25 s: reports at 10, 20 and 30 s, and the end
            clock["t"] += 1 / 32
            bar.update(1)
        bar.close()
        quick = pp.progress(range(50), desc="quick")
        assert list(quick) == list(range(50))
        quick.close()
        pp.progress(total=5, disable=True).update(5)  # a bar its caller turned off (e.g. rank > 0)
    assert [(t.desc, t.done, t.percent, t.final) for t in ticks] == [
        ("embeddings", 320, 32.0, False),
        ("embeddings", 640, 64.0, False),
        ("embeddings", 960, 96.0, False),
        ("embeddings", 1000, 100.0, True),
    ]

    def broken(t: Any) -> None:
        raise ConnectionError("API down")

    with pp.report_progress(broken, every_s=0):
        bar = pp.progress(total=3)
        bar.update(3)
        bar.close()
    bar = pp.progress(total=3)  # outside the context: a plain bar
    assert type(bar) is not pp._ReportingBar


def test_flow_parameters_are_typed_for_the_ui_form() -> None:
    """Prefect builds a deployment's form from the parameter schema: plain types with defaults and
    descriptions (no Optional unions), the variants and stages as choices."""
    for name, fl in flows.FLOWS.items():
        props = fl.parameters.properties
        assert props["config"]["type"] == "string" and props["config"]["default"] == ""
        assert props["overrides"]["type"] == "array" and props["overrides"]["items"] == {"type": "string"}
        assert all(p.get("description") for p in props.values()), name
    variants = flows.train.parameters.properties["variants"]
    assert variants["items"]["enum"] == list(flows.TRAIN_VARIANTS) == variants["default"]
    assert set(flows.stages.parameters.properties["targets"]["items"]["enum"]) == set(REGISTRY)


def test_child_runs_are_named_after_flow_config_and_targets(write_config: Any, tmp_path: Path) -> None:
    run = load_config(write_config(tmp_path))
    roots, _ = flows.resolve_targets(run, flows.flow_targets("neighbors"))
    name = flows.dag_run_name("neighbors", "configs/demo.yaml", roots)
    assert name.startswith("neighbors-dag demo 3 targets #")
    other = load_config(write_config(tmp_path), ["bm25.k=5"])
    roots_k5, _ = flows.resolve_targets(other, flows.flow_targets("neighbors"))
    assert flows.dag_run_name("neighbors", "configs/demo.yaml", roots_k5) != name
    (ev,), _ = flows.resolve_targets(run, flows.flow_targets("stages", stages=["chunks"]))
    assert flows.dag_run_name("stages", None, [ev]) == f"stages-dag defaults {ev.ref}"


BUILD_HOLDING_THE_LOCK = """
import os, sys, time
from stages import load_config
from pipeline.executor import open_build, pending_shards, publish, resolve, run_shard
from pipeline.locks import build_lock
from pipeline.store import ArtifactStore

run = load_config(sys.argv[1])
node = resolve("documents", run)
with build_lock(ArtifactStore(run.root()), node.stage, node.version):
    print("locked", flush=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the test has seen the flow wait for this build
    ctx = open_build(node, {})
    todo, done = pending_shards(ctx, node.impl.plan(ctx))
    publish(ctx, node, done + [run_shard(ctx, s) for s in todo], {})
"""


@pytest.mark.prefect
def test_a_flow_waits_for_another_process_building_the_same_version(
    prefect_server: Any, write_config: Any, tmp_path: Path
) -> None:
    """A manual `rpt run` and a scheduled flow on one store: the flow waits for the version the other
    process is building (it holds the lock until the test has seen the flow wait), then finds it instead
    of building it a second time."""
    import subprocess
    import sys
    import threading
    import time

    from tests.conftest import REPO

    cfg = write_config(tmp_path / "a")
    version = resolve("documents", load_config(cfg)).version
    marker = tmp_path / "go-on"
    waiting = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if f"documents@{version} is being built by" in record.getMessage():
                waiting.set()

    handler = Waiting(logging.INFO)
    locks_log = logging.getLogger("rpt.locks")
    level = locks_log.level
    locks_log.addHandler(handler)
    locks_log.setLevel(logging.INFO)
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD_HOLDING_THE_LOCK, cfg, str(marker)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    result: dict[str, Any] = {}

    def flow() -> None:
        try:
            result["report"] = flows.stages(["documents"], cfg)
        except BaseException as e:  # handed to the test's thread
            result["error"] = e

    thread = threading.Thread(target=flow, daemon=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        thread.start()
        deadline = time.monotonic() + 90
        while not waiting.wait(timeout=0.2) and thread.is_alive() and time.monotonic() < deadline:
            pass
        assert waiting.is_set(), f"the flow did not wait for the other process's build: {result}"
        assert thread.is_alive()  # still waiting: the other process has not built it yet
    finally:
        marker.touch()  # the other process goes on (and ends) whatever happened
        thread.join(timeout=120)
        _, err = proc.communicate(timeout=120)
        locks_log.removeHandler(handler)
        locks_log.setLevel(level)
    assert proc.returncode == 0, err[-2000:]
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert statuses(result["report"]) == [("documents", "found")]  # built once, by the other process

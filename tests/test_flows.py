"""Prefect flows: builds, cache hits on artifact versions, reruns of dependents only, rebuilds of deleted
artifacts, shard resume, Dask == threads byte for byte, the CLI, deployments. One Prefect test server per session.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import flows  # first: it sets Prefect's logging environment before prefect is imported
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.executor import build, resolve
from pipeline.registry import STAGES, get_stage
from pipeline.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]

# A few small standard-library packages (about 180 KB, ~1000 chunks), four documents, so four shards.
BASE: dict[str, Any] = {
    "documents": {"stdlib_include": ["json", "wsgiref", "textwrap", "dataclasses"],
                  "split_lists": {"valid": ["stdlib/textwrap"]}, "shard_bytes": 60_000},
    "tokenizer": {"vocab_size": 1024},
    "bm25": {"k": 4, "exclude_recent": 2, "shard_chunks": 300},
}
TARGETS = ["bm25"]  # extended to the neighbors flow as its stages land on main


def write_config(path: Path, root: Path, **sections: dict[str, Any]) -> str:
    data: dict[str, Any] = {"artifacts_root": str(root), **json.loads(json.dumps(BASE))}
    for name, sec in sections.items():
        data[name] = {**data.get(name, {}), **sec}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def file_digests(root: Path, ref: str) -> list[tuple[str, str]]:
    stage, version = ref.split("@")
    m = ArtifactStore(str(root)).get(stage, version).manifest
    return sorted((f.path, f.sha256) for f in m.files)


def by_stage(report: list[dict[str, Any]]) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in report}


# ------------------------------------------------------------------------------ Prefect API helpers


def latest_dag_run() -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["rpt-dag"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
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


def table_artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in arts if a.type == "table"}


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
def thread_run(prefect_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The flow built once with the default (thread) runner, plus what the Prefect API saw of it."""
    d = tmp_path_factory.mktemp("flow-threads")
    cfg = write_config(d / "run.yaml", d / "store")
    report = flows.stages(TARGETS, cfg)
    dag = latest_dag_run()
    return {"cfg": cfg, "root": d / "store", "report": report, "dag": dag, "tmp": d}


# ------------------------------------------------------------------------------ flow runs


@pytest.mark.prefect
def test_flow_builds_artifacts_like_the_executor(thread_run: dict[str, Any], tmp_path: Path) -> None:
    report = thread_run["report"]
    assert by_stage(report) == {"documents": "built", "tokenizer": "built", "chunks": "built", "bm25": "built"}
    store = ArtifactStore(str(thread_run["root"]))
    for r in report:
        art = store.get(r["stage"], r["version"])
        assert art.verify() == []
        assert art.path == r["path"] and art.manifest.rows == r["rows"]
    assert len(store.get("chunks", by_stage_version(report, "chunks")).manifest.shards) == 4

    # the same config built by the executor alone (CLI path) gives the same versions and bytes
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "store")
    art = build("bm25", load_config(cfg), with_deps=True)
    assert art.ref == by_stage_ref(report, "bm25")
    for r in report:
        assert file_digests(tmp_path / "store", r["ref"]) == file_digests(thread_run["root"], r["ref"])

    # Prefect saw one plan task and one task per shard, and each stage published its stats table
    chunks = by_stage_ref(report, "chunks")
    names = sorted(t.name for t in task_runs(thread_run["dag"].id))
    assert names.count(f"{chunks}/plan") == 1 and sum(n.startswith(f"{chunks}/0") for n in names) == 4
    tables = table_artifacts(thread_run["dag"].id)
    assert {"documents-stats", "tokenizer-stats", "chunks-stats", "bm25-stats", "stages-summary"} <= set(tables)
    rows = {row["field"]: row["value"] for row in json.loads(tables["bm25-stats"].data)}
    assert rows["rows"] == f"{r_rows(report, 'bm25'):,}" and rows["meta.source"] == "bm25"
    # the project's rpt.* loggers reach the flow run's logs
    assert any(log.name.startswith("rpt.") for log in run_logs(thread_run["dag"].id))


@pytest.mark.prefect
def test_rerun_hits_the_cache_for_every_task(thread_run: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    store = ArtifactStore(str(thread_run["root"]))
    created = {r["ref"]: store.get(r["stage"], r["version"]).manifest.created_at for r in thread_run["report"]}
    out = CliRunner().invoke(app, ["flow", "stages", "-c", thread_run["cfg"], "--target", "bm25"])
    assert out.exit_code == 0, out.output
    lines = [ln.split() for ln in out.output.splitlines() if ln.startswith(("cached", "built", "found"))]
    assert sorted((ln[0], ln[1]) for ln in lines) == sorted(("cached", ref) for ref in created)
    dag = latest_dag_run()
    runs = task_runs(dag.id)
    assert sorted(t.name for t in runs) == sorted(created)  # no plan or shard task ran
    assert all(t.state.name == "Cached" for t in runs)
    tables = table_artifacts(dag.id)  # cached stages still show their stats in this run
    assert all("(cached)" in tables[f"{ref.split('@')[0]}-stats"].description for ref in created)
    assert {ref: store.get(*ref.split("@")).manifest.created_at for ref in created} == created


@pytest.mark.prefect
def test_changed_setting_reruns_only_its_dependents(thread_run: dict[str, Any]) -> None:
    report = flows.stages(TARGETS, thread_run["cfg"], ["bm25.exclude_recent=1"])
    assert by_stage(report) == {"documents": "cached", "tokenizer": "cached", "chunks": "cached", "bm25": "built"}
    report = flows.stages(TARGETS, thread_run["cfg"], ["chunks.chunk_len=32"])
    assert by_stage(report) == {"documents": "cached", "tokenizer": "cached", "chunks": "built", "bm25": "built"}
    # unhashed settings (how, not what) change no version: everything is cached
    report = flows.stages(TARGETS, thread_run["cfg"], ["bm25.shard_chunks=100", "runner.workers=1"])
    assert set(by_stage(report).values()) == {"cached"}


@pytest.mark.prefect
def test_deleted_artifact_is_rebuilt_despite_the_cache(thread_run: dict[str, Any]) -> None:
    ref = by_stage_ref(thread_run["report"], "chunks")
    before = file_digests(thread_run["root"], ref)
    shutil.rmtree(thread_run["root"] / "chunks" / ref.split("@")[1])
    report = flows.stages(TARGETS, thread_run["cfg"])
    # bm25 still exists (its version does not change), so only chunks is rebuilt
    assert by_stage(report) == {"documents": "cached", "tokenizer": "cached", "chunks": "built", "bm25": "cached"}
    assert file_digests(thread_run["root"], ref) == before


@pytest.mark.prefect
def test_failed_shard_resumes_on_rerun(thread_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    chunks_stage = get_stage("chunks")
    real = chunks_stage.run_shard
    calls: list[int] = []

    def failing(ctx: Any, shard: Any) -> Any:
        calls.append(shard.index)
        if shard.index == 1:
            raise RuntimeError("shard 1 died")
        return real(ctx, shard)

    monkeypatch.setattr(chunks_stage, "run_shard", failing)
    sets = ["chunks.chunk_len=48"]
    with pytest.raises(Exception, match="shard 1 died"):
        flows.stages(TARGETS, thread_run["cfg"], sets)
    assert calls == [0, 1]  # serial stage: shards after the failed one never started
    calls.clear()
    monkeypatch.setattr(chunks_stage, "run_shard", lambda ctx, shard: (calls.append(shard.index), real(ctx, shard))[1])
    report = flows.stages(TARGETS, thread_run["cfg"], sets)
    assert by_stage(report)["chunks"] == "built" and calls == [1, 2, 3]  # shard 0 resumed from its sidecar
    clean = write_config(tmp_path / "run.yaml", tmp_path / "store", chunks={"chunk_len": 48})
    art = build("chunks", load_config(clean), with_deps=True)
    assert art.ref == by_stage_ref(report, "chunks")
    assert file_digests(tmp_path / "store", art.ref) == file_digests(thread_run["root"], art.ref)


@pytest.mark.prefect
def test_dask_two_workers_match_threads_byte_for_byte(thread_run: dict[str, Any], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "store")
    with open(cfg, "a") as f:
        f.write("runner: {kind: dask, workers: 2}\n")
    report = flows.stages(TARGETS, cfg)
    assert set(by_stage(report).values()) == {"built"}
    assert [r["ref"] for r in report] == [r["ref"] for r in thread_run["report"]]
    for r in report:
        assert file_digests(tmp_path / "store", r["ref"]) == file_digests(thread_run["root"], r["ref"])
    runs = task_runs(latest_dag_run().id)
    assert sum(t.name.startswith(f"{by_stage_ref(report, 'documents')}/0") for t in runs) == 4
    assert all(t.state.is_completed() for t in runs)


# ------------------------------------------------------------------------------ no server needed


def test_flows_need_registered_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delitem(STAGES, "bm25", raising=False)
    with pytest.raises(ConfigError, match=r"needs stage 'bm25'.*pipeline/registry.py"):
        flows.flow_targets("neighbors")
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "store")
    with pytest.raises(ConfigError, match="needs stage 'bm25'"):  # before any server or cluster starts
        flows.run_named("neighbors", cfg)
    with pytest.raises(ConfigError, match="unknown flow 'neighbours'"):
        flows.run_named("neighbours", cfg)
    with pytest.raises(ConfigError, match="--variant applies"):
        flows.run_named("stages", cfg, variants=["baseline"], targets=["chunks"])


def test_train_flow_targets_every_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGES, "train", "stages.train")  # only the name is checked here
    assert [dict(t.overrides) for t in flows.flow_targets("train")] == [{"variant": v} for v in flows.TRAIN_VARIANTS]
    assert [t.overrides["variant"] for t in flows.flow_targets("train", ["rpt_sem"])] == ["rpt_sem"]


def test_waves_put_inputs_first(tmp_path: Path) -> None:
    run = load_config(write_config(tmp_path / "run.yaml", tmp_path / "store"))
    roots, nodes = flows.resolve_targets(run, [flows.Target(s) for s in TARGETS])
    waves = flows.waves(nodes)
    wave_of = {n.ref: i for i, w in enumerate(waves) for n in w}
    assert sorted(wave_of) == sorted(n.ref for n in nodes)
    for n in nodes:
        assert all(wave_of[c.ref] < wave_of[n.ref] for c in n.inputs.values())
    assert [[n.stage for n in w] for w in waves][:3] == [["documents"], ["tokenizer"], ["chunks"]]
    assert roots[0].version == resolve(TARGETS[0], run).version


def test_task_runner_follows_the_config(tmp_path: Path) -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    run = load_config(write_config(tmp_path / "run.yaml", tmp_path / "store"))

    def runner(**kw: Any) -> Any:
        return flows.task_runner_for(run.model_copy(update={"runner": run.runner.model_copy(update=kw)}))

    assert isinstance(runner(kind="auto"), ThreadPoolTaskRunner)
    assert runner(kind="threads", workers=3)._max_workers == 3
    assert runner(kind="serial")._max_workers == 1
    assert isinstance(runner(kind="processes", workers=2), ProcessPoolTaskRunner)
    local = runner(kind="dask", workers=2)
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 2
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

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployed = {}
    for d in spec["deployments"]:
        path, _, name = d["entrypoint"].partition(":")
        assert path == "flows.py"
        fl = getattr(flows, name)
        assert isinstance(fl, Flow) and fl is flows.FLOWS[fl.name]
        assert d["work_pool"]["name"] == "rpt-process"
        assert set(d.get("parameters", {})) <= set(fl.parameters.properties)
        deployed[fl.name] = d["name"]
    assert set(deployed) == set(flows.FLOWS)


# ------------------------------------------------------------------------------ small helpers


def by_stage_ref(report: list[dict[str, Any]], stage: str) -> str:
    return next(r["ref"] for r in report if r["stage"] == stage)


def by_stage_version(report: list[dict[str, Any]], stage: str) -> str:
    return next(r["version"] for r in report if r["stage"] == stage)


def r_rows(report: list[dict[str, Any]], stage: str) -> int:
    return next(r["rows"] for r in report if r["stage"] == stage)

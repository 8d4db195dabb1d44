"""A stage killed mid-run (a real subprocess, SIGKILL) leaves no trusted artifact; the rerun resumes
from the finished shards and produces exactly what an uninterrupted run produces."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.executor import build, resolve
from pipeline.store import ArtifactStore
from tests.conftest import FIXTURE_BOOKS, REPO, copy_stages, make_config


@pytest.fixture
def prepared(tmp_path, gutenberg_dir):
    d = tmp_path / "books"
    d.mkdir()
    for book in sorted(gutenberg_dir.glob("*.txt.gz")):
        (d / book.name).symlink_to(book)
    # one documents part (and so one chunks shard) per book
    run = make_config(
        tmp_path / "store",
        runner={"kind": "serial"},
        documents={"paths": [str(d)], "shard_bytes": 1},
        tokenizer={"vocab_size": 2048, "max_train_chars": 2_000_000},
    )
    build("tokenizer", run, with_deps=True)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(run.model_dump(mode="json")))
    return run, cfg


def test_killed_stage_resumes_to_identical_result(prepared, tmp_path, caplog):
    run, cfg = prepared
    store = ArtifactStore(run.root())
    version = resolve("chunks", run).version
    # an uninterrupted build elsewhere, from the same upstream artifacts
    clean_root = tmp_path / "clean"
    for stage in ("documents", "tokenizer"):
        shutil.copytree(store.stage_dir(stage), clean_root / stage)
    clean = build("chunks", run.model_copy(update={"artifacts_root": str(clean_root)}))
    assert clean.version == version and len(clean.parts()) == len(list(FIXTURE_BOOKS.glob("*.txt.gz")))

    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "run", "chunks", "-c", str(cfg)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = store.fs.glob(f"{store.partial_dir('chunks', version)}/_shards/*.json")
    deadline = time.time() + 120
    while len(shards) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
        shards = store.fs.glob(f"{store.partial_dir('chunks', version)}/_shards/*.json")
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(shards) >= 2
    # nothing trusted was published
    assert not store.exists("chunks", version)
    assert store.get_ref("chunks", "latest") is None
    assert version in store.partials("chunks")

    with caplog.at_level(logging.INFO, logger="rpt"):
        resumed = build("chunks", run)
    assert any("resuming" in r.getMessage() for r in caplog.records)
    assert resumed.version == version
    assert resumed.verify() == []
    assert {f.path: f.sha256 for f in resumed.manifest.files} == {
        f.path: f.sha256 for f in clean.manifest.files
    }
    assert resumed.manifest.stats["chunks"] == clean.manifest.stats["chunks"]
    assert version not in store.partials("chunks")


def test_rerun_with_fewer_shards_publishes_no_stale_parts(tiny_run, tmp_path):
    """A build killed after its shards, rerun with an unhashed setting that plans fewer shards: the
    parts of the old plan must not be published beside the new ones (they would duplicate rows)."""
    from pipeline.executor import open_build, pending_shards, run_shard

    run = copy_stages(tiny_run, tmp_path / "store", ("documents", "tokenizer", "chunks"))
    many = run.with_section("bm25", {"shard_chunks": 10, "exclude_recent": 2, "k": 4})
    one = run.with_section("bm25", {"shard_chunks": 1_000_000, "exclude_recent": 2, "k": 4})
    node = resolve("bm25", many)
    assert node.version == resolve("bm25", one).version  # shard_chunks only changes how it runs
    store = ArtifactStore(run.root())
    ctx = open_build(node, {r: store.get(c.stage, c.version) for r, c in node.inputs.items()})
    shards = node.impl.plan(ctx)
    assert len(shards) >= 3
    for s in pending_shards(ctx, shards)[0]:
        run_shard(ctx, s)  # every shard done, then the process "dies" before publishing

    art = build("bm25", one)
    chunks = store.get("chunks", node.inputs["chunks"].version)
    ids = art.scan().select("chunk_id").collect()["chunk_id"].to_list()
    assert len(art.parts()) == 1
    assert sorted(ids) == list(range(chunks.manifest.rows)) and len(ids) == len(set(ids))
    assert art.manifest.rows == chunks.manifest.rows
    assert art.verify() == []

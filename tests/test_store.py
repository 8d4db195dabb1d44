"""Versions, atomic publish, reruns, refs, verify, and the CLI over a real store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.errors import ArtifactError
from pipeline.executor import build, resolve
from pipeline.store import ArtifactStore
from tests.conftest import REPO, make_config


def versions(run):
    node = resolve("chunks", run)
    return {n.stage: n.version for n in node.walk()}


def test_version_is_deterministic_across_processes(small_run):
    here = versions(small_run)
    code = (
        "import json,sys; from stages import config_from_dict; from pipeline.executor import resolve;"
        "run=config_from_dict(json.loads(sys.argv[1]));"
        "print(json.dumps({n.stage: n.version for n in resolve('chunks', run).walk()}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(small_run.model_dump(mode="json"))],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=env,
    )
    assert json.loads(out.stdout) == here


def test_changed_config_changes_exactly_the_dependents(small_run):
    base = versions(small_run)
    v = versions(small_run.with_section("chunks", {"chunk_len": 32}))
    assert v["documents"] == base["documents"] and v["tokenizer"] == base["tokenizer"]
    assert v["chunks"] != base["chunks"]
    v = versions(small_run.with_section("tokenizer", {"vocab_size": 1024}))
    assert v["documents"] == base["documents"]
    assert v["tokenizer"] != base["tokenizer"] and v["chunks"] != base["chunks"]
    # how it runs, not what it makes: no new version
    assert versions(small_run.with_section("chunks", {"batch_docs": 3})) == base
    # the artifact root is where, not what
    assert versions(small_run.model_copy(update={"artifacts_root": "/elsewhere"})) == base


def test_corpus_path_is_not_hashed_but_content_is(tmp_path, small_corpus):
    moved = tmp_path / "books"
    shutil.copytree(small_corpus, moved)
    a = resolve("documents", make_config(tmp_path, documents={"paths": [str(small_corpus)]})).version
    b = resolve("documents", make_config(tmp_path, documents={"paths": [str(moved)]})).version
    assert a == b
    (moved / "pg11.txt.gz").unlink()
    shutil.copy(small_corpus / "pg46.txt.gz", moved / "pg11.txt.gz")
    c = resolve("documents", make_config(tmp_path, documents={"paths": [str(moved)]})).version
    assert c != a


def test_rerun_is_a_noop(small_run):
    store = ArtifactStore(small_run.root())
    art = build("chunks", small_run)
    stamp = {f.path: os.stat(art.file(f.path)).st_mtime_ns for f in art.manifest.files}
    again = build("chunks", small_run)
    assert again.version == art.version and again.manifest.created_at == art.manifest.created_at
    assert {f.path: os.stat(art.file(f.path)).st_mtime_ns for f in art.manifest.files} == stamp
    assert store.get_ref("chunks", "latest") == art.version


def test_manifest_contents(small_run):
    art = build("chunks", small_run)
    m = art.manifest
    assert m.stage == "chunks" and m.inputs["documents"].startswith("documents@")
    assert m.arrow_schema and [f["name"] for f in m.arrow_schema["fields"]][:2] == ["chunk_id", "doc_idx"]
    parts = [f for f in m.files if f.path.startswith("part-")]
    assert parts and all(len(f.sha256) == 64 and f.rows for f in parts)
    assert m.stats["chunks"] == sum(f.rows for f in parts)
    assert {"plan_s", "shards_wall_s", "finalize_s"} <= set(m.timings)
    assert "pyarrow" in m.packages and m.config["chunk_len"] == 64


def test_missing_input_without_deps_is_a_clear_error(tmp_path, small_corpus):
    run = make_config(tmp_path, documents={"paths": [str(small_corpus)]})
    with pytest.raises(ArtifactError, match=r"needs input 'documents'.*rpt run documents.*--with-deps"):
        build("chunks", run)


def test_folder_without_manifest_does_not_exist(small_run, tmp_path):
    store = ArtifactStore(small_run.root())
    fake = tmp_path / "store"
    shutil.copytree(store.root, fake)
    v = store.get_ref("chunks", "latest")
    os.remove(fake / "chunks" / v / "manifest.json")
    other = ArtifactStore(str(fake))
    assert not other.exists("chunks", v)
    with pytest.raises(ArtifactError):
        other.get("chunks", v)
    # and a build there recreates it rather than trusting the debris
    run = small_run.model_copy(update={"artifacts_root": str(fake)})
    assert build("chunks", run).version == v and other.exists("chunks", v)


def test_verify_detects_corruption(small_run, tmp_path):
    store = ArtifactStore(small_run.root())
    fake = tmp_path / "store"
    shutil.copytree(store.root, fake)
    other = ArtifactStore(str(fake))
    art = other.resolve("chunks")
    assert art.verify() == []
    part = art.parts()[0]
    with open(part, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    problems = art.verify()
    assert len(problems) == 1 and "checksum mismatch" in problems[0]


def test_refs_and_resolve(small_run):
    store = ArtifactStore(small_run.root())
    art = store.resolve("chunks")
    assert store.resolve(f"chunks@{art.version[:6]}").version == art.version
    store.set_ref("chunks", "golden", art.version)
    assert store.resolve("chunks@golden").version == art.version
    assert store.refs("chunks")["golden"] == art.version
    with pytest.raises(ArtifactError, match="no artifact chunks@zzzz"):
        store.resolve("chunks@zzzz")


def rpt(*args, cwd=REPO, check=True):
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=cwd, check=check
    )


def test_cli_run_ls_show_verify(small_run, tmp_path):
    root = small_run.root()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(small_run.model_dump(mode="json")))  # JSON is YAML
    out = rpt("run", "chunks", "-c", str(cfg))
    v = ArtifactStore(root).get_ref("chunks", "latest")
    assert out.stdout.startswith(f"chunks@{v}") and "up to date" in out.stderr
    ls = rpt("artifacts", "ls", "--root", root).stdout
    assert f"chunks@{v}" in ls and "documents@" in ls and "latest" in ls
    show = rpt("artifacts", "show", "chunks", "--root", root, "-n", "2").stdout
    assert (
        "lineage:" in show
        and "tokenizer: tokenizer@" in show
        and "chunk_id" in show
        and "shape: (2, 7)" in show
    )
    ver = rpt("artifacts", "verify", "--root", root).stdout
    assert "3 of 3 artifacts intact" in ver
    bad = rpt("run", "chunks", "-c", str(cfg), "--set", "chunks.chunk_len=zero", check=False)
    assert bad.returncode == 2 and "chunks.chunk_len" in bad.stderr and "Traceback" not in bad.stderr


def test_object_store_root(tmp_path):
    """A non-local fsspec root (the in-memory filesystem stands in for s3:// or gs://)."""
    from pipeline.formats import ChunkReader

    run = make_config(
        f"memory://rpt-test/{tmp_path.name}",
        documents={"stdlib_include": ["json", "argparse"], "split_lists": {"test": ["stdlib/json"]}},
        tokenizer={"vocab_size": 600},
    )
    art = build("chunks", run, with_deps=True)
    assert not art.store.is_local
    assert sorted(f.path for f in art.manifest.files) == [
        "doc_index.parquet",
        "part-00000.parquet",
        "tokens.npy",
    ]
    reader = ChunkReader(art)
    assert reader.tokens.shape == (art.manifest.rows, 64)
    assert art.scan().collect().height == art.manifest.rows and art.verify() == []
    assert build("chunks", run).manifest.created_at == art.manifest.created_at

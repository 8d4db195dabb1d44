"""The artifact store on a real S3 API: moto's server, started by these tests on 127.0.0.1.

On an object store `publish` copies the data files to the final prefix and writes the manifest last,
and readers trust a manifest only with all its files present. Shown here: a build killed (SIGKILL, a
real process) mid-shards and again mid-publish resumes to exactly the uninterrupted result; a prefix
with data but no manifest, or a manifest whose files are missing, does not exist for readers and a
rerun replaces it; `verify` catches what sizes cannot; the Parquet reads back through the same s3://
URI with the store, polars and DuckDB.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import polars as pl
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from pipeline.config import RunConfigBase
from pipeline.errors import ArtifactError
from pipeline.executor import build, resolve
from pipeline.formats import ChunkReader
from pipeline.manifest import MANIFEST_NAME
from pipeline.store import Artifact, ArtifactStore
from tests.conftest import REPO, make_config

BUCKET = "rpt-test"
KEY = "testing"
REGION = "us-east-1"
N_DOCS = 6  # one documents part, and so one chunks shard, per document (shard_bytes=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint of a local S3 server holding an empty bucket BUCKET."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server logs every request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        # The environment, not storage options: the store is built from a bare s3:// URI, also in the
        # killed build's process and its rerun, and botocore reads AWS_ENDPOINT_URL wherever it runs.
        for k, v in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(home / "config"),  # none: a developer's profile must not interfere
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
            "RPT_CACHE": str(tmp_path_factory.mktemp("rpt-cache")),
        }.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
            mp.delenv(k, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # none may hold another endpoint
        fsspec.filesystem("s3").mkdir(BUCKET)
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six documents of seeded random words (about 2,500 characters each)."""
    rng = random.Random(14)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(300)]
    d = tmp_path_factory.mktemp("s3-corpus") / "docs"
    d.mkdir()
    for i in range(N_DOCS):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(450)) + "\n")
    return d


def s3_config(prefix: str, corpus: Path) -> RunConfigBase:
    return make_config(
        f"s3://{BUCKET}/{prefix}",
        runner={"kind": "serial"},
        documents={"paths": [str(corpus)], "shard_bytes": 1},
        tokenizer={"vocab_size": 300},
    )


@pytest.fixture(scope="module")
def clean(s3: str, corpus: Path) -> tuple[RunConfigBase, Artifact]:
    """documents -> tokenizer -> chunks built uninterrupted on S3 (tests only read this store)."""
    run = s3_config("clean", corpus)
    return run, build("chunks", run, with_deps=True)


def copy_stages(run: RunConfigBase, prefix: str, stages: tuple[str, ...]) -> RunConfigBase:
    """The same config rooted at a new prefix holding server-side copies of `stages`."""
    fs = ArtifactStore(run.root()).fs
    for stage in stages:
        fs.copy(f"{BUCKET}/clean/{stage}", f"{BUCKET}/{prefix}/{stage}", recursive=True)
    return run.model_copy(update={"artifacts_root": f"s3://{BUCKET}/{prefix}"})


# A build in its own process that stops at a chosen point and prints how many shards it ran, for the
# test to SIGKILL it there. The test picks the point, not a timer: on six tiny shards the window
# between two shards, or between the data copies and the manifest, is milliseconds long.
DRIVER = r"""
import json, sys, time
import s3fs
import pipeline.executor as ex
from stages import config_from_dict

run, stop_at = config_from_dict(json.loads(sys.argv[1])), sys.argv[2]
ran = 0

def stop():
    print(f"stopped {ran}", flush=True)
    time.sleep(600)

run_shard = ex.run_shard
def counted(ctx, shard):
    global ran
    result = run_shard(ctx, shard)
    ran += 1
    if stop_at == f"shards:{ran}":
        stop()
    return result
ex.run_shard = counted

pipe_file = s3fs.S3FileSystem._pipe_file
async def before_manifest(self, path, *args, **kwargs):
    if stop_at == "manifest" and path.endswith("/manifest.json") and "/.partial-" not in path:
        stop()  # every data file is under the final prefix by now
    return await pipe_file(self, path, *args, **kwargs)
s3fs.S3FileSystem._pipe_file = before_manifest

ex.build("chunks", run)
print("finished", flush=True)
"""


def kill_build_at(run: RunConfigBase, stop_at: str, tmp_path: Path) -> int:
    """Run the chunks build in a subprocess, SIGKILL it at `stop_at`; returns the shards it ran."""
    err = tmp_path / f"build-{stop_at.replace(':', '-')}.stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(run.model_dump(mode="json")), stop_at],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    watchdog = threading.Timer(120, proc.kill)  # a build that never stops must not hang the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("stopped"), f"the build did not stop at {stop_at}: {line!r}\n{err.read_text()}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return int(line.split()[1])


def test_killed_build_resumes_to_the_uninterrupted_result(clean, tmp_path):
    clean_run, clean_art = clean
    run = copy_stages(clean_run, "killed", ("documents", "tokenizer"))
    store = ArtifactStore(run.root())
    v = resolve("chunks", run).version
    assert v == clean_art.version
    final, partial = store.version_dir("chunks", v), store.partial_dir("chunks", v)

    # killed after two of six shards: their sidecars are on S3, nothing is published
    assert kill_build_at(run, "shards:2", tmp_path) == 2
    assert len(store.fs.glob(f"{partial}/_shards/*.json")) == 2
    assert v in store.partials("chunks")
    assert not store.exists("chunks", v) and not store.fs.exists(final)
    assert store.get_ref("chunks", "latest") is None

    # the rerun resumes (runs the four other shards) and is killed with every data file under the
    # final prefix but no manifest: the prefix does not exist for readers
    assert kill_build_at(run, "manifest", tmp_path) == N_DOCS - 2
    landed = {p.rsplit("/", 1)[-1] for p in store.fs.find(final)}
    assert landed == {f.path for f in clean_art.manifest.files}
    assert not store.exists("chunks", v) and store.versions("chunks") == []
    with pytest.raises(ArtifactError, match=f"chunks@{v} not found"):
        store.get("chunks", v)
    with pytest.raises(ArtifactError, match="no artifact chunks@latest"):
        store.resolve("chunks")

    # the next run publishes over the debris: exactly the uninterrupted build
    art = build("chunks", run)
    assert art.version == v and art.verify() == []
    assert {f.path: f.sha256 for f in art.manifest.files} == {
        f.path: f.sha256 for f in clean_art.manifest.files
    }
    for key in ("chunks", "tokens"):
        assert art.manifest.stats[key] == clean_art.manifest.stats[key]
    assert v not in store.partials("chunks") and store.get_ref("chunks", "latest") == v

    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "artifacts", "verify", "--root", run.root()],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0 and "3 of 3 artifacts intact" in out.stdout, out.stdout + out.stderr


def test_incomplete_prefix_is_not_trusted_and_a_rerun_replaces_it(clean, caplog):
    clean_run, clean_art = clean
    run = copy_stages(clean_run, "untrusted", ("documents", "tokenizer", "chunks"))
    store = ArtifactStore(run.root())
    fs, v = store.fs, clean_art.version
    art = store.get("chunks", v)
    part, manifest_path = art.parts()[0], art.file(MANIFEST_NAME)
    data, manifest = fs.cat_file(part), fs.cat_file(manifest_path)

    # a manifest whose file is missing, or of another size
    fs.rm_file(part)
    with caplog.at_level(logging.WARNING, logger="rpt"):
        assert not store.exists("chunks", v)
    assert "missing file part-00000.parquet" in caplog.text
    assert store.versions("chunks") == []
    fs.pipe_file(part, data[:-7])
    assert not store.exists("chunks", v)
    fs.pipe_file(part, data)
    assert store.exists("chunks", v)

    # data without a manifest
    fs.rm_file(manifest_path)
    assert not store.exists("chunks", v)
    with pytest.raises(ArtifactError, match="not found"):
        store.get("chunks", v)
    fs.pipe_file(manifest_path, manifest)

    # same size, other bytes: a lookup checks sizes only, `verify` reads the bytes
    flipped = bytearray(data)
    flipped[100] ^= 0xFF
    fs.pipe_file(part, bytes(flipped))
    problems = store.get("chunks", v).verify()
    assert len(problems) == 1 and "part-00000.parquet checksum mismatch" in problems[0]

    # a stale manifest with a file missing and a stray object: the rerun rebuilds and replaces it all
    fs.rm_file(art.parts()[1])
    fs.pipe_file(art.file("stray.bin"), b"debris")
    assert not store.exists("chunks", v)
    rebuilt = build("chunks", run)
    assert rebuilt.verify() == []
    assert {p.rsplit("/", 1)[-1] for p in fs.find(rebuilt.path)} == {
        MANIFEST_NAME,
        *(f.path for f in clean_art.manifest.files),
    }
    assert {f.path: f.sha256 for f in rebuilt.manifest.files} == {
        f.path: f.sha256 for f in clean_art.manifest.files
    }


def test_reads_through_the_s3_uri(s3, clean, monkeypatch, tmp_path):
    run, _ = clean
    art = ArtifactStore(run.root()).resolve("chunks")
    rows = art.manifest.rows
    table = art.read()
    assert table.num_rows == rows and art.dataset().count_rows() == rows
    assert art.scan().collect().height == rows
    assert sum(b.num_rows for b in art.iter_batches(batch_size=50)) == rows
    assert art.read_file("doc_index.parquet").num_rows == N_DOCS
    assert ChunkReader(art).tokens.shape == (rows, 64)  # tokens.npy through local_path

    # local_path: a folder requested after one of its files is fetched whole; a damaged cached file
    # is fetched again; an unknown name is an error naming it
    monkeypatch.setenv("RPT_CACHE", str(tmp_path / "cache"))
    art.local_path("doc_index.parquet").write_bytes(b"truncated")
    folder = art.local_path()
    assert {p.name for p in folder.iterdir()} == {MANIFEST_NAME, *(f.path for f in art.manifest.files)}
    sizes = {f.path: f.bytes for f in art.manifest.files}
    assert (folder / "doc_index.parquet").stat().st_size == sizes["doc_index.parquet"]
    assert np.array_equal(np.load(folder / "tokens.npy"), ChunkReader(art).tokens)
    with pytest.raises(ArtifactError, match="has no file or folder 'nope.parquet'"):
        art.local_path("nope.parquet")

    # polars through its own S3 client (object_store), same URIs
    uris = [art.fs.unstrip_protocol(p) for p in art.parts()]
    assert all(u.startswith(f"s3://{BUCKET}/clean/chunks/") for u in uris)
    options = {
        "aws_endpoint_url": s3,
        "aws_access_key_id": KEY,
        "aws_secret_access_key": KEY,
        "aws_region": REGION,
        "aws_allow_http": "true",
    }
    assert pl.scan_parquet(uris, storage_options=options).collect().equals(pl.from_arrow(table))

    # DuckDB: its own S3 reader (the httpfs extension) is downloaded on first use, which an offline
    # machine cannot do, so s3:// goes through s3fs registered as a filesystem (same URIs, same server)
    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("s3"))
    listed = ", ".join(f"'{u}'" for u in uris)
    query = f"SELECT count(*), sum(n_tokens), max(chunk_id) FROM read_parquet([{listed}])"
    got = con.execute(query).fetchone()
    assert got == (rows, art.manifest.stats["tokens"], rows - 1)

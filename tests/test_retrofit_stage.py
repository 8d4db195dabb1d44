"""The retrofit stage end to end on five book slices: the reference LM as the frozen base, corpus-scope
BM25 neighbors. The artifact loads back in one call and reproduces its evaluation; the frozen row equals
the base LM's own NLL on the same windows; a killed run resumes to identical weights; a given base enters
the version by content; the base's weights are untouched; bad settings are clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.executor import build, resolve
from pipeline.formats import REFERENCE_MODEL_DIR, TOKENIZER_FILE
from pipeline.store import ArtifactStore
from tests.conftest import TINY_REFERENCE, copy_stages

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RETROFIT = {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "log_every": 2, "warmup_steps": 2, "lr": 3e-3}


@pytest.fixture(scope="module")
def upstream(tiny_run, tmp_path_factory):
    """tiny_run's chunks with a reference LM (128-token context) and corpus-scope BM25 built."""
    run = copy_stages(tiny_run, tmp_path_factory.mktemp("retrofit"), ("documents", "tokenizer", "chunks"))
    run = run.with_section("reference", {**TINY_REFERENCE, "seq_len": 128, "steps": 4}).with_section(
        "retrofit", {**RETROFIT, "seq_len": 128}
    )
    run = run.with_section("runner", {"kind": "serial"})
    build("reference", run, with_deps=True)
    build("bm25", run.with_section("bm25", {"scope": "corpus", "query": "chunk"}), with_deps=True)
    return run


def test_retrofit_builds_loads_back_and_leaves_the_base_alone(upstream):
    from safetensors.torch import load_file

    from data.neighbors import load_neighbor_table
    from data.retrofit import batch_arrays, tiling_windows
    from pipeline.formats import ChunkReader
    from stages.retrofit.load import load_retrofitted

    store = ArtifactStore(upstream.root())
    ref = store.get("reference", resolve("reference", upstream).version)
    before = load_file(str(ref.local_path(f"{REFERENCE_MODEL_DIR}/model.safetensors")))
    art = build("retrofit", upstream)
    st = art.manifest.stats
    assert st["steps"] == 6 and st["seq_len"] == 128 and st["cca_layers"] == [1]
    assert 0 < st["trainable_share"] < 1 and st["train_tokens"] == 6 * 2 * 128
    assert st["train_token_share"] == pytest.approx(6 * 2 * 128 / (4 * 2 * 128))
    assert art.manifest.inputs["neighbors"].startswith("bm25@")
    assert art.manifest.meta["base"]["artifact"] == ref.ref
    card = (art.local_path() / "README.md").read_text()
    assert ref.ref in card and f"{st['ppl_own']:.3f}" in card and "load_retrofit" in card
    assert not any(f.path.startswith("ckpt") for f in art.manifest.files)
    after = load_file(str(ref.local_path(f"{REFERENCE_MODEL_DIR}/model.safetensors")))
    assert all(torch.equal(before[k], after[k]) for k in before)

    # load back in one call; the evaluation rows recomputed independently of the stage
    model = load_retrofitted(art.local_path())
    chunks = store.get("chunks", resolve("chunks", upstream).version)
    reader = ChunkReader(chunks)
    nb_art = store.get("bm25", art.manifest.inputs["neighbors"].split("@")[1])
    table = load_neighbor_table(nb_art, reader.n_chunks).ids
    w = tiling_windows(reader.docs("test"), 2)
    arrays = batch_arrays(
        np.asarray(reader.tokens), reader.chunk_doc, table, w, np.arange(len(w.first)), 2, 2
    )
    tokens, labels = torch.from_numpy(arrays["tokens"]), torch.from_numpy(arrays["labels"])
    with torch.no_grad():
        own = model(tokens, torch.from_numpy(arrays["neighbors"]), labels).token_nll.sum()
        # the frozen row is the base itself: the reference LM's NLL through transformers, no retrofit code
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            str(ref.local_path(REFERENCE_MODEL_DIR)), local_files_only=True
        )
        logits = hf(input_ids=tokens).logits
        frozen = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        )
    n = int((labels != -100).sum())
    assert n == st["eval_tokens"]
    assert np.exp(float(own) / n) == pytest.approx(st["ppl_own"], rel=1e-4)
    assert np.exp(float(frozen) / n) == pytest.approx(st["ppl_frozen"], rel=1e-4)
    ev = art.read_file("eval.parquet").to_pylist()
    assert {r["setting"] for r in ev} == {"frozen", "own", "empty"} and len(ev) == 3 * len(w.first)


def test_killed_retrofit_resumes_to_identical_weights(upstream, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import stages.retrofit.loop as loop

    clean = build("retrofit", upstream)
    run2 = copy_stages(
        upstream, tmp_path / "store", ("documents", "tokenizer", "chunks", "reference", "bm25")
    )

    def crash(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt("killed after step 4")

    monkeypatch.setattr(loop, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        build("retrofit", run2)
    store2 = ArtifactStore(run2.root())
    version = resolve("retrofit", run2).version
    assert version == clean.version and not store2.exists("retrofit", version)
    ckpts = store2.fs.ls(f"{store2.partial_dir('retrofit', version)}/ckpt", detail=False)
    assert sorted(Path(p).name for p in ckpts) == ["LATEST", "step-0000004"]
    monkeypatch.setattr(loop, "_after_step", lambda step: None)
    resumed = build("retrofit", run2)
    a = load_file(str(clean.local_path("retrofit.safetensors")))
    b = load_file(str(resumed.local_path("retrofit.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.manifest.stats["ppl_own"] == clean.manifest.stats["ppl_own"]


def save_llama(folder: Path, tokenizer_json: Path, vocab: int, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).save_pretrained(folder)
    shutil.copyfile(tokenizer_json, folder / TOKENIZER_FILE)


def test_a_given_llama_base_versions_by_content(upstream, tmp_path):
    store = ArtifactStore(upstream.root())
    tok = store.get("tokenizer", resolve("tokenizer", upstream).version).local_path(TOKENIZER_FILE)
    save_llama(tmp_path / "a", tok, 1024)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same files elsewhere
    save_llama(tmp_path / "c", tok, 1024, seed=1)
    runs = {k: upstream.with_section("retrofit", {"base_path": str(tmp_path / k)}) for k in "abc"}
    va, vb, vc = (resolve("retrofit", r).version for r in runs.values())
    assert va == vb != vc
    assert "reference" not in resolve("retrofit", runs["a"]).inputs
    art = build("retrofit", runs["a"])
    assert art.manifest.stats["base_model_type"] == "llama" and art.manifest.meta["base"]["path"]
    assert art.manifest.stats["train_token_share"] is None  # a given model's training tokens are unknown


def test_bad_settings_are_clear_errors(upstream, tmp_path):
    store = ArtifactStore(upstream.root())
    with pytest.raises(ConfigError, match="no config.json"):
        resolve("retrofit", upstream.with_section("retrofit", {"base_path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="n_neighbors"):
        build("retrofit", upstream.with_section("retrofit", {"n_neighbors": 50}))
    with pytest.raises(ConfigError, match="multiple of chunks.chunk_len"):
        build("retrofit", upstream.with_section("retrofit", {"seq_len": 100}))
    other = tmp_path / "other"
    tok = store.get("tokenizer", resolve("tokenizer", upstream).version).local_path(TOKENIZER_FILE)
    save_llama(other, tok, 1024)
    (other / TOKENIZER_FILE).write_text((other / TOKENIZER_FILE).read_text().replace('"the"', '"teh"', 1))
    with pytest.raises(ConfigError, match="another tokenizer"):
        build("retrofit", upstream.with_section("retrofit", {"base_path": str(other)}))


def test_evaluate_reports_the_retrofit_rows(upstream):
    from pipeline.errors import InputError
    from stages.evaluate.config import Config as EvalConfig
    from stages.evaluate.report import Metrics, _markdown, retrofit_table
    from stages.evaluate.retrofit_rows import retrofit_rows

    art = build("retrofit", upstream)
    st = art.manifest.stats
    m = Metrics(retrofit_rows(art, "test"))
    assert m.value("retrofit", "retrofit", "own", 2, "perplexity") == st["ppl_own"]
    assert m.value("retrofit", "retrofit", "own", 2, "nll_minus_empty_ci_low") == st["nll_own_minus_empty"][1]
    md = _markdown(retrofit_table(m))
    assert f"{st['ppl_frozen']:,.2f}" in md and f"{st['ppl_empty']:,.2f}" in md and "of the base LM's" in md
    with pytest.raises(InputError, match="retrofit.eval_split=valid"):
        retrofit_rows(art, "valid")
    # on: evaluate reads the retrofit artifact; off (the default): evaluate's versions are those from before
    node = resolve("evaluate", upstream.with_section("evaluate", {"retrofit": True}))
    assert node.inputs["retrofit"].version == art.version
    assert (
        "retrofit" not in EvalConfig().hashed_dict() and EvalConfig(retrofit=True).hashed_dict()["retrofit"]
    )


@pytest.mark.parametrize("table,scope", [("bm25", "document-causal"), ("dense", "corpus")])
def test_any_neighbor_table_of_either_scope(upstream, tiny_encoder, tmp_path, table, scope):
    """The user's choice of table: dense (a stand-in encoder) or bm25, document-causal or corpus. The
    stage reads exactly that table; its own-neighbor row uses its neighbors (differs from no neighbors)."""
    run = copy_stages(upstream, tmp_path / "store", ("documents", "tokenizer", "chunks", "reference"))
    run = run.with_section("embeddings", {"model": str(tiny_encoder), "workers": 1, "batch_size": 256})
    run = run.with_section("retrofit", {"neighbors": table, "scope": scope})
    art = build("retrofit", run, with_deps=True)
    nb = ArtifactStore(run.root()).get(table, art.manifest.inputs["neighbors"].split("@")[1])
    assert art.manifest.inputs["neighbors"].startswith(f"{table}@") and nb.manifest.meta["scope"] == scope
    assert art.manifest.meta["scope"] == scope
    st = art.manifest.stats
    assert st["ppl_own"] != st["ppl_empty"] and st["nll_own_minus_empty"][0] != 0


def test_the_table_read_is_causal_and_covers_every_chunk_whatever_the_bm25_section(upstream):
    """The run's own bm25 section may ask for non-causal statistics or queries of some splits only; the
    retrofit's table takes neither (document statistics would let future chunks pick neighbors; train
    chunks without rows would train CCA on nothing)."""
    run = upstream.with_section("bm25", {"stats": "document", "query_splits": ["test"], "example_chunks": 4})
    for scope in ("document-causal", "corpus"):
        node = resolve("retrofit", run.with_section("retrofit", {"scope": scope})).inputs["neighbors"]
        assert node.cfg.scope == scope and node.cfg.query == "chunk" and node.cfg.query_splits is None
        assert node.cfg.stats == "causal" and node.cfg.example_chunks == 0


def test_bootstrap_units_are_blocks_of_chunks_or_documents():
    from stages.retrofit.loop import summarize

    rows = [
        {
            "window": w,
            "doc_idx": 0,
            "first_chunk": 4 * w,
            "setting": s,
            "nll_sum": 10.0 + (s == "own"),
            "tokens": 5,
        }
        for w in range(10)
        for s in ("frozen", "own", "empty")
    ]
    st = summarize(rows)
    assert st["bootstrap_units"] == 3 and st["bootstrap_unit"].startswith(
        "block"
    )  # chunks 0-15, 16-31, 32-39
    assert st["nll_own_minus_empty"][0] == pytest.approx(1 / 5) and st["eval_tokens"] == 50
    many = [dict(r, doc_idx=r["window"], first_chunk=100 * r["window"]) for r in rows]
    assert summarize(many)["bootstrap_unit"] == "document" and summarize(many)["bootstrap_units"] == 10

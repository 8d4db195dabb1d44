"""scores: every stored log-probability equals a naive one-forward-per-pair computation with a plain HF
model call; edge chunks follow the documented conventions; a failed shard resumes to identical output."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.executor import build, resolve
from pipeline.formats import REFERENCE_MODEL_DIR, SCORES_SCHEMA, TOKENIZER_FILE, ChunkReader, load_tokenizer
from pipeline.store import ArtifactStore
from tests.conftest import TINY_REFERENCE, copy_stages, make_config, one_thread

UPSTREAM = ("documents", "tokenizer", "chunks", "reference", "bm25")


def tiny_config(root: Path, corpus: Path, **sections):
    base = {
        "runner": {"kind": "serial"},
        "documents": {"paths": [str(corpus)], "min_chars": 20, "split_lists": {"valid": ["docs/valid.txt"]}},
        "tokenizer": {"vocab_size": 300},
        "reference": dict(TINY_REFERENCE),
        "bm25": {"exclude_recent": 1},
        "scores": {"candidates": 4, "shard_chunks": 1, "batch_tokens": 512, "kv_cache_mb": 1},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return make_config(root, **base)


@pytest.fixture(scope="session")
def scored(tmp_path_factory, tiny_corpus):
    run = tiny_config(tmp_path_factory.mktemp("scores"), tiny_corpus)
    with one_thread():
        art = build("scores", run, with_deps=True)
    return run, art


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one torch thread is fastest


def naive_logp(
    model,
    prefix: list[np.ndarray],
    query: np.ndarray,
    target: np.ndarray,
    copy: tuple[float, int] | None = None,
) -> float:
    """log P(target | prefix chunks, query) with one plain forward over the whole sequence; with
    copy = (weight, order), each token's LM probability mixed with the share of the earlier occurrences of
    its preceding `order` tokens that it followed (where there are any)."""
    ids = np.concatenate([*prefix, query, target]).astype(np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    start = len(ids) - len(target)
    total = 0.0
    for p in range(start, len(ids)):
        lp = float(logp[p - 1, ids[p]])
        if copy is not None:
            w, n = copy
            ctx = tuple(ids[p - n : p])
            nxt = [ids[s + n] for s in range(0, p - n) if tuple(ids[s : s + n]) == ctx] if p >= n else []
            if nxt:
                lp = math.log((1 - w) * math.exp(lp) + w * sum(t == ids[p] for t in nxt) / len(nxt))
        total += lp
    return total


def load_model(run):
    from transformers import AutoModelForCausalLM

    ref = ArtifactStore(run.root()).get("reference", resolve("reference", run).version)
    path = ref.local_path(REFERENCE_MODEL_DIR)
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval(), path


def chunk_tokens(reader: ChunkReader) -> list[np.ndarray]:
    return [row[row >= 0] for row in np.asarray(reader.tokens)]


def check_against_naive(art, run, tokens: list[np.ndarray], copy: tuple[float, int] | None = None) -> int:
    """Recompute every row naively (conventions spelled out here independently); returns pairs checked."""
    model, _ = load_model(run)
    reader = ChunkReader(ArtifactStore(run.root()).get("chunks", resolve("chunks", run).version))
    doc_of = reader.chunk_doc
    rows = art.read().to_pylist()
    checked = 0
    for r in rows:
        i = r["chunk_id"]
        local = [tokens[c] for c in (i - 2, i - 1) if c >= 0 and doc_of[c] == doc_of[i]]
        lp_local = naive_logp(model, local, tokens[i], tokens[i + 1], copy)
        assert r["logp_local"] == pytest.approx(lp_local, abs=1e-4, rel=1e-6), i  # float32 storage: ~6e-8 rel
        for j, lp, d in zip(r["candidate_ids"], r["logp_candidate"], r["delta"]):
            prefix = [tokens[j]] + ([tokens[j + 1]] if doc_of[j + 1] == doc_of[j] else [])
            want = naive_logp(model, prefix, tokens[i], tokens[i + 1], copy)
            assert lp == pytest.approx(want, abs=1e-4, rel=1e-6), (i, j)
            # the sign convention: positive when the candidate beats the local context
            assert d == pytest.approx(want - lp_local, abs=1e-3)
            checked += 1
    return checked


def test_every_logp_matches_naive(scored):
    run, art = scored
    reader = ChunkReader(ArtifactStore(run.root()).get("chunks", resolve("chunks", run).version))
    assert art.read().schema.equals(SCORES_SCHEMA)
    assert check_against_naive(art, run, chunk_tokens(reader)) > 100


def test_a_copy_cache_is_mixed_into_every_logp(scored, tmp_path):
    """reference.copy_weight: the scores are the LM mixed with the in-context copy model, token by token,
    as the naive loop computes them; the copy probe reports the mixture (it copies) and the LM alone."""
    run0, _ = scored
    run = tiny_config(
        tmp_path, Path(run0.documents.paths[0]), reference={"copy_weight": 0.4, "copy_order": 2}
    )
    with one_thread():
        art = build("scores", run, with_deps=True)
    reader = ChunkReader(ArtifactStore(run.root()).get("chunks", resolve("chunks", run).version))
    assert check_against_naive(art, run, chunk_tokens(reader), copy=(0.4, 2)) > 100
    ref = ArtifactStore(run.root()).get("reference", resolve("reference", run).version)
    ref0 = ArtifactStore(run0.root()).get("reference", resolve("reference", run0).version)
    assert ref.version != ref0.version
    st = ref.manifest.stats
    assert st["copy_gain_lm"] == pytest.approx(ref0.manifest.stats["copy_gain"], abs=1e-6)
    assert st["copy_gain"] > 0.5 > st["copy_gain_lm"]


def test_rows_and_edge_chunks(scored):
    run, art = scored
    store = ArtifactStore(run.root())
    reader = ChunkReader(store.get("chunks", resolve("chunks", run).version))
    t = art.read().to_pylist()
    by_id = {r["chunk_id"]: r for r in t}
    docs = reader.docs()
    # every chunk with a target has exactly one row; a document's last chunk has none
    want = sorted(c for d in docs for c in range(d.first, d.first + d.n - 1))
    assert sorted(by_id) == want
    assert len(by_id) == len(t)
    # candidates are the bm25 (chunk+target, document-causal) top-k in order, pads dropped
    bm = store.get("bm25", resolve("scores", run).inputs["bm25"].version)
    assert bm.manifest.config["query"] == "chunk+target" and bm.manifest.config["scope"] == "document-causal"
    for q, nb in zip(bm.read().column("chunk_id").to_pylist(), bm.read().column("neighbor_ids").to_pylist()):
        if q in by_id:
            assert by_id[q]["candidate_ids"] == [j for j in nb if j >= 0]
    long_doc = max(docs, key=lambda d: d.n)
    first = by_id[long_doc.first]
    # chunks 0 and 1 cannot retrieve anything with exclude_recent=1; their local context is what exists
    assert first["candidate_ids"] == [] and first["delta"] == [] and np.isfinite(first["logp_local"])
    assert by_id[long_doc.first + 1]["candidate_ids"] == []
    assert len(by_id[long_doc.first + 2]["candidate_ids"]) == 1  # only chunk 0 is retrievable
    # a document too short to retrieve anything still has rows, with empty candidate lists
    short = next(d for d in docs if 1 < d.n <= 3)
    assert all(by_id[c]["candidate_ids"] == [] for c in range(short.first, short.first + short.n - 1))
    # a one-chunk document has no target at all
    assert any(d.n == 1 and d.first not in by_id for d in docs)
    # the target of the next-to-last chunk is the short last chunk
    assert reader.lengths(np.array([long_doc.first + long_doc.n - 1]))[0] < reader.chunk_len
    stats = art.manifest.stats
    assert stats["queries"] == len(t) and stats["candidates"] == sum(len(r["candidate_ids"]) for r in t)
    assert stats["positives"] == sum(sum(d > 0 for d in r["delta"]) for r in t)
    assert 0 <= stats["fraction_with_positive"] <= 1
    assert art.manifest.meta["positive"] == "delta > 0"


def test_core_conventions_on_hand_made_candidates(scored):
    """The scoring core on a hand-made candidate table: a candidate that ends its document has no
    continuation; a candidate equal to the local pair scores delta 0 exactly; any prefix works."""
    from model.lm_scoring import ScoringLM, score_queries
    from stages.scores import build_scores_table

    run, _ = scored
    model, _ = load_model(run)
    rng = np.random.default_rng(0)
    toks = [rng.integers(0, 300, n) for n in [64] * 9 + [17] + [64] * 3 + [5]]
    doc_start = np.array([0] * 10 + [10] * 4)
    doc_end = np.array([10] * 10 + [14] * 4)
    queries = np.array([0, 1, 2, 5, 8, 11, 12])
    cands = [
        np.array([], np.int64),
        np.array([0]),
        np.array([0]),
        np.array([3, 0, 9]),
        np.array([6, 2, 13]),
        np.array([10, 9]),
        np.array([10]),
    ]
    lm = ScoringLM(model, torch.device("cpu"), torch.float32)
    qs, counts = score_queries(
        lm, queries, cands, doc_start, doc_end, lambda c: toks[c], batch_tokens=300, kv_cache_mb=1
    )
    table = build_scores_table(qs).to_pylist()
    for r, q, c in zip(table, queries, cands):
        local = [toks[x] for x in (q - 2, q - 1) if x >= doc_start[q]]
        assert r["logp_local"] == pytest.approx(naive_logp(model, local, toks[q], toks[q + 1]), abs=1e-3)
        for j, lp in zip(c, r["logp_candidate"]):
            prefix = [toks[j]] + ([toks[j + 1]] if j + 1 < doc_end[j] else [])  # 9 and 13 end their documents
            assert lp == pytest.approx(naive_logp(model, prefix, toks[q], toks[q + 1]), abs=1e-3), (q, j)
    # a candidate whose pair is the local pair (2: 0, 5: 3, 8: 6, 12: 10) is computed once: delta exactly 0
    assert [table[k]["delta"][0] for k in (2, 3, 4, 6)] == [0.0] * 4
    assert counts["pairs"] == sum(len(c) for c in cands) + len(queries) - 4


def test_failed_shard_resumes_to_identical_output(scored, tmp_path, monkeypatch):
    import model.lm_scoring as sc

    run, clean = scored
    root = tmp_path / "store"
    run2 = copy_stages(run, root, UPSTREAM)  # same upstream artifacts in a fresh store
    real = sc.score_queries
    state = {"calls": 0, "fail_at": 2}

    def counted(*a, **k):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise RuntimeError("simulated crash in shard 2")
        return real(*a, **k)

    monkeypatch.setattr(sc, "score_queries", counted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build("scores", run2)
    version = resolve("scores", run2).version
    assert version == clean.version
    st2 = ArtifactStore(str(root))
    assert not st2.exists("scores", version) and version in st2.partials("scores")
    done = st2.fs.glob(f"{st2.partial_dir('scores', version)}/_shards/*.json")
    assert len(done) == 1  # the first shard survived; only the failed one is redone
    state.update(calls=0, fail_at=None)
    resumed = build("scores", run2)
    n_shards = len(clean.parts())
    assert state["calls"] == n_shards - 1  # the finished shard is not recomputed
    assert {f.path: f.sha256 for f in resumed.manifest.files} == {
        f.path: f.sha256 for f in clean.manifest.files
    }


def test_killed_scoring_process_resumes_to_identical_output(scored, tmp_path):
    """A real `rpt run scores` process SIGKILLed inside its second shard: nothing is published, the
    first shard survives, and the rerun scores only the rest, byte-identical to an uninterrupted run."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import model.lm_scoring as sc
    from tests.conftest import REPO

    run, clean = scored
    root = tmp_path / "store"
    run2 = copy_stages(run, root, UPSTREAM)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(run2.model_dump(mode="json")))
    # the worker stalls in its second shard, so the kill lands mid-shard whatever the machine's speed
    stall = (
        "import sys, time, model.lm_scoring as sc\n"
        "real, n = sc.score_queries, [0]\n"
        "def slow(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2: time.sleep(600)\n"
        "    return real(*a, **k)\n"
        "sc.score_queries = slow\n"
        "from app.cli import main\n"
        "sys.argv = ['rpt', 'run', 'scores', '-c', sys.argv[1]]\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", stall, str(cfg)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "RPT_PROGRESS": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    st2 = ArtifactStore(str(root))
    version = resolve("scores", run2).version
    sidecars = f"{st2.partial_dir('scores', version)}/_shards/*.json"
    deadline = time.time() + 180
    while not st2.fs.glob(sidecars) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside shard 2 by now (it stalls there)
    assert proc.poll() is None, "the scoring process ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(st2.fs.glob(sidecars)) == 1
    assert not st2.exists("scores", version) and st2.get_ref("scores", "latest") is None

    calls = {"n": 0}
    real = sc.score_queries

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    sc.score_queries = counted
    try:
        resumed = build("scores", run2)
    finally:
        sc.score_queries = real
    assert calls["n"] == len(clean.parts()) - 1  # the shard finished before the kill is not redone
    assert {f.path: f.sha256 for f in resumed.manifest.files} == {
        f.path: f.sha256 for f in clean.manifest.files
    }


def test_other_tokenizer_is_retokenized(scored, tmp_path):
    """An adopted LM with its own tokenizer scores the chunk texts re-tokenized chunk by chunk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    run, _ = scored
    store = ArtifactStore(run.root())
    reader = ChunkReader(store.get("chunks", resolve("chunks", run).version))
    texts = reader.texts(np.arange(reader.n_chunks))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    folder = tmp_path / "other-lm"
    torch.manual_seed(1)
    GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=448, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(folder)
    tok.save(str(folder / TOKENIZER_FILE))
    root = tmp_path / "store"
    for stage in ("documents", "tokenizer", "chunks", "bm25"):
        shutil.copytree(store.stage_dir(stage), root / stage)
    run2 = run.model_copy(update={"artifacts_root": str(root)}).with_section(
        "reference", {"path": str(folder)}
    )
    art = build("scores", run2, with_deps=True)
    assert art.manifest.meta["tokenizer_differs"] is True
    lm_tok = load_tokenizer(folder / TOKENIZER_FILE)
    tokens = [np.asarray(e.ids) for e in lm_tok.encode_batch(texts, add_special_tokens=False)]
    assert any(len(t) != len(r[r >= 0]) for t, r in zip(tokens, np.asarray(reader.tokens)))
    assert check_against_naive(art, run2, tokens) > 100


def test_bad_device_is_a_config_error(monkeypatch):
    from pipeline.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_gpu_close_to_fp32(scored):
    """On a GPU the bf16 scorer agrees with the fp32 CPU result to bf16 precision."""
    from model.lm_scoring import ScoringLM, score_queries
    from stages.scores import document_bounds

    run, art = scored
    _, path = load_model(run)
    reader = ChunkReader(ArtifactStore(run.root()).get("chunks", resolve("chunks", run).version))

    ds, de = document_bounds(reader)
    rows = art.read().to_pylist()
    q = np.array([r["chunk_id"] for r in rows])
    c = [np.array(r["candidate_ids"], dtype=np.int64) for r in rows]
    toks = chunk_tokens(reader)
    lm = ScoringLM.load(str(path), torch.device("cuda"), torch.bfloat16)
    qs, _ = score_queries(lm, q, c, ds, de, lambda i: toks[i])
    np.testing.assert_allclose(qs.logp_local, [r["logp_local"] for r in rows], rtol=2e-2, atol=0.5)


def test_workers_claim_distinct_devices(tmp_path):
    """Each worker thread/process claims a device slot no other live worker holds (multi-GPU spreading)."""
    import subprocess
    import sys
    import threading

    from pipeline.devices import claim_slot

    names = ["gpu-a", "gpu-b", "gpu-c"]
    holder = subprocess.Popen(  # another worker process that holds slot 0 until we close its stdin
        [
            sys.executable,
            "-c",
            "import sys; from pipeline.devices import claim_slot; "
            f"print(claim_slot({names!r}, {str(tmp_path)!r}), flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "0"
        got: list[int] = []
        live = threading.Barrier(3)  # a claim lasts as long as its thread: all three live until all claimed

        def worker() -> None:
            got.append(claim_slot(names, tmp_path))
            live.wait()

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # two threads take the free slots 1 and 2; the third finds none free and shares one
        assert len(got) == 3 and {1, 2} <= set(got) and set(got) <= {0, 1, 2}
        # a thread's claim ends with it: a new thread (maybe reusing a dead one's id) finds slot 1 free
        again: list[int] = []
        t = threading.Thread(target=lambda: again.append(claim_slot(names, tmp_path)))
        t.start()
        t.join()
        assert again == [1]
    finally:
        holder.stdin.close()
        holder.wait()

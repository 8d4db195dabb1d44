"""Stage `evaluate` and `rpt report`: the whole chain on five short book slices with tiny models
(2 training steps each), checked against independent computations: perplexity from the model's logits
by hand, the oracle's neighbors by a naive loop over the scores table, ranking metrics against ranx,
and the split of every query chunk."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.executor import build, resolve
from pipeline.formats import TOKEN_PAD, ChunkReader, read_neighbors
from pipeline.store import ArtifactStore
from retrieval.ranking import distinct_overlap, ranking_metrics
from stages import config_from_dict
from stages.evaluate.perplexity import EvalDoc, doc_batch, oracle_positions, select_documents
from stages.evaluate.repeats import REPEAT_NGRAM

TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "window": 128, "stride": 64}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one torch thread is fastest


@pytest.fixture(scope="module")
def eval_run(tiny_run, tiny_encoder, tmp_path_factory):
    """documents ... train (four variants, 2 steps each) -> evaluate, in a private copy of the tiny store."""
    root = tmp_path_factory.mktemp("evaluate-store")
    shutil.copytree(tiny_run.root(), root, dirs_exist_ok=True)
    data = tiny_run.model_dump(mode="json")
    data.update(
        artifacts_root=str(root),
        bm25={"exclude_recent": 1},  # = (window - stride) / chunk_len of TINY_MODEL
        dense={"scope": "document-causal", "exclude_recent": 1},
        embeddings={"model": str(tiny_encoder)},
        reference={
            "hidden": 32,
            "layers": 1,
            "heads": 2,
            "intermediate": 64,
            "steps": 3,
            "batch": 2,
            "eval_tokens": 512,
        },
        scores={"candidates": 8, "splits": ["train", "test"]},
        train={
            "steps": 2,
            "seq_len": 512,
            "batch_size": 1,
            "warmup_steps": 1,
            "workers": 0,
            "model": TINY_MODEL,
        },
        evaluate={"neighbors": [2, 3], "threads": 1},
    )
    run = config_from_dict(data)
    art = build("evaluate", run, with_deps=True)
    return run, art


def _metrics(art):
    return art.read_file("metrics.parquet").to_pylist()


def _value(rows, **eq):
    hits = [r for r in rows if all(r[k] == v for k, v in eq.items())]
    assert len(hits) == 1, eq
    return hits[0]


# ------------------------------------------------------------------------------------------ end to end
def test_every_row_is_computed_over_the_same_test_tokens(eval_run):
    run, art = eval_run
    rows = _metrics(art)
    ppl = [r for r in rows if r["table"] == "perplexity" and r["metric"] == "perplexity"]
    got = {(r["model"], r["setting"], r["neighbors"]) for r in ppl}
    assert got == {
        ("baseline", "none", 0),
        *{(v, "empty", 0) for v in ("retro_bm25", "rpt_lex", "rpt_sem")},
        ("retro_bm25", "bm25", 2),
        ("retro_bm25", "bm25", 3),
        *{(v, s, k) for v in ("rpt_lex", "rpt_sem") for s in ("retriever", "oracle") for k in (2, 3)},
    }
    reader = ChunkReader(ArtifactStore(run.root()).get("chunks", art.manifest.inputs["chunks"].split("@")[1]))
    test_tokens = sum(int(reader.lengths(d.chunk_ids).sum()) - 1 for d in reader.docs("test"))
    assert {r["count"] for r in ppl} == {test_tokens}
    assert all(1.0 < r["value"] < 2 * 1024 for r in ppl)  # a 1024-token vocabulary, barely trained
    ret = [r for r in rows if r["table"] == "retrieval"]
    assert {r["model"] for r in ret} == {"bm25", "dense", "rpt_lex", "rpt_sem", "random"}
    assert {r["metric"] for r in ret} == {"precision@2", "recall@10", "ndcg@20"}
    assert all(0.0 <= r["value"] <= 1.0 for r in ret)
    # the chance level by hand: a random ranking of each query's universe (pos - exclude_recent chunks)
    qs = art.read_file("details/retrieval.parquet").to_pylist()
    qs = [r for r in qs if r["retriever"] == "bm25"]
    pos = {int(c): int(p) for c, p in zip(range(reader.n_chunks), reader.chunk_pos)}
    u = np.array([max(pos[r["chunk_id"]] - 1, 1) for r in qs], dtype=float)  # exclude_recent = 1
    g = np.array([r["n_gold"] for r in qs], dtype=float)
    rand_p2 = _value(rows, table="retrieval", model="random", metric="precision@2")["value"]
    assert rand_p2 == pytest.approx(float((g * np.minimum(2, u) / (u * 2)).mean()), rel=1e-9)
    rand_r10 = _value(rows, table="retrieval", model="random", metric="recall@10")["value"]
    assert rand_r10 == pytest.approx(float((np.minimum(10, u) / u).mean()), rel=1e-9)
    assert {r["model"] for r in rows if r["table"] == "overlap"} == {
        "bm25",
        "dense",
        "rpt_lex",
        "rpt_sem",
        "gold",
    }
    assert {r["value"] for r in rows if r["table"] == "training" and r["metric"] == "steps"} == {2.0}
    # the scoring LM's copy probe, as its manifest recorded it (the gold above is its scores)
    store = ArtifactStore(run.root())
    scores = store.get("scores", art.manifest.inputs["scores"].split("@")[1])
    probe = store.get("reference", scores.manifest.inputs["reference"].split("@")[1]).manifest.stats
    scorer = {r["metric"]: r for r in rows if r["table"] == "scorer"}
    assert set(scorer) == {"copy_first_nll", "copy_repeat_nll", "copy_gain"}
    assert all(scorer[k]["value"] == pytest.approx(probe[k]) for k in scorer)
    assert {r["count"] for r in scorer.values()} == {probe["copy_passages"]}
    # the report, its plots, and a rerun that is a no-op
    report = (Path(art.path) / "report.md").read_text()
    assert (
        f"(gain {probe['copy_gain']:.2f} nats): it does not copy in context" in report
    )  # a barely trained LM
    assert "paper Table 2" in report and "PG19" in report and "11.48" in report
    for png in ("perplexity.png", "retrieval.png", "overlap.png", "training.png"):
        assert (Path(art.path) / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert build("evaluate", run).version == art.version
    assert not art.verify()


def test_perplexity_is_exp_of_the_mean_token_loss_by_hand(eval_run):
    """Recompute four rows from the checkpoints (baseline; rpt_sem with oracle neighbors; retro_bm25 with
    the bm25 table's; rpt_lex with its own retriever): logits of the whole test document, -log softmax at each
    next token in float64, exp of the mean. The oracle's neighbors come from a naive loop over the
    scores table: gold = candidates of the same document, retrievable, with delta > 0, best first."""
    from model.checkpoint import load_checkpoint

    run, art = eval_run
    store = ArtifactStore(run.root())
    inp = {r: store.resolve(ref) for r, ref in art.manifest.inputs.items()}
    reader = ChunkReader(inp["chunks"])
    (doc,) = reader.docs("test")
    toks = [
        int(t) for t in np.asarray(reader.tokens[doc.first : doc.first + doc.n]).ravel() if t != TOKEN_PAD
    ]
    T = -(-len(toks) // reader.chunk_len) * reader.chunk_len
    x = torch.tensor([toks + [0] * (T - len(toks))])

    scores = inp["scores"].read().to_pylist()
    w = 1
    gold: list[list[int]] = [[] for _ in range(doc.n)]
    for row in scores:
        i = row["chunk_id"] - doc.first
        if not 0 <= i < doc.n:
            continue
        ok = [
            (d, c - doc.first)
            for c, d in zip(row["candidate_ids"], row["delta"])
            if d > 0 and doc.first <= c <= row["chunk_id"] - 1 - w
        ]
        gold[i] = [p for _, p in sorted(ok, key=lambda t: -t[0])]
    k = 2
    oracle = torch.tensor([[(g + [-1] * k)[:k] for g in gold]])
    # RETRO's neighbors: the bm25 table's (query = chunk) ids, in BM25 order, that chunk i may retrieve
    q_ids, nb_ids, _ = read_neighbors(inp["bm25"])
    row_of = {int(q): r for r, q in enumerate(q_ids)}
    k3 = 3
    bm25_pos = [
        [int(c) - doc.first for c in nb_ids[row_of[doc.first + i]] if doc.first <= c <= doc.first + i - 1 - w]
        for i in range(doc.n)
    ]
    bm25_nb = torch.tensor([[(b + [-1] * k3)[:k3] for b in bm25_pos]])

    rows = _metrics(art)
    for variant, kwargs, setting in [
        ("baseline", {"source": "none"}, ("none", 0)),
        ("rpt_sem", {"source": "given", "neighbor_pos": oracle, "k": k}, ("oracle", k)),
        ("retro_bm25", {"source": "given", "neighbor_pos": bm25_nb, "k": k3}, ("bm25", k3)),
        ("rpt_lex", {"source": "retriever", "k": k3}, ("retriever", k3)),
    ]:
        model, _ = load_checkpoint(inp[f"train_{variant}"].local_path())
        with torch.no_grad():
            logits = model(x, **kwargs, return_logits=True).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        nll = [-float(logp[t, toks[t + 1]]) for t in range(len(toks) - 1)]
        by_hand = math.exp(sum(nll) / len(nll))
        got = _value(
            rows,
            table="perplexity",
            model=variant,
            setting=setting[0],
            neighbors=setting[1],
            metric="perplexity",
        )
        assert got["count"] == len(nll)
        assert got["value"] == pytest.approx(by_hand, rel=1e-5)
        if variant == "baseline":  # the repeats table splits the same NLLs by the naive repeat search
            rep = _repeats_by_search(toks, TINY_MODEL["window"], REPEAT_NGRAM)[: len(nll)]
            split = {
                name: [x for x, r in zip(nll, rep) if r == want]
                for name, want in (("repeat", 1), ("other", 0))
            }
            for name, vals in split.items():
                hits = [
                    r
                    for r in rows
                    if r["table"] == "repeats" and r["model"] == "baseline" and r["metric"] == f"{name}_nll"
                ]
                assert len(hits) == (1 if vals else 0)
                if vals:
                    assert hits[0]["count"] == len(vals)
                    assert hits[0]["value"] == pytest.approx(sum(vals) / len(vals), rel=1e-5)
            assert split["other"]
    assert any(len(g) >= 2 for g in gold)  # the oracle row did use gold neighbors
    assert any(len(b) >= k3 for b in bm25_pos)
    # the number of neighbors reaches the model: K = 2 and 3 (this fixture's evaluate.neighbors) differ
    for variant, setting in [("rpt_sem", "retriever"), ("retro_bm25", "bm25")]:
        by_k = [
            _value(rows, table="perplexity", model=variant, setting=setting, neighbors=n, metric="perplexity")
            for n in (2, 3)
        ]
        assert by_k[0]["value"] != by_k[1]["value"], (variant, by_k)


def test_queries_and_rankings_come_from_the_test_split_only(eval_run):
    run, art = eval_run
    store = ArtifactStore(run.root())
    reader = ChunkReader(store.resolve(art.manifest.inputs["chunks"]))
    test_ids = np.concatenate([d.chunk_ids for d in reader.docs("test")])
    per_query = pq.read_table(Path(art.path) / "details" / "retrieval.parquet")
    q = per_query.column("chunk_id").to_numpy()
    assert len(q) and np.isin(q, test_ids).all()
    assert per_query.column("n_gold").to_numpy().min() >= 1
    for v in ("rpt_lex", "rpt_sem"):
        t = pq.read_table(Path(art.path) / "rankings" / f"{v}.parquet")
        qs = t.column("chunk_id").to_numpy()
        assert np.array_equal(np.sort(qs), test_ids)  # every test chunk ranked, nothing else
        nb = t.column("neighbor_ids").combine_chunks().flatten().to_numpy().reshape(len(qs), -1)
        for qi, row in zip(qs, nb):
            real = row[row >= 0]
            assert np.all(reader.chunk_doc[real] == reader.chunk_doc[qi])
            assert np.all(reader.chunk_pos[real] <= reader.chunk_pos[qi] - 2)  # exclude_recent = 1


def test_train_split_chunks_do_not_change_the_test_metrics(eval_run, tmp_path):
    """Scramble every train- and valid-split token in a copy of the store and evaluate again: every
    perplexity, retrieval and overlap figure is unchanged, so no other split enters the test metrics."""
    import polars as pl

    run, art = eval_run
    root = tmp_path / "store"
    shutil.copytree(run.root(), root)
    shutil.rmtree(root / "evaluate")
    chunks = ArtifactStore(str(root)).resolve(art.manifest.inputs["chunks"])
    reader = ChunkReader(chunks)
    tokens = np.load(chunks.local_path("tokens.npy"), mmap_mode="r+")
    vocab = int(tokens.max()) + 1
    others = [d for d in reader.docs() if d.split != "test"]
    assert others and any(d.split == "train" for d in others)
    for d in others:
        block = tokens[d.first : d.first + d.n]
        block[block >= 0] = (block[block >= 0] * 7 + 3) % vocab  # another valid token id everywhere
    tokens.flush()
    # the scrambled tokens no longer match the chunks manifest's checksums, on purpose: check sizes only
    scrambled = run.model_copy(update={"artifacts_root": str(root)}).with_section(
        "runner", {"verify_inputs": "size"}
    )
    again = build("evaluate", scrambled)
    assert again.version == art.version

    def table(a):
        m = pl.read_parquet(Path(a.path) / "metrics.parquet").filter(pl.col("table") != "training")
        return m.sort("table", "model", "setting", "neighbors", "metric")

    assert table(again).equals(table(art))


def test_report_command_prints_the_tables(eval_run):
    from typer.testing import CliRunner

    from app.cli import app

    run, art = eval_run
    res = CliRunner().invoke(app, ["report", "--root", run.root()])
    assert res.exit_code == 0, res.output
    assert f"evaluate@{art.version}" in res.output
    for text in ("Test perplexity", "Retrieval against", "RPT-Sem", "P@2", "11.48", "Token overlap"):
        assert text in res.output
    res = CliRunner().invoke(app, ["report", "chunks", "--root", run.root()])
    assert res.exit_code != 0


def test_a_killed_evaluation_resumes_at_the_unfinished_variant(eval_run, monkeypatch):
    from stages.evaluate import STAGE

    run, art = eval_run
    run2 = run.with_section("evaluate", {"neighbors": [2]})  # another version, same models
    real = type(STAGE).run_shard
    calls: list[str] = []

    def dies_on_rpt_sem(self, ctx, shard):
        calls.append(shard.payload["variant"])
        if shard.payload["variant"] == "rpt_sem":
            raise KeyboardInterrupt  # as if killed
        return real(self, ctx, shard)

    monkeypatch.setattr(type(STAGE), "run_shard", dies_on_rpt_sem)
    with pytest.raises(KeyboardInterrupt):
        build("evaluate", run2)
    assert calls == ["baseline", "retro_bm25", "rpt_lex", "rpt_sem"]
    calls.clear()
    monkeypatch.setattr(
        type(STAGE),
        "run_shard",
        lambda self, ctx, shard: calls.append(shard.payload["variant"]) or real(self, ctx, shard),
    )
    art2 = build("evaluate", run2)
    assert calls == ["rpt_sem"]  # the three finished variants were not recomputed
    full = {(r["model"], r["setting"], r["neighbors"], r["metric"]): r["value"] for r in _metrics(art)}
    for r in _metrics(art2):
        if r["table"] in ("perplexity", "retrieval"):
            assert r["value"] == pytest.approx(full[(r["model"], r["setting"], r["neighbors"], r["metric"])])


def test_a_split_without_gold_is_an_error_naming_the_setting(eval_run):
    run, _ = eval_run
    bad = run.with_section("evaluate", {"split": "valid"})  # scores.splits = [train, test]
    with pytest.raises(InputError, match="scores.splits"):
        build("evaluate", bad)
    assert resolve("evaluate", bad).version != resolve("evaluate", run).version


# ------------------------------------------------------------------------------------------ units
def test_select_documents_bounds_and_split(eval_run):
    run, art = eval_run
    reader = ChunkReader(ArtifactStore(run.root()).resolve(art.manifest.inputs["chunks"]))
    m = reader.chunk_len
    test = reader.docs("test")
    (doc,) = select_documents(reader, "test")
    assert (doc.first, doc.n_chunks) == (test[0].first, test[0].n)
    (cut,) = select_documents(reader, "test", max_doc_tokens=5 * m + 3)
    assert cut.n_chunks == 5 and cut.n_tokens == 5 * m
    assert sum(d.n_tokens for d in select_documents(reader, "train", max_tokens=40 * m)) <= 40 * m
    assert {reader.chunk_doc[d.first] for d in select_documents(reader, "train")} == {
        d.doc_idx for d in reader.docs("train")
    }
    with pytest.raises(ConfigError, match="max_doc_tokens"):
        select_documents(reader, "test", max_doc_tokens=m - 1)
    tok, lab = doc_batch(reader, [cut])
    assert tok.shape == (1, 5 * m) and (lab[0, :-1] == tok[0, 1:]).all() and lab[0, -1] == -100


def test_doc_batch_pads_the_short_last_chunk_without_labels(eval_run):
    run, art = eval_run
    reader = ChunkReader(ArtifactStore(run.root()).resolve(art.manifest.inputs["chunks"]))
    d = next(d for d in reader.docs() if reader.lengths(np.array([d.first + d.n - 1]))[0] < reader.chunk_len)
    n_tok = int(reader.lengths(d.chunk_ids).sum())
    tok, lab = doc_batch(reader, [EvalDoc(d.doc_idx, d.first, d.n, n_tok)])
    assert (lab[0] != -100).sum() == n_tok - 1 and (lab[0, n_tok - 1 :] == -100).all()
    assert (tok >= 0).all()


def test_oracle_takes_only_gold_candidates_best_first():
    pos = np.array([[3, 5, -1, 7, 2], [4, 1, 0, -1, -1], [-1, -1, -1, -1, -1]])
    delta = np.array([[0.5, 2.0, 9.0, -1.0, 0.5], [0.0, np.nan, -3.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    # row 0: 9.0 is not retrievable (pos -1), -1.0 is no gold, the tie 0.5/0.5 keeps candidate order
    assert oracle_positions(pos, delta, 3).tolist() == [[5, 3, 2], [-1, -1, -1], [-1, -1, -1]]
    assert oracle_positions(pos, delta, 6).shape == (3, 6)


def test_oracle_matches_the_models_gold_source():
    """Our oracle positions equal model.losses.gold_positions (the training-time gold) on random data."""
    from model.losses import gold_positions as model_gold
    from model.retriever import retrievable_mask

    rng = np.random.default_rng(0)
    n, C, w = 12, 5, 1
    pos = np.full((n, C), -1)
    for i in range(n):
        allowed = np.arange(0, max(0, i - w))
        take = rng.choice(allowed, size=min(C, len(allowed)), replace=False) if len(allowed) else []
        pos[i, : len(take)] = take
    delta = rng.normal(size=(n, C))
    mask = torch.zeros(1, n, n).masked_fill(~retrievable_mask(n, w), float("-inf"))
    for k in (1, 2, 4):
        ref = model_gold(mask, torch.from_numpy(pos)[None], torch.from_numpy(delta).float()[None], k)[0]
        assert oracle_positions(pos, delta, k).tolist() == ref.tolist()


def _naive(ranked, gold):
    """precision@2, recall@10, nDCG@20 of one ranking against {id: grade} (linear gains)."""
    hits = [g in gold for g in ranked]
    dcg = sum(gold.get(g, 0.0) / math.log2(r + 2) for r, g in enumerate(ranked[:20]))
    idcg = sum(v / math.log2(r + 2) for r, v in enumerate(sorted(gold.values(), reverse=True)[:20]))
    return sum(hits[:2]) / 2, sum(hits[:10]) / len(gold), dcg / idcg


def test_ranking_metrics_against_ranx_and_by_hand():
    from ranx import Qrels, Run, evaluate

    rng = np.random.default_rng(1)
    Q, R, G = 40, 20, 20
    ranked = np.full((Q, R), -1)
    gold_ids = np.full((Q, G), -1)
    grades = np.zeros((Q, G))
    for q in range(Q):
        pool = rng.choice(60, size=40, replace=False)
        n_rank = int(rng.integers(1, R + 1))  # short rankings too (few retrievable chunks)
        ranked[q, :n_rank] = pool[:n_rank]
        n_gold = int(rng.integers(1, G + 1))
        gold_ids[q, :n_gold] = rng.choice(pool, size=n_gold, replace=False)
        grades[q, :n_gold] = rng.integers(1, 6, size=n_gold)
    ours = ranking_metrics(ranked, gold_ids, grades)
    qrels = Qrels(
        {f"q{q:03d}": {f"d{g}": int(v) for g, v in zip(gold_ids[q], grades[q]) if g >= 0} for q in range(Q)}
    )
    run = Run(
        {f"q{q:03d}": {f"d{d}": float(R - r) for r, d in enumerate(ranked[q]) if d >= 0} for q in range(Q)}
    )
    ref = evaluate(qrels, run, ["precision@2", "recall@10", "ndcg@20"], return_mean=False)
    for met in ("precision@2", "recall@10", "ndcg@20"):
        np.testing.assert_allclose(ours[met], ref[met], rtol=1e-9, atol=1e-12)
    # float grades (deltas), checked against the definition
    grades = np.where(gold_ids >= 0, rng.uniform(0.01, 3.0, size=(Q, G)), 0.0)
    ours = ranking_metrics(ranked, gold_ids, grades)
    for q in range(Q):
        gold = {int(g): float(v) for g, v in zip(gold_ids[q], grades[q]) if g >= 0}
        p, r, n = _naive([int(x) for x in ranked[q] if x >= 0], gold)
        assert (ours["precision@2"][q], ours["recall@10"][q]) == pytest.approx((p, r))
        assert ours["ndcg@20"][q] == pytest.approx(n)


def test_ranking_metrics_hand_example_and_bad_input():
    ranked = np.array([[7, 3, 9, -1]])
    gold, grades = np.array([[3, 5, -1]]), np.array([[2.0, 1.0, 0.0]])
    out = ranking_metrics(ranked, gold, grades, precision_at=[1, 2], recall_at=[2], ndcg_at=[3])
    assert out["precision@1"][0] == 0.0 and out["precision@2"][0] == 0.5 and out["recall@2"][0] == 0.5
    assert out["ndcg@3"][0] == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    with pytest.raises(ValueError, match="repeats"):
        ranking_metrics(np.array([[1, 1]]), gold, grades)
    with pytest.raises(ValueError, match="> 0"):
        ranking_metrics(ranked, np.array([[3]]), np.array([[0.0]]))
    assert distinct_overlap(np.array([1, 2, 2, 3, -1]), np.array([2, 3, 4, 4, -1])) == (
        2,
        pytest.approx(2 / 3),
    )


def test_use_rows_are_paired_differences_with_bootstrap_intervals(eval_run):
    """'use': own-neighbor NLL minus empty (and minus the baseline) per token, from the per-block
    details by hand; the interval is a percentile interval around it; the report shows the table."""
    _, art = eval_run
    rows = _metrics(art)
    details = {
        v: art.read_file(f"details/perplexity-{v}.parquet").to_pylist()
        for v in ("baseline", "retro_bm25", "rpt_lex", "rpt_sem")
    }

    def nll(v: str, setting: str, k: int) -> tuple[float, int]:
        rs = [r for r in details[v] if r["setting"] == setting and r["neighbors"] == k]
        return sum(r["nll_sum"] for r in rs), sum(r["tokens"] for r in rs)

    assert art.manifest.meta["bootstrap_unit"] == "block"  # one test document: blocks of 16 chunks
    for v, own in (("retro_bm25", "bm25"), ("rpt_lex", "retriever"), ("rpt_sem", "retriever")):
        for k in (2, 3):
            a, n = nll(v, own, k)
            for ref, (b, _) in (("empty", nll(v, "empty", 0)), ("baseline", nll("baseline", "none", 0))):
                r = _value(rows, table="use", model=v, setting=own, neighbors=k, metric=f"nll_minus_{ref}")
                assert r["value"] == pytest.approx((a - b) / n, rel=1e-9, abs=1e-12)
                lo = _value(rows, table="use", model=v, neighbors=k, metric=f"nll_minus_{ref}_ci_low")[
                    "value"
                ]
                hi = _value(rows, table="use", model=v, neighbors=k, metric=f"nll_minus_{ref}_ci_high")[
                    "value"
                ]
                assert lo <= r["value"] <= hi and r["count"] == len({d["block"] for d in details[v]})
    report = art.local_path("report.md").read_text()
    assert "Use of retrieval" in report and "ΔNLL vs empty" in report
    assert any(r["table"] == "training" and r["metric"] == "train_gate_mean" for r in rows)


def _repeats_by_search(x: list[int], window: int, n: int) -> list[bool]:
    """Naive: for each t, the latest earlier end j of the same n tokens, searched position by position."""
    out = [False] * len(x)
    for t in range(n - 1, len(x) - 1):
        for j in range(t - 1, n - 2, -1):
            if x[j - n + 1 : j + 1] == x[t - n + 1 : t + 1]:
                out[t] = t - j > window and x[j + 1] == x[t + 1]
                break
    return out


def test_repeat_mask_matches_a_direct_search():
    """Repeated passages (the report's copy diagnostic) on synthetic documents with verbatim copies
    beyond the window, on random text with short repeats inside it, and with padding after the end."""
    from data.synthetic import copy_document
    from stages.evaluate.repeats import repeat_mask

    rng = np.random.default_rng(3)
    docs = [copy_document(rng, 24, 8, 12, min_gap=40).tokens for _ in range(3)]
    docs.append(rng.integers(0, 3, 300))  # tiny vocabulary: n-grams recur at every distance
    for x in docs:
        for window, n in ((32, 4), (8, 3), (100, 6)):
            padded = np.concatenate([x, np.full(7, 99)])
            got = repeat_mask(padded, len(x), window, n)
            want = _repeats_by_search([int(v) for v in x], window, n)
            assert got[: len(x)].tolist() == want and not got[len(x) :].any()
    assert repeat_mask(docs[0], len(docs[0]), 32, 4).sum() > 20  # the copies are found


@pytest.mark.parametrize("lm_gain", [None, 0.01])
def test_the_table_3_note_names_the_scorer_as_used(lm_gain):
    """With a copy cache the probe's figures are the mixture's, and the note says so beside the LM's own."""
    from stages.evaluate.report import Metrics, retrieval_table

    probe = {"copy_first_nll": 5.07, "copy_repeat_nll": 0.75, "copy_gain": 4.32}
    if lm_gain is not None:
        probe["copy_gain_lm"] = lm_gain
    rows = [
        {
            "table": "scorer",
            "model": "reference",
            "setting": "copy",
            "neighbors": None,
            "metric": k,
            "value": v,
            "count": 128,
        }
        for k, v in probe.items()
    ]
    notes = " ".join(retrieval_table(Metrics(rows), "PG19").notes)
    assert "NLL 0.75 against 5.07 where it first occurs (gain 4.32 nats): it copies in context." in notes
    if lm_gain is None:
        assert notes.count("The scoring LM on a passage") == 1 and "copy cache" not in notes
    else:
        assert "The scoring LM with its copy cache (reference.copy_weight) on a passage" in notes
        assert "The LM alone gains 0.01 nats." in notes

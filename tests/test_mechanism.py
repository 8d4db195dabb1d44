"""Mechanism tests: on synthetic documents whose later passages repeat earlier ones verbatim, at
arbitrary token offsets and further back than the attention window, each retrieval mechanism learns
what it is for, through the same forward/loss code the train stage runs (model.training):

  (a) CCA copies: retro_bm25 given the true neighbor plus a random distractor predicts the copied
      tokens (NLL < 0.5 nats) while its empty ablation stays at chance (ln V);
  (b) the learned retriever of rpt_lex (BM25 chunk+target positives) and of rpt_sem (scoring-LM
      deltas) ranks a true source chunk of a copied query chunk first (recall@1 > 0.9);
  (c) rpt_sem end to end (scheduled sampling, K = 2, its own retriever at evaluation) predicts the
      copied tokens its retriever can reach (NLL < 1.0).

The supervision is built as the stages build it: candidates are the BM25 top-k of (c_i, c_i+1) from
the bm25 stage's kernel; rpt_lex targets come from data.neighbors.lex_targets; rpt_sem targets are the
scores stage's delta under a trigram copy model standing in for the scoring LM (data.synthetic).

The model is the smallest RPT (one lower and one upper layer, d = 64) on 32 chunks of 8 tokens: copying
an unaligned repeat needs an induction-like circuit in CCA (match the current token against the
neighbor's tokens, read the one after), which a tiny model forms only after a few hundred steps. Each
test trains until its target is met (checked every 50 steps) or its step budget ends. One thread.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.neighbors import ChunkTable, lex_targets
from data.synthetic import (
    CopyDoc,
    copy_batch,
    copy_corpus,
    copy_lm_deltas,
    distractor_neighbors,
    predictable,
    retrievable_copies,
    true_chunks,
)
from model.config import preset
from model.rpt import RPT
from model.training import Schedule, forward_loss
from retrieval.bm25 import Params, document_neighbors

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]

M, N, V, W = 8, 32, 256, 2  # chunk length, chunks per document, vocabulary, exclude_recent
MIN_GAP = 6 * M  # a copy's source ends at least this many tokens before it: beyond the window (4 M)
BATCH, CANDIDATES = 8, 8


def model_config(variant: str):
    return preset(
        "tiny",
        variant=variant,
        vocab_size=V,
        d_model=64,
        n_layers=2,
        n_heads=2,
        ffn_dim=176,
        chunk_len=M,
        window=4 * M,
        stride=2 * M,
        exclude_recent=W,
    )


def corpus(seed: int, n: int) -> list[CopyDoc]:
    return copy_corpus(seed, n, N, M, V, MIN_GAP, span_chunks=(3, 6))


def bm25_candidates(doc: CopyDoc) -> tuple[np.ndarray, np.ndarray]:
    """The supervision table's candidates: BM25 top-k of (c_i, c_i+1) over the retrievable chunks."""
    p = Params(k=CANDIDATES, query="chunk+target", exclude_recent=W)
    return document_neighbors(doc.tokens.reshape(N, M).astype(np.int32), p)


def supervision(doc: CopyDoc, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(candidate positions, targets) as the train stage builds them for rpt_lex / rpt_sem."""
    pos, score = bm25_candidates(doc)
    if kind == "lex":
        return pos, lex_targets(ChunkTable(pos, np.where(pos < 0, np.nan, score).astype(np.float32))).values
    return pos, copy_lm_deltas(doc, pos, V)  # the scores stage's delta, a copy model as the scoring LM


def supervised_batch(seed: int, kind: str) -> dict:
    """Fresh documents every step (a fixed pool is memorised within a few hundred steps)."""
    docs = corpus(seed, BATCH)
    pos, tgt = zip(*(supervision(d, kind) for d in docs))
    return copy_batch(docs, cand_pos=list(pos), cand_target=list(tgt))


def copied_nll(model: RPT, docs: list[CopyDoc], mask: torch.Tensor | None = None, **kw) -> float:
    """Mean NLL over the tokens that continue a copy (or over `mask`)."""
    batch = copy_batch(docs)
    model.eval()
    with torch.no_grad():
        out = model(batch["tokens"], batch["labels"], **kw)
    model.train()
    if mask is None:
        mask = torch.from_numpy(np.stack([predictable(d) for d in docs]))
    return float(out.token_nll[mask].mean())


def source_recall_at_1(model: RPT, docs: list[CopyDoc]) -> float:
    """Share of copied query chunks (every token a copy, the sources retrievable) whose top-1 holds what
    they copy."""
    batch = copy_batch(docs)
    model.eval()
    with torch.no_grad():
        top = model(batch["tokens"], source="retriever", k=1).ret_topk[..., 0]
    model.train()
    hits = []
    for b, d in enumerate(docs):
        for u, src in enumerate(true_chunks(d)):
            if (d.source[u * M : (u + 1) * M] >= 0).all() and max(src) <= u - 1 - W:
                hits.append(int(top[b, u]) in src)
    return float(np.mean(hits))


def train_until(
    model: RPT, batches, schedule: Schedule, done, max_steps: int, check_from: int = 0
) -> list[bool]:
    """Train with model.training's loss (scheduled sampling drawn per step) until done() holds (checked
    every 50 steps from `check_from` on)."""
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    history = []
    for step in range(max_steps):
        at = schedule.at(step, model.cfg.has_retriever)
        for g in opt.param_groups:
            g["lr"] = at["lr"]
        batch, source = batches(step)
        gold = model.cfg.has_retriever and rng.random() < at["p_gold"]
        loss, _ = forward_loss(model, batch, alpha=at["alpha_ret"], tau=at["tau"], gold=gold, source=source)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            history.append(step + 1 >= check_from and done())
            if history[-1] is True:
                break
    return history


def test_cca_copies_from_the_true_neighbor_not_the_distractor() -> None:
    torch.manual_seed(0)
    model = RPT(model_config("retro_bm25"))
    rng = np.random.default_rng(1)
    test = corpus(99, 32)
    test_nb = [distractor_neighbors(d, W, np.random.default_rng(5)) for d in test]

    def batches(step: int):
        docs = corpus(1000 + step, BATCH)
        return copy_batch(docs, [distractor_neighbors(d, W, rng) for d in docs]), "given"

    def nll() -> float:
        return copied_nll(model, test, source="given", neighbor_pos=copy_batch(test, test_nb)["neighbor_pos"])

    hist = train_until(model, batches, Schedule(steps=800, lr=3e-3, warmup=50), lambda: nll() < 0.5, 800)
    got = nll()
    empty = copied_nll(model, test, source="given", neighbor_pos=torch.full((len(test), N, 1), -1))
    baseline_chance = math.log(V)
    assert got < 0.5, (
        f"copied-token NLL {got:.2f} after {50 * len(hist)} steps (chance {baseline_chance:.2f})"
    )
    assert empty > baseline_chance - 0.1, f"without neighbors the copies became predictable ({empty:.2f})"


@pytest.mark.parametrize("kind", ["lex", "sem"])
def test_learned_retriever_finds_the_source_chunk(kind: str) -> None:
    torch.manual_seed(0)
    model = RPT(model_config(f"rpt_{kind}"))
    test = corpus(98, 32)

    def batches(step: int):
        return supervised_batch(2000 + step, kind), "none"

    # the retriever alone is trained here (no neighbors fed): alpha 1 from the start, margin 1 -> 2
    schedule = Schedule(steps=400, lr=3e-3, warmup=20, alpha_ret=1.0, tau_max=2.0, tau_ramp=200)
    hist = train_until(model, batches, schedule, lambda: source_recall_at_1(model, test) > 0.9, 400)
    got = source_recall_at_1(model, test)
    assert got > 0.9, f"rpt_{kind}: recall@1 of the source chunk {got:.2f} after {50 * len(hist)} steps"


def test_rpt_sem_end_to_end_copies_through_its_own_retriever() -> None:
    """Scheduled sampling over a 700-step horizon (gold neighbors 1 -> 0 by step 630), alpha_ret 0.1
    (the official code's aux_scale); judged with the model's own top-2 on the copied tokens a
    retriever can reach (the chunk whose neighbors serve them is itself a copy: a copy's first chunk
    gives no clue of what it will repeat), checked every 50 steps from step 400."""
    torch.manual_seed(0)
    model = RPT(model_config("rpt_sem"))
    test = corpus(97, 32)
    reach = torch.from_numpy(np.stack([retrievable_copies(d, W) for d in test]))

    def batches(step: int):  # the variant's own source: its retriever (gold when scheduled sampling draws it)
        return supervised_batch(3000 + step, "sem"), None

    def own_nll() -> float:
        return copied_nll(model, test, mask=reach, source="retriever", k=2)

    steps = 700
    schedule = Schedule(
        steps=steps, lr=3e-3, warmup=50, alpha_ret=0.1, alpha_ramp=50, tau_max=2.0, tau_ramp=300
    )
    hist = train_until(model, batches, schedule, lambda: own_nll() < 1.0, steps, check_from=400)
    got = own_nll()
    empty = copied_nll(
        model, test, mask=reach, source="given", neighbor_pos=torch.full((len(test), N, 1), -1)
    )
    assert got < 1.0, f"rpt_sem, own retriever: copied-token NLL {got:.2f} after {50 * len(hist)} steps"
    assert empty > math.log(V) - 0.1

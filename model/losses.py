"""Losses: LM cross-entropy and the retriever's LambdaRank loss (paper §3.2, Burges et al. 2006).

Retriever supervision per query chunk i: candidate chunk positions with target scores (scoring-LM
deltas for rpt_sem, BM25 scores for rpt_lex). Positives are retrievable candidates with target > 0.
As in the official code, every retrievable chunk that is not a candidate is a negative (target
-inf), so negatives are not limited to the BM25 candidates. For a positive l and any retrievable j
with target(l) > target(j), the pair loss is

    lambda_lj * max(0, tau - (s(l) - s(j)))

with lambda the official code's LambdaRank weight |G_l - G_j| * |log2(r_l + 2) - log2(r_j + 2)| / IDCG,
G = 2^t - 1 for positives (0 otherwise), r the 0-based rank by the retriever's current scores. (The
textbook weight uses the discount difference |1/log2(r_l + 2) - 1/log2(r_j + 2)|, which vanishes for
pairs ranked far down, exactly where a retriever that starts at chance has all its positives; the
log-rank difference keeps them trained.) The loss is the weighted sum over valid pairs divided by their
number (official code). Pairs are formed only from positive candidates ([B, l, C, l]).

Targets per variant (see data.supervision): rpt_sem, the scoring LM's delta (positives delta > 0);
rpt_lex, 1 for each of the top-k BM25 (chunk+target) candidates (the paper's R^pos), so all its
positives weigh the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import IGNORE

RECALL_AT = (2, 5, 10, 20)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over labelled tokens, per-token NLL [B, T] with 0 at ignored positions)."""
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).reshape(labels.shape)
    n = (labels != IGNORE).sum().clamp(min=1)
    return nll.sum() / n, nll


def dense_targets(scores: torch.Tensor, cand_pos: torch.Tensor, cand_target: torch.Tensor) -> torch.Tensor:
    """Target matrix [B, l, l]: the candidate's target where it is a retrievable candidate, else -inf."""
    ok = (cand_pos >= 0) & torch.isfinite(cand_target)
    idx = cand_pos.clamp(min=0)
    t = torch.full_like(scores, float("-inf"))
    t = t.scatter_reduce(-1, idx, torch.where(ok, cand_target.float(), float("-inf")), reduce="amax")
    return t.masked_fill(~torch.isfinite(scores), float("-inf"))


def gold_positions(
    scores: torch.Tensor, cand_pos: torch.Tensor, cand_target: torch.Tensor, k: int
) -> torch.Tensor:
    """Top-k positives by target per chunk ([B, l, k], -1 where fewer than k positives)."""
    t = dense_targets(scores, cand_pos, cand_target)
    t = t.masked_fill(~(t > 0), float("-inf"))
    kk = min(k, t.shape[-1])
    val, idx = t.topk(kk, dim=-1)
    idx = idx.masked_fill(~torch.isfinite(val), -1)
    return F.pad(idx, (0, k - kk), value=-1) if kk < k else idx


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def lambdarank_loss(
    scores: torch.Tensor, cand_pos: torch.Tensor, cand_target: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, l, l] (-inf: not retrievable), cand_pos [B, l, C] (-1: none), cand_target [B, l, C].
    Returns (loss, number of valid pairs)."""
    scores = scores.float()
    retr = torch.isfinite(scores)
    t = dense_targets(scores, cand_pos, cand_target)
    pos_mask = (t > 0) & retr
    with torch.no_grad():
        gain = torch.where(pos_mask, torch.exp2(t.clamp(max=100.0)) - 1.0, torch.zeros_like(t))
        disc = torch.log2(_ranks(scores).float() + 2.0)
        ideal = gain.sort(dim=-1, descending=True).values
        idcg = (ideal / torch.log2(torch.arange(ideal.shape[-1], device=t.device).float() + 2.0)).sum(-1)

    # positive candidates l (each position once) against every retrievable chunk j
    idx = cand_pos.clamp(min=0)
    dup = (cand_pos[..., :, None] == cand_pos[..., None, :]).tril(-1).any(-1)
    is_pos = (cand_pos >= 0) & ~dup & pos_mask.gather(-1, idx)
    s_fin = scores.masked_fill(~retr, 0.0)
    s_l = s_fin.gather(-1, idx)  # [B, l, C]
    t_l = t.gather(-1, idx)
    valid = is_pos[..., None] & retr[:, :, None, :] & (t_l[..., None] > t[:, :, None, :])  # [B, l, C, l]
    hinge = F.relu(tau - (s_l[..., None] - s_fin[:, :, None, :]))
    with torch.no_grad():
        g_l, d_l = gain.gather(-1, idx), disc.gather(-1, idx)
        lam = (g_l[..., None] - gain[:, :, None, :]).abs() * (d_l[..., None] - disc[:, :, None, :]).abs()
        lam = lam / idcg.clamp(min=1e-3)[..., None, None]
    n_pairs = valid.sum()
    loss = torch.where(valid, lam * hinge, torch.zeros_like(hinge)).sum() / n_pairs.clamp(min=1)
    return loss, n_pairs


@torch.no_grad()
def retrieval_recall(
    scores: torch.Tensor, cand_pos: torch.Tensor, cand_target: torch.Tensor, ks: tuple[int, ...] = RECALL_AT
) -> dict[int, torch.Tensor]:
    """recall@k of the retriever's ranking against the gold positives, averaged over query chunks
    that have at least one positive: |top-k ∩ positives| / |positives|."""
    return {
        k: v for k, v in retrieval_metrics(scores, cand_pos, cand_target, ks).items() if isinstance(k, int)
    }


@torch.no_grad()
def retrieval_metrics(
    scores: torch.Tensor, cand_pos: torch.Tensor, cand_target: torch.Tensor, ks: tuple[int, ...] = RECALL_AT
) -> dict[int | str, torch.Tensor]:
    """Against the gold positives, over the whole universe the retriever ranks (every retrievable chunk
    of the example), as 0-d tensors (no host sync; NaN where undefined):
      k (int)           recall@k, averaged over query chunks with at least one positive
      "p@2"             precision@2 (Table 3's P@2) over the same queries
      "positive_share"  share of the query chunks with a retrievable chunk that have a positive
      "universe"        retrievable chunks per such query chunk
    """
    t = dense_targets(scores, cand_pos, cand_target)
    retr = torch.isfinite(scores)
    pos = (t > 0) & retr
    n_pos = pos.sum(-1)
    has = n_pos > 0
    ranks = _ranks(scores.float())
    out: dict[int | str, torch.Tensor] = {}
    n_has = has.sum()
    nan = torch.tensor(float("nan"), device=scores.device)

    def mean_over_has(v: torch.Tensor) -> torch.Tensor:
        return torch.where(n_has > 0, torch.where(has, v, 0.0).sum() / n_has.clamp(min=1), nan)

    for k in ks:
        hit = (pos & (ranks < k)).sum(-1).float()
        out[k] = mean_over_has(hit / n_pos.clamp(min=1))
    out["p@2"] = mean_over_has((pos & (ranks < 2)).sum(-1).float() / 2.0)
    n_retr = retr.sum(-1)
    askers = n_retr > 0
    n_ask = askers.sum()
    out["positive_share"] = torch.where(n_ask > 0, has.sum().float() / n_ask.clamp(min=1), nan)
    out["universe"] = torch.where(n_ask > 0, n_retr.sum().float() / n_ask.clamp(min=1), nan)
    return out

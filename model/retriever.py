"""RPT's learned retriever: score every earlier chunk of the sequence for every chunk, pick top-K.

Each chunk's lower-decoder states get one bidirectional attention layer (within the chunk), then a
mean pool; queries and keys are W_Q, W_K projections (with bias, as in the official code) of the
pooled vector after separate RMSNorms; s(q, c) = <W_Q h_q, W_K h_c> / sqrt(d). Only chunks that the
document-causal rule allows (`pipeline.formats.causal_retrievable`: j <= i - 1 - exclude_recent)
get a score; every other entry is -inf and can never be selected or enter the loss.
The bidirectional pass only mixes tokens of one chunk, whose neighbors serve the next chunk, so it
leaks nothing from the future into the prediction of any token.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from model.config import RPTConfig
from model.layers import Attention, RMSNorm


def retrievable_mask(n_chunks: int, exclude_recent: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [n_chunks, n_chunks]: [i, j] is True iff chunk i may retrieve chunk j (same rule as
    pipeline.formats.causal_retrievable)."""
    i = torch.arange(n_chunks, device=device)
    return i[None, :] <= i[:, None] - 1 - exclude_recent


class Retriever(nn.Module):
    def __init__(self, cfg: RPTConfig):
        super().__init__()
        d = cfg.d_model
        self.m, self.exclude_recent, self.scale = cfg.chunk_len, cfg.exclude_recent, 1.0 / math.sqrt(d)
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, d] lower-decoder states -> (queries [B, l, d], keys [B, l, d]).

        The bidirectional layer serves the pooled chunk representation only; CCA reads the lower
        decoder's own token states (model.rpt). The official code feeds CCA the encoded states, but
        then the ranking loss, which wants chunk-level (pooled) features, shapes the very token states
        CCA must match token by token: on the end-to-end mechanism test (tests/test_mechanism.py)
        rpt_sem's CCA learned nothing in 500 steps that way, and copied (NLL 0.7) with the lower states."""
        B, T, d = h.shape
        x = h.reshape(B * (T // self.m), self.m, d)
        pos = torch.arange(self.m, device=h.device)
        enc = x + self.attn(self.norm(x), q_pos=pos)
        pooled = enc.mean(dim=1).reshape(B, T // self.m, d)
        return self.q_proj(self.q_norm(pooled)), self.k_proj(self.k_norm(pooled))

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[B, l, l] float32 scores; -inf where the chunk is not retrievable."""
        dev = q.device.type
        off = torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else nullcontext()
        with off:  # ranks and the loss want float32 scores, also under bf16 autocast
            s = torch.einsum("bqd,bkd->bqk", q.float(), k.float()) * self.scale
        allowed = retrievable_mask(q.shape[1], self.exclude_recent, q.device)
        return s.masked_fill(~allowed, float("-inf"))


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k chunk positions per query from masked scores [B, l, l]; -1 where fewer than k exist."""
    kk = min(k, scores.shape[-1])
    val, idx = scores.topk(kk, dim=-1)
    idx = idx.masked_fill(~torch.isfinite(val), -1)
    if kk < k:
        idx = torch.nn.functional.pad(idx, (0, k - kk), value=-1)
    return idx

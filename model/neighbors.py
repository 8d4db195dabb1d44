"""From chosen neighbor positions to the gated CCA memory (paper §3.4, footnote 2; official code's
NeighborAugmentor and CrossNeighborAugmentor).

1. A neighbor of chunk i is chunk j together with its continuation j+1: 2m token states.
2. Bidirectional self-attention over those 2m tokens. It does not depend on i, so it runs once per
   chunk position j and is then gathered (the same values as running it per neighbor, at 1/K cost).
3. Augmentation: the neighbor's tokens cross-attend to the tokens of the query chunk i.
4. Gating: each neighbor is mean-pooled; a causal attention runs over the sequence of pooled
   neighbors in (chunk, rank) order, so a neighbor sees the neighbors of earlier chunks and the
   higher-ranked neighbors of its own chunk; then g = eta + (1 - eta) sigmoid(w . pooled + b). That
   attention spans the chunks of one attention window (window/m chunks), so training and evaluation
   on long documents see the same span. The gate is returned, not applied: each CCA layer normalises
   the neighbor states first and scales them by g after (model.cca).

Why the smooth gate: the paper writes g = max(eta, sigmoid(.)), whose gradient is zero wherever
sigmoid < eta, so a gate pushed below the floor by noisy neighbors early in training never comes back
(measured: every gate at 0.1 by step 150, for good). The official code uses 0.1 + 0.9 sigmoid(s / d),
the same range [eta, 1] with a gradient everywhere; we do the same, with the divisor a setting
(`gate_temperature`, default 1; the official code's is the width d). Why it matters: Adam moves each of
the gate's d + 1 weights by about lr per step whatever the gradient's size, so an unscaled score moves
~d times faster than any one weight. On the demo (d = 64) the gates reached the floor by step 75, while
the neighbors were still noise to a model learning its unigrams, and stayed there with the sigmoid
saturated (gate mean 0.10-0.11 to step 1,000); with temperature d they stay near 0.5 and RETRO's
validation perplexity was 2.5-6% lower on each of three seeds. On the synthetic mechanism tests the
opposite holds: there the gate is the quickest way to drop a random distractor, and with temperature d
rpt_sem end to end reached a copied-token NLL of only 2.78 in the 700 steps where it reaches < 1.0 with
1 (docs/evaluate.md, "Why the neighbors were not copied").

Any neighbor source is held to j <= i - 1 here (then j + 1 <= i), which is what keeps CCA causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.cca import NeighborMemory
from model.config import RPTConfig
from model.layers import Attention, RMSNorm


class NeighborEncoder(nn.Module):
    def __init__(self, cfg: RPTConfig):
        super().__init__()
        d = cfg.d_model
        self.m, self.eta, self.span = cfg.chunk_len, cfg.gate_eta, max(1, cfg.window // cfg.chunk_len)
        self.score_scale = 1.0 / cfg.gate_temperature  # the official code divides by d: see above
        self.self_norm, self.self_attn = RMSNorm(d, cfg.norm_eps), Attention(cfg)
        self.q_norm, self.kv_norm, self.query_attn = (
            RMSNorm(d, cfg.norm_eps),
            RMSNorm(d, cfg.norm_eps),
            Attention(cfg),
        )
        self.x_norm1, self.x_attn, self.x_norm2 = (
            RMSNorm(d, cfg.norm_eps),
            Attention(cfg),
            RMSNorm(d, cfg.norm_eps),
        )
        self.gate = nn.Linear(d, 1, bias=True)

    def forward(
        self, states: torch.Tensor, query_states: torch.Tensor, positions: torch.Tensor
    ) -> NeighborMemory:
        """states [B, T, d]: token states neighbors are made of; query_states [B, T, d]: lower-decoder
        states of the query chunks; positions [B, l, K]: chosen chunk positions (-1: none)."""
        B, T, d = states.shape
        m, n = self.m, T // self.m
        K = positions.shape[-1]
        dev = states.device
        i = torch.arange(n, device=dev)[None, :, None]
        valid = (positions >= 0) & (positions <= i - 1)
        pos = positions.masked_fill(~valid, -1)

        chunks = states.reshape(B, n, m, d)
        pairs = torch.cat([chunks, F.pad(chunks[:, 1:], (0, 0, 0, 0, 0, 1))], dim=2).reshape(B * n, 2 * m, d)
        ppos = torch.arange(2 * m, device=dev)
        pairs = (pairs + self.self_attn(self.self_norm(pairs), q_pos=ppos)).reshape(B, n, 2 * m, d)

        nb = pairs[torch.arange(B, device=dev)[:, None, None], pos.clamp(min=0)]  # [B, n, K, 2m, d]
        flat = nb.reshape(B * n, K * 2 * m, d)
        qc = query_states.reshape(B * n, m, d)
        flat = flat + self.query_attn(
            self.q_norm(flat), self.kv_norm(qc), q_pos=ppos.repeat(K), k_pos=torch.arange(m, device=dev)
        )
        nb = flat.reshape(B, n, K, 2 * m, d)

        pooled = nb.mean(dim=3).reshape(B, n * K, d)
        idx = torch.arange(n * K, device=dev)
        chunk = idx // K
        allowed = (idx[None, :] <= idx[:, None]) & (chunk[:, None] - chunk[None, :] < self.span)
        mask = allowed[None] & valid.reshape(B, 1, n * K)
        mask = mask | torch.eye(n * K, dtype=torch.bool, device=dev)[None]  # never an empty row
        x = pooled + self.x_attn(self.x_norm1(pooled), q_pos=idx, attn_mask=mask)
        s = self.gate(self.x_norm2(x)).squeeze(-1).float() * self.score_scale
        gate = (self.eta + (1.0 - self.eta) * torch.sigmoid(s)).reshape(B, n, K)
        kv_mask = valid[..., None].expand(B, n, K, 2 * m).reshape(B, n, K * 2 * m)
        return NeighborMemory(nb.reshape(B, n, K * 2 * m, d), kv_mask, gate, pos)

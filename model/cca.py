"""Chunked cross-attention (RETRO, Borgeaud et al. 2021) as used by RPT's upper decoder.

With chunk length m, the hidden states are shifted left by m-1 before they are cut into chunks, so
the queries attending to the neighbors of chunk u are the last token of chunk u and the first m-1
tokens of chunk u+1. The neighbors of u are chosen from chunk u's content, which the last token of
u has already seen, so no position attends to information from its future. Positions 0..m-2 attend
to nothing (their CCA output is zero). A learned null key/value lets a query attend to "nothing"
when a chunk has no (valid) neighbors.

Keys/values are RMS-normalised neighbor states, then scaled by the neighbor's gate. The states come
from the lower decoder, whose residual stream at init is ~50x smaller (RMS) than the normalised
queries; unnormalised, CCA's attention logits start near zero and the copy signal is too weak to learn
from (measured on a copy task: nothing learned in 1,200 steps; with the norm, NLL 0.45 by step 800).
The official code has the same per-layer norm (`use_cca_norm2`). The gate is applied after the norm,
which would otherwise remove it (RMSNorm(g x) = RMSNorm(x) for a scalar g > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import RPTConfig
from model.layers import Attention, RMSNorm


@dataclass
class NeighborMemory:
    """Keys/values for CCA: per chunk, K neighbors of 2m token states each (gated), and their mask."""

    states: torch.Tensor  # [B, n_chunks, K * 2m, d] (not normalised, not gated)
    mask: torch.Tensor  # [B, n_chunks, K * 2m] bool, True where the neighbor is valid
    gate: torch.Tensor  # [B, n_chunks, K] in [eta, 1]: each CCA layer scales its normalised states by it
    positions: torch.Tensor  # [B, n_chunks, K] in-sequence chunk positions, -1 for none


class ChunkedCrossAttention(nn.Module):
    def __init__(self, cfg: RPTConfig):
        super().__init__()
        self.m = cfg.chunk_len
        self.kv_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, null_kv=True)

    def forward(self, x: torch.Tensor, mem: NeighborMemory) -> torch.Tensor:
        B, T, d = x.shape
        m = self.m
        n_chunks = T // m
        lk = mem.states.shape[2]
        K = mem.gate.shape[-1]
        gate = mem.gate.to(x.dtype).repeat_interleave(lk // K, dim=-1)  # [B, n, K * 2m]
        kv = self.kv_norm(mem.states)
        shifted = F.pad(x[:, m - 1 :], (0, 0, 0, m - 1))  # row r holds position r + m - 1
        q = shifted.reshape(B * n_chunks, m, d)
        dev = x.device
        # positions as in the official code: queries m-1 .. 2m-2, each neighbor's keys 0 .. 2m-1
        q_pos = torch.arange(m - 1, 2 * m - 1, device=dev)
        k_pos = torch.arange(2 * m, device=dev).repeat(lk // (2 * m))
        out = self.attn(
            q,
            kv.reshape(B * n_chunks, lk, d),
            q_pos=q_pos,
            k_pos=k_pos,
            key_mask=mem.mask.reshape(B * n_chunks, lk),
            value_scale=gate.reshape(B * n_chunks, lk),
        )
        out = out.reshape(B, T, d)
        return F.pad(out, (0, 0, m - 1, 0))[:, :T]  # back: position p gets row p - (m - 1)

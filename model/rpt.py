"""The RPT decoder, one class for every variant (see model.config).

    tokens -> embedding -> lower half (sliding-window causal layers) -> lower states
           -> [retriever: chunk encoding, scores over retrievable chunks, top-K]
           -> [neighbors: chunk j + j+1 states, augmented by the query chunk, gated]
           -> upper half (sliding-window causal layers, CCA in `cca_layers`) -> norm -> LM head

Neighbor sources for `forward(source=...)`:
  none       no CCA (the baseline; or an RPT model with retrieval switched off)
  given      neighbor_pos [B, l, K] in-sequence chunk positions (-1 none): BM25 neighbors for
             retro_bm25, or any externally chosen neighbors at evaluation
  retriever  the learned retriever's top-K (rpt_lex, rpt_sem)
  gold       top-K positives of the supervision targets (scheduled sampling; `oracle` at evaluation)
Whatever the source, chunk i only ever gets neighbors j <= i - 1, so the model is causal given them.
Evaluate can run a whole document as one sequence (attention is windowed, retrieval spans all
earlier chunks): pad T up to a multiple of chunk_len; padding at the end affects no earlier logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from model.cca import ChunkedCrossAttention, NeighborMemory
from model.config import RPTConfig
from model.layers import RMSNorm, SwiGLU, WindowSelfAttention
from model.losses import IGNORE, gold_positions, lambdarank_loss, lm_loss, retrieval_metrics
from model.neighbors import NeighborEncoder
from model.retriever import Retriever, retrievable_mask, topk_positions

Source = Literal["none", "given", "retriever", "gold"]
LOGIT_SLICE = 8192  # tokens per LM-head slice when only the loss is needed


@dataclass
class RPTOutput:
    loss: torch.Tensor | None = None  # lm_loss (the caller adds alpha_ret * ret_loss)
    lm_loss: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None  # [B, T], 0 where the label is ignored
    logits: torch.Tensor | None = None  # [B, T, V] when return_logits
    ret_loss: torch.Tensor | None = None
    n_pairs: torch.Tensor | None = None
    ret_scores: torch.Tensor | None = None  # [B, l, l] retriever scores, -inf where not retrievable
    ret_topk: torch.Tensor | None = None  # [B, l, K] retriever's top-K positions (-1 none)
    neighbor_pos: torch.Tensor | None = None  # [B, l, K] neighbors actually fed to CCA
    gate: torch.Tensor | None = None  # [B, l, K]
    cca_ratio: list[torch.Tensor] = field(default_factory=list)  # per CCA layer: |CCA out| / |residual|
    retrieval: dict[int | str, torch.Tensor] = field(default_factory=dict)  # losses.retrieval_metrics


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm h); [h += CCA(norm h, neighbors)]; h += FFN(norm h)."""

    def __init__(self, cfg: RPTConfig, cca: bool = False):
        super().__init__()
        d = cfg.d_model
        self.attn_norm, self.attn = RMSNorm(d, cfg.norm_eps), WindowSelfAttention(cfg)
        self.cca_norm = RMSNorm(d, cfg.norm_eps) if cca else None
        self.cca = ChunkedCrossAttention(cfg) if cca else None
        self.ffn_norm, self.ffn = RMSNorm(d, cfg.norm_eps), SwiGLU(d, cfg.ffn_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, h: torch.Tensor, mem: NeighborMemory | None = None, ratios: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        h = h + self.drop(self.attn(self.attn_norm(h)))
        if self.cca is not None and mem is not None:
            c = self.cca(self.cca_norm(h), mem)
            if ratios is not None:  # how much CCA writes into the residual stream (a use diagnostic)
                with torch.no_grad():
                    ratios.append(c.float().norm() / h.float().norm().clamp(min=1e-12))
            h = h + self.drop(c)
        return h + self.drop(self.ffn(self.ffn_norm(h)))


class RPT(nn.Module):
    def __init__(self, cfg: RPTConfig):
        super().__init__()
        self.cfg = cfg
        half = cfg.n_layers // 2
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.lower = nn.ModuleList(DecoderLayer(cfg) for _ in range(half))
        self.retriever = Retriever(cfg) if cfg.has_retriever else None
        self.neighbors = NeighborEncoder(cfg) if cfg.has_cca else None
        cca = set(cfg.upper_cca)
        self.upper = nn.ModuleList(DecoderLayer(cfg, cca=i in cca) for i in range(half))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init(self, mod: nn.Module) -> None:
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, 0.0, self.cfg.init_std)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def default_source(self) -> Source:
        return {"baseline": "none", "retro_bm25": "given"}.get(self.cfg.variant, "retriever")  # type: ignore[return-value]

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        source: Source | None = None,
        neighbor_pos: torch.Tensor | None = None,
        cand_pos: torch.Tensor | None = None,
        cand_target: torch.Tensor | None = None,
        k: int | None = None,
        tau: float = 1.0,
        return_logits: bool = False,
    ) -> RPTOutput:
        """tokens [B, T] (T a multiple of chunk_len); labels [B, T] next tokens (-100: ignore).
        cand_pos/cand_target [B, l, C]: retriever supervision (loss, recall, and the gold source)."""
        cfg = self.cfg
        B, T = tokens.shape
        if T % cfg.chunk_len:
            raise ValueError(
                f"sequence length {T} is not a multiple of chunk_len {cfg.chunk_len}; pad at the end"
            )
        source = source or self.default_source()
        k = k or cfg.n_neighbors
        if source != "none" and self.neighbors is None:
            raise ValueError(f"variant {cfg.variant} has no CCA; use source='none'")
        if source == "retriever" and self.retriever is None:
            raise ValueError(f"variant {cfg.variant} has no learned retriever; use source='given'")
        if source == "given" and neighbor_pos is None:
            raise ValueError("source='given' needs neighbor_pos [B, n_chunks, K]")
        supervised = cand_pos is not None and cand_target is not None
        if source == "gold" and not supervised:
            raise ValueError("source='gold' needs cand_pos and cand_target")

        out = RPTOutput()
        h = self.drop(self.embed(tokens))
        for layer in self.lower:
            h = layer(h)
        low = h
        nb_states = low
        scores = None
        if self.retriever is not None and (source != "none" or supervised):
            q, kk = self.retriever.encode(low)
            scores = self.retriever.scores(q, kk)
            out.ret_scores = scores
            out.ret_topk = topk_positions(scores.detach(), k)
            if supervised:
                out.ret_loss, out.n_pairs = lambdarank_loss(scores, cand_pos, cand_target, tau)
                out.retrieval = retrieval_metrics(scores.detach(), cand_pos, cand_target)

        positions = None
        if source == "given":
            positions = neighbor_pos[..., :k].to(tokens.device).long()
        elif source == "retriever":
            positions = out.ret_topk
        elif source == "gold":
            ref = (
                scores.detach()
                if scores is not None
                else self._causal_scores(T // cfg.chunk_len, B, tokens.device)
            )
            positions = gold_positions(ref, cand_pos, cand_target, k)
        mem = None
        if positions is not None:
            if cfg.detach_neighbors:  # CCA learns to read the lower decoder, not to rewrite it
                mem = self.neighbors(nb_states.detach(), low.detach(), positions)
            else:
                mem = self.neighbors(nb_states, low, positions)
            out.neighbor_pos, out.gate = mem.positions, mem.gate
        for layer in self.upper:
            h = layer(h, mem, out.cca_ratio)
        h = self.norm(h)
        if return_logits:
            out.logits = self.lm_head(h)
        if labels is not None:
            if out.logits is not None:
                out.lm_loss, out.token_nll = lm_loss(out.logits, labels)
            else:  # slices of the sequence: a long document never holds [T, V] float32 logits at once
                nll = [
                    lm_loss(self.lm_head(h[:, s : s + LOGIT_SLICE]), labels[:, s : s + LOGIT_SLICE])[1]
                    for s in range(0, T, LOGIT_SLICE)
                ]
                out.token_nll = torch.cat(nll, dim=1)
                out.lm_loss = out.token_nll.sum() / (labels != IGNORE).sum().clamp(min=1)
            out.loss = out.lm_loss
        return out

    def _causal_scores(self, n: int, B: int, device: torch.device) -> torch.Tensor:
        """Zero scores over the retrievable chunks (for gold neighbors without a learned retriever)."""
        allowed = retrievable_mask(n, self.cfg.exclude_recent, device)
        return torch.zeros(B, n, n, device=device).masked_fill(~allowed, float("-inf"))


def shift_labels(tokens: torch.Tensor, next_token: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels for tokens [B, T]: labels[:, t] = tokens[:, t+1]; the last position gets
    `next_token` [B] when given (the token after the sequence), else IGNORE."""
    last = next_token[:, None] if next_token is not None else torch.full_like(tokens[:, :1], IGNORE)
    return torch.cat([tokens[:, 1:], last], dim=1)

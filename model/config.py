"""RPTConfig: the architecture of every variant, with size presets (`tiny`, `small`, `paper`).

One config (and one model class) for all variants; the variant decides which modules exist:

  baseline    no retrieval, no CCA: the sliding-window Transformer-XL row of the paper
  retro_bm25  CCA over lower-decoder states of given (BM25) neighbors; no learned retriever
  rpt_lex     learned retriever trained on BM25 positives
  rpt_sem     learned retriever trained on the scoring LM's positives
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Variant = Literal["baseline", "retro_bm25", "rpt_lex", "rpt_sem"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)  # the one list of variants (flows, evaluate, train)
RETRIEVER_VARIANTS = ("rpt_lex", "rpt_sem")
# the label of a position without a target (no loss): torch's cross-entropy ignore_index. Here, not in
# model.losses, because data and stages (which must not import torch at module level) use it too.
IGNORE = -100


class RPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    variant: Variant = "rpt_sem"
    vocab_size: int = Field(16384, ge=2)
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=2, description="even: the lower half is plain, the upper half may have CCA")
    n_heads: int = Field(4, ge=1)
    ffn_dim: int = Field(352, ge=1, description="SwiGLU hidden size")
    chunk_len: int = Field(64, ge=1, description="m: tokens per chunk (must equal the chunks artifact's)")
    window: int = Field(512, ge=1, description="attention window in tokens (paper 2048)")
    stride: int = Field(256, ge=1, description="attention block: each block of `stride` tokens sees `window`")
    cca_layers: list[int] | None = Field(
        None, description="upper-half layer indices (0-based) with chunked cross-attention; None: all"
    )
    n_neighbors: int = Field(2, ge=1, description="K neighbors per chunk in training (2-4 at evaluation)")
    exclude_recent: int = Field(
        0, ge=0, description="chunk i may retrieve j <= i-1-exclude_recent (taken from the bm25 input)"
    )
    gate_eta: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="neighbor gate: eta + (1 - eta) sigmoid(.) (floor eta, a gradient everywhere)",
    )
    gate_temperature: float = Field(
        1.0,
        gt=0,
        description="the gate's score is divided by it before the sigmoid (the official code: d_model)",
    )
    detach_neighbors: bool = Field(
        False,
        description="the neighbor memory reads the lower decoder's states without a gradient into them "
        "(not in the paper; for a one-layer lower decoder, docs/evaluate.md)",
    )
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _check(self) -> RPTConfig:
        if self.n_layers % 2:
            raise ValueError(f"n_layers must be even (lower and upper halves), got {self.n_layers}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("the head dimension d_model/n_heads must be even (RoPE rotates pairs)")
        if self.window % self.stride:
            raise ValueError(f"window ({self.window}) must be a multiple of stride ({self.stride})")
        if self.stride % self.chunk_len:
            raise ValueError(f"stride ({self.stride}) must be a multiple of chunk_len ({self.chunk_len})")
        half = self.n_layers // 2
        if self.cca_layers is not None:
            bad = [i for i in self.cca_layers if not 0 <= i < half]
            if bad:
                raise ValueError(f"cca_layers {bad} out of range: the upper half has layers 0..{half - 1}")
            self.cca_layers = sorted(set(self.cca_layers))
        return self

    # ---- derived
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def has_cca(self) -> bool:
        return self.variant != "baseline"

    @property
    def has_retriever(self) -> bool:
        return self.variant in RETRIEVER_VARIANTS

    @property
    def upper_cca(self) -> list[int]:
        if not self.has_cca:
            return []
        return list(range(self.n_layers // 2)) if self.cca_layers is None else list(self.cca_layers)


# Size presets. `paper` is the 250m gin file of the official code (12L, d=1024, 8 heads, ffn 2816),
# CCA in 5 of the 6 upper layers (App. B), window 2048 / stride 1024, GPT-NeoX vocabulary.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, ffn_dim=352, window=512, stride=256),
    "small": dict(d_model=512, n_layers=8, n_heads=8, ffn_dim=1408, window=1024, stride=512),
    "paper": dict(
        d_model=1024,
        n_layers=12,
        n_heads=8,
        ffn_dim=2816,
        window=2048,
        stride=1024,
        cca_layers=[1, 2, 3, 4, 5],
        vocab_size=50277,
        dropout=0.05,
    ),
}


def preset(name: str, **overrides: Any) -> RPTConfig:
    """An RPTConfig from a named preset with field overrides (unknown fields are errors)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return RPTConfig(**{**PRESETS[name], **overrides})

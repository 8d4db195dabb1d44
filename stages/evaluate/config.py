"""The `evaluate:` section of a run config (docs/evaluate.md lists every key). The setting names it
selects (`oracle`, `empty`) are written into metrics.parquet: stages/evaluate/perplexity.py (`Setting`)
says what each one feeds the model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from model.config import VARIANTS, Variant
from pipeline.config import StageConfig
from pipeline.devices import DeviceSetting, DtypeSetting


class Config(StageConfig):
    variants: list[Variant] = Field(
        default_factory=lambda: list(VARIANTS), description="train variants to evaluate"
    )
    neighbors: list[int] = Field(
        default_factory=lambda: [2, 3, 4], description="neighbors per chunk at inference"
    )
    oracle: bool = Field(
        True, description="also evaluate rpt_lex / rpt_sem with gold neighbors (the oracle rows)"
    )
    ablation: bool = Field(
        True,
        description="also evaluate each retrieval variant with CCA given no neighbors (setting `empty`): "
        "what retrieval itself adds, apart from how the training run went",
    )
    retrievers: list[Literal["bm25", "dense"]] = Field(
        default_factory=lambda: ["bm25", "dense"],
        description="neighbor tables compared with the learned retrievers in the retrieval table",
    )
    retrofit: bool = Field(
        False,
        description="also report the retrofit stage's rows (frozen LM, retrofitted with its neighbors and with "
        "none), which it measured on the same split",
    )
    split: Literal["train", "valid", "test"] = "test"
    max_docs: int | None = Field(None, ge=1, description="evaluate at most this many documents of the split")
    max_tokens: int | None = Field(
        1 << 20, ge=2, description="at most this many tokens over all documents (whole chunks); None: all"
    )
    max_doc_tokens: int | None = Field(
        None, ge=2, description="evaluate at most this long a prefix of each document (bounds memory)"
    )
    bootstrap_unit: Literal["auto", "document", "block"] = Field(
        "auto",
        description="unit resampled for the confidence intervals of 'use' (own neighbors minus empty NLL): "
        "documents, blocks of block_chunks chunks, or auto (documents when there are at least 8)",
    )
    block_chunks: int = Field(16, ge=1, description="chunks per block (bootstrap unit 'block')")
    precision_at: list[int] = Field(default_factory=lambda: [2])
    recall_at: list[int] = Field(default_factory=lambda: [10])
    ndcg_at: list[int] = Field(default_factory=lambda: [20])
    paper_column: Literal["ArXiv", "Code", "PG19", "Books3"] = Field(
        "PG19", description="which dataset column of the paper's tables the report shows beside ours"
    )
    # how, not what
    device: DeviceSetting = Field("auto", description="auto (GPU when present), cpu, cuda, cuda:N")
    dtype: DtypeSetting = Field(
        "auto", description="auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16"
    )
    batch_docs: int = Field(1, ge=1, description="documents of equal length per forward pass")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")

    UNHASHED = frozenset({"device", "dtype", "batch_docs", "threads"})

    def hashed_dict(self) -> dict[str, Any]:
        d = super().hashed_dict()
        if not d.get("retrofit"):  # off: the versions from before the setting
            d.pop("retrofit", None)
        return d

    @field_validator("variants", "neighbors", "precision_at", "recall_at", "ndcg_at", "retrievers")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated entries in {v}")
        if any(isinstance(x, int) and x < 1 for x in v):
            raise ValueError(f"entries must be >= 1, got {v}")
        return v

    @field_validator("variants", "neighbors")
    @classmethod
    def _non_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("must not be empty")
        return v

    @property
    def depth(self) -> int:
        """Rank depth needed of every ranking: the largest neighbor count or cut-off."""
        return max([*self.neighbors, *self.precision_at, *self.recall_at, *self.ndcg_at])

"""The `documents:` section of the config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from pipeline.config import NoBoolNumbers, StageConfig
from stages.documents.recurrences import Recurrences

DEFAULT_STDLIB_EXCLUDE = [
    "test",
    "idlelib",
    "site-packages",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib-dynload",
    "pydoc_data",
    "this",
    "antigravity",
]


class SplitFractions(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid")
    train: float = Field(0.9, ge=0, le=1)
    valid: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1 (train+valid+test = {total:g})")
        return self


class Config(StageConfig):
    paths: list[str] = Field(
        default_factory=list,
        description="files, folders or globs (.txt, .txt.gz, .jsonl(.gz), .parquet); empty: the embedded "
        "Python standard library corpus",
    )
    text_field: str = Field("text", description="the text field of .jsonl records / column of .parquet files")
    id_field: str | None = Field(None, description="field/column holding a stable document id")
    title_field: str | None = None
    strip_gutenberg: bool = Field(True, description="remove Project Gutenberg headers and licence footers")
    min_chars: int = Field(1000, ge=0, description="documents shorter than this are dropped (and counted)")
    splits: SplitFractions = Field(default_factory=SplitFractions)
    split_lists: dict[Literal["train", "valid", "test"], list[str]] = Field(
        default_factory=dict,
        description="explicit doc_ids per split; when given, fractions are ignored and unlisted docs are train",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise",
        description="bad input (empty/binary/unreadable file, malformed JSON line, missing text "
        "column): raise an error naming it, or skip it and count it in the manifest stats",
    )
    stdlib_include: list[str] | None = Field(
        None, description="embedded corpus: only these top-level packages"
    )
    stdlib_exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_STDLIB_EXCLUDE))
    fingerprint: Literal["content", "size"] = Field(
        "content",
        description="how input files enter the version: sha256 of contents, or name+size (huge corpora)",
    )
    shard_bytes: int = Field(256 << 20, ge=1, description="input bytes per shard")
    duplicates: Literal["raise", "drop", "keep"] = Field(
        "raise",
        description="documents with identical text under two ids (a copy of a book in two folders: a "
        "possible train/test leak): raise an error naming both, drop all but the first (counted), or keep",
    )

    recurrences: Recurrences = Field(
        default_factory=Recurrences,
        description="copies of earlier passages inserted into train documents (stages/documents/recurrences.py); "
        "valid and test documents are never changed",
    )

    def hashed_dict(self) -> dict[str, Any]:
        d = super().hashed_dict()
        if not self.recurrences.every_lines:  # none: the versions from before the setting
            d.pop("recurrences")
        return d

    # Corpus paths never enter a version (the fingerprint of the files does); shard size changes no row.
    UNHASHED = frozenset({"paths", "shard_bytes"})

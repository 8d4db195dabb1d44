"""Stage name -> module. Stage modules import heavy libraries lazily, so this stays cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.stage import Stage

# In pipeline order. Each module defines `STAGE`, an instance of pipeline.stage.Stage.
STAGES: dict[str, str] = {
    "documents": "stages.documents",
    "tokenizer": "stages.tokenizer",
    "chunks": "stages.chunks",
    "bm25": "stages.bm25",
    "embeddings": "stages.embeddings",
    "dense": "stages.dense",
    "reference": "stages.reference",
    "scores": "stages.scores",
}


def get_stage(name: str) -> Stage:
    mod = STAGES.get(name)
    if mod is None:
        raise ConfigError(f"unknown stage '{name}' (known: {', '.join(STAGES)})")
    return importlib.import_module(mod).STAGE

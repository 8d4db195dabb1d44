"""Stage name -> module. Stage modules import torch, numba and faiss only inside the functions that run
shards, so loading every stage for its Config stays cheap (tests/test_imports.py checks `rpt config`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.stage import Stage

# Every stage the framework knows (the order is not the DAG's: each stage's inputs decide that). Each
# module defines `STAGE`, an instance of pipeline.stage.Stage.
STAGES: dict[str, str] = {
    "documents": "stages.documents",
    "tokenizer": "stages.tokenizer",
    "chunks": "stages.chunks",
    "bm25": "stages.bm25",
    "embeddings": "stages.embeddings",
    "dense": "stages.dense",
    "evaluate": "stages.evaluate",
    "train": "stages.train",
    "reference": "stages.reference",
    "scores": "stages.scores",
}


def get_stage(name: str) -> Stage:
    mod = STAGES.get(name)
    if mod is None:
        raise ConfigError(f"unknown stage '{name}' (known: {', '.join(STAGES)})")
    return importlib.import_module(mod).STAGE

"""One module per stage. Each defines `Config` (its config section) and `STAGE` (a pipeline.stage.Stage).
Stages never import each other; they share only `pipeline/` and the artifacts.

`REGISTRY` is this project's set of stages, handed to the framework wherever a config is loaded
(`load_config` and `config_from_dict` below are the framework's loaders bound to it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline import config as _config
from pipeline.registry import Registry

REGISTRY = Registry(
    {
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
        "retrofit": "stages.retrofit",
    },
    home=__name__,
)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> _config.RunConfigBase:
    """A run config of these stages from YAML (None: all defaults) with `--set` overrides."""
    return _config.load_config(REGISTRY, path, overrides)


def config_from_dict(data: Mapping[str, Any]) -> _config.RunConfigBase:
    return _config.config_from_dict(REGISTRY, data)


def __getattr__(name: str) -> Any:
    # `stages.RunConfig` is built on first use; pickle (process, Dask and Ray workers) finds it here.
    if name == "RunConfig":
        return REGISTRY.run_config()
    raise AttributeError(name)

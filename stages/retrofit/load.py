"""Load a retrofit artifact back in one call: `load_retrofitted(folder)`. The base is found from
retrofit.json (the reference artifact beside it in the store, or the recorded folder) or given, and checked
against the recorded content digest before its weights are used. Imports torch (not the stage module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.retrofit import RetrofitLM, load_retrofit, read_meta
from pipeline.errors import InputError
from pipeline.formats import CAUSAL_LM_FILES
from pipeline.versioning import tree_digest


def recorded_base(folder: Path, info: dict[str, Any]) -> Path:
    """The base folder retrofit.json names: a reference artifact beside this one in the store
    (<root>/reference/<version>/model for <root>/retrofit/<version>), or a recorded path."""
    if info.get("artifact"):
        stage, version = info["artifact"].split("@")
        p = folder.parent.parent / stage / version / info.get("model_dir", "model")
        if p.is_dir():
            return p
    if info.get("path") and Path(info["path"]).is_dir():
        return Path(info["path"])
    raise InputError(
        f"{folder}: its base ({info.get('artifact') or info.get('path')}) is not there; pass base=FOLDER"
    )


def load_retrofitted(folder: str | Path, base: str | Path | None = None, device: Any = "cpu") -> RetrofitLM:
    """The retrofitted model of a retrofit artifact folder (or what model.retrofit.save_retrofit wrote)."""
    folder = Path(folder)
    info = read_meta(folder).get("base") or {}
    path = Path(base) if base is not None else recorded_base(folder, info)
    if info.get("digest"):
        found = tree_digest(path, CAUSAL_LM_FILES)
        if found != info["digest"]:
            raise InputError(
                f"the base at {path} has content digest {found}; the retrofit at {folder} was trained on "
                f"{info['digest']}: pass the base it was trained on"
            )
    return load_retrofit(folder, path, device)

"""Model checkpoints: `model.safetensors` (weights) + `config.json` ({"model": RPTConfig, ...}).

`load_checkpoint(path)` is what evaluation uses: a folder (a train artifact, or a checkpoint folder
inside a partial one) or the path of its model.safetensors. The optimizer and RNG state beside them,
and the checkpoint folders of a run, are `model.checkpointer`'s (shared with the reference stage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from model.config import RPTConfig
from model.rpt import RPT

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "rpt-checkpoint/1"


def unwrap(model: torch.nn.Module) -> RPT:
    """The RPT inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, RPT):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not an RPT model: {type(model).__name__}")
        model = inner


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: tied lm_head dropped (safetensors stores no shared tensors)."""
    m = unwrap(model)
    state = m.state_dict()
    if m.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def model_bytes(model: torch.nn.Module) -> bytes:
    return save(model_state(model), metadata={"format": FORMAT})


def config_json(cfg: RPTConfig, **extra: Any) -> str:
    return json.dumps(
        {"format": FORMAT, "model": cfg.model_dump(mode="json"), **extra}, indent=2, sort_keys=True
    )


def load_weights(model: RPT, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(set(missing) - allowed)}, "
            f"unexpected {sorted(unexpected)}"
        )


def read_config(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: expected a checkpoint folder with {CONFIG_FILE} and {MODEL_FILE}"
        )
    return json.loads(cfg_path.read_text())


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[RPT, RPTConfig]:
    """(model in eval mode on `device`, its config) from a checkpoint folder or its model.safetensors."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    meta = read_config(folder)
    cfg = RPTConfig(**meta["model"])
    model = RPT(cfg)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    load_weights(model, load_file(str(weights)))
    return model.to(device).eval(), cfg

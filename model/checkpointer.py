"""Resumable training checkpoints: one scheme for the train stage (the RPT model) and the reference stage
(a Hugging Face GPT-NeoX). Weights and optimizer tensors are safetensors and everything else is JSON, so
resuming unpickles nothing; every file is written atomically (a temporary name, then a rename).

A checkpoint folder (`save_state`, `load_state`) holds
  model.safetensors      the weights: `module_bytes` (tied copies stored once) or the caller's encoder
                         (the train stage's `model.checkpoint.model_bytes`, the file evaluation reads)
  <the caller's files>   e.g. the train stage's config.json and metrics.parquet
  optimizer.safetensors  the optimizer's state tensors `state.<param>.<key>` (`optimizer_state`) and
                         each rank's RNG states `rng.<rank>.<cpu|cuda>`
  train_state.json       last: {"step", "optimizer": param groups and non-tensor state, "world", ...}

`Checkpointer(root)` keeps a run's checkpoints as root/step-NNNNNNN/ with root/LATEST naming the newest
complete one: a checkpoint is written into a temporary folder that is renamed into place before LATEST
is replaced, so a run killed at any moment resumes from the last complete checkpoint. Older ones go.
The learning rate and every other schedule are pure functions of the step (`model.schedules`), so a
checkpoint holds no scheduler.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
LATEST = "LATEST"

Weights = Callable[[torch.nn.Module], bytes]
LoadWeights = Callable[[torch.nn.Module, dict[str, torch.Tensor]], None]


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ weights
def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """state_dict names whose tensor is an earlier name's (tied weights) -> that earlier name."""
    first: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict().items():
        if t.numel() == 0:
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def module_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Any module's weights for safetensors (which stores no shared tensors): tied copies dropped."""
    tied = tied_names(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}


def module_bytes(model: torch.nn.Module) -> bytes:
    return save(module_state(model))


def load_module_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load `module_state` output: every weight but the tied copies must be there, nothing else."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(missing) - set(tied_names(model)))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing}, unexpected {sorted(unexpected)}"
        )


# ------------------------------------------------------------------------------------------ optimizer, RNG
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict split into tensors (for safetensors) and JSON (hyperparameters)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """The inverse of `optimizer_state`. Optimizer.load_state_dict moves each state tensor to its
    parameter's device (AdamW keeps `step` on the CPU)."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states: the CPU's, and the GPU's when `device` is one."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


# ------------------------------------------------------------------------------------------ a folder
def save_state(
    folder: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    *,
    step: int,
    rngs: list[dict[str, torch.Tensor]],
    weights: Weights = module_bytes,
    files: dict[str, bytes] | None = None,
    **fields: Any,
) -> None:
    """Write a training state into `folder`: weights, the caller's `files`, optimizer tensors with the
    RNG states of every rank (`rngs[rank]`), then train_state.json with the caller's JSON `fields`."""
    tensors, meta = optimizer_state(opt)
    for r, rng in enumerate(rngs):
        tensors.update({f"rng.{r}.{k}": v for k, v in rng.items()})
    write_atomic(folder / MODEL_FILE, weights(model))
    for name, data in (files or {}).items():
        write_atomic(folder / name, data)
    write_atomic(folder / OPTIM_FILE, save(tensors))
    state = {"step": step, "optimizer": meta, "world": len(rngs), **fields}
    write_atomic(folder / STATE_FILE, json.dumps(state, indent=1).encode())


def load_state(
    folder: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    *,
    rank: int = 0,
    device: torch.device | None = None,
    load_weights: LoadWeights = load_module_state,
) -> dict[str, Any]:
    """Restore what `save_state` wrote: weights, optimizer, this rank's RNG states. Returns the
    train_state.json fields (`step` among them)."""
    state = json.loads((folder / STATE_FILE).read_text())
    load_weights(model, load_file(str(folder / MODEL_FILE)))
    tensors = load_file(str(folder / OPTIM_FILE))
    load_optimizer_state(
        opt, {k: v for k, v in tensors.items() if k.startswith("state.")}, state["optimizer"]
    )
    rng = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{rank}.")}
    set_rng_state(rng, device or torch.device("cpu"))
    return state


# ------------------------------------------------------------------------------------------ a run's checkpoints
class Checkpointer:
    """The checkpoints of one training run under the local folder `root` (see the module docstring)."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = Path(root)
        self.keep = keep

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:07d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None. Removes debris of a writer killed mid-write."""
        if not self.root.is_dir():
            return None
        for p in self.root.iterdir():
            if ".tmp-" in p.name:
                if p.is_dir():  # every DDP rank looks: ignore what another removed first
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        latest = self.root / LATEST
        if latest.is_file():
            d = self.root / latest.read_text().strip()
            if (d / STATE_FILE).is_file():
                return d
        return None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """The run's newest checkpoint: `write(folder)` fills a temporary folder (with `save_state`)
        that is then renamed into place and named by LATEST; older checkpoints are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = self.name(step)
        tmp = self.root / f"{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        write(tmp)
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(self.root / LATEST, name.encode())
        self.prune(newest=final)
        return final

    def prune(self, newest: Path | None = None) -> None:
        """Keep the newest `keep` checkpoint folders, `newest` (the one just written) first: a folder of a
        later step than it is left from a run that restarted (e.g. one the LATEST pointer did not name)."""
        done = sorted(
            (int(p.name[5:]), p)
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
        )
        if newest is not None:
            step = int(newest.name[5:])
            for s, p in done:
                if s > step:
                    shutil.rmtree(p, ignore_errors=True)
            done = [(s, p) for s, p in done if s <= step]
        for _, p in done[: -self.keep]:
            shutil.rmtree(p, ignore_errors=True)

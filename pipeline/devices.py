"""Torch device and dtype selection shared by the GPU-capable stages (reference, scores)."""

from __future__ import annotations

import os
from typing import Any

from pipeline.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(spec: str) -> Any:
    """'auto' -> the GPU of this worker when CUDA is present (LOCAL_RANK under torchrun), else the CPU."""
    import torch

    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"device {spec!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine; use device=auto or cpu")
    return dev


def resolve_dtype(spec: str, device: Any) -> Any:
    """'auto' -> bfloat16 on a GPU, float32 on the CPU (bf16 matmuls are slow and lossy on most CPUs)."""
    import torch

    if spec not in DTYPES:
        raise ConfigError(f"dtype {spec!r}: expected one of {', '.join(DTYPES)}")
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)

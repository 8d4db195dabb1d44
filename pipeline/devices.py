"""Torch device and dtype selection shared by the GPU-capable stages (reference, scores, train, evaluate)."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


_LANE = threading.local()  # the GPU a flow's lane gave this thread (see `gpu_lane`)


@contextmanager
def gpu_lane(slot: int | None) -> Iterator[None]:
    """Run the body on GPU `slot`: `resolve_device("auto")` in this thread returns it. The flows give each
    GPU shard a lane (one per GPU), so two stages running side by side never share a GPU."""
    prev = getattr(_LANE, "slot", None)
    _LANE.slot = slot
    try:
        yield
    finally:
        _LANE.slot = prev


def lane_slot() -> int | None:
    return getattr(_LANE, "slot", None)


def resolve_device(spec: str) -> Any:
    """'auto' -> this worker's GPU when CUDA is present, else the CPU. A worker's GPU is LOCAL_RANK under
    torchrun, else the GPU of the flow lane running it (`gpu_lane`); otherwise, with several GPUs visible,
    each worker (process or thread) claims a free one (see `claim_slot`), so `runner.kind=processes` with
    one worker per GPU spreads shards over the GPUs."""
    import torch

    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        n = torch.cuda.device_count()
        if "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % n)
        if lane_slot() is not None:
            return torch.device("cuda", lane_slot() % n)
        if n == 1:
            return torch.device("cuda", 0)
        names = [str(torch.cuda.get_device_properties(i).uuid) for i in range(n)]
        return torch.device("cuda", claim_slot(names))
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(
            f"device {spec!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine; use device=auto or cpu")
    return dev


_CLAIMS: dict[int, int] = {}  # thread id -> claimed slot; the lock files stay open (held) for the process
_HELD: list[Any] = []
_CLAIM_LOCK = threading.Lock()


def claim_slot(names: list[str], lock_dir: str | Path | None = None) -> int:
    """Index of a slot (e.g. a GPU, by its UUID) that no other live worker on this machine holds.

    A worker claims a slot with an exclusive `flock` on `<lock_dir>/<name>.lock`, held until the process
    exits (the OS drops it if the process is killed). When every slot is taken, workers share them
    round-robin. The claim is per thread, so a threads runner spreads as well."""
    import fcntl

    tid = threading.get_ident()
    with _CLAIM_LOCK:
        if tid in _CLAIMS:
            return _CLAIMS[tid]
        d = Path(lock_dir or Path(tempfile.gettempdir()) / "rpt-device-locks")
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            f = open(d / f"{name}.lock", "w")  # noqa: SIM115 (held open on purpose)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            _HELD.append(f)
            _CLAIMS[tid] = i
            return i
        _CLAIMS[tid] = (os.getpid() + len(_CLAIMS)) % len(names)
        return _CLAIMS[tid]


def resolve_dtype(spec: str, device: Any) -> Any:
    """'auto' -> bfloat16 on a GPU, float32 on the CPU (bf16 matmuls are slow and lossy on most CPUs)."""
    import torch

    if spec not in DTYPES:
        raise ConfigError(f"dtype {spec!r}: expected one of {', '.join(DTYPES)}")
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)

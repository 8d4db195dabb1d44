"""Torch device and dtype selection: the one place a stage's `device` / `dtype` setting becomes a torch
device and dtype (reference, scores, train, evaluate, embeddings, dense, and the GPU faiss indexes)."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfigBase

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # accepted as well


def check_device_setting(spec: str) -> str:
    """A `device` setting is auto, cpu, cuda or cuda:N (checked when the config loads; what it means on
    this worker is `resolve_device`'s)."""
    head, _, index = spec.partition(":")
    if spec in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return spec
    raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {spec!r}")


def check_dtype_setting(spec: str) -> str:
    """A `dtype` setting is auto or a dtype name, long or short (float32 / fp32, ...). The value is kept
    as written: it is part of artifact versions."""
    if spec in DTYPES or spec in DTYPE_ALIASES:
        return spec
    raise ValueError(f"expected one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}), got {spec!r}")


# The one type of every stage's device and dtype setting.
DeviceSetting = Annotated[str, AfterValidator(check_device_setting)]
DtypeSetting = Annotated[str, AfterValidator(check_dtype_setting)]


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


@contextmanager
def on_gpu(slot: int | None) -> Iterator[None]:
    """Run a shard on GPU `slot`: the thread's lane for `resolve_device("auto")` and its current CUDA
    device (for `cuda` without an index). None, or no CUDA: nothing changes."""
    if slot is None:
        yield
        return
    import torch

    if not torch.cuda.is_available():
        yield
        return
    # modulo: under Ray a task sees only the GPU it was given (CUDA_VISIBLE_DEVICES), as device 0
    slot %= max(1, torch.cuda.device_count())
    prev = torch.cuda.current_device()
    torch.cuda.set_device(slot)
    try:
        with gpu_lane(slot):
            yield
    finally:
        torch.cuda.set_device(prev)


def visible_gpus(run: RunConfigBase) -> int:
    """GPUs the runners give lanes to: runner.gpus when set, else the GPUs torch sees (0 without torch)."""
    if run.runner.gpus is not None:
        return run.runner.gpus
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str, setting: str = "device") -> Any:
    """The torch device of a stage's `device` setting; every GPU stage resolves its device here.

    'auto' -> this worker's GPU when CUDA is present, else the CPU; 'cuda' -> this worker's GPU (an error
    without CUDA); 'cpu', 'cuda:N' -> that device. A worker's GPU is LOCAL_RANK's under torchrun, else the
    GPU of the lane running the shard (`gpu_lane`: the flows and `rpt run` with threads or processes give
    GPU shards lanes); otherwise, with several GPUs visible, each worker thread claims a free one (see
    `claim_slot`), so serial runs side by side and Dask workers spread over the GPUs. `setting` names
    the setting in errors (e.g. `dense.device`)."""
    import torch

    if spec in ("auto", "cuda"):
        if torch.cuda.is_available():
            return worker_gpu()
        if spec == "auto":
            return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(
            f"{setting} {spec!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{setting} {spec!r}: CUDA is not available on this machine; use {setting}: auto or cpu"
        )
    return dev


def worker_gpu() -> Any:
    """This worker's GPU (CUDA present): LOCAL_RANK's, the flow lane's, the only one, or a claimed one."""
    import torch

    n = torch.cuda.device_count()
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % n)
    if lane_slot() is not None:
        return torch.device("cuda", lane_slot() % n)
    if n == 1:
        return torch.device("cuda", 0)
    names = [str(torch.cuda.get_device_properties(i).uuid) for i in range(n)]
    return torch.device("cuda", claim_slot(names))


class _Claim:
    """A thread's claim on a slot: the open, flock-ed lock file (None when it shares a slot). It lives in
    the thread's local storage, so the lock is released when the thread ends (a thread id that Python
    reuses for a new thread does not inherit it)."""

    def __init__(self, slot: int, lock_file: Any = None):
        self.slot, self.lock_file = slot, lock_file

    def __del__(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()  # closing the file drops its flock


_CLAIMS = threading.local()  # .by_key: {(lock dir, slot names): _Claim} of this thread
_CLAIM_LOCK = threading.Lock()
_SHARED = [0]  # claims that found every slot taken, for the round-robin


def claim_slot(names: list[str], lock_dir: str | Path | None = None) -> int:
    """Index of a slot (e.g. a GPU, by its UUID) that no other live worker on this machine holds.

    A worker claims a slot with an exclusive `flock` on `<lock_dir>/<name>.lock`, held while the thread
    that claimed it lives (the OS drops it if the process is killed). When every slot is taken, workers
    share them round-robin. The claim is per thread, so a threads runner spreads as well."""
    import fcntl

    d = Path(lock_dir or Path(tempfile.gettempdir()) / "rpt-device-locks")
    key = (str(d), tuple(names))
    mine: dict[tuple[str, tuple[str, ...]], _Claim] = _CLAIMS.__dict__.setdefault("by_key", {})
    if key in mine:
        return mine[key].slot
    with _CLAIM_LOCK:
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            f = open(d / f"{name}.lock", "w")  # noqa: SIM115 (held open on purpose)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            mine[key] = _Claim(i, f)
            return i
        _SHARED[0] += 1
        mine[key] = _Claim((os.getpid() + _SHARED[0]) % len(names))
        return mine[key].slot


def resolve_dtype(spec: str, device: Any, setting: str = "dtype", *, fp16_without_bf16: bool = False) -> Any:
    """The torch dtype of a stage's `dtype` setting: float32, bfloat16, float16 or their short names
    fp32, bf16, fp16. 'auto' -> bfloat16 on a GPU, float32 on the CPU (bf16 matmuls are slow and lossy on
    most CPUs). `fp16_without_bf16`: inference only (no loss to scale), float16 on a GPU without bf16."""
    import torch

    name = DTYPE_ALIASES.get(spec, spec)
    if name not in DTYPES:
        raise ConfigError(
            f"{setting} {spec!r}: expected one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})"
        )
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        if fp16_without_bf16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        # bf16 even where a GPU lacks it (emulated, slow, but safe): fp16 would need a GradScaler in training
        return torch.bfloat16
    return getattr(torch, name)


def dtype_alias(dtype: Any) -> str:
    """The short name of a torch dtype (torch.bfloat16 -> 'bf16'), as the embeddings stage spells it."""
    name = str(dtype).removeprefix("torch.")
    return {v: k for k, v in DTYPE_ALIASES.items()}.get(name, name)


class Lanes:
    """Chains of tasks that run one after another: task k on a lane waits for the task before it there.

    The flows keep one set of lanes for every GPU stage, one lane per GPU (one on CPU), handed out round
    robin, so each GPU runs one shard at a time across all stages of the flow; a serial stage gets one lane.
    `rpt run` (pipeline.executor.run_shards) gives a GPU stage's shards the same lanes.
    """

    def __init__(self, n: int):
        self.last: list[Any] = [None] * max(1, n)
        self.turn = 0

    def take(self) -> tuple[int, Any]:
        """(lane, the task the next one on it must wait for, or None)."""
        lane = self.turn % len(self.last)
        self.turn += 1
        return lane, self.last[lane]

    def put(self, lane: int, fut: Any) -> None:
        self.last[lane] = fut

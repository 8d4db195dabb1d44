"""pipeline.devices, the one device/dtype resolver of the GPU stages: 'auto' and 'cuda' give this worker's
GPU (LOCAL_RANK's, the flow lane's, or a claimed one), dtype settings accept the short names (bf16)."""

from __future__ import annotations

import pytest
import torch

from pipeline.devices import dtype_alias, gpu_lane, resolve_device, resolve_dtype
from pipeline.errors import ConfigError


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_and_cuda_are_this_workers_gpu(four_gpus, monkeypatch):
    with gpu_lane(3):
        assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
        assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit GPU is that GPU
        assert resolve_device("cpu") == torch.device("cpu")
        monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun's rank wins over the lane
        assert resolve_device("auto", "train.device") == torch.device("cuda", 2)


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"dense.device 'cuda': CUDA is not available.*dense.device: auto"):
        resolve_device("cuda", "dense.device")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu")


def test_dtypes_and_their_short_names(monkeypatch):
    cpu = torch.device("cpu")
    for long, short in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        assert resolve_dtype(long, cpu) == resolve_dtype(short, cpu) == getattr(torch, long)
        assert dtype_alias(getattr(torch, long)) == short
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == resolve_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16  # training stages: never fp16 unscaled
    assert resolve_dtype("auto", "cuda:0", fp16_without_bf16=True) == torch.float16  # embeddings (inference)
    with pytest.raises(ConfigError, match="embeddings.dtype 'half'"):
        resolve_dtype("half", cpu, "embeddings.dtype")


def test_rpt_run_gives_each_gpu_one_shard_at_a_time_on_a_worker_of_its_own(monkeypatch):
    """executor.run_on_lanes: every shard runs once; a lane (a GPU) never runs two shards at a time, and
    always in the same worker, so what the worker caches for its GPU stays on it."""
    import concurrent.futures as cf
    import threading
    import time

    from pipeline import executor
    from pipeline.stage import Shard

    lock = threading.Lock()
    busy: dict[int, int] = {}
    seen: list[tuple[int, int, int]] = []  # (shard, lane, worker thread)
    peak = [0]

    def fake_run(ctx, shard, gpu):
        with lock:
            busy[gpu] = busy.get(gpu, 0) + 1
            assert busy[gpu] == 1, f"lane {gpu} runs two shards at once"
            peak[0] = max(peak[0], sum(busy.values()))
        time.sleep(0.002 * (shard.index % 3))
        with lock:
            busy[gpu] -= 1
            seen.append((shard.index, gpu, threading.get_ident()))
        return shard.index

    monkeypatch.setattr(executor, "run_shard_on", fake_run)
    pools = [cf.ThreadPoolExecutor(1) for _ in range(3)]
    try:
        shards = [Shard(index=i, total=20) for i in range(20)]
        done = list(executor.run_on_lanes(pools, None, shards))
    finally:
        for p in pools:
            p.shutdown()
    assert sorted(done) == list(range(20))
    workers_of_lane: dict[int, set[int]] = {}
    for _, lane, tid in seen:
        workers_of_lane.setdefault(lane, set()).add(tid)
    assert set(workers_of_lane) == {0, 1, 2} and all(len(t) == 1 for t in workers_of_lane.values())
    assert peak[0] <= 3

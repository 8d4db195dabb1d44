"""The GPU check: baseline and rpt_sem, `small` preset, a fixed token budget, on the shared books
(configs/gpu-check.yaml), then perplexity, P@2, tokens/s and MFU side by side. At most ~8 minutes on one
H100/H200 (prepared on the CPU; run it where a GPU is lent):

    python -m bench.gpu_check [--config configs/gpu-check.yaml]

MFU = FLOPs of one training step (torch.utils.flop_counter on the meta device: matmuls and attention,
forward and backward) x steps per second / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import REPO, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpu-check.yaml")
    args = ap.parse_args()
    import torch

    from bench.train import meta_flops, peak_flops
    from pipeline.executor import resolve
    from pipeline.store import ArtifactStore
    from stages import load_config

    if not torch.cuda.is_available():
        sys.exit(
            "bench.gpu_check needs a CUDA GPU (the CPU runs are configs/demo.yaml and gutenberg-cpu.yaml)"
        )
    env = {**os.environ, "RPT_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "app.cli", "flow", "full", "-c", args.config]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - t0
    run = load_config(args.config)
    store = ArtifactStore(run.root())
    ev = store.get("evaluate", resolve("evaluate", run).version)
    rows = ev.read_file("metrics.parquet").to_pylist()
    device = torch.device("cuda")
    peak = peak_flops(device)
    result: dict = {"wall_s": round(wall, 1), "gpu": torch.cuda.get_device_name(device), "variants": {}}
    tcfg = run.section("train")
    for v in run.section("evaluate").variants:
        art = store.get("train", resolve("train", run.with_section("train", {"variant": v})).version)
        st = art.stats
        fl_args = argparse.Namespace(
            preset=tcfg.preset,
            seq_len=tcfg.seq_len,
            batch=tcfg.batch_size,
            vocab=None,
            exclude_recent=run.section("bm25").exclude_recent,
        )
        flops, params = meta_flops(v, fl_args)
        steps_per_s = st["steps"] / st["train_s"]
        ppl = next(
            r["value"]
            for r in rows
            if r["table"] == "perplexity"
            and r["model"] == v
            and r["metric"] == "perplexity"
            and r["setting"] in ("none", "retriever")
        )
        p2 = next(
            (
                r["value"]
                for r in rows
                if r["table"] == "retrieval" and r["model"] == v and r["metric"] == "precision@2"
            ),
            None,
        )
        result["variants"][v] = {
            "perplexity": round(ppl, 3),
            "p_at_2": None if p2 is None else round(100 * p2, 2),
            "tokens_per_s": round(st["tokens"] / st["train_s"]),
            "mfu": None if peak is None else round(flops * steps_per_s / peak, 4),
            "params": params,
            "peak_memory_gb": st.get("peak_memory_gb"),
        }
    bm25_p2 = next(
        r["value"]
        for r in rows
        if r["table"] == "retrieval" and r["model"] == "bm25" and r["metric"] == "precision@2"
    )
    result["bm25_p_at_2"] = round(100 * bm25_p2, 2)
    print(json.dumps(result, indent=1))
    save("gpu_check", result)
    print(f"report: {ev.local_path('report.md')}")


if __name__ == "__main__":
    main()

"""Training step time of each RPT variant against the `baseline` of the same size, side by side.

One step = forward + backward + AdamW on a batch of synthetic sequences (random tokens; random
retrievable BM25 positions for retro_bm25; 20 random candidates with targets for rpt_*, the learned
retriever choosing the neighbors). Variants are timed interleaved (baseline, variant, baseline, ...)
after warm-up, so machine noise hits both sides alike; the ratio of medians is printed.
The paper measured 1.51x time per update for RPT over its Transformer-XL baseline (target <= 1.3x).

`--count-only` counts FLOPs per step on the meta device (nothing is computed), for any preset.
`--mfu` adds model FLOP utilisation on a GPU: FLOPs of one step counted by
torch.utils.flop_counter (matmuls and attention, forward and backward) / step time / the device's
dense bf16 peak, plus peak GPU memory. On a CPU it reports achieved GFLOP/s instead.

    python -m bench.train [--preset tiny] [--seq-len 1024] [--batch 2] [--steps 5] [--mfu]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

from bench.common import save
from model.config import VARIANTS, preset
from model.rpt import RPT, shift_labels

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense, SXM


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_batch(variant: str, B: int, T: int, m: int, V: int, K: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    n = T // m
    tok = torch.randint(0, V, (B, T), generator=g)
    batch: dict[str, Any] = {"tokens": tok, "labels": shift_labels(tok)}
    i = torch.arange(n)[None, :, None]
    if variant == "retro_bm25":
        pos = (torch.rand(B, n, K, generator=g) * (i - 1).clamp(min=0)).long()
        batch["neighbor_pos"] = torch.where(i >= 2, pos, -1)
    if variant.startswith("rpt"):
        pos = (torch.rand(B, n, 20, generator=g) * (i - 1).clamp(min=0)).long()
        batch["cand_pos"] = torch.where(i >= 2, pos, -1)
        batch["cand_target"] = torch.randn(B, n, 20, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


class Runner:
    def __init__(self, variant: str, args: argparse.Namespace, device: torch.device):
        overrides = {"variant": variant, "chunk_len": 64, "exclude_recent": args.exclude_recent}
        if args.vocab:
            overrides["vocab_size"] = args.vocab
        self.cfg = preset(args.preset, **overrides)
        torch.manual_seed(0)
        self.model = RPT(self.cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        self.batch = make_batch(variant, args.batch, args.seq_len, 64, self.cfg.vocab_size, 2, device)
        self.device = device
        bf16 = device.type == "cuda"
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.fn = torch.compile(self.model) if args.compile else self.model
        self.times: list[float] = []

    def step(self) -> None:
        b = self.batch
        with self.autocast:
            out = self.fn(
                b["tokens"],
                b["labels"],
                neighbor_pos=b.get("neighbor_pos"),
                cand_pos=b.get("cand_pos"),
                cand_target=b.get("cand_target"),
            )
            loss = out.lm_loss + 0.1 * out.ret_loss if out.ret_loss is not None else out.lm_loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t)

    def peak_memory_gb(self) -> float:
        """Peak GPU memory of one step of this variant (other variants' weights stay resident)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        from model import layers

        layers.EXPLICIT_MASKS = True  # same FLOPs; the counter cannot trace CausalBias
        try:
            with FlopCounterMode(display=False) as fc:
                self.step()
        finally:
            layers.EXPLICIT_MASKS = False
        return fc.get_total_flops()


def meta_flops(variant: str, args: argparse.Namespace) -> tuple[int, int]:
    """(FLOPs of forward + backward, parameters) at any size without computing: the model and the batch
    live on the meta device and torch.utils.flop_counter counts the matmuls and attention."""
    from torch.utils.flop_counter import FlopCounterMode

    from model import layers
    from model import rpt as rpt_module

    overrides = {"variant": variant, "chunk_len": 64, "exclude_recent": args.exclude_recent}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    cfg = preset(args.preset, **overrides)
    recall, layers.EXPLICIT_MASKS = rpt_module.retrieval_metrics, True
    rpt_module.retrieval_metrics = lambda *a, **k: {}  # data-dependent shapes; no FLOPs worth counting
    try:
        with torch.device("meta"):
            model = RPT(cfg)
            b = make_batch(variant, args.batch, args.seq_len, 64, cfg.vocab_size, 2, torch.device("meta"))
            with FlopCounterMode(display=False) as fc:
                out = model(
                    b["tokens"],
                    b["labels"],
                    neighbor_pos=b.get("neighbor_pos"),
                    cand_pos=b.get("cand_pos"),
                    cand_target=b.get("cand_target"),
                )
                (out.lm_loss + (out.ret_loss if out.ret_loss is not None else 0)).backward()
    finally:
        rpt_module.retrieval_metrics, layers.EXPLICIT_MASKS = recall, False
    return fc.get_total_flops(), model.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "baseline"])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None, help="default: the preset's (paper: 50277)")
    ap.add_argument("--exclude-recent", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--mfu", action="store_true", help="count FLOPs; MFU against the GPU's bf16 peak")
    ap.add_argument(
        "--count-only",
        action="store_true",
        help="only count FLOPs per step (meta device, no compute): any preset on any machine",
    )
    args = ap.parse_args()
    if args.count_only:
        base_fl = None
        print(f"preset {args.preset}, seq_len {args.seq_len}, batch {args.batch}: FLOPs per step (fwd + bwd)")
        for v in ["baseline", *args.variants]:
            fl, n = meta_flops(v, args)
            base_fl = base_fl or fl
            print(f"{v:12s} {n / 1e6:9.1f}M params {fl / 1e12:9.3f} TFLOP {fl / base_fl:6.3f}x")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"preset {args.preset}, seq_len {args.seq_len}, batch {args.batch}"
    )
    runners = {v: Runner(v, args, device) for v in ["baseline", *args.variants]}
    for r in runners.values():
        for _ in range(2):
            r.step()
    for _ in range(args.steps):
        for r in runners.values():
            r.timed()
    base = statistics.median(runners["baseline"].times)
    tokens = args.batch * args.seq_len
    results: dict[str, Any] = {
        "preset": args.preset,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "device": str(device),
        "variants": {},
    }
    peak = peak_flops(device)
    print(
        f"{'variant':12s} {'params':>10s} {'s/step':>9s} {'tok/s':>10s} {'vs baseline':>12s}"
        + (f" {'GFLOP/step':>11s} {'MFU' if peak else 'GFLOP/s':>8s}" if args.mfu else "")
        + ("  peak mem" if device.type == "cuda" else "")
    )
    for v, r in runners.items():
        med = statistics.median(r.times)
        row = {
            "params": r.model.num_params(),
            "s_per_step": med,
            "tokens_per_s": tokens / med,
            "ratio": med / base,
            "times": r.times,
        }
        line = f"{v:12s} {row['params'] / 1e6:9.2f}M {med:9.4f} {tokens / med:10.0f} {med / base:11.2f}x"
        if args.mfu:
            fl = r.flops()
            row["flops_per_step"] = fl
            if peak:
                row["mfu"] = fl / med / peak
                line += f" {fl / 1e9:11.1f} {100 * row['mfu']:7.1f}%"
            else:
                line += f" {fl / 1e9:11.1f} {fl / med / 1e9:8.1f}"
        if device.type == "cuda":
            row["peak_memory_gb"] = r.peak_memory_gb()
            line += f"  {row['peak_memory_gb']:.2f} GiB"
        results["variants"][v] = row
        print(line)
    if device.type != "cuda":
        results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {results['peak_rss_mb']:.0f} MiB; no GPU here, so no MFU")
    print(f"saved {save(f'train-{args.preset}-{device.type}', results)}")


if __name__ == "__main__":
    main()

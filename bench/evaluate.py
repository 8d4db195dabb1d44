"""Costs of the evaluate stage.

    python -m bench.evaluate metrics [--queries 20000 --repeats 3]
    python -m bench.evaluate forward [--chunks 1900 --preset tiny --vocab 4096 --threads 1]

metrics: Table 3's ranking metrics (precision@2, recall@10, nDCG@20) over synthetic rankings of 20
chunks against up to 20 graded gold chunks per query: ours (retrieval.ranking, numpy, vectorised over
queries) against ranx (numba; its Qrels/Run built from dicts as a user would, and the evaluate call
alone), after one warm-up call each (ranx compiles on first use). Checks that the values agree.

forward: one evaluation pass of a randomly initialised model over one document of N chunks (the stage
runs each document as one sequence), per neighbor source: time, tokens/s and the process's peak RSS
(settings in increasing memory order, so each peak is that setting's).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

import numpy as np

from bench.common import save


def synthetic(q: int, r: int = 20, g: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ranked = np.full((q, r), -1, dtype=np.int64)
    gold = np.full((q, g), -1, dtype=np.int64)
    grades = np.zeros((q, g))
    for i in range(q):
        pool = rng.choice(200, size=60, replace=False)
        nr, ng = int(rng.integers(1, r + 1)), int(rng.integers(1, g + 1))
        ranked[i, :nr] = pool[:nr]
        gold[i, :ng] = rng.choice(pool, size=ng, replace=False)
        grades[i, :ng] = rng.integers(1, 6, size=ng)
    return ranked, gold, grades


def bench_metrics(args: argparse.Namespace) -> dict[str, Any]:
    from ranx import Qrels, Run, evaluate

    from retrieval.ranking import ranking_metrics

    mets = ["precision@2", "recall@10", "ndcg@20"]
    ranked, gold, grades = synthetic(args.queries)

    def ours() -> dict[str, np.ndarray]:
        return ranking_metrics(ranked, gold, grades)

    def build() -> tuple[Any, Any]:
        qrels = Qrels(
            {
                f"q{i:07d}": {f"d{d}": int(v) for d, v in zip(gold[i], grades[i]) if d >= 0}
                for i in range(len(gold))
            }
        )
        run = Run(
            {
                f"q{i:07d}": {f"d{d}": float(20 - r) for r, d in enumerate(ranked[i]) if d >= 0}
                for i in range(len(ranked))
            }
        )
        return qrels, run

    qrels, run = build()
    ref = evaluate(qrels, run, mets, return_mean=False)  # warm-up: numba compiles here
    got = ours()
    diff = max(float(np.abs(got[m] - ref[m]).max()) for m in mets)
    t_ours, t_build, t_eval = [], [], []
    for _ in range(args.repeats):  # interleaved, so machine load hits all alike
        t0 = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        qrels, run = build()
        t_build.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(qrels, run, mets, return_mean=False)
        t_eval.append(time.perf_counter() - t0)
    res = {
        "queries": args.queries,
        "max_abs_diff": diff,
        "ours_s": statistics.median(t_ours),
        "ranx_build_s": statistics.median(t_build),
        "ranx_evaluate_s": statistics.median(t_eval),
    }
    res["ranx_total_over_ours"] = (res["ranx_build_s"] + res["ranx_evaluate_s"]) / res["ours_s"]
    res["ranx_evaluate_over_ours"] = res["ranx_evaluate_s"] / res["ours_s"]
    print(f"{args.queries:,} queries, max |ours - ranx| = {diff:.2e}")
    print(f"ours (numpy)            {res['ours_s']:.3f} s")
    print(f"ranx build Qrels/Run    {res['ranx_build_s']:.3f} s")
    print(
        f"ranx evaluate           {res['ranx_evaluate_s']:.3f} s   (ranx evaluate / ours: "
        f"{res['ranx_evaluate_over_ours']:.2f}x; with building: {res['ranx_total_over_ours']:.2f}x)"
    )
    return res


def bench_forward(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from model.config import preset
    from model.rpt import RPT

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, variant="rpt_sem", vocab_size=args.vocab, exclude_recent=args.exclude_recent)
    model = RPT(cfg).eval()
    T = args.chunks * cfg.chunk_len
    x = torch.randint(0, args.vocab, (1, T))
    labels = torch.roll(x, -1, 1)
    out: dict[str, Any] = {
        "preset": args.preset,
        "chunks": args.chunks,
        "tokens": T,
        "params": model.num_params(),
        "threads": torch.get_num_threads(),
        "passes": {},
    }
    print(
        f"{args.preset} rpt_sem ({model.num_params():,} params), one document of {args.chunks} chunks "
        f"({T:,} tokens), {torch.get_num_threads()} thread(s)"
    )
    for name, kw in [
        ("none", {"source": "none"}),
        ("retriever K=2", {"source": "retriever", "k": 2}),
        ("retriever K=4", {"source": "retriever", "k": 4}),
    ]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(x, labels, **kw)
        s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["passes"][name] = {"seconds": s, "tokens_per_s": T / s, "peak_rss_gb": peak}
        print(f"{name:15s} {s:7.1f} s  {T / s:8,.0f} tokens/s  peak RSS {peak:.2f} GB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mp = sub.add_parser("metrics")
    mp.add_argument("--queries", type=int, default=20000)
    mp.add_argument("--repeats", type=int, default=3)
    fp = sub.add_parser("forward")
    fp.add_argument("--chunks", type=int, default=1900)
    fp.add_argument("--preset", default="tiny")
    fp.add_argument("--vocab", type=int, default=4096)
    fp.add_argument("--exclude-recent", type=int, default=4)
    fp.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res = bench_metrics(args) if args.cmd == "metrics" else bench_forward(args)
    print(f"saved {save(f'evaluate_{args.cmd}', res)}")


if __name__ == "__main__":
    main()

"""Scoring throughput of the `scores` stage against naive scoring, MFU on a GPU, and the supervision
headroom (fraction of queries with a positive candidate) on the shared books.

    python -m bench.scores speed    [--hidden 256 --layers 4 --vocab 16384 --repeats 3 --threads N]
    python -m bench.scores mfu      --peak-tflops 989 [--shapes 410m 1.4b]      (needs a CUDA GPU)
    python -m bench.scores headroom [--queries 300 --steps 300]                 (builds a pipeline run)

speed: the same randomly initialised GPT-NeoX scores the same (query, candidate) pairs of a synthetic
document four ways, interleaved round by round so machine load hits all alike:
  ours        prefix key/value states computed once, only (c_q, c_t) run per pair, logits at targets only;
  naive-1     one plain HF forward per pair over (c_j, c_j+1, c_q, c_t), full logits (the issue's peer);
  naive-B     the same full sequences batched (no padding needed: all are 256 tokens), full logits;
  naive-B+k   batched full sequences, with our head path (logits only at the target positions, in
              cache-sized float32 blocks): the ratio to ours isolates the reuse of the prefix states.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from bench.common import save

SHAPES = {  # Pythia shapes (GPT-NeoX, vocab padded to 50304)
    "70m": {"hidden": 512, "layers": 6, "heads": 8, "intermediate": 2048},
    "410m": {"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096},
    "1.4b": {"hidden": 2048, "layers": 24, "heads": 16, "intermediate": 8192},
}


def make_model(
    hidden: int, layers: int, heads: int, intermediate: int, vocab: int, dtype: Any, device: Any
) -> Any:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
    )
    return GPTNeoXForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def synthetic_document(
    n_chunks: int, candidates: int, exclude_recent: int, vocab: int, chunk_len: int = 64, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """One document of full chunks; every query with retrievable chunks gets up to `candidates` of them."""
    rng = np.random.default_rng(seed)
    toks = [rng.integers(0, vocab, chunk_len) for _ in range(n_chunks)]
    queries = np.arange(exclude_recent + 1, n_chunks - 1)
    cands = [
        rng.choice(i - exclude_recent, size=min(candidates, i - exclude_recent), replace=False)
        for i in queries
    ]
    return toks, queries, cands


def pair_list(queries: np.ndarray, cands: list[np.ndarray]) -> list[tuple[int, tuple[int, ...]]]:
    """(query, prefix chunks) of every scored pair: the local pair and each candidate's pair."""
    out = []
    for i, c in zip(queries.tolist(), cands):
        seen = {(i - 2, i - 1)}
        out.append((i, (i - 2, i - 1)))
        for j in c.tolist():
            if (j, j + 1) not in seen:
                seen.add((j, j + 1))
                out.append((i, (j, j + 1)))
    return out


def naive_one(
    model: Any, toks: list[np.ndarray], pairs: list[tuple[int, tuple[int, ...]]], device: Any
) -> list[float]:
    """One plain HF forward per pair, full logits, log-softmax, sum over the target's tokens."""
    import torch

    out = []
    with torch.inference_mode():
        for i, pre in pairs:
            ids = np.concatenate([*(toks[c] for c in pre), toks[i], toks[i + 1]])
            x = torch.from_numpy(ids).to(device)[None]
            logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            t = len(toks[i + 1])
            out.append(float(logp[-t - 1 : -1].gather(1, x[0, -t:, None]).sum()))
    return out


def naive_batched(
    model: Any,
    toks: list[np.ndarray],
    pairs: list[tuple[int, tuple[int, ...]]],
    device: Any,
    batch_tokens: int,
    lm: Any = None,
) -> list[float]:
    """Full 256-token sequences in batches (no padding needed). With `lm` (a ScoringLM), the log-probs come
    from our head path (hidden states at target positions only, blocked float32 logits), so the ratio to
    ours isolates the reuse of prefix states; without, a plain HF call computes all logits."""
    import torch

    out: list[float] = []
    seq = 4 * len(toks[0])
    t = len(toks[0])
    rows = max(1, batch_tokens // seq)
    with torch.inference_mode():
        for a in range(0, len(pairs), rows):
            ids = np.stack(
                [
                    np.concatenate([*(toks[c] for c in pre), toks[i], toks[i + 1]])
                    for i, pre in pairs[a : a + rows]
                ]
            )
            x = torch.from_numpy(ids).to(device)
            if lm is not None:
                h = lm.base(input_ids=x).last_hidden_state[:, -t - 1 : -1].reshape(-1, lm.head_w.shape[1])
                r = torch.arange(len(ids), device=device).repeat_interleave(t)
                out.extend(lm.target_logp(h, x[:, -t:].reshape(-1), r, len(ids)).tolist())
                continue
            logits = model(input_ids=x).logits[:, -t - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, -t:].reshape(-1), reduction="none"
            )
            out.extend((-nll.view(len(ids), t).sum(1)).tolist())
    return out


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(args: argparse.Namespace) -> None:
    import torch

    from model.lm_scoring import ScoringLM, score_queries

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = make_model(
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab, torch.float32, device
    )
    lm = ScoringLM(model, device, torch.float32)
    toks, queries, cands = synthetic_document(args.chunks, args.candidates, args.exclude_recent, args.vocab)
    ds, de = np.zeros(len(toks), np.int64), np.full(len(toks), len(toks))
    pairs = pair_list(queries, cands)
    sub = [p for p in pairs if p[0] in set(queries[: args.naive_queries].tolist())]
    subB = [p for p in pairs if p[0] in set(queries[: 4 * args.naive_queries].tolist())]
    print(
        f"model: GPT-NeoX hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{lm.params / 1e6:.1f}M params; torch threads {torch.get_num_threads()}"
    )
    print(
        f"document: {args.chunks} chunks, {len(queries)} queries, {len(pairs)} pairs "
        f"(naive-1 on {len(sub)}, naive-B on {len(subB)} of them)"
    )
    rounds: list[dict[str, float]] = []
    max_err = 0.0
    for r in range(args.repeats):
        res = {}
        t0 = time.perf_counter()
        qs, counts = score_queries(
            lm, queries, cands, ds, de, toks.__getitem__, args.batch_tokens, args.kv_cache_mb
        )
        res["ours"] = counts["pairs"] / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        naive = naive_one(model, toks, sub, device)
        res["naive-1"] = len(sub) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        naive_batched(model, toks, subB, device, args.batch_tokens)
        res["naive-B"] = len(subB) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        naive_batched(model, toks, subB, device, args.batch_tokens, lm)
        res["naive-B+k"] = len(subB) / (time.perf_counter() - t0)
        rounds.append(res)
        # agreement of ours with the naive loop on the same pairs
        ours_by = {}
        for q, i in enumerate(queries.tolist()):
            ours_by[(i, (i - 2, i - 1))] = qs.logp_local[q]
            for j, v in zip(cands[q].tolist(), qs.logp_candidate[q]):
                ours_by[(i, (j, j + 1))] = v
        max_err = max(max_err, max(abs(ours_by[p] - v) for p, v in zip(sub, naive)))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v:8.1f} pairs/s" for k, v in res.items()), flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratios = {k: [r["ours"] / r[k] for r in rounds] for k in rounds[0] if k != "ours"}
    print(
        f"\nforward tokens per pair: ours {(counts['prefix_tokens'] + counts['suffix_tokens']) / counts['pairs']:.0f}, "
        f"naive {4 * len(toks[0])};  max |ours - naive-1| = {max_err:.2e} nats"
    )
    for k, v in med.items():
        extra = (
            ""
            if k == "ours"
            else (
                f"   ours/{k}: median {statistics.median(ratios[k]):.2f}x "
                f"(rounds: {', '.join(f'{x:.2f}' for x in ratios[k])})"
            )
        )
        print(f"{k:10s} {v:9.1f} pairs/s{extra}")
    path = save(
        "scores_speed",
        {
            "args": vars(args),
            "rounds": rounds,
            "median_pairs_per_s": med,
            "ratios": ratios,
            "max_abs_diff": max_err,
            "params": lm.params,
        },
    )
    print(f"saved {path}")


def mfu(args: argparse.Namespace) -> None:
    import torch

    from model.lm_scoring import ScoringLM, score_queries

    if not torch.cuda.is_available():
        print("mfu: no CUDA device on this machine; MFU is measured on a GPU only (nothing run)")
        save("scores_mfu", {"skipped": "no CUDA device"})
        return
    device = torch.device("cuda")
    results = {}
    for shape in args.shapes:
        s = SHAPES[shape]
        model = make_model(
            s["hidden"], s["layers"], s["heads"], s["intermediate"], 50304, torch.bfloat16, device
        )
        lm = ScoringLM(model, device, torch.bfloat16)
        n_all = lm.params
        n_fwd = n_all - model.get_input_embeddings().weight.numel()
        toks, queries, cands = synthetic_document(args.chunks, args.candidates, args.exclude_recent, 50304)
        ds, de = np.zeros(len(toks), np.int64), np.full(len(toks), len(toks))
        warm = slice(0, 32)
        score_queries(
            lm, queries[warm], cands[warm], ds, de, toks.__getitem__, args.batch_tokens, args.kv_cache_mb
        )
        sync(device)
        t0 = time.perf_counter()
        _, counts = score_queries(
            lm, queries, cands, ds, de, toks.__getitem__, args.batch_tokens, args.kv_cache_mb
        )
        sync(device)
        sec = time.perf_counter() - t0
        tok_s = (counts["prefix_tokens"] + counts["suffix_tokens"]) / sec
        pairs = pair_list(queries[:64], cands[:64])
        naive_batched(model, toks, pairs[:64], device, args.batch_tokens)
        sync(device)
        t0 = time.perf_counter()
        naive_batched(model, toks, pairs, device, args.batch_tokens)
        sync(device)
        naive_ps = len(pairs) / (time.perf_counter() - t0)
        r = {
            "params": n_all,
            "params_no_input_embedding": n_fwd,
            "pairs_per_s": counts["pairs"] / sec,
            "forward_tokens_per_s": tok_s,
            "mfu": 2 * n_all * tok_s / (args.peak_tflops * 1e12),
            "mfu_no_input_embedding": 2 * n_fwd * tok_s / (args.peak_tflops * 1e12),
            "naive_batched_pairs_per_s": naive_ps,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        }
        results[shape] = r
        print(
            f"{shape}: {n_all / 1e6:.0f}M params, {r['pairs_per_s']:,.0f} pairs/s, {tok_s:,.0f} forward tokens/s, "
            f"MFU {100 * r['mfu']:.1f}% (excluding the input embedding {100 * r['mfu_no_input_embedding']:.1f}%) "
            f"of {args.peak_tflops} TFLOP/s; naive batched {naive_ps:,.0f} pairs/s "
            f"(ours {r['pairs_per_s'] / naive_ps:.2f}x); peak memory {r['peak_mem_gb']:.1f} GB",
            flush=True,
        )
        del model, lm
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"device: {torch.cuda.get_device_name(0)}")
    save("scores_mfu", {"args": vars(args), "device": torch.cuda.get_device_name(0), "results": results})


def headroom(args: argparse.Namespace) -> None:
    """Train the reference LM with the pipeline on the shared books, then score a sample of queries."""
    import torch

    from model.lm_scoring import score_queries
    from pipeline.executor import build_node, resolve
    from pipeline.formats import REFERENCE_MODEL_DIR, ChunkReader
    from pipeline.progress import setup_logging
    from stages import load_config
    from stages.scores import HEADROOM_K, ChunkTokens, document_bounds, scoring_lm

    setup_logging("INFO")
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = [
        f"artifacts_root={args.root}",
        f"reference.steps={args.steps}",
        f"reference.hidden={args.hidden}",
        f"reference.layers={args.layers}",
        f"reference.heads={args.heads}",
        f"reference.intermediate={4 * args.hidden}",
        f"reference.batch={args.batch}",
        f"reference.seq_len={args.seq_len}",
        f"reference.lr={args.lr}",
        "reference.warmup=50",
    ]
    run = load_config(args.config, sets)
    node = resolve("scores", run)
    t0 = time.perf_counter()
    ref = build_node(node.inputs["reference"], with_deps=True)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    bm25 = build_node(node.inputs["bm25"], with_deps=True)
    t_bm = time.perf_counter() - t0
    reader = ChunkReader(build_node(node.inputs["chunks"], with_deps=True))
    ds, de = document_bounds(reader)
    from pipeline.formats import read_neighbors

    qid, nb, _ = read_neighbors(bm25)
    order = np.argsort(qid)
    qid, nb = qid[order], nb[order]
    split = np.repeat([d.split for d in reader.docs()], [d.n for d in reader.docs()])
    has_target = np.arange(reader.n_chunks) + 1 < de
    n_cand = (nb[:, : run.scores.candidates] >= 0).sum(1)
    pool = np.flatnonzero((split == args.split) & has_target & (n_cand > 0))
    n_all = int(((split == args.split) & has_target).sum())
    rng = np.random.default_rng(args.seed)
    queries = np.sort(rng.choice(pool, size=min(args.queries, len(pool)), replace=False))
    cands = [row[row >= 0] for row in nb[queries, : run.scores.candidates]]
    lm = scoring_lm(str(ref.local_path(REFERENCE_MODEL_DIR)), torch.device("cpu"), torch.float32)
    tokens = ChunkTokens(reader, 0, reader.n_chunks)
    t0 = time.perf_counter()
    qs, counts = score_queries(lm, queries, cands, ds, de, tokens, 8192, 1024)
    t_sc = time.perf_counter() - t0
    delta = [lp - loc for lp, loc in zip(qs.logp_candidate, qs.logp_local)]
    print(
        f"\nreference LM: {ref.stats['params'] / 1e6:.1f}M params, trained {ref.stats['steps']} steps "
        f"({ref.stats['train_tokens_seen']:,} tokens) in {ref.stats.get('train_s', 0):.0f} s; "
        f"valid ppl {ref.stats['valid_ppl']:.1f} (build {t_ref:.0f} s, bm25 {t_bm:.0f} s)"
    )
    print(
        f"scored {len(queries)} random {args.split} queries with >= 1 candidate ({len(pool)} of {n_all} "
        f"queries with a target have one), {counts['pairs']} pairs in {t_sc:.0f} s "
        f"({counts['pairs'] / t_sc:.1f} pairs/s)"
    )
    out = {}
    for k in HEADROOM_K:
        frac = float(np.mean([(d[:k] > 0).any() for d in delta]))
        mx = float(np.mean([d[:k].max() for d in delta]))
        out[k] = {"fraction_with_positive": frac, "mean_max_delta": mx}
        print(
            f"top-{k:2d} bm25 candidates: {100 * frac:5.1f}% of queries have a positive (delta > 0); "
            f"mean max delta {mx:+.3f} nats"
        )
    rate = float(np.mean(np.concatenate(delta) > 0))
    print(f"positive rate over all scored candidates: {rate:.3f}")
    control = {}
    if args.control:
        # the same queries with random retrievable chunks instead of bm25's: how much of the above is the
        # candidates' content rather than noise of the reference LM
        ex = run.bm25.exclude_recent
        rand = [
            np.sort(rng.choice(np.arange(ds[q], q - ex), size=len(c), replace=False))
            for q, c in zip(queries, cands)
        ]
        t0 = time.perf_counter()
        qr, _ = score_queries(lm, queries, rand, ds, de, tokens, 8192, 1024)
        dr = [lp - loc for lp, loc in zip(qr.logp_candidate, qr.logp_local)]
        control = {
            "positive_rate": float(np.mean(np.concatenate(dr) > 0)),
            "fraction_with_positive": float(np.mean([(d > 0).any() for d in dr])),
            "mean_max_delta": float(np.mean([d.max() for d in dr])),
            "score_s": time.perf_counter() - t0,
        }
        print(
            f"control, as many random retrievable chunks per query: positive rate {control['positive_rate']:.3f}, "
            f"{100 * control['fraction_with_positive']:.1f}% of queries have a positive, mean max delta "
            f"{control['mean_max_delta']:+.3f} nats"
        )
    path = save(
        "scores_headroom",
        {
            "args": vars(args),
            "reference": {k: ref.stats.get(k) for k in ("params", "steps", "valid_ppl", "train_s")},
            "queries": len(queries),
            "pool": len(pool),
            "queries_with_target": n_all,
            "pairs": counts["pairs"],
            "score_s": t_sc,
            "headroom": out,
            "positive_rate": rate,
            "control_random_candidates": control,
        },
    )
    print(f"saved {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode")
    sp = sub.add_parser("speed", help="ours vs naive scoring on the CPU, same model, side by side")
    sp.add_argument("--hidden", type=int, default=256)
    sp.add_argument("--layers", type=int, default=4)
    sp.add_argument("--heads", type=int, default=4)
    sp.add_argument("--intermediate", type=int, default=1024)
    sp.add_argument("--vocab", type=int, default=16384)
    sp.add_argument("--chunks", type=int, default=100, help="chunks of the synthetic document")
    sp.add_argument(
        "--naive-queries", type=int, default=6, help="queries timed with naive-1 (x4 for naive-B)"
    )
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--threads", type=int, default=None)
    mp = sub.add_parser("mfu", help="model FLOP utilisation on a GPU for Pythia-shaped random models")
    mp.add_argument(
        "--peak-tflops", type=float, required=True, help="the GPU's dense bf16 peak (H100 SXM: 989)"
    )
    mp.add_argument("--shapes", nargs="+", default=["410m", "1.4b"], choices=list(SHAPES))
    mp.add_argument("--chunks", type=int, default=1200)
    hp = sub.add_parser("headroom", help="fraction of queries with a positive candidate on the shared books")
    hp.add_argument("--config", default="configs/gutenberg.yaml")
    hp.add_argument("--root", default="artifacts")
    hp.add_argument("--split", default="test")
    hp.add_argument("--queries", type=int, default=300)
    hp.add_argument("--steps", type=int, default=200)
    hp.add_argument("--hidden", type=int, default=128)
    hp.add_argument("--layers", type=int, default=4)
    hp.add_argument("--heads", type=int, default=4)
    hp.add_argument("--batch", type=int, default=16)
    hp.add_argument("--seq-len", type=int, default=256)
    hp.add_argument("--lr", type=float, default=2e-3)
    hp.add_argument("--seed", type=int, default=0)
    hp.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip scoring random candidates as a control",
    )
    hp.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is faster on a busy 2-core machine)"
    )
    for p in (sp, mp):
        p.add_argument("--candidates", type=int, default=20)
        p.add_argument("--exclude-recent", type=int, default=16)
        p.add_argument("--batch-tokens", type=int, default=8192 if p is sp else 32768)
        p.add_argument("--kv-cache-mb", type=int, default=1024 if p is sp else 16384)
    args = ap.parse_args(argv if argv is not None else (sys.argv[1:] or ["speed"]))
    {"speed": speed, "mfu": mfu, "headroom": headroom}[args.mode](args)


if __name__ == "__main__":
    main()

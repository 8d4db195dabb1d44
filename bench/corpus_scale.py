"""Corpus-scope neighbor tables at scale (issue "corpus-scope neighbors at cluster scale"): a database of
10^7 chunks through `bm25` and `dense` on a local Dask cluster of two workers, the database sharded
(`db_shard_chunks`), beside the unsharded path where it fits.

The corpus: the shared Gutenberg books replicated `--replicas` times, each copy with `--perturb` of its
words replaced by other words of the same book (seeded), one document per copy (64 copies of the 44 books:
~2,800 documents, ~640M tokens, ~10^7 chunks of 64 tokens). Two copies are the test split: the queries
(`query_splits: [test]`); everything else is the train split, the database. Dense search uses the
`random-projection` encoder (a seeded vector per token id, mean-pooled): no CPU runs a BERT over 10^7
chunks in an hour, and the index work is the same whatever made the vectors.

Steps: the corpus files; `rpt run chunks` and `rpt run embeddings` (not measured: the same as any run);
then for each table, on a fresh 2-worker LocalCluster (one thread each), `rpt flow stages --target T` with
`runner.kind: dask` and the cluster's address: wall time, queries per second, each worker's peak RSS
(`getrusage` in the worker), the artifact's disk. The unsharded path runs the same way into a copy of the
store (same version: `db_shard_chunks` is not in it) when `--unsharded` is given; for BM25 also in-process
on database prefixes (`--bm25-prefixes`), to show how its memory grows with the database.

    python -m bench.corpus_scale --root /tmp/scale --replicas 64 --db-shard-chunks 1000000 [--unsharded dense]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save

BOOKS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "gutenberg"
RPT = [sys.executable, "-m", "app.cli"]
WORD = re.compile(r"\S+")


# ----------------------------------------------------------------------------------------- the corpus
def read_book(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def make_corpus(books: Path, out: Path, replicas: int, perturb: float, seed: int) -> dict[str, Any]:
    """Parquet files of perturbed book copies (doc ids `<book>~<copy>`); returns the test ids and sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    done = out.parent / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    paths = sorted(p for p in books.iterdir() if p.name.endswith((".txt", ".txt.gz")))
    if not paths:
        raise SystemExit(f"no books in {books}: pass --books DIR (.txt or .txt.gz files)")
    rng = np.random.default_rng(seed)
    sizes, total_chars = {}, 0
    for bi, p in enumerate(paths):
        words = np.array(WORD.findall(read_book(p)), dtype=object)
        sizes[p.name] = len(words)
        ids, texts = [], []
        for r in range(replicas):
            w = words.copy()
            hit = rng.random(len(w)) < perturb
            w[hit] = words[rng.integers(0, len(words), int(hit.sum()))]
            ids.append(f"{p.name.split('.')[0]}~{r:03d}")
            texts.append(" ".join(w.tolist()))
            total_chars += len(texts[-1])
        pq.write_table(
            pa.table({"id": ids, "text": texts}), out / f"books-{bi:03d}.parquet", compression="zstd"
        )
        print(f"corpus: {p.name} x {replicas} ({len(words):,} words)", flush=True)
    smallest = sorted(sizes, key=sizes.get)[:2]
    info = {"test": [f"{n.split('.')[0]}~000" for n in smallest], "chars": total_chars, "books": len(paths)}
    done.write_text(json.dumps(info))
    return info


def write_config(root: Path, corpus: Path, info: dict[str, Any], args: argparse.Namespace) -> Path:
    import yaml

    cfg = {
        "artifacts_root": str(root / "store"),
        "documents": {
            "paths": [str(corpus)],
            "id_field": "id",
            "split_lists": {"test": info["test"]},
            "fingerprint": "size",
            "min_chars": 0,
        },
        "tokenizer": {"vocab_size": 16384, "max_train_chars": 50_000_000},
        "chunks": {"chunk_len": 64},
        "embeddings": {"encoder": "random-projection", "projection_dim": args.dim, "shard_chunks": 1_000_000},
        "bm25": {
            "scope": "corpus",
            "k": 10,
            "db_shard_chunks": args.db_shard_chunks,
            "query_splits": ["test"],
        },
        "dense": {
            "scope": "corpus",
            "k": 10,
            "index": "ivfpq",
            "nlist": args.nlist,
            "pq_m": args.pq_m,
            "train_sample": args.train_sample,
            "db_shard_chunks": args.db_shard_chunks,
            "query_splits": ["test"],
            "recall_sample": 500,
            "device": "cpu",
        },
    }
    path = root / "scale.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------- measuring
def rpt(*argv: str, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run([*RPT, *argv], check=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table_on_dask(config: Path, target: str, overrides: list[str], workers: int) -> dict[str, Any]:
    """`rpt flow stages --target <target>` on a fresh LocalCluster: wall, peak RSS of each worker."""
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        # cpu_lanes = workers: dense may use a GPU, and such stages run their shards one at a time on CPUs
        # unless runner.cpu_lanes allows more
        runner = (
            "runner.kind=dask",
            f"runner.address={cluster.scheduler_address}",
            f"runner.cpu_lanes={workers}",
        )
        sets = [f"--set={s}" for s in (*runner, *overrides)]
        wall = rpt(
            "flow", "stages", "--target", target, "-c", str(config), *sets, env={"OMP_NUM_THREADS": "1"}
        )
        rss = client.run(peak_rss_mb)
    return {"wall_s": round(wall, 1), "worker_peak_rss_mb": sorted(round(v) for v in rss.values())}


def manifest(store: Path, stage: str) -> dict[str, Any]:
    folders = [p for p in (store / stage).iterdir() if (p / "manifest.json").is_file()]
    latest = max(folders, key=lambda p: (p / "manifest.json").stat().st_mtime)
    m = json.loads((latest / "manifest.json").read_text())
    return {
        "path": latest,
        "stats": m["stats"],
        "timings": m["timings"],
        "meta": m["meta"],
        "bytes": dir_bytes(latest),
    }


def bm25_prefix_memory(store: Path, sizes: list[int]) -> list[dict[str, Any]]:
    """The unsharded BM25 index over the first n database chunks, built in a fresh process each: peak RSS."""
    out = []
    for n in sizes:
        code = (
            "import numpy as np, resource, sys\n"
            "from pipeline.store import ArtifactStore\n"
            "from pipeline.formats import ChunkReader\n"
            "from retrieval.bm25 import CorpusIndex, Params\n"
            f"r = ChunkReader(ArtifactStore({str(store)!r}).resolve('chunks'))\n"
            "ids = np.concatenate([d.chunk_ids for d in r.docs('train')])[:" + str(n) + "]\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "idx = CorpusIndex.build(r.tokens[ids], ids, Params(k=10), 16384)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base / 1024)\n"
        )
        res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        peak, base = map(float, res.stdout.split())
        out.append({"database_chunks": n, "peak_rss_mb": round(peak), "before_index_mb": round(base)})
        print(f"bm25 unsharded index over {n:,} chunks: peak RSS {peak:,.0f} MB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/rpt-scale"))
    ap.add_argument("--books", type=Path, default=BOOKS)
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--perturb", type=float, default=0.05)
    ap.add_argument("--db-shard-chunks", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--train-sample", type=int, default=200_000)
    ap.add_argument("--pq-m", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tables", nargs="+", default=["bm25", "dense"])
    ap.add_argument("--unsharded", nargs="*", default=[], help="tables to build unsharded too (a store copy)")
    ap.add_argument("--bm25-prefixes", type=int, nargs="*", default=[], help="unsharded BM25 index sizes")
    args = ap.parse_args()
    root = args.root
    info = make_corpus(args.books, root / "corpus", args.replicas, args.perturb, seed=0)
    config = write_config(root, root / "corpus", info, args)
    local = ["--set=runner.kind=processes", f"--set=runner.workers={args.workers}"]  # set-up: every core
    t_chunks = rpt("run", "chunks", "--with-deps", "-c", str(config), *local)
    t_emb = rpt("run", "embeddings", "-c", str(config), *local) if "dense" in args.tables else None
    store = root / "store"
    chunks = manifest(store, "chunks")
    result: dict[str, Any] = {
        "corpus": info,
        "chunks": chunks["stats"].get("chunks"),
        "tokens": chunks["stats"].get("tokens"),
        "chunks_wall_s": round(t_chunks, 1),
        "embeddings_wall_s": round(t_emb, 1) if t_emb else None,
        "db_shard_chunks": args.db_shard_chunks,
        "workers": args.workers,
    }
    for table in args.tables:
        run = table_on_dask(config, table, [], args.workers)
        m = manifest(store, table)
        st = m["stats"]
        rows = st.get("rows", 0)
        run.update(
            queries=rows,
            database_shards=st.get("database_shards"),
            queries_per_s=round(rows / run["wall_s"], 1),
            disk_mb=round(m["bytes"] / 2**20, 1),
            merge_s=st.get("merge_s"),
            recall_at_k=st.get("recall_at_k"),
            index=m["meta"].get("index"),
        )
        result[table] = run
        print(json.dumps({table: run}, default=str), flush=True)
        if table in args.unsharded:
            copy = root / "store-unsharded"
            if copy.exists():
                shutil.rmtree(copy)
            shutil.copytree(store, copy, ignore=shutil.ignore_patterns(table), copy_function=os.link)
            un = table_on_dask(
                config, table, [f"artifacts_root={copy}", f"{table}.db_shard_chunks=0"], args.workers
            )
            mu = manifest(copy, table)
            un.update(disk_mb=round(mu["bytes"] / 2**20, 1), recall_at_k=mu["stats"].get("recall_at_k"))
            result[f"{table}_unsharded"] = un
            print(json.dumps({f"{table}_unsharded": un}, default=str), flush=True)
    if args.bm25_prefixes:
        result["bm25_unsharded_index_memory"] = bm25_prefix_memory(store, args.bm25_prefixes)
    print(json.dumps(result, indent=2, default=str))
    save("corpus_scale", result)


if __name__ == "__main__":
    main()

"""Ingest + tokenize + chunk throughput on the shared books, and peak memory.

Ours: `rpt run documents|tokenizer|chunks` (one process per stage, as a user runs them).
Peer: the loop most people write first: for each book, decode, `tokenizer.encode` it alone, slice into
64-token chunks in Python, and write one Parquet file (same tokenizer, same output columns).

    python -m bench.ingest [--books N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

from bench.common import GUTENBERG, REPO, run_measured, save

PEER = r"""
import gzip, sys, time, json
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from tokenizers import Tokenizer
books, tok_path, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
tok = Tokenizer.from_file(tok_path)
rows = {"chunk_id": [], "doc_idx": [], "chunk_idx": [], "tokens": [], "text": []}
t0 = time.perf_counter(); n_tok = 0
for d, p in enumerate(books):
    raw = gzip.open(p).read()
    try: text = raw.decode("utf-8")
    except UnicodeDecodeError: text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n")
    enc = tok.encode(text, add_special_tokens=False)
    ids, offs = enc.ids, enc.offsets
    n_tok += len(ids)
    for k in range(0, len(ids), 64):
        rows["chunk_id"].append(len(rows["chunk_id"])); rows["doc_idx"].append(d); rows["chunk_idx"].append(k // 64)
        rows["tokens"].append(ids[k:k + 64])
        end = offs[k + 64][0] if k + 64 < len(ids) else len(text)
        rows["text"].append(text[offs[k][0]:end])
pq.write_table(pa.table(rows), out, compression="zstd")
print(json.dumps({"tokens": n_tok, "seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--books",
        type=int,
        default=44,
        help="how many of the shared books (largest first is not used; sorted by name)",
    )
    args = ap.parse_args()
    books = sorted(GUTENBERG.glob("*.txt.gz"))[: args.books]
    raw_bytes = 0
    for b in books:
        with gzip.open(b) as f:
            raw_bytes += len(f.read())
    with tempfile.TemporaryDirectory(prefix="rpt-bench-") as tmp:
        corpus = Path(tmp) / "gutenberg"
        corpus.mkdir()
        for b in books:
            (corpus / b.name).symlink_to(b)
        root = Path(tmp) / "store"
        rpt = [sys.executable, "-m", "app.cli", "run"]
        sets = ["--set", f"artifacts_root={root}", "--set", f"documents.paths=[{corpus}]"]
        env = {"RPT_PROGRESS": "0"}
        ours = {}
        for stage in ("documents", "tokenizer", "chunks"):
            r = run_measured([*rpt, stage, *sets], env=env)
            ours[stage] = {"seconds": round(r["seconds"], 2), "peak_rss_mb": round(r["peak_rss_mb"])}
            print(
                f"ours  {stage:10s} {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True
            )
        from pipeline.store import ArtifactStore

        store = ArtifactStore(str(root))
        chunks = store.resolve("chunks")
        tokens = chunks.stats["tokens"]
        tok_path = store.resolve("tokenizer").local_path("tokenizer.json")
        peer = run_measured(
            [
                sys.executable,
                "-c",
                PEER,
                json.dumps([str(b) for b in books]),
                str(tok_path),
                str(Path(tmp) / "peer.parquet"),
            ]
        )
        peer_stats = json.loads(peer["output"].strip().splitlines()[-1])
    ours_tc = (
        ours["documents"]["seconds"] + ours["chunks"]["seconds"]
    )  # ingest + tokenize + chunk (tokenizer training apart)
    print()
    print(
        f"corpus: {len(books)} books, {raw_bytes / 1e6:.1f} MB of text, {tokens:,} tokens, {chunks.stats['chunks']:,} chunks"
    )
    print(
        f"ours  ingest+tokenize+chunk: {ours_tc:6.1f} s  {tokens / ours_tc:10,.0f} tokens/s  "
        f"(process wall time, incl. start-up and writing; tokenizer training {ours['tokenizer']['seconds']:.1f} s apart)"
    )
    print(
        f"peer  naive per-book loop:   {peer['seconds']:6.1f} s  {peer_stats['tokens'] / peer['seconds']:10,.0f} tokens/s  "
        f"peak RSS {peer['peak_rss_mb']:.0f} MB"
    )
    print(
        f"ratio ours/peer throughput: {(tokens / ours_tc) / (peer_stats['tokens'] / peer['seconds']):.2f}x;  "
        f"peak RSS ours (max stage) {max(v['peak_rss_mb'] for v in ours.values())} MB"
    )
    path = save(
        "ingest",
        {
            "books": len(books),
            "tokens": tokens,
            "ours": ours,
            "ours_tokens_per_s": tokens / ours_tc,
            "peer": {
                "seconds": peer["seconds"],
                "peak_rss_mb": peer["peak_rss_mb"],
                "tokens_per_s": peer_stats["tokens"] / peer["seconds"],
            },
        },
    )
    print(f"saved {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()

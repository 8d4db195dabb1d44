"""Peak memory of the chunks stage against one big document (issue "Integrity", item 5).

Each size is one generated document: the Python standard library's sources concatenated into a single
file (a "code repository" dump), cut to N MB. For each size the documents and tokenizer artifacts are built
once (a byte-level BPE trained on 2 MB of it, adopted by every size); then the chunks stage runs in a fresh
subprocess per mode, on a private copy of that store, and its peak RSS is taken (the child's VmHWM, which
unlike ru_maxrss does not count the parent's pages at fork; psutil sampling beside it):

- `pieces`: the stage as configured (chunks.piece_bytes, default 256 KiB pieces),
- `whole`:  chunks.piece_bytes=null, every document encoded whole (the former behaviour of this code),
- `baseline` (with --baseline REF): the chunks stage of git commit REF, extracted with `git archive`.

The modes' artifacts are checked to be identical (tokens.npy, doc_index.parquet, the parts' rows).

    python -m bench.chunks_memory [--sizes 5 10 20 40] [--modes pieces whole] [--baseline REF]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, run_measured, save

CHILD = r"""
import json, resource, sys, time
from stages import config_from_dict
from pipeline.executor import build

def peak_mb():
    # VmHWM is this process image's own peak; ru_maxrss also counts the parent's pages at fork
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
art = build("chunks", config_from_dict(cfg))
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "maxrss_mb": peak_mb(), "stats": art.stats, "path": str(art.local_path(""))}))
"""


def code_dump(path: Path, mb: float) -> None:
    """The stdlib's .py files, concatenated (cycled if needed), as one document of `mb` megabytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    want = int(mb * 1_000_000)
    out: list[bytes] = []
    size = 0
    while size < want:
        for p in files:
            data = p.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            data = f"# ---- {p.relative_to(root)}\n".encode() + data.replace(b"\r\n", b"\n")
            out.append(data)
            size += len(data)
            if size >= want:
                break
    # cut at `want` bytes, not inside a character
    path.write_bytes(b"".join(out)[:want].decode("utf-8", errors="ignore").encode("utf-8"))


def config(root: Path, doc: Path, tok: Path | None, chunks: dict[str, Any]) -> dict[str, Any]:
    return {
        "artifacts_root": str(root),
        "documents": {"paths": [str(doc)], "min_chars": 0, "split_lists": {"train": [doc.name]}},
        "tokenizer": {"path": str(tok)} if tok else {"vocab_size": 8192, "max_train_chars": 2_000_000},
        "chunks": chunks,
    }


def digest(art_dir: Path) -> str:
    """Content of a chunks artifact: tokens.npy, doc_index.parquet and the parts' rows (not their bytes:
    row groups may be cut elsewhere for documents larger than a row group)."""
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    h.update((art_dir / "tokens.npy").read_bytes())
    h.update(pq.read_table(art_dir / "doc_index.parquet").to_pandas().to_csv().encode())
    for part in sorted(art_dir.glob("part-*.parquet")):
        t = pq.read_table(part)
        for col in t.column_names:
            h.update(str(t.column(col).to_pylist()).encode())
    return h.hexdigest()


def extract(ref: str, dest: Path) -> Path:
    """The tree of commit `ref` (python sources only), without touching the working tree or the index."""
    tar = dest / "src.tar"
    with tar.open("wb") as f:
        subprocess.run(["git", "archive", ref, "pipeline", "stages"], cwd=REPO, stdout=f, check=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[5, 10, 20, 40], help="document sizes, MB")
    ap.add_argument("--modes", nargs="+", default=["pieces", "whole"], choices=["pieces", "whole"])
    ap.add_argument("--baseline", default=None, help="also run the chunks stage of this git commit")
    ap.add_argument("--piece-bytes", type=int, default=None, help="chunks.piece_bytes for `pieces`")
    args = ap.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rpt-bench-chunks-") as tmp_s:
        tmp = Path(tmp_s)
        modes: list[tuple[str, dict[str, Any], Path]] = []
        for m in args.modes:
            chunks = {"piece_bytes": None} if m == "whole" else {}
            if m == "pieces" and args.piece_bytes:
                chunks["piece_bytes"] = args.piece_bytes
            modes.append((m, chunks, REPO))
        if args.baseline:
            base = tmp / "baseline"
            base.mkdir()
            modes.append((f"baseline {args.baseline}", {}, extract(args.baseline, base)))
        # one tokenizer for every size: trained on the smallest document's first 2 MB
        from pipeline.executor import build
        from stages import config_from_dict

        train_doc = tmp / "train" / "train.txt"
        train_doc.parent.mkdir()
        code_dump(train_doc, 2)
        tok_art = build(
            "tokenizer", config_from_dict(config(tmp / "tokstore", train_doc, None, {})), with_deps=True
        )
        tok_json = tmp / "tokenizer.json"
        shutil.copy(tok_art.local_path("tokenizer.json"), tok_json)
        for mb in args.sizes:
            doc = tmp / f"doc{mb:g}" / f"dump-{mb:g}mb.txt"
            doc.parent.mkdir()
            code_dump(doc, mb)
            store = tmp / f"store{mb:g}"
            build("tokenizer", config_from_dict(config(store, doc, tok_json, {})), with_deps=True)
            build("documents", config_from_dict(config(store, doc, tok_json, {})))
            digests = {}
            for name, chunks, cwd in modes:
                root = tmp / "run"
                shutil.rmtree(root, ignore_errors=True)
                for stage in ("documents", "tokenizer"):
                    shutil.copytree(store / stage, root / stage)
                cfg = config(root, doc, tok_json, chunks)
                r = run_measured([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=cwd)
                child = json.loads(r["output"].strip().splitlines()[-1])
                digests[name] = digest(Path(child["path"]))
                row = {
                    "mb": mb,
                    "mode": name,
                    "peak_rss_mb": round(r["peak_rss_mb"]),
                    "maxrss_mb": round(child["maxrss_mb"]),
                    "seconds": round(child["seconds"], 1),
                    "tokens": child["stats"]["tokens"],
                }
                results.append(row)
                print(
                    f"{mb:5g} MB  {name:22s} peak RSS {row['maxrss_mb']:6d} MB (sampled {row['peak_rss_mb']:6d})"
                    f"  {row['seconds']:6.1f} s  {row['tokens']:,} tokens",
                    flush=True,
                )
                shutil.rmtree(root, ignore_errors=True)
            if len(set(digests.values())) != 1:
                raise SystemExit(f"the modes' chunks differ at {mb:g} MB: {digests}")
    print()
    names = [m[0] for m in modes]
    print("peak RSS (MB) by document size; identical chunks in every mode")
    print(f"{'doc MB':>7s}  " + "  ".join(f"{n:>22s}" for n in names) + "  ratio to the first")
    for mb in args.sizes:
        rows = {r["mode"]: r for r in results if r["mb"] == mb}
        peaks = [rows[n]["maxrss_mb"] for n in names]
        ratios = "  ".join(f"{p / peaks[0]:.1f}x" for p in peaks[1:])
        print(f"{mb:7g}  " + "  ".join(f"{p:22d}" for p in peaks) + f"  {ratios}")
    if len(args.sizes) > 1:
        lo, hi = min(args.sizes), max(args.sizes)
        for n in names:
            a = next(r for r in results if r["mb"] == lo and r["mode"] == n)["maxrss_mb"]
            b = next(r for r in results if r["mb"] == hi and r["mode"] == n)["maxrss_mb"]
            print(f"{n}: {(b - a) / (hi - lo):.1f} MB of peak RSS per MB of document ({lo:g} -> {hi:g} MB)")
    path = save("chunks_memory", {"sizes_mb": args.sizes, "results": results})
    print(f"saved {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmarks: timing, peak memory of a subprocess, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def find_gutenberg() -> Path:
    """The shared books: $RPT_GUTENBERG, else `shared/corpora/gutenberg` beside this checkout or beside any
    folder above it (a clone at /work/ci/x/repo still finds /work/shared)."""
    if os.environ.get("RPT_GUTENBERG"):
        return Path(os.environ["RPT_GUTENBERG"]).resolve()
    for parent in REPO.parents:
        candidate = parent / "shared" / "corpora" / "gutenberg"
        if candidate.is_dir():
            return candidate.resolve()
    return (REPO.parent / "shared" / "corpora" / "gutenberg").resolve()  # named in the error of the users


GUTENBERG = find_gutenberg()
RESULTS = REPO / "bench" / "results"


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> dict[str, Any]:
    """Run a command; return wall seconds and the peak RSS of it and its children (sampled every 20 ms)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        sys.stderr.write(out)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak / 2**20, "output": out}


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path

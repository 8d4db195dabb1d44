"""What Prefect orchestration costs: a flow's DAG built by the plain executor (`rpt run --with-deps` for each
of the flow's targets) and by the flow (thread runner, and a Dask local cluster with two worker processes),
then rerun when everything is built (the executor's no-op vs the flow's cache hits). One Prefect server for
the whole benchmark, its start-up timed apart. Each build goes into a fresh store; the flows' files are
checked to be byte-identical to the executor's.

    python -m bench.flows [--config configs/demo.yaml] [--flow neighbors | --target chunks ...] [--repeat 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("RPT_PROGRESS", "0")

from app import flows  # first: it sets Prefect's environment before prefect is imported
from bench.common import REPO, save
from pipeline.executor import build
from pipeline.store import ArtifactStore
from stages import load_config


def digests(root: str, r: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f.path, f.sha256) for f in ArtifactStore(root).get(r["stage"], r["version"]).manifest.files]


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--flow", default="neighbors", help="the flow whose DAG is built (default: neighbors)")
    ap.add_argument("--target", action="append", help="instead of a flow: these stages (the `stages` flow)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    name, stages = ("stages", args.target) if args.target else (args.flow, None)
    targets = flows.flow_targets(name, stages=stages)
    logging.getLogger("prefect").setLevel(logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)

    rows: dict[str, list[float]] = {
        k: [] for k in ("executor", "flow_threads", "flow_dask2", "executor_rerun", "flow_rerun")
    }
    t0 = time.perf_counter()
    with flows.prefect_api():
        server_s = time.perf_counter() - t0
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="rpt-bench-flows-") as tmp:

                def cfg(store: str, **runner: Any) -> list[str]:  # overrides: own store, runner settings
                    return [f"artifacts_root={tmp}/{store}"] + [f"runner.{k}={v}" for k, v in runner.items()]

                def executor(run: Any) -> None:
                    for t in targets:
                        build(t.stage, run.with_section(t.stage, t.overrides_for(run)), with_deps=True)

                def flow(sets: list[str]) -> list[dict[str, Any]]:
                    if stages:
                        return flows.stages(stages, args.config, sets)
                    return flows.FLOWS[name](args.config, sets)

                ex = load_config(args.config, cfg("executor"))
                rows["executor"].append(timed(executor, ex))
                rows["executor_rerun"].append(timed(executor, ex))
                rows["flow_threads"].append(timed(flow, cfg("threads")))
                rows["flow_rerun"].append(timed(flow, cfg("threads")))
                rows["flow_dask2"].append(timed(flow, cfg("dask", kind="dask", workers=2)))
                for where in ("threads", "dask"):  # the same bytes as the executor's build
                    for r in flow(cfg(where)):
                        assert digests(f"{tmp}/{where}", r) == digests(f"{tmp}/executor", r), r["ref"]

    best = {k: min(v) for k, v in rows.items()}
    n_tasks = len(flows.resolve_targets(load_config(args.config), targets)[1])
    print(
        f"config {args.config}, flow {name} {stages or ''}, {n_tasks} artifacts, best of {args.repeat}; "
        f"Prefect server start {server_s:.1f} s (once)"
    )
    print(f"{'':22s}{'seconds':>9s}  {'vs executor':>11s}")
    for k in ("executor", "flow_threads", "flow_dask2"):
        print(f"{k:22s}{best[k]:9.2f}  {best[k] / best['executor']:10.2f}x")
    print(f"{'executor_rerun':22s}{best['executor_rerun']:9.2f}")
    print(
        f"{'flow_rerun (cached)':22s}{best['flow_rerun']:9.2f}  "
        f"({best['flow_rerun'] / n_tasks:.2f} s per cached stage)"
    )
    path = save(
        f"flows-{name}",
        {
            "config": args.config,
            "flow": name,
            "targets": [str(t) for t in targets],
            "server_start_s": server_s,
            "runs": rows,
            "best": best,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()

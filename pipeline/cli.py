"""The `rpt` command line: run stages, inspect and verify artifacts, run flows, print reports."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
import yaml

from pipeline.errors import RptError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
artifacts_app = typer.Typer(no_args_is_help=True, help="List, show and verify artifacts in the store.")
app.add_typer(artifacts_app, name="artifacts")

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="run config (YAML); default: all defaults")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a key: section.key=value (repeatable)")
]
RootOpt = Annotated[
    str | None,
    typer.Option("--root", help="artifact store root (default: from -c, RPT_ARTIFACTS or ./artifacts)"),
]
LogOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")]


def _setup(level: str) -> None:
    from pipeline.progress import setup_logging

    setup_logging(level)


def _load(config: str | None, sets: list[str] | None):  # -> RunConfigBase
    from pipeline.config import load_config

    return load_config(config, sets or [])


def _store(root: str | None, config: str | None):
    from pipeline.store import ArtifactStore

    if root:
        return ArtifactStore(root)
    return ArtifactStore(_load(config, None).root())


@app.command()
def run(
    stage: Annotated[str, typer.Argument(help="stage to build, e.g. chunks, bm25")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    with_deps: Annotated[
        bool, typer.Option("--with-deps", help="build missing upstream artifacts first")
    ] = False,
    log_level: LogOpt = "INFO",
) -> None:
    """Build one stage's artifact (a no-op that prints the existing version when it is up to date)."""
    from pipeline.executor import build

    _setup(log_level)
    cfg = _load(config, set_)
    art = build(stage, cfg, with_deps=with_deps)
    typer.echo(f"{art.ref}\t{art.path}\t{art.manifest.rows:,} rows")


@app.command()
def status(
    stage: Annotated[str, typer.Argument(help="stage whose dependency graph to show")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show the versions a config resolves to for a stage and its inputs, and which are built."""
    from pipeline.executor import resolve
    from pipeline.executor import status as dag_status

    node = resolve(stage, _load(config, set_))
    for ref, state in dag_status(node).items():
        typer.echo(f"{state:8s} {ref}")


@app.command()
def report(
    spec: Annotated[
        str, typer.Argument(help="evaluate artifact: evaluate (latest), evaluate@VERSION or @REF")
    ] = "evaluate",
    root: RootOpt = None,
    config: ConfigOpt = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print the artifact's report.md instead")
    ] = False,
) -> None:
    """Print the perplexity and retrieval tables of an evaluate artifact (default: the latest)."""
    from pipeline.report import REPORT_FILE, read_metrics, render_text

    store = _store(root, config)
    art = store.resolve(spec)
    metrics = read_metrics(art)
    if markdown:
        with art.fs.open(art.file(REPORT_FILE), "r") as f:
            typer.echo(f.read())
        return
    column = art.meta.get("paper_column", "PG19")
    docs, tokens = art.stats.get("docs"), art.stats.get("tokens")
    header = [
        f"{art.ref} ({art.manifest.created_at}): {docs} {art.meta.get('split', 'test')} document(s), "
        f"{tokens:,} tokens; paper column {column}"
        if tokens is not None
        else art.ref
    ]
    typer.echo(render_text(metrics, column, header))
    typer.echo(f"\nreport: {art.file(REPORT_FILE)}\nplots:  {art.file('plots')}/")


@app.command("flow")
def run_flow(
    name: Annotated[str, typer.Argument(help="neighbors, supervision, train, evaluate, full, or stages")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant", help="train/full: only these model variants (repeatable; default: all four)"
        ),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="stages flow: stages to build with their inputs (repeatable)"),
    ] = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Run a Prefect flow over the stage DAG (cached on artifact versions; tasks mapped over `runner.kind`).

    Without PREFECT_API_URL, Prefect starts a temporary local server for the run."""
    _setup(log_level)
    from flows import run_named

    report = run_named(
        name, config, list(set_ or []), list(variant or []) or None, list(target or []) or None
    )
    w = max((len(r["ref"]) for r in report), default=10)
    for r in report:
        typer.echo(f"{r['status']:7s} {r['ref']:{w}}  {r['rows']:>12,} rows  {r['path']}")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the full run config with every default filled in."""
    cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ------------------------------------------------------------------------------ artifacts


@artifacts_app.command("ls")
def artifacts_ls(
    stage: Annotated[str | None, typer.Argument(help="only this stage")] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List published artifacts (and unfinished partial builds)."""
    store = _store(root, config)
    stages = [stage] if stage else store.stages()
    rows = []
    for s in stages:
        refs: dict[str, str] = {}
        for n, v in store.refs(s).items():
            refs[v] = ",".join(filter(None, [refs.get(v, ""), n]))
        for m in store.versions(s):
            rows.append((m.ref, m.created_at, f"{m.rows:,}", refs.get(m.version, "")))
        for v in store.partials(s):
            rows.append((f"{s}@{v}", "(partial)", "", ""))
    if not rows:
        typer.echo(f"no artifacts under {store.uri}")
        return
    w = max(len(r[0]) for r in rows)
    typer.echo(f"{'ARTIFACT':{w}}  {'CREATED':25}  {'ROWS':>12}  REFS")
    for r in rows:
        typer.echo(f"{r[0]:{w}}  {r[1]:25}  {r[2]:>12}  {r[3]}")


def _lineage(store, ref: str, depth: int = 0, seen: set[str] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    stage, _, version = ref.partition("@")
    lines = []
    try:
        m = store.get(stage, version).manifest
    except RptError:
        return ["  " * depth + f"{ref} (missing)"]
    for role, inp in m.inputs.items():
        lines.append("  " * depth + f"{role}: {inp}")
        if inp not in seen:
            seen.add(inp)
            lines.extend(_lineage(store, inp, depth + 1, seen))
    return lines


@artifacts_app.command("show")
def artifacts_show(
    spec: Annotated[
        str, typer.Argument(help="STAGE, STAGE@VERSION (a unique prefix is enough) or STAGE@REF")
    ],
    rows: Annotated[int, typer.Option("--rows", "-n", help="first rows to print")] = 5,
    root: RootOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw manifest")] = False,
) -> None:
    """Manifest, schema, lineage and the first rows of an artifact."""
    store = _store(root, config)
    art = store.resolve(spec)
    m = art.manifest
    if as_json:
        typer.echo(m.to_json())
        return
    typer.echo(f"{m.ref}  (stage version {m.stage_version}, created {m.created_at})")
    typer.echo(f"path: {art.path}")
    typer.echo("lineage:")
    for line in _lineage(store, m.ref, 1) or ["  (no inputs)"]:
        typer.echo(line)
    typer.echo("config:\n" + _indent(yaml.safe_dump(m.config, sort_keys=False)))
    if m.meta:
        typer.echo("meta:\n" + _indent(yaml.safe_dump(m.meta, sort_keys=False)))
    typer.echo("stats:\n" + _indent(yaml.safe_dump(m.stats, sort_keys=False)))
    typer.echo("timings: " + json.dumps(m.timings))
    if m.arrow_schema:
        typer.echo("schema:\n" + _indent(m.arrow_schema.get("text", "")))
    typer.echo(f"files ({len(m.files)}):")
    for f in m.files[:20]:
        typer.echo(f"  {f.path}  {f.bytes:,} B" + (f"  {f.rows:,} rows" if f.rows is not None else ""))
    if len(m.files) > 20:
        typer.echo(f"  ... {len(m.files) - 20} more")
    if rows > 0 and art.parts():
        import polars as pl

        with pl.Config(tbl_cols=12, fmt_str_lengths=60, fmt_table_cell_list_len=6, tbl_width_chars=160):
            typer.echo(str(art.scan().head(rows).collect()))


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.rstrip().splitlines())


@artifacts_app.command("verify")
def artifacts_verify(
    spec: Annotated[str | None, typer.Argument(help="STAGE[@VERSION]; default: every artifact")] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Recompute every file's checksum against its manifest."""
    store = _store(root, config)
    if spec and "@" in spec:
        arts = [store.resolve(spec)]
    else:
        arts = [
            store.get(m.stage, m.version)
            for s in ([spec] if spec else store.stages())
            for m in store.versions(s)
        ]
    bad = 0
    for a in arts:
        problems = a.verify()
        bad += bool(problems)
        typer.echo(f"{'OK ' if not problems else 'BAD'} {a.ref}")
        for p in problems:
            typer.echo(f"    {p}")
    typer.echo(f"{len(arts) - bad} of {len(arts)} artifacts intact")
    if bad:
        raise typer.Exit(1)


@artifacts_app.command("ref")
def artifacts_ref(
    spec: Annotated[str, typer.Argument(help="STAGE@VERSION")],
    name: Annotated[str, typer.Argument(help="ref name, e.g. baseline-2026-11")],
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Point a named ref at a version."""
    store = _store(root, config)
    art = store.resolve(spec)
    store.set_ref(art.stage, name, art.version)
    typer.echo(f"{art.stage}@{name} -> {art.version}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except RptError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; finished shards are kept and a rerun resumes", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors in standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

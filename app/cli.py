"""The `rpt` command line: run stages, inspect and verify artifacts, run flows, print reports."""

from __future__ import annotations

import errno
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
artifacts_app = typer.Typer(
    no_args_is_help=True, help="List, show, verify, name, locate and remove artifacts in the store."
)
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
    from stages import load_config

    return load_config(config, sets or [])


def _store(root: str | None, config: str | None):
    from pipeline.store import ArtifactStore

    if root:
        return ArtifactStore(root)
    return ArtifactStore(_load(config, None).root())


def _artifact(spec: str, root: str | None, config: str | None, sets: list[str] | None):  # -> Artifact
    """The artifact a spec names. A bare STAGE given a config (-c or --set) is the version that config
    resolves to: `latest` is shared by every config writing to a store, so it may be another config's."""
    from pipeline.housekeeping import config_artifact

    stage, at, _ = spec.partition("@")
    if not at and (config or sets):
        return config_artifact(stage, _load(config, sets), root)
    return _store(root, config).resolve(spec)


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
        str,
        typer.Argument(
            help="evaluate artifact: evaluate (the config's with -c/--set, else latest), evaluate@VERSION or @REF"
        ),
    ] = "evaluate",
    root: RootOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print the artifact's report.md instead")
    ] = False,
) -> None:
    """Print the perplexity and retrieval tables of an evaluate artifact: the one the config (-c, --set)
    resolves to, else the latest."""
    from stages.evaluate.report import PLOTS_DIR, REPORT_FILE, read_metrics, render_text

    art = _artifact("evaluate" + spec if spec.startswith("@") else spec, root, config, set_)
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
    typer.echo(f"\nreport: {art.file(REPORT_FILE)}\nplots:  {art.file(PLOTS_DIR)}/")


@app.command("flow")
def run_flow(
    name: Annotated[
        str, typer.Argument(help="neighbors, supervision, train, evaluate, retrofit, full, or stages")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help="train: only these model variants (default: all four); full: train these too, beside "
            "evaluate.variants (repeatable)",
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
    from app.flows import run_named

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
    """List published artifacts with their size and refs, unfinished partial builds, and version folders
    whose manifest is missing or broken."""
    from pipeline import housekeeping as hk
    from pipeline.store import check_name

    store = _store(root, config)
    stages = [check_name("stage", stage)] if stage else hk.stages(store)
    rows, notes = [], []
    for s in stages:
        good, bad = hk.read_refs(store, s)
        notes.extend(f"warning: {p}" for p in bad)
        refs: dict[str, str] = {}
        for n, v in good.items():
            refs[v] = ",".join(filter(None, [refs.get(v, ""), n]))
        for e in hk.entries(store, s):
            if e.kind == hk.ARTIFACT and e.manifest is not None:
                m = e.manifest
                size = hk.human_size(e.manifest_bytes)
                rows.append((e.ref, m.created_at, f"{m.rows:,}", size, refs.get(e.name, "")))
            elif e.kind in (hk.BROKEN, hk.INCOMPLETE, hk.PARTIAL):
                what = {hk.BROKEN: "(bad manifest)", hk.INCOMPLETE: "(no manifest)", hk.PARTIAL: "(partial)"}
                size = hk.human_size(hk.tree_info(store, e.path)[0])
                rows.append((e.ref, what[e.kind], "", size, refs.get(e.name, "") if e.version else ""))
                if e.kind == hk.BROKEN:
                    notes.append(
                        f"warning: {e.ref}: {e.problem}; it is not an artifact until rebuilt "
                        f"(`rpt artifacts rm {e.ref}` removes it)"
                    )
                elif e.kind == hk.INCOMPLETE:
                    notes.append(
                        f"note: {e.ref}: no manifest: an interrupted publish, or one in progress "
                        "(`rpt artifacts gc` removes it once stale)"
                    )
    if not rows:
        typer.echo(f"no artifacts under {store.uri}")
    else:
        w = max(len(r[0]) for r in rows)
        typer.echo(f"{'ARTIFACT':{w}}  {'CREATED':25}  {'ROWS':>12}  {'SIZE':>10}  REFS")
        for r in rows:
            typer.echo(f"{r[0]:{w}}  {r[1]:25}  {r[2]:>12}  {r[3]:>10}  {r[4]}")
    for n in notes:
        typer.echo(n, err=True)


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
        str,
        typer.Argument(
            help="STAGE (the config's, else latest), STAGE@VERSION (a unique prefix) or STAGE@REF"
        ),
    ],
    rows: Annotated[int, typer.Option("--rows", "-n", help="first rows to print")] = 5,
    root: RootOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw manifest")] = False,
) -> None:
    """Manifest, schema, lineage and the first rows of an artifact (a bare STAGE with -c/--set: the
    version that config resolves to; without: latest)."""
    art = _artifact(spec, root, config, set_)
    store = art.store
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
    """Recompute every file's checksum against its manifest; exit status 1 when anything is wrong.

    A version folder with an unreadable manifest, and a ref that holds no version, count as bad."""
    from pipeline import housekeeping as hk
    from pipeline.store import Artifact, check_name

    store = _store(root, config)
    explicit = bool(spec and "@" in spec)
    bad_refs: list[str] = []
    if explicit:
        targets = [hk.find_version(store, spec or "")]
    else:
        stages = [check_name("stage", spec)] if spec else hk.stages(store)
        targets = [e for s in stages for e in hk.entries(store, s) if e.kind in hk.VERSION_KINDS]
        bad_refs = [p for s in stages for p in hk.read_refs(store, s)[1]]
    bad = checked = 0
    for e in targets:
        if e.kind == hk.INCOMPLETE and not explicit:
            # On an object store a publish in progress looks like this: not an artifact, not an error.
            typer.echo(f"--  {e.ref}: no manifest (not an artifact: an interrupted or running publish)")
            continue
        checked += 1
        if e.kind == hk.ARTIFACT and e.manifest is not None:
            problems = Artifact(store, e.manifest).verify()
        else:
            problems = [f"{e.ref}: {e.problem}"]
        bad += bool(problems)
        typer.echo(f"{'OK ' if not problems else 'BAD'} {e.ref}")
        for p in problems:
            typer.echo(f"    {p}")
    for p in bad_refs:
        typer.echo(f"BAD {p}")
    typer.echo(
        f"{checked - bad} of {checked} artifacts intact"
        + (f"; {len(bad_refs)} bad ref(s)" if bad_refs else "")
    )
    if bad or bad_refs:
        raise typer.Exit(1)


@artifacts_app.command("ref")
def artifacts_ref(
    spec: Annotated[str, typer.Argument(help="STAGE@VERSION, or STAGE with -c: the config's version")],
    name: Annotated[str, typer.Argument(help="ref name, e.g. baseline-2026-11")],
    root: RootOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Point a named ref at a version (named refs are kept by `rpt artifacts gc`)."""
    from pipeline.store import check_name

    check_name("ref name", name)
    art = _artifact(spec, root, config, set_)
    art.store.set_ref(art.stage, name, art.version)
    typer.echo(f"{art.stage}@{name} -> {art.version}")


@artifacts_app.command("path")
def artifacts_path(
    spec: Annotated[str, typer.Argument(help="STAGE (the version the config resolves to) or STAGE@VERSION")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Print the folder (or URI) of the artifact a config resolves a stage to; an error when it is not built."""
    from pipeline.housekeeping import config_artifact, uri

    if "@" in spec:
        art = _store(root, config).resolve(spec)
    else:
        art = config_artifact(spec, _load(config, set_), root)
    typer.echo(uri(art.store, art.path))


@artifacts_app.command("rm")
def artifacts_rm(
    spec: Annotated[str, typer.Argument(help="STAGE@VERSION (a unique prefix or a ref name is enough)")],
    force: Annotated[
        bool, typer.Option("--force", help="remove it even when other artifacts name it as an input")
    ] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Remove one artifact version and the refs that point to it."""
    from pipeline.housekeeping import human_size, remove_version

    store = _store(root, config)
    e, size, refs = remove_version(store, spec, force=force)
    dropped = f"; removed ref(s) {', '.join(refs)}" if refs else ""
    typer.echo(f"removed {e.ref} ({human_size(size)}){dropped}")


@artifacts_app.command("gc")
def artifacts_gc(
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config", "-c", help="keep what this config resolves to, with its lineage (repeatable)"
        ),
    ] = None,
    root: RootOpt = None,
    yes: Annotated[
        bool, typer.Option("--yes", "--apply", help="delete; without it gc only prints what it would remove")
    ] = False,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="debris (partial builds of versions nothing keeps, folders without a valid manifest) goes "
            "once unchanged this long (30m, 6h, 2d); 0: all of it, when no build is running",
        ),
    ] = "24h",
    keep_latest: Annotated[
        bool, typer.Option("--keep-latest/--no-keep-latest", help="keep the targets of the `latest` refs")
    ] = True,
) -> None:
    """Remove artifacts that no named ref, no given config and no kept artifact's lineage needs, and
    stale debris. A dry run unless --yes."""
    from pipeline import housekeeping as hk
    from pipeline.errors import ConfigError
    from pipeline.store import ArtifactStore

    age = hk.parse_age(older_than)
    runs = [(c, _load(c, None)) for c in config or []]
    if root:
        store = ArtifactStore(root)
    else:
        roots = {r.root() for _, r in runs} or {_load(None, None).root()}
        if len(roots) > 1:
            raise ConfigError(
                f"the configs given write to different stores ({', '.join(sorted(roots))}): "
                "collect one store at a time with --root"
            )
        store = ArtifactStore(roots.pop())
    plan = hk.plan_gc(store, runs, older_than=age, keep_latest=keep_latest)
    for p in plan.bad_refs:
        typer.echo(f"warning: {p}", err=True)
    if plan.bad_refs and yes:
        raise ConfigError(
            "gc cannot tell what the refs above keep, so it removes nothing: fix or delete them first"
        )
    w = max([len(r) for r in plan.keep] + [len(i.entry.label) for i in plan.remove + plan.spared] + [8])
    for ref, why in sorted(plan.keep.items()):
        typer.echo(f"keep    {ref:{w}}  {'':>10}  {why}")
    for i in plan.spared:
        typer.echo(f"spare   {i.entry.label:{w}}  {hk.human_size(i.bytes):>10}  {i.why}")
    for i in plan.remove:
        typer.echo(f"remove  {i.entry.label:{w}}  {hk.human_size(i.bytes):>10}  {i.why}")
    for stage, name, v in plan.drop_refs:
        typer.echo(f"remove  {stage + '@' + name:{w}}  {'':>10}  ref to {stage}@{v}, which is removed")
    if yes:
        n_spared = len(plan.spared)
        hk.apply_gc(store, plan)
        for i in plan.spared[n_spared:]:  # re-checked at removal and left alone after all
            typer.echo(f"spare   {i.entry.label:{w}}  {hk.human_size(i.bytes):>10}  {i.why}")
        typer.echo(f"removed {len(plan.remove)} item(s), {hk.human_size(plan.total)} freed under {store.uri}")
    else:
        typer.echo(
            f"would remove {len(plan.remove)} item(s), {hk.human_size(plan.total)} under {store.uri} "
            "(a dry run: add --yes to delete)"
        )


_INTERRUPTED = "interrupted; finished shards are kept and a rerun resumes"


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except RptError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(_INTERRUPTED, err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # A read-only store (or corpus folder): one line naming the path, not a traceback.
        typer.echo(
            f"error: {e.filename or 'a file'}: {e.strerror}. If that path is in the artifact store, make the "
            "store writable or point artifacts_root (or RPT_ARTIFACTS, or --root) at a writable folder",
            err=True,
        )
        sys.exit(2)
    except Exception as e:  # usage errors, which standalone_mode=False raises instead of printing
        import click

        # Recent typer vendors its own copy of click, whose exceptions are not click's: check both.
        usage = (click.exceptions.ClickException, getattr(typer, "TyperException", click.ClickException))
        if isinstance(e, usage) and hasattr(e, "show"):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        if isinstance(e, click.exceptions.Abort | typer.Abort):
            sys.exit(1)
        if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):
            # credentials, endpoint or bucket problems of an s3:// store: the store, not our code
            typer.echo(
                f"error: the object store refused or could not be reached: {type(e).__name__}: {e}. "
                "Check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile), the endpoint "
                "(AWS_ENDPOINT_URL) and the bucket of artifacts_root",
                err=True,
            )
            sys.exit(2)
        raise
    # In standalone_mode=False click *returns* the code of a typer.Exit (and typer turns Ctrl-C into
    # Exit(130)) instead of raising it: without this every failing command would exit 0.
    if rc == 130:
        typer.echo(_INTERRUPTED, err=True)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()

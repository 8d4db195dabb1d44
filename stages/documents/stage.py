"""Stage `documents`: raw corpus files (or the embedded stdlib corpus) -> one row per document.

Shards are groups of input files (or stdlib packages). Each shard numbers its documents locally;
finalize turns those into a dense global `doc_idx` in shard order, so the result does not depend
on how many workers ran the shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.errors import ConfigError, InputError
from pipeline.formats import DOCUMENTS_SCHEMA, SPLITS
from pipeline.parquet import coalesce, iter_row_groups
from pipeline.stage import Shard, ShardResult, Stage, StageContext, merge_stats
from pipeline.versioning import file_digest, sha256_file
from stages.documents.config import Config
from stages.documents.discovery import InputFile, discover
from stages.documents.readers import RawDoc, Skip, iter_file
from stages.documents.recurrences import insert_recurrences
from stages.documents.stdlib_corpus import read_stdlib_unit, stdlib_doc_bytes, stdlib_root, stdlib_units

log = logging.getLogger("rpt.documents")

SCHEMA = DOCUMENTS_SCHEMA
# skipped inputs listed by file and line in the manifest stats (the counts are complete)
MAX_SKIP_EXAMPLES = 50
# documents are written in batches of about this much text (a row group each): memory stays bounded
BATCH_CHARS = 32 << 20


def assign_split(doc_id: str, cfg: Config, listed: dict[str, str]) -> str:
    if cfg.split_lists:
        return listed.get(doc_id, "train")
    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < cfg.splits.train:
        return "train"
    if u < cfg.splits.train + cfg.splits.valid:
        return "valid"
    return "test"


class DocumentsStage(Stage):
    name = "documents"
    version = 1
    Config = Config
    description = "ingest corpus files into one Parquet row per document"
    preferred_runner = "processes"

    # ------------------------------------------------------------------ units of work
    def _units(self, cfg: Config) -> list[dict[str, Any]]:
        if not cfg.paths:
            units = stdlib_units(cfg.stdlib_include, cfg.stdlib_exclude)
            if not units:
                raise ConfigError(
                    "documents: the embedded stdlib corpus is empty with this stdlib_include/stdlib_exclude"
                )
            return [{"stdlib": name, "bytes": stdlib_doc_bytes(files)} for name, files in units]
        files, ignored, unreadable = discover(cfg.paths, cfg.on_error)
        if ignored:
            log.info("documents: ignoring %d files of unsupported types (e.g. %s)", len(ignored), ignored[0])
        if not files:
            raise InputError(
                "no supported files (.txt, .txt.gz, .jsonl(.gz), .parquet) found", path=", ".join(cfg.paths)
            )
        units = [{"path": f.path, "rel": f.rel, "bytes": os.path.getsize(f.path)} for f in files]
        # unreadable files (on_error=skip) travel as units so that a shard counts them in the stats
        units += [{"skip": why, "path": f.path, "rel": f.rel, "bytes": 0} for f, why in unreadable]
        return units

    def fingerprint(self, cfg: Config) -> Any:
        units = self._units(cfg)
        if not cfg.paths:
            root = stdlib_root()
            files = {name: files for name, files in stdlib_units(cfg.stdlib_include, cfg.stdlib_exclude)}
            return {
                "corpus": "stdlib",
                "python": sys.version.split()[0],
                "files": [
                    [p.relative_to(root).as_posix(), file_digest(p)]
                    for u in units
                    for p in files[u["stdlib"]]
                ],
            }

        def ident(u: dict[str, Any]) -> Any:
            if "skip" in u:
                return "unreadable"
            return u["bytes"] if cfg.fingerprint == "size" else file_digest(u["path"])

        return {"files": [[u["rel"], ident(u)] for u in units]}

    # ------------------------------------------------------------------ shards
    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        groups: list[list[dict[str, Any]]] = [[]]
        size = 0
        # each file travels with the identity its version was computed from; the shard checks it after
        # reading (a file replaced between resolving and reading would put new text under the old version)
        expected = dict(map(tuple, ctx.fingerprint.get("files", []))) if cfg.paths and ctx.fingerprint else {}
        units = self._units(cfg)
        if expected:
            now = {u["rel"] for u in units}
            added, removed = sorted(now - set(expected)), sorted(set(expected) - now)
            if added or removed:
                raise InputError(
                    "the corpus changed between computing the artifact's version and reading it ("
                    + ", ".join(
                        f"{what}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                        for what, names in (("added", added), ("removed", removed))
                        if names
                    )
                    + "); nothing was published: rerun the build once the corpus is settled",
                    path=", ".join(cfg.paths),
                )
        for u in units:
            if u.get("rel") in expected:
                u["expect"] = expected[u["rel"]]
            if groups[-1] and size + u["bytes"] > cfg.shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append({k: v for k, v in u.items() if k != "bytes"})
            size += u["bytes"]
        return [Shard(i, len(groups), {"units": g}) for i, g in enumerate(groups)]

    def _docs(self, cfg: Config, units: list[dict[str, Any]]) -> Any:
        if not cfg.paths:
            table = dict(stdlib_units(cfg.stdlib_include, cfg.stdlib_exclude))
            for u in units:
                yield read_stdlib_unit(u["stdlib"], table[u["stdlib"]])
            return
        for u in units:
            if "skip" in u:
                yield Skip("unreadable", u["skip"], u["path"])
                continue
            yield from iter_file(
                InputFile(u["path"], u["rel"]),
                cfg.text_field,
                cfg.id_field,
                cfg.title_field,
                cfg.strip_gutenberg,
            )
            if "expect" in u:
                check_unchanged(u["path"], u["expect"])

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        listed = {d: s for s, ids in cfg.split_lists.items() for d in ids}
        skipped: Counter[str] = Counter()
        examples: list[dict[str, Any]] = []
        encodings: Counter[str] = Counter()
        splits: Counter[str] = Counter()
        totals = {"docs": 0, "chars": 0, "dropped_short": 0, "dropped_short_chars": 0, "stripped": 0}

        def batches() -> Iterator[pa.Table]:
            # streamed: at most one batch of documents (BATCH_CHARS of text) is in memory at a time,
            # however large a single input file is
            cols: dict[str, list[Any]] = {n: [] for n in SCHEMA.names}
            chars = 0
            for item in self._docs(cfg, shard.payload["units"]):
                if isinstance(item, Skip):
                    if cfg.on_error == "raise":
                        raise item.as_error()
                    where = f", line {item.line}" if item.line else ""
                    log.warning("skipping %s%s: %s", item.path, where, item)
                    skipped[item.reason] += 1
                    if len(examples) < MAX_SKIP_EXAMPLES:
                        examples.append(
                            {"file": item.path, "line": item.line, "reason": item.reason, "error": str(item)}
                        )
                    continue
                doc: RawDoc = item
                if len(doc.text) < cfg.min_chars:
                    totals["dropped_short"] += 1
                    totals["dropped_short_chars"] += len(doc.text)
                    continue
                split = assign_split(doc.doc_id, cfg, listed)
                encodings[doc.encoding] += 1
                totals["stripped"] += doc.gutenberg
                splits[split] += 1
                cols["doc_id"].append(doc.doc_id)
                cols["doc_idx"].append(totals["docs"])  # local; made global in finalize
                cols["split"].append(split)
                cols["source"].append(doc.source)
                cols["title"].append(doc.title)
                cols["text"].append(doc.text)
                cols["n_chars"].append(len(doc.text))
                totals["docs"] += 1
                totals["chars"] += len(doc.text)
                chars += len(doc.text)
                if chars >= BATCH_CHARS:
                    yield pa.table(cols, schema=SCHEMA)
                    cols = {n: [] for n in SCHEMA.names}
                    chars = 0
            if cols["doc_id"]:  # (no documents at all: write_parquet writes the schema alone)
                yield pa.table(cols, schema=SCHEMA)

        ctx.write_parquet(f"_local/docs-{shard.name}.parquet", batches(), schema=SCHEMA)
        return {
            "docs": totals["docs"],
            "chars": totals["chars"],
            "dropped_short": totals["dropped_short"],
            "dropped_short_chars": totals["dropped_short_chars"],
            "skipped": dict(skipped),
            "skipped_examples": examples,
            "encodings": dict(encodings),
            "splits": dict(splits),
            "gutenberg_stripped": totals["stripped"],
        }

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        seen: dict[str, int] = {}
        by_text: dict[bytes, str] = {}  # text digest -> the first doc_id holding that text
        dropped: Counter[str] = Counter()
        dropped_chars = 0
        inserted = {"recurrences": 0, "recurrence_chars": 0}
        n_kept = 0
        n_same_text = 0
        for r in results:
            local = f"_local/docs-{r.index:05d}.parquet"

            def renumbered(local: str = local) -> Iterator[pa.Table]:
                # one row group in memory at a time; doc_idx is made global (and dense after drops)
                nonlocal n_kept, n_same_text, dropped_chars
                for t in iter_row_groups(ctx.path(local), ctx.fs):
                    keep: list[bool] = []
                    for d, text, split in zip(
                        t.column("doc_id").to_pylist(),
                        t.column("text").to_pylist(),
                        t.column("split").to_pylist(),
                    ):
                        if d in seen:
                            raise InputError(
                                f"duplicate doc_id '{d}' (documents {seen[d]} and {n_kept}); "
                                "doc ids must be unique: set documents.id_field or rename the files"
                            )
                        digest = hashlib.blake2b(
                            text.encode("utf-8", "surrogatepass"), digest_size=16
                        ).digest()
                        first = by_text.setdefault(digest, d)
                        if first != d:
                            n_same_text += 1
                            if cfg.duplicates == "raise":
                                raise InputError(
                                    f"documents '{first}' and '{d}' have the same text (a copy in two places "
                                    "can leak between splits); remove one, or set documents.duplicates=drop "
                                    "(keep the first) or =keep"
                                )
                            if cfg.duplicates == "drop":
                                dropped[split] += 1
                                dropped_chars += len(text)
                                keep.append(False)
                                continue
                        seen[d] = n_kept
                        n_kept += 1
                        keep.append(True)
                    t = t.filter(pa.array(keep, pa.bool_()))
                    idx = pa.array(range(n_kept - t.num_rows, n_kept), pa.int64())
                    yield with_recurrences(t.set_column(1, "doc_idx", idx))

            def with_recurrences(t: pa.Table) -> pa.Table:
                # after the duplicate check, which must compare the texts as read
                if not cfg.recurrences.every_lines:
                    return t
                texts = t.column("text").to_pylist()
                for k, (d, split) in enumerate(
                    zip(t.column("doc_id").to_pylist(), t.column("split").to_pylist())
                ):
                    if split == "train":
                        texts[k], done = insert_recurrences(texts[k], d, cfg.recurrences)
                        inserted["recurrences"] += done.copies
                        inserted["recurrence_chars"] += done.chars
                t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
                n_chars = pa.array([len(x) for x in texts], pa.int64())
                return t.set_column(t.schema.get_field_index("n_chars"), "n_chars", n_chars)

            ctx.write_parquet(f"part-{r.index:05d}.parquet", coalesce(renumbered()), schema=SCHEMA)
        offset = n_kept
        ctx.fs.rm(ctx.path("_local"), recursive=True)
        missing = sorted({d for ids in cfg.split_lists.values() for d in ids} - set(seen))
        if missing:
            raise ConfigError(
                f"documents.split_lists names doc_ids not in the corpus: {', '.join(missing[:10])}"
                + (" ..." if len(missing) > 10 else "")
            )
        stats = merge_stats(r.stats for r in results)
        stats["same_text"] = n_same_text
        stats.update(inserted)
        stats["chars"] += inserted["recurrence_chars"]
        if dropped:
            stats["dropped_duplicates"] = sum(dropped.values())
            stats["docs"] -= sum(dropped.values())
            stats["chars"] -= dropped_chars
            stats["splits"] = {k: v - dropped[k] for k, v in stats["splits"].items() if v - dropped[k]}
        stats["skipped_examples"] = [e for r in results for e in r.stats.get("skipped_examples", [])][
            :MAX_SKIP_EXAMPLES
        ]
        for s in SPLITS:
            frac = (
                getattr(cfg.splits, s)
                if not cfg.split_lists
                else (1.0 if s == "train" else len(cfg.split_lists.get(s, [])))
            )
            if frac and not stats.get("splits", {}).get(s):
                log.warning("documents: split '%s' is empty; set documents.split_lists or more documents", s)
        if offset == 0:
            raise InputError(
                "no documents left after filtering (all shorter than documents.min_chars "
                f"= {cfg.min_chars} or skipped)",
                path=", ".join(cfg.paths) or "stdlib",
            )
        return stats

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        return {"corpus": "stdlib" if not cfg.paths else "files", "paths": cfg.paths}

    def output_schema(self) -> pa.Schema:
        return SCHEMA


def check_unchanged(path: str, expect: str | int) -> None:
    """After reading `path`: its content (or size, with documents.fingerprint=size) is still what the
    artifact's version was computed from. Not memoised: a replaced file may keep its size and mtime."""
    now: str | int = sha256_file(path) if isinstance(expect, str) else os.path.getsize(path)
    if now != expect:
        raise InputError(
            "changed while the documents stage was reading it (the artifact's version was computed from "
            "its earlier content); nothing was published: rerun the build once the corpus is settled",
            path=path,
        )


STAGE = DocumentsStage()

"""Tables and the paper's ordering for an evaluate artifact (`report.md` and `rpt report`).

Everything here reads the evaluate artifact's metrics.parquet (`pipeline.formats.EVAL_METRICS_SCHEMA`,
one row per table x model x setting x neighbors x metric), so the stage's report.md and the terminal
output of `rpt report` are the same tables. The paper's numbers are in paper.py, the plots in plots.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError
from stages.evaluate.paper import PAPER_PERPLEXITY, PAPER_RETRIEVAL, PAPER_RETRIEVAL_METRICS
from stages.evaluate.repeats import REPEAT_NGRAM
from stages.reference.stage import COPY_GAIN_MIN

METRICS_FILE = "metrics.parquet"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

MODEL_NAMES = {
    "baseline": "Transformer-XL (baseline)",
    "retro_bm25": "RETRO w. BM25",
    "rpt_lex": "RPT-Lex",
    "rpt_sem": "RPT-Sem",
}
RETRIEVER_NAMES = {
    "bm25": "BM25 (query = chunk)",
    "dense": "Dense (frozen encoder)",
    "rpt_lex": "RPT-Lex retriever",
    "rpt_sem": "RPT-Sem retriever",
    "gold": "Gold (top positive)",
    "random": "Random ranking (expected)",
}
METRIC_NAMES = {"precision": "P", "recall": "R", "ndcg": "nDCG"}


# ------------------------------------------------------------------------------------------ metrics rows
class Metrics:
    """Lookup over metrics.parquet rows: value(table, model, setting, neighbors, metric)."""

    def __init__(self, rows: Iterable[Mapping[str, Any]]):
        self.rows = [dict(r) for r in rows]
        self._by = {(r["table"], r["model"], r["setting"], r["neighbors"], r["metric"]): r for r in self.rows}

    def value(self, table: str, model: str, setting: str, neighbors: int | None, metric: str) -> float | None:
        r = self._by.get((table, model, setting, neighbors, metric))
        return None if r is None else r["value"]

    def count(self, table: str, model: str, setting: str, neighbors: int | None, metric: str) -> int | None:
        r = self._by.get((table, model, setting, neighbors, metric))
        return None if r is None else r["count"]

    def select(self, table: str, **eq: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["table"] == table and all(r[k] == v for k, v in eq.items())]

    def models(self, table: str) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            if r["table"] == table:
                seen.setdefault(r["model"], None)
        return list(seen)


def read_metrics(art: Any) -> Metrics:
    """The metrics of an evaluate artifact (`pipeline.store.Artifact`)."""
    if art.stage != "evaluate":
        raise ArtifactError(f"{art.ref} is not an evaluate artifact; `rpt report` reads evaluate@VERSION")
    if not art.has(METRICS_FILE):
        raise ArtifactError(f"{art.ref} has no {METRICS_FILE}; rebuild it with `rpt run evaluate`")
    return Metrics(art.read_file(METRICS_FILE).to_pylist())


# ------------------------------------------------------------------------------------------ tables
@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def _pct(v: float | None) -> str:
    return "—" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _rel(v: float | None, base: float | None) -> str:
    if v is None or base is None or math.isnan(v) or math.isnan(base) or base == 0:
        return "—"
    return f"{100 * (v / base - 1):+.1f}%"


def perplexity_table(m: Metrics, column: str) -> Table:
    """Table 2: every (variant, setting, neighbors) row we measured, beside the paper's number."""
    paper = PAPER_PERPLEXITY[column]
    base = m.value("perplexity", "baseline", "none", 0, "perplexity")
    paper_base = paper[("baseline", "none", 0)]
    # the paper's order: own neighbors by variant, then the oracle rows
    rows = sorted(
        m.select("perplexity", metric="perplexity"),
        key=lambda r: (
            r["setting"] == "oracle",
            list(MODEL_NAMES).index(r["model"]) if r["model"] in MODEL_NAMES else 9,
            r["setting"] != "empty",
            r["neighbors"] or 0,
        ),
    )
    out = []
    for r in rows:
        key = (r["model"], r["setting"], r["neighbors"])
        suffix = {"oracle": " w. Oracle", "empty": ", no neighbors (ablation)"}.get(r["setting"], "")
        name = MODEL_NAMES.get(r["model"], r["model"]) + suffix
        p = paper.get(key)
        out.append(
            [
                name,
                str(r["neighbors"]) if r["neighbors"] else "—",
                r["setting"],
                _num(r["value"]),
                _rel(r["value"], base) if r["model"] != "baseline" else "",
                _num(p),
                _rel(p, paper_base) if p is not None and r["model"] != "baseline" else "",
            ]
        )
    tokens = m.count("perplexity", "baseline", "none", 0, "perplexity")
    if tokens is None and rows:
        tokens = rows[0]["count"]
    notes = [
        f"Perplexity = exp(mean token NLL) over the same {tokens:,} test tokens for every row."
        if tokens
        else "No perplexity rows.",
        f"Paper: Rubin & Berant, Table 2, {column} column (arXiv v2); 2 neighbours unless stated. "
        "The percentages are changes against the baseline row of the same column.",
    ]
    return Table(
        "Test perplexity (paper Table 2)",
        ["model", "neighbors", "neighbor source", "ours", "vs baseline", f"paper ({column})", "paper vs TXL"],
        out,
        notes,
    )


def retrieval_table(m: Metrics, column: str) -> Table:
    """Table 3: every retriever's ranking metrics beside the paper's (in percent)."""
    metrics: list[str] = []
    for r in m.select("retrieval"):
        if r["metric"] not in metrics:
            metrics.append(r["metric"])
    paper = PAPER_RETRIEVAL[column]
    headers = ["retriever"]
    for met in metrics:
        kind, _, k = met.partition("@")
        label = f"{METRIC_NAMES.get(kind, kind)}@{k}"
        headers.append(label)
        if met in PAPER_RETRIEVAL_METRICS:
            headers.append(f"{label} paper")
    rows = []
    queries = None
    for model in m.models("retrieval"):
        row = [RETRIEVER_NAMES.get(model, model)]
        for met in metrics:
            v = m.value("retrieval", model, "gold", None, met)
            queries = queries or m.count("retrieval", model, "gold", None, met)
            row.append(_pct(v))
            if met in PAPER_RETRIEVAL_METRICS:
                p = paper.get(model)
                row.append("—" if p is None else f"{p[PAPER_RETRIEVAL_METRICS.index(met)]:.0f}")
        rows.append(row)
    notes = [
        f"Percent, averaged over {queries or 0:,} test query chunks that have at least one gold chunk "
        "(a scored candidate with delta > 0); nDCG is graded by delta (linear gain).",
        f"Paper: Table 3, {column} column (the paper has no dense-retriever column).",
    ]
    gain = m.value("scorer", "reference", "copy", None, "copy_gain")
    if gain is not None:
        first = m.value("scorer", "reference", "copy", None, "copy_first_nll")
        repeat = m.value("scorer", "reference", "copy", None, "copy_repeat_nll")
        verdict = (
            "it copies in context"
            if gain >= COPY_GAIN_MIN
            else "it does not copy in context, so this gold cannot single out the chunk that holds a "
            "continuation (docs/supervision.md)"
        )
        lm_gain = m.value("scorer", "reference", "copy", None, "copy_gain_lm")
        scorer = (
            "The scoring LM"
            if lm_gain is None
            else "The scoring LM with its copy cache (reference.copy_weight)"
        )
        notes.append(
            f"{scorer} on a passage repeated one chunk back: NLL {repeat:.2f} against {first:.2f} where it "
            f"first occurs (gain {gain:.2f} nats): {verdict}."
            + ("" if lm_gain is None else f" The LM alone gains {lm_gain:.2f} nats.")
        )
    return Table("Retrieval against the scoring LM's gold (paper Table 3)", headers, rows, notes)


def overlap_table(m: Metrics) -> Table:
    rows = []
    for model in m.models("overlap"):
        v = {
            met: m.value("overlap", model, "top-1", None, met)
            for met in ("query_tokens", "query_fraction", "target_tokens", "target_fraction")
        }
        rows.append(
            [
                RETRIEVER_NAMES.get(model, model),
                f"{_num(v['query_tokens'], 1)} ({_pct(v['query_fraction'])}%)",
                f"{_num(v['target_tokens'], 1)} ({_pct(v['target_fraction'])}%)",
            ]
        )
    notes = [
        "Distinct token ids of the query chunk c_i (target chunk c_i+1) that also occur in the best "
        "retrieved neighbor (chunk c_j with its continuation c_j+1), mean over the Table 3 queries; "
        "in brackets as a share of the chunk's distinct ids.",
        "Paper (Fig. 4): RPT-Sem's best neighbor overlaps the target more than RPT-Lex's; BM25 overlaps the "
        "query most but not the target.",
    ]
    return Table(
        "Token overlap of the best neighbor (paper Fig. 4)",
        ["retriever", "with query", "with target"],
        rows,
        notes,
    )


def training_table(m: Metrics) -> Table:
    rows = []
    for model in m.models("training"):
        g = lambda met, model=model: m.value("training", model, "final", None, met)  # noqa: E731
        rows.append(
            [
                MODEL_NAMES.get(model, model),
                _num(g("steps"), 0),
                _num(g("tokens"), 0),
                _num(g("params"), 0),
                _num(g("final_lm_loss"), 3),
                _num(g("train_s"), 0),
            ]
        )
    steps = {r["value"] for r in m.select("training", metric="steps")}
    tokens = {r["value"] for r in m.select("training", metric="tokens")}
    notes = [
        "Every variant trained for the same steps and tokens."
        if len(steps) <= 1 and len(tokens) <= 1
        else "WARNING: the variants trained for different steps or tokens; the comparison is not even."
    ]
    return Table(
        "Training (one train artifact per variant)",
        ["model", "steps", "tokens", "params", "final LM loss", "train s"],
        rows,
        notes,
    )


def use_table(m: Metrics) -> Table:
    """Does each variant use what it retrieves? Test NLL with its own neighbors minus with none (the
    `empty` ablation) and minus the baseline, with 95% bootstrap intervals, beside the diagnostics at
    the end of training (means over the last quarter of the logged steps)."""
    rows = []
    for model in m.models("use"):
        ks = sorted({r["neighbors"] for r in m.select("use", model=model)})
        for k in ks:
            setting = next(r["setting"] for r in m.select("use", model=model, neighbors=k))

            def delta(ref: str, k: int = k, model: str = model, setting: str = setting) -> str:
                v = m.value("use", model, setting, k, f"nll_minus_{ref}")
                lo = m.value("use", model, setting, k, f"nll_minus_{ref}_ci_low")
                hi = m.value("use", model, setting, k, f"nll_minus_{ref}_ci_high")
                return "" if v is None else f"{v:+.4f} [{lo:+.4f}, {hi:+.4f}]"

            t = lambda met, i=None, model=model: m.value("training", model, "final", i, met)  # noqa: E731
            ratios = [r["value"] for r in m.select("training", model=model, metric="train_cca_ratio")]
            rows.append(
                [
                    MODEL_NAMES.get(model, model),
                    str(k),
                    delta("empty"),
                    delta("baseline"),
                    _num(t("train_gate_mean"), 2),
                    "/".join(f"{x:.2f}" for x in ratios) or "",
                    _pct(t("supervision_positive_share")),
                    _num(t("supervision_universe"), 1),
                    _pct(t("train_p_at_2")),
                ]
            )
    n_units = {r["count"] for r in m.select("use")}
    notes = [
        "ΔNLL in nats per token (negative: the neighbors help); [95% bootstrap interval over "
        f"{', '.join(str(n) for n in sorted(n_units))} units (documents or blocks of chunks, see the artifact's meta)].",
        "Gate: mean neighbor gate in [0.1, 1]; CCA/residual: |CCA output| / |residual stream| per CCA layer; "
        "positives: share of training query chunks with a gold positive in their example; universe: "
        "retrievable chunks per query in training; train P@2: the retriever over that universe.",
    ]
    return Table(
        "Use of retrieval (own neighbors vs none, and vs the baseline)",
        [
            "model",
            "K",
            "ΔNLL vs empty",
            "ΔNLL vs baseline",
            "gate",
            "CCA/residual",
            "positives",
            "universe",
            "train P@2",
        ],
        rows,
        notes,
    )


def repeat_table(m: Metrics) -> Table:
    """Does a variant copy from its neighbors? NLL on the test tokens that continue a passage last seen
    beyond the attention window (a model that reads the right neighbor and copies predicts them almost
    surely) beside the NLL on all other tokens, for every perplexity row."""
    base = m.value("repeats", "baseline", "none", 0, "repeat_nll")
    rows = []
    for r in sorted(
        m.select("repeats", metric="repeat_nll"),
        key=lambda r: (
            list(MODEL_NAMES).index(r["model"]) if r["model"] in MODEL_NAMES else 9,
            r["setting"] != "empty",
            r["setting"] == "oracle",
            r["neighbors"] or 0,
        ),
    ):
        other = m.value("repeats", r["model"], r["setting"], r["neighbors"], "other_nll")
        rows.append(
            [
                MODEL_NAMES.get(r["model"], r["model"]),
                r["setting"],
                str(r["neighbors"]) if r["neighbors"] else "—",
                _num(r["value"], 3),
                f"{r['value'] - base:+.3f}" if base is not None and r["model"] != "baseline" else "",
                _num(other, 3),
            ]
        )
    n = {r["count"] for r in m.select("repeats", metric="repeat_nll")}
    notes = [
        f"Repeated tokens ({', '.join(f'{c:,}' for c in sorted(n))} of the test tokens): the {REPEAT_NGRAM} tokens "
        "up to and including the current one last occurred further back than the attention window, and the "
        "token after them there is the token to predict. Mean NLL in nats; a model that copies from "
        "its neighbors brings the first column far below the second.",
    ]
    return Table(
        "Repeated passages (does a model copy from its neighbors?)",
        ["model", "neighbor source", "K", "NLL repeated", "vs baseline", "NLL other tokens"],
        rows,
        notes,
    )


def retrofit_table(m: Metrics) -> Table:
    """The retrofit stage's rows: the frozen LM, retrofitted with its neighbors and with none, on the same
    tokens; ΔNLL against the frozen LM and against no neighbors (what retrieval adds)."""
    rows = []
    k = next((r["neighbors"] for r in m.select("retrofit", setting="own", metric="perplexity")), None)
    frozen = m.value("retrofit", "retrofit", "frozen", 0, "perplexity")
    names = {
        "frozen": "frozen LM",
        "own": f"retrofitted, own neighbors (K={k})",
        "empty": "retrofitted, no neighbors",
    }
    for setting, nb in (("frozen", 0), ("own", k), ("empty", 0)):
        ppl = m.value("retrofit", "retrofit", setting, nb, "perplexity")

        def delta(ref: str, setting: str = setting, nb: int | None = nb) -> str:
            v = m.value("retrofit", "retrofit", setting, nb, f"nll_minus_{ref}")
            lo = m.value("retrofit", "retrofit", setting, nb, f"nll_minus_{ref}_ci_low")
            hi = m.value("retrofit", "retrofit", setting, nb, f"nll_minus_{ref}_ci_high")
            return "" if v is None else f"{v:+.4f} [{lo:+.4f}, {hi:+.4f}]"

        rows.append(
            [
                names[setting],
                _num(ppl),
                _rel(ppl, frozen) if setting != "frozen" else "",
                delta("frozen"),
                delta("empty"),
            ]
        )
    share = lambda met: m.value("retrofit", "retrofit", "training", None, met)  # noqa: E731
    trained = f"Trained: {_pct(share('trainable_share'))}% of the parameters (CCA and the neighbor encoder; the base frozen)"
    if share("train_tokens") is not None:
        trained += f", on {share('train_tokens'):,.0f} tokens"
    if share("train_token_share") is not None:
        trained += f" ({_pct(share('train_token_share'))}% of the base LM's training tokens)"
    notes = [
        trained + ".",
        "ΔNLL in nats per token; [95% paired bootstrap interval over "
        f"{next((r['count'] for r in m.select('retrofit', metric='nll_minus_empty')), '?')} units: documents, or "
        "blocks of 16 chunks when there are fewer than 8]. Own minus no "
        "neighbors is what retrieval adds; no neighbors minus frozen, what the new parameters add by themselves.",
    ]
    return Table(
        "RETROfit (frozen LM + CCA)",
        ["model", "perplexity", "vs frozen", "ΔNLL vs frozen", "ΔNLL vs no neighbors"],
        rows,
        notes,
    )


def ordering_checks(m: Metrics) -> list[tuple[str, bool | None, str]]:
    """The paper's qualitative claims on our numbers: (claim, holds (None: a row is missing), the numbers)."""
    ppl = lambda v, s, k=2: m.value("perplexity", v, s, k if s != "none" else 0, "perplexity")  # noqa: E731
    empty = lambda v: m.value("perplexity", v, "empty", 0, "perplexity")  # noqa: E731
    p2 = lambda r: m.value("retrieval", r, "gold", None, "precision@2")  # noqa: E731
    base, retro = ppl("baseline", "none"), ppl("retro_bm25", "bm25")
    lex, sem = ppl("rpt_lex", "retriever"), ppl("rpt_sem", "retriever")

    def below(
        claim: str, a: float | None, b: float | None, pct: bool = False
    ) -> tuple[str, bool | None, str]:
        if a is None or b is None:
            return claim, None, ""
        if pct:
            return claim, a < b, f"{100 * a:.1f}% vs {100 * b:.1f}%"
        return claim, a < b, f"{a:,.2f} vs {b:,.2f}, {_rel(a, b)}"

    return [
        below("RPT-Sem perplexity below RPT-Lex", sem, lex),
        below("RPT-Sem perplexity below RETRO w. BM25", sem, retro),
        below("RPT-Sem perplexity below the baseline", sem, base),
        below("RPT-Lex perplexity below the baseline", lex, base),
        below("RETRO w. BM25 perplexity below the baseline", retro, base),
        below("RPT-Sem's P@2 above BM25's (BM25 vs RPT-Sem)", p2("bm25"), p2("rpt_sem"), pct=True),
        below(
            "RPT-Sem's P@2 above a random ranking's (random vs RPT-Sem)",
            p2("random"),
            p2("rpt_sem"),
            pct=True,
        ),
        below("RPT-Sem with oracle neighbors below RPT-Sem with its own", ppl("rpt_sem", "oracle"), sem),
        below("Retrieval itself helps RPT-Sem (own neighbors vs none)", sem, empty("rpt_sem")),
        below("Retrieval itself helps RPT-Lex (own neighbors vs none)", lex, empty("rpt_lex")),
        below("Retrieval itself helps RETRO w. BM25 (BM25 neighbors vs none)", retro, empty("retro_bm25")),
    ]


def all_tables(m: Metrics, column: str) -> list[Table]:
    out = [perplexity_table(m, column), retrieval_table(m, column)]
    if m.models("use"):
        out.append(use_table(m))
    if m.models("repeats"):
        out.append(repeat_table(m))
    if m.models("overlap"):
        out.append(overlap_table(m))
    if m.models("training"):
        out.append(training_table(m))
    if m.models("retrofit"):
        out.append(retrofit_table(m))
    return out


# ------------------------------------------------------------------------------------------ rendering
def _markdown(t: Table) -> str:
    lines = [
        f"### {t.title}",
        "",
        "| " + " | ".join(t.headers) + " |",
        "|" + "|".join("---" for _ in t.headers) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    lines += [""] + [f"{n}  " for n in t.notes]
    return "\n".join(lines)


def _text(t: Table) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in t.rows)) if t.rows else len(h) for i, h in enumerate(t.headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [t.title, "=" * len(t.title), line(t.headers), line(["-" * w for w in widths])]
    out += [line(r) for r in t.rows]
    out += [f"  {n}" for n in t.notes]
    return "\n".join(out)


def _checks_lines(m: Metrics) -> list[str]:
    mark = {True: "yes", False: "no", None: "n/a"}
    return [
        f"- {name}: **{mark[ok]}**" + (f" ({nums})" if nums else "") for name, ok, nums in ordering_checks(m)
    ]


def render_text(m: Metrics, column: str, header: Sequence[str] = ()) -> str:
    parts = [*header, ""] if header else []
    parts += [_text(t) + "\n" for t in all_tables(m, column)]
    parts += ["The paper's ordering on our numbers (2 neighbors):"]
    parts += [line.replace("**", "") for line in _checks_lines(m)]
    return "\n".join(parts)


def render_markdown(m: Metrics, column: str, header: Sequence[str] = (), plots: Sequence[str] = ()) -> str:
    parts = ["# Evaluation report", "", *header, ""]
    parts += [_markdown(t) + "\n" for t in all_tables(m, column)]
    parts += ["### The paper's ordering on these numbers (2 neighbors)", "", *_checks_lines(m), ""]
    if plots:
        parts += ["### Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(parts)

"""The retrofit stage's measurements as rows of the evaluate artifact (table `retrofit`): perplexity of the
frozen LM, of the retrofitted model with its own neighbors and with none, all on the same tokens of the
split, the paired ΔNLL with their bootstrap intervals, the share of parameters trained and the training
tokens as a share of the base LM's. The retrofit stage measured them (stages.retrofit); evaluate reports."""

from __future__ import annotations

from typing import Any

from pipeline.errors import InputError
from pipeline.store import Artifact
from stages.evaluate.rows import metric_row

SETTINGS = {"frozen": 0, "own": None, "empty": 0}  # setting -> neighbors in the row (None: K)


def retrofit_rows(art: Artifact, split: str) -> list[dict[str, Any]]:
    st, cfg = art.manifest.stats, art.manifest.config
    if st.get("eval_split") != split:
        raise InputError(
            f"{art.ref} was measured on the {st.get('eval_split')!r} split, this report is of {split!r}: set "
            f"retrofit.eval_split={split}"
        )
    k = int(cfg["n_neighbors"])
    n = int(st["eval_tokens"])
    rows = [
        metric_row("retrofit", "retrofit", s, k if nb is None else nb, "perplexity", float(st[f"ppl_{s}"]), n)
        for s, nb in SETTINGS.items()
    ]
    for a, b in (("own", "empty"), ("own", "frozen"), ("empty", "frozen")):
        point, lo, hi = st[f"nll_{a}_minus_{b}"]
        met = f"nll_minus_{b}"
        for name, val in ((met, point), (f"{met}_ci_low", lo), (f"{met}_ci_high", hi)):
            rows.append(
                metric_row(
                    "retrofit", "retrofit", a, k if a == "own" else 0, name, float(val), st["bootstrap_units"]
                )
            )
    for name in ("trainable_share", "train_token_share", "train_tokens", "trainable_params"):
        if st.get(name) is not None:
            rows.append(metric_row("retrofit", "retrofit", "training", None, name, float(st[name]), None))
    return rows

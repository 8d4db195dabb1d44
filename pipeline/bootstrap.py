"""Paired percentile bootstrap of a difference in NLL per token between two settings measured on the same
units (documents, blocks of chunks, windows): what the evaluate stage's `use` table and the retrofit stage's
report both give as "ΔNLL [95% interval]"."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def paired_delta(
    nll_a: np.ndarray,
    nll_b: np.ndarray,
    tokens: np.ndarray,
    rng: np.random.Generator,
    samples: int = BOOTSTRAP_SAMPLES,
) -> tuple[float, float, float]:
    """(point, low, high): (sum a - sum b) / sum tokens over the units, and its 95% interval from resampled
    units (the same units for both settings: paired; a ratio of sums, so long units weigh more)."""
    na, nb = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
    tok = np.asarray(tokens, np.float64)
    point = (na.sum() - nb.sum()) / tok.sum()
    idx = rng.integers(0, len(na), (samples, len(na)))
    boot = (na[idx].sum(1) - nb[idx].sum(1)) / tok[idx].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(point), float(lo), float(hi)

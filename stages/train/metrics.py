"""The train stage's metrics: named sums kept on the device and all-reduced in one call (`MetricSums`), what
one micro-batch adds to them (`add_micro_batch`), and the metrics.parquet row they reduce to
(`metrics_row`, `metrics_bytes`). Imported by stages.train.loop (it imports torch; the stage module must not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import torch

from pipeline.parquet import parquet_bytes
from stages.train.stage import METRICS_SCHEMA


class MetricSums:
    """Named float64 sums kept on the device (one host sync per step) in one packed vector, so DDP
    all-reduces them in one call. A `summed` name is one slot; a `mean` name is two, (sum, count),
    and NaN values are not counted. Read back by name: `total(name)`, `mean(name)`."""

    def __init__(self, summed: Iterable[str], means: Iterable[str], device: torch.device | str = "cpu"):
        self.slots: dict[str, int] = {}
        for name in summed:
            self.slots[name] = len(self.slots)
        self.mean_names = tuple(means)
        base = len(self.slots)
        for i, name in enumerate(self.mean_names):
            self.slots[name] = base + 2 * i  # the sum; the count is the next slot
        self.size = base + 2 * len(self.mean_names)
        self.vec = torch.zeros(self.size, dtype=torch.float64, device=device)

    def _like(self, vec: torch.Tensor) -> MetricSums:
        new = object.__new__(MetricSums)
        new.slots, new.mean_names, new.size, new.vec = self.slots, self.mean_names, self.size, vec
        return new

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Add to a summed name (a tensor is detached and added as float64 on the device)."""
        self.vec[self.slots[name]] += value.detach().double() if isinstance(value, torch.Tensor) else value

    def add_mean(self, name: str, value: torch.Tensor) -> None:
        """Add a value (sum) and 1 (count) to a mean name, unless the value is NaN."""
        v = value.detach().double()
        ok = ~torch.isnan(v)
        i = self.slots[name]
        self.vec[i] += torch.where(ok, v, 0.0)
        self.vec[i + 1] += ok.double()

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> MetricSums:
        """The sums over all ranks (one `reduce`, an all-reduce of the packed vector), on the host."""
        return self._like(reduce(self.vec).cpu())

    def __add__(self, other: MetricSums) -> MetricSums:
        return self._like(self.vec + other.vec)

    def total(self, name: str) -> float:
        return self.vec[self.slots[name]].item()

    def mean(self, name: str) -> float:
        i = self.slots[name]
        s, c = self.vec[i].item(), self.vec[i + 1].item()
        return s / c if c else float("nan")


# a micro-batch's metrics: SUMMED are summed (n_pairs per step, the rest per micro-batch); MEANS and
# each CCA layer's |CCA output| / |residual| ratio are means over the micro-batches that have them
SUMMED = ("loss", "lm_loss", "ret_loss", "used_gold", "n_pairs")
MEANS = (
    "recall_at_2",
    "recall_at_5",
    "recall_at_10",
    "recall_at_20",
    "p_at_2",
    "positive_share",
    "universe",
    "gate_mean",
)
RETRIEVAL_KEYS = {  # MEANS name -> key of RPTOutput.retrieval
    "recall_at_2": 2,
    "recall_at_5": 5,
    "recall_at_10": 10,
    "recall_at_20": 20,
    "p_at_2": "p@2",
    "positive_share": "positive_share",
    "universe": "universe",
}


def step_sums(n_cca: int, device: torch.device) -> MetricSums:
    return MetricSums(SUMMED, (*MEANS, *(f"cca_ratio.{i}" for i in range(n_cca))), device)


def add_micro_batch(sums: MetricSums, loss: torch.Tensor, out: Any, gold: bool, n_cca: int) -> None:
    """Add one micro-batch's loss and RPTOutput diagnostics."""
    sums.add("loss", loss)
    sums.add("lm_loss", out.lm_loss)
    sums.add("used_gold", float(gold))
    if out.ret_loss is not None:
        sums.add("ret_loss", out.ret_loss)
        sums.add("n_pairs", out.n_pairs.double())
        for name, key in RETRIEVAL_KEYS.items():
            sums.add_mean(name, out.retrieval[key])
    if out.gate is not None and out.neighbor_pos is not None:
        valid = out.neighbor_pos >= 0
        g = torch.where(valid, out.gate.float(), 0.0).sum() / valid.sum().clamp(min=1)
        sums.add_mean("gate_mean", torch.where(valid.any(), g, float("nan")))
    for i, r in enumerate(out.cca_ratio[:n_cca]):
        sums.add_mean(f"cca_ratio.{i}", r)


def metrics_row(window: MetricSums, micro_per_step: int, n_steps: int, has_ret: bool, n_cca: int) -> dict:
    """A metrics.parquet row (its metric columns) from the sums over `n_steps` steps and all processes."""
    n_micro = n_steps * micro_per_step
    row: dict[str, Any] = {
        "loss": window.total("loss") / n_micro,
        "lm_loss": window.total("lm_loss") / n_micro,
        "ret_loss": window.total("ret_loss") / n_micro if has_ret else float("nan"),
        "used_gold": window.total("used_gold") / n_micro,
        "n_pairs": round(window.total("n_pairs") / n_steps),
    }
    for name in MEANS:
        row[name] = window.mean(name)
    row["cca_ratio"] = [window.mean(f"cca_ratio.{i}") for i in range(n_cca)]
    return row


def metrics_bytes(rows: list[dict[str, Any]]) -> bytes:
    """metrics.parquet (zstd) of the rows so far."""
    return parquet_bytes(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA))

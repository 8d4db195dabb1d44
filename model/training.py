"""What one training step computes, apart from data, devices and checkpoints (those are stages.train's):
the schedules at a step, the forward pass with its neighbor source, the loss, and the use diagnostics.
The train stage and the mechanism tests run exactly this.

Use diagnostics (per logged row of metrics.parquet, means over its steps):
  gate_mean        mean neighbor gate in [eta, 1] over the chunks' valid neighbors
  cca_ratio        per CCA layer: |CCA output| / |residual stream| (Frobenius), how much CCA writes
  positive_share   share of query chunks (with a retrievable chunk) that have a gold positive
  universe         retrievable chunks per such query: what the retriever ranks in training
  p_at_2, recall_at_k   the retriever's ranking over that whole universe against the gold positives
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model import schedules as sch
from model.rpt import RPTOutput

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
_RET_KEYS = {
    "recall_at_2": 2,
    "recall_at_5": 5,
    "recall_at_10": 10,
    "recall_at_20": 20,
    "p_at_2": "p@2",
    "positive_share": "positive_share",
    "universe": "universe",
}


@dataclass(frozen=True)
class Schedule:
    """Every schedule of a run as a pure function of the step (a resumed run recomputes them exactly)."""

    steps: int
    lr: float
    warmup: int = 0
    min_lr_ratio: float = 0.1
    alpha_ret: float = 0.1
    alpha_ramp: int = 0
    tau_max: float = 4.0
    tau_ramp: int = 0
    ss_fraction: float = 0.9

    def at(self, step: int, has_retriever: bool) -> dict[str, float]:
        return {
            "lr": sch.learning_rate(step, self.steps, self.lr, self.warmup, self.min_lr_ratio),
            "alpha_ret": sch.alpha_ret(step, self.alpha_ramp, self.alpha_ret) if has_retriever else 0.0,
            "tau": sch.margin(step, self.tau_ramp, self.tau_max),
            "p_gold": sch.p_gold(step, self.steps, self.ss_fraction) if has_retriever else 0.0,
        }


def forward_loss(
    net: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    alpha: float,
    tau: float,
    gold: bool,
    source: str | None = None,
) -> tuple[torch.Tensor, RPTOutput]:
    """The step's loss on one micro-batch: LM cross-entropy + alpha * LambdaRank. `gold`: feed the gold
    neighbors (scheduled sampling's teacher forcing) instead of the variant's own `source` (default:
    the variant's: none, given (BM25) or retriever)."""
    out: RPTOutput = net(
        batch["tokens"],
        batch["labels"],
        source="gold" if gold else source,
        neighbor_pos=batch.get("neighbor_pos"),
        cand_pos=batch.get("cand_pos"),
        cand_target=batch.get("cand_target"),
        tau=tau,
    )
    loss = out.lm_loss + alpha * out.ret_loss if out.ret_loss is not None else out.lm_loss
    return loss, out


class StepMetrics:
    """Sums of a step's metrics over micro-batches, kept on the device (one host sync per step) as one
    vector that DDP can all-reduce: the SUMMED values, then (sum, count) per MEANS value and per CCA
    layer's ratio (NaN values are not counted)."""

    def __init__(self, n_cca: int, device: torch.device):
        self.n_cca = n_cca
        self.size = len(SUMMED) + 2 * (len(MEANS) + n_cca)
        self.vec = torch.zeros(self.size, dtype=torch.float64, device=device)

    def _mean_slot(self, i: int, value: torch.Tensor) -> None:
        v = value.detach().double()
        ok = ~torch.isnan(v)
        base = len(SUMMED) + 2 * i
        self.vec[base] += torch.where(ok, v, 0.0)
        self.vec[base + 1] += ok.double()

    def add(self, loss: torch.Tensor, out: RPTOutput, gold: bool) -> None:
        self.vec[0] += loss.detach().double()
        self.vec[1] += out.lm_loss.detach().double()
        self.vec[3] += float(gold)
        if out.ret_loss is not None:
            self.vec[2] += out.ret_loss.detach().double()
            self.vec[4] += out.n_pairs.double()
            for i, name in enumerate(MEANS[:-1]):
                self._mean_slot(i, out.retrieval[_RET_KEYS[name]])
        if out.gate is not None and out.neighbor_pos is not None:
            valid = out.neighbor_pos >= 0
            g = torch.where(valid, out.gate.float(), 0.0).sum() / valid.sum().clamp(min=1)
            self._mean_slot(len(MEANS) - 1, torch.where(valid.any(), g, float("nan")))
        for i, r in enumerate(out.cca_ratio[: self.n_cca]):
            self._mean_slot(len(MEANS) + i, r)


def metrics_row(window: torch.Tensor, micro_per_step: int, n_steps: int, has_ret: bool, n_cca: int) -> dict:
    """A metrics.parquet row from the sums of StepMetrics vectors over `n_steps` steps (and processes)."""
    w = window.tolist()
    n_micro = n_steps * micro_per_step
    row: dict[str, Any] = {
        "loss": w[0] / n_micro,
        "lm_loss": w[1] / n_micro,
        "ret_loss": w[2] / n_micro if has_ret else float("nan"),
        "used_gold": w[3] / n_micro,
        "n_pairs": round(w[4] / n_steps),
    }

    def mean(i: int) -> float:
        s, c = w[len(SUMMED) + 2 * i], w[len(SUMMED) + 2 * i + 1]
        return s / c if c else float("nan")

    for i, name in enumerate(MEANS):
        row[name] = mean(i)
    row["cca_ratio"] = [mean(len(MEANS) + i) for i in range(n_cca)]
    return row

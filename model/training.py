"""What one training step computes, apart from data, devices, metrics and checkpoints (stages.train.loop,
stages.train.metrics, model.checkpointer): the schedules at a step, the forward pass with its neighbor
source, and the loss. The train stage and the mechanism tests run exactly this.

Use diagnostics that stages.train.loop logs from each step's output (per row of metrics.parquet, means
over its steps):
  gate_mean        mean neighbor gate in [eta, 1] over the chunks' valid neighbors
  cca_ratio        per CCA layer: |CCA output| / |residual stream| (Frobenius), how much CCA writes
  positive_share   share of query chunks (with a retrievable chunk) that have a gold positive
  universe         retrievable chunks per such query: what the retriever ranks in training
  p_at_2, recall_at_k   the retriever's ranking over that whole universe against the gold positives
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import schedules as sch
from model.rpt import RPTOutput


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

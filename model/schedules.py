"""Training schedules as pure functions of the step (so a resumed run recomputes them exactly)."""

from __future__ import annotations

import math


def linear_ramp(step: int, ramp_steps: int, start: float, end: float) -> float:
    """start at step 0, end from step `ramp_steps` on, linear in between."""
    if ramp_steps <= 0:
        return end
    return start + (end - start) * min(max(step, 0) / ramp_steps, 1.0)


def alpha_ret(step: int, ramp_steps: int, alpha_max: float) -> float:
    """Weight of the retriever loss: 0 -> alpha_max linearly (paper: over the first 100K steps)."""
    return linear_ramp(step, ramp_steps, 0.0, alpha_max)


def margin(step: int, ramp_steps: int, tau_max: float, tau_start: float = 1.0) -> float:
    """LambdaRank margin tau: tau_start -> tau_max linearly (official code: 1 -> max_margin)."""
    return linear_ramp(step, ramp_steps, tau_start, tau_max)


def p_gold(step: int, total_steps: int, fraction: float = 0.9) -> float:
    """Scheduled sampling: probability of feeding gold neighbors. 1 at step 0, cosine down to 0 at
    `fraction` of training, 0 afterwards (paper §3.3)."""
    horizon = fraction * total_steps
    if horizon <= 0 or step >= horizon:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / horizon))


def learning_rate(
    step: int, total_steps: int, lr: float, warmup: int, min_ratio: float, *, peak_times_ratio: bool = False
) -> float:
    """The learning rate of both training stages: a linear warm-up to `lr` over `warmup` steps (step 0
    trains at lr / warmup), then cosine decay to `min_ratio * lr` at `total_steps`.

    `peak_times_ratio` only picks the rounding of the warm-up: (lr * (step + 1)) / warmup (the train
    stage's) or lr * ((step + 1) / warmup), the peak times a multiplier (the reference stage's, as
    torch's LambdaLR computed it). They differ in the last bit for about a third of the warm-up steps;
    each stage keeps its own so its trained weights stay what they were."""
    if warmup > 0 and step < warmup:
        return lr * ((step + 1) / warmup) if peak_times_ratio else lr * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))

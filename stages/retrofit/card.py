"""The retrofit artifact's model card (README.md), rendered from its manifest's fields (stage, version,
config, inputs, stats, meta): what was frozen and what trained, on which neighbors, for how many tokens,
what it measured, and how to load it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _delta(v: list[float] | None) -> str:
    return "n/a" if not v else f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"


def model_card(manifest: Mapping[str, Any]) -> str:
    cfg, stats, meta = manifest["config"], manifest["stats"], manifest.get("meta", {})
    base = meta.get("base", {})
    inputs = manifest.get("inputs", {})
    where = base.get("artifact") or base.get("path") or "?"
    base_tok = stats.get("base_train_tokens")
    lines = [
        f"# RETROfitted {stats.get('base_model_type', 'causal LM')} (`{manifest['stage']}@{manifest['version']}`)",
        "",
        "A pretrained causal LM, **frozen**, with chunked cross-attention (RETRO, Borgeaud et al. 2021) inserted "
        f"after blocks {stats.get('cca_layers')} and a {cfg.get('encoder_layers')}-layer neighbor encoder; only "
        "those new parts were trained. Before training its logits equal the base's exactly (CCA's output "
        "projections start at zero).",
        "",
        "## Base",
        f"- `{where}`, content digest `{base.get('digest', '?')}`",
        f"- parameters: {stats.get('frozen_params', 0):,} frozen, {stats.get('trainable_params', 0):,} trained "
        f"({_pct(stats.get('trainable_share'))} of the total)",
        "",
        "## Training",
        f"- neighbors: `{inputs.get('neighbors', '?')}` (scope {cfg.get('scope')}, K = {cfg.get('n_neighbors')}; "
        "each neighbor is a chunk with its continuation)",
        f"- {stats.get('steps')} steps x {cfg.get('batch_size')} examples x {stats.get('seq_len')} tokens = "
        f"{stats.get('train_tokens', 0):,} tokens"
        + (
            f", {_pct(stats.get('train_token_share'))} of the base's {base_tok:,} training tokens"
            if base_tok
            else ""
        ),
        f"- lr {cfg.get('lr')}, warm-up {cfg.get('warmup_steps')}, seed {cfg.get('seed')}; final loss "
        f"{stats.get('final_loss', float('nan')):.4f}; {stats.get('train_s')} s",
        "",
        f"## Evaluation ({stats.get('eval_split')} split, {stats.get('eval_tokens', 0):,} tokens, the same for every row)",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| frozen base | {stats.get('ppl_frozen', float('nan')):.3f} |",
        f"| retrofitted, own neighbors | {stats.get('ppl_own', float('nan')):.3f} |",
        f"| retrofitted, no neighbors | {stats.get('ppl_empty', float('nan')):.3f} |",
        "",
        f"- ΔNLL own - no neighbors: {_delta(stats.get('nll_own_minus_empty'))} nats/token (what retrieval adds)",
        f"- ΔNLL own - frozen base: {_delta(stats.get('nll_own_minus_frozen'))}",
        f"- ΔNLL no neighbors - frozen base: {_delta(stats.get('nll_empty_minus_frozen'))}",
        f"- [95% paired bootstrap intervals over {stats.get('bootstrap_units')} units: "
        f"{stats.get('bootstrap_unit')}s]",
        "",
        "## Load",
        "```python",
        "from stages.retrofit.load import load_retrofitted",
        "model = load_retrofitted('<this folder>')  # the base is found from retrofit.json and checked by digest",
        "out = model(tokens, neighbors)            # neighbors [B, T/m, K, 2m] token ids, -1 pads; None: the base",
        "```",
        "",
    ]
    return "\n".join(lines)

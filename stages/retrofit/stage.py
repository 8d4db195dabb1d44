"""Stage `retrofit`: RETROfit a pretrained causal LM (Borgeaud et al. 2021, section 4.4). The base stays
frozen; chunked cross-attention after chosen blocks and a neighbor encoder (model.retrofit) train on the
train split with the neighbors of a table of the user's choice, then the stage measures, on the same
tokens of the evaluation split: the frozen LM, the retrofitted model with its neighbors, and with none.

The base: the reference stage's model (default: the pipeline's own GPT-NeoX, or whatever
`reference.path` adopted) or a local Hugging Face folder `retrofit.base_path` (GPT-NeoX/Pythia or Llama
family), which enters the version by a digest of its files, never by its path. Its tokenizer must be the
pipeline's (set `tokenizer.path` to the base's tokenizer.json).

The neighbors: `retrofit.neighbors` (bm25 | dense) with `retrofit.scope` corpus (RETRO: the database is the
train split, the query's own document excluded by id) or document-causal (earlier chunks of the same
document), query = the chunk. Neighbor j is used with its continuation j+1.

The artifact: retrofit.safetensors (the new parameters) and retrofit.json (their config and the base's
identity: `stages.retrofit.load.load_retrofitted(folder)` loads it back in one call), metrics.parquet (training
curve), eval.parquet (NLL per evaluation window and setting), README.md (a model card rendered from the
manifest's fields). A killed run resumes from its last checkpoint (ckpt/, dropped at publish).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.config import RunConfigBase, StageConfig
from pipeline.devices import DeviceSetting
from pipeline.errors import ConfigError
from pipeline.formats import causal_lm_digest
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext

log = logging.getLogger("rpt.retrofit")

CKPT_DIR = "ckpt"
CARD_FILE = "README.md"
EVAL_FILE = "eval.parquet"
FINAL_FILES = ("retrofit.safetensors", "retrofit.json", "metrics.parquet", EVAL_FILE)


class Config(StageConfig):
    base_path: str | None = Field(
        None,
        description="a local Hugging Face causal-LM folder (GPT-NeoX/Pythia, Llama); None: the reference "
        "stage's model",
    )
    neighbors: Literal["bm25", "dense"] = Field("bm25", description="the neighbor table")
    scope: Literal["corpus", "document-causal"] = Field(
        "corpus", description="corpus: RETRO's database (train split, own document excluded)"
    )
    n_neighbors: int = Field(2, ge=1, description="K neighbors per chunk")
    cca_layers: list[int] | None = Field(
        None,
        description="0-based base blocks followed by CCA; None: RETRO's every third from the sixth (bases "
        "of fewer than six blocks: the upper half)",
    )
    encoder_layers: int = Field(2, ge=1, description="layers of the neighbor encoder")
    seq_len: int | None = Field(
        None,
        ge=2,
        description="tokens per example (a multiple of chunk_len); None: the base's context, <= 2048",
    )
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    init_std: float = Field(
        0.02, gt=0, description="std of the new weights (CCA's output projections start at 0)"
    )
    seed: int = 0
    eval_split: Literal["train", "valid", "test"] = "test"
    eval_tokens: int | None = Field(65536, ge=2, description="evaluate at most this many tokens; None: all")
    # how, not what
    device: DeviceSetting = Field("auto", description="auto (GPU when present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 autocast on GPU")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)

    UNHASHED = frozenset({"base_path", "device", "dtype", "threads", "checkpoint_every", "log_every"})

    @field_validator("cca_layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0):
            raise ValueError(f"cca_layers {v}: name at least one block, as 0-based indices")
        return v


def neighbor_overrides(cfg: Config) -> dict[str, Any]:
    """The neighbor table the retrofit reads: the chosen scope, a row for every chunk (train queries are
    the training's), and, for bm25, query = the chunk with causal statistics and no example bound, whatever
    the run's own section says (`stats: document` would let a document's future chunks pick neighbors)."""
    bm25 = {"query": "chunk", "stats": "causal", "example_chunks": 0}
    return {"scope": cfg.scope, "query_splits": None, **(bm25 if cfg.neighbors == "bm25" else {})}


class RetrofitStage(Stage):
    name = "retrofit"
    version = 1
    Config = Config
    description = "RETROfit a frozen causal LM: CCA and a neighbor encoder trained on a neighbor table"
    preferred_runner = "serial"
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        cfg: Config = run.section("retrofit")
        refs = {
            "chunks": InputRef("chunks"),
            "tokenizer": InputRef("tokenizer"),
            "neighbors": InputRef(cfg.neighbors, neighbor_overrides(cfg)),
        }
        if not cfg.base_path:
            refs["reference"] = InputRef("reference")
        return refs

    def fingerprint(self, cfg: Config) -> Any:
        if not cfg.base_path:
            return None
        return {"base_files": causal_lm_digest(cfg.base_path, "retrofit.base_path")}

    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        nb = ctx.inputs["neighbors"]
        k = int(nb.manifest.config.get("k", 0))
        if k < cfg.n_neighbors:
            raise ConfigError(
                f"retrofit.n_neighbors={cfg.n_neighbors} but {nb.ref} holds {k} neighbors per chunk; "
                f"raise {cfg.neighbors}.k"
            )
        return [Shard(0, 1)]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        from stages.retrofit.loop import run_retrofit

        stats = run_retrofit(ctx)
        for name in FINAL_FILES:
            ctx.written.append(ctx.file_entry(name))
        return stats

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        from stages.retrofit.card import model_card

        ctx.drop(CKPT_DIR)
        stats = dict(results[0].stats)
        manifest = {
            "stage": self.name,
            "version": ctx.version,
            "config": ctx.cfg.model_dump(mode="json"),
            "inputs": {r: a.ref for r, a in ctx.inputs.items()},
            "stats": stats,
            "meta": self.meta(ctx),
        }
        ctx.write_text(CARD_FILE, model_card(manifest))
        return stats

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        info = json.loads(ctx.fs.cat(ctx.path("retrofit.json")))
        return {
            "base": info["base"],
            "cca_layers": info["config"]["cca_layers"],
            "neighbors": ctx.inputs["neighbors"].ref,
            "scope": cfg.scope,
            "load": "stages.retrofit.load.load_retrofitted(<this folder>)",
        }


STAGE = RetrofitStage()

"""Stage `reference`: the scoring LM whose log-probabilities supervise the retriever (paper: Pythia-1.4B).

Either adopt a local Hugging Face causal-LM folder (`reference.path`, e.g. Pythia-1.4B on a cluster; it
enters the version by a checksum of its files, never by its path) or train a small, randomly
initialised GPT-NeoX (the Pythia architecture) with the pipeline's tokenizer on the train split.
Both end as the same thing: `model/` in the artifact, written by `save_pretrained` (safetensors) with
the tokenizer.json beside it, so `scores` has one code path. The training (stages.reference.lm) uses
the train stage's optimizer, learning-rate schedule and checkpoints (model.checkpointer: weights,
optimizer and RNG state as safetensors + JSON), written to the build's partial folder every
`checkpoint_every` steps; a killed run resumes from the last one and ends bit-identical to an
uninterrupted run. The manifest records the validation perplexity (valid split), parameter counts and
whether the LM copies in context (`copy_*`, docs/supervision.md: a scorer that cannot copy is blind to the
chunks that hold a continuation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.devices import DeviceSetting, DtypeSetting, resolve_device, resolve_dtype
from pipeline.errors import ConfigError, InputError
from pipeline.formats import (
    REFERENCE_MODEL_DIR,
    TOKEN_PAD,
    TOKENIZER_FILE,
    ChunkReader,
    causal_lm_digest,
    load_tokenizer,
    same_tokenizer,
    tokenizer_identity,
)
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext

log = logging.getLogger("rpt.reference")

CKPT_DIR = "_checkpoints"
SIZE_FIELDS = (
    "hidden",
    "layers",
    "heads",
    "intermediate",
    "seq_len",
    "steps",
    "batch",
    "lr",
    "warmup",
    "weight_decay",
    "seed",
    "init_std",
)


COPY_PASSAGES = 128  # passages of the copy probe (stages.reference.lm.copy_probe)
COPY_GAIN_MIN = 0.5  # nats: below this the scoring LM is reported as unable to copy in context


class Config(StageConfig):
    path: str | None = Field(
        None,
        description="adopt this local Hugging Face causal-LM folder (e.g. Pythia-1.4B) instead of training",
    )
    hidden: int = Field(256, ge=8, description="hidden size of the trained GPT-NeoX")
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    intermediate: int = Field(1024, ge=8)
    seq_len: int = Field(256, ge=8, description="training window; scoring uses 4 chunks (256 tokens at m=64)")
    steps: int = Field(1500, ge=0)
    batch: int = Field(16, ge=1, description="windows per step")
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    seed: int = Field(0)
    init_std: float = Field(
        0.02,
        gt=0,
        description="std of the initial weights (GPT-NeoX initializer_range); 0.02 is sized for wide models, a "
        "64-wide one learns far faster from ~0.05",
    )
    eval_tokens: int = Field(262_144, ge=0, description="validation perplexity over at most this many tokens")
    device: DeviceSetting = Field("auto", description="auto (GPU when present), cpu, cuda, cuda:N")
    dtype: DtypeSetting = Field(
        "auto", description="auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16"
    )
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    copy_weight: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="mix an in-context copy model into the scoring LM with this weight (model.lm_scoring."
        "CopyCache): for a small LM that cannot copy (the copy probe); 0: the LM alone, as the paper",
    )
    copy_order: int = Field(2, ge=1, le=8, description="tokens the copy model matches before it copies")

    UNHASHED = frozenset({"path", "device", "dtype", "checkpoint_every"})

    def hashed_dict(self) -> dict[str, Any]:
        d = super().hashed_dict()
        if self.path:  # an adopted model is identified by its files; training settings do not apply
            d = {k: v for k, v in d.items() if k not in SIZE_FIELDS}
        if d.get("init_std") == 0.02:  # the default: the versions from before the setting
            d.pop("init_std")
        if not d.get("copy_weight"):  # no copy model: the versions from before the setting
            d.pop("copy_weight", None)
            d.pop("copy_order", None)
        return d


# ------------------------------------------------------------------------------------------ data


class WindowSampler:
    """Training windows of `seq_len` tokens inside train documents, drawn uniformly over all windows.
    The batch of step s depends only on (seed, s), so a resumed run sees exactly the same data."""

    def __init__(self, reader: ChunkReader, split: str, seq_len: int, seed: int):
        n_tok = dict(
            zip(
                reader.doc_index.column("doc_idx").to_pylist(),
                reader.doc_index.column("n_tokens").to_pylist(),
            )
        )
        self.tokens = reader.tokens
        self.L = reader.chunk_len
        self.seq_len = seq_len
        self.seed = seed
        docs = [d for d in reader.docs(split) if n_tok[d.doc_idx] >= seq_len]
        if not docs:
            raise InputError(
                f"reference: no {split} document has at least seq_len={seq_len} tokens; "
                "lower reference.seq_len or add longer documents"
            )
        self.first = np.array([d.first for d in docs], dtype=np.int64)
        counts = np.array([n_tok[d.doc_idx] - seq_len + 1 for d in docs], dtype=np.int64)
        self.cum = np.cumsum(counts)
        self.n_tokens = int(sum(n_tok[d.doc_idx] for d in docs))

    def window(self, doc: int, off: int) -> np.ndarray:
        r0 = self.first[doc] + off // self.L
        r1 = self.first[doc] + (off + self.seq_len - 1) // self.L + 1
        flat = np.asarray(self.tokens[r0:r1]).reshape(-1)
        s = off % self.L
        return flat[s : s + self.seq_len]

    def batch(self, step: int, size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        g = rng.integers(0, int(self.cum[-1]), size)
        doc = np.searchsorted(self.cum, g, side="right")
        off = g - np.concatenate([[0], self.cum])[doc]
        out = np.stack([self.window(int(d), int(o)) for d, o in zip(doc, off)])
        assert (out != TOKEN_PAD).all()
        return out.astype(np.int64)


def doc_token_arrays(
    reader: ChunkReader,
    split: str,
    max_tokens: int,
    lm_tokenizer: Any = None,
) -> list[np.ndarray]:
    """Token ids of the split's documents (in order, at most `max_tokens` in all), under the pipeline's
    tokenizer or, when `lm_tokenizer` is given, re-tokenized from the chunk texts."""
    out: list[np.ndarray] = []
    budget = max_tokens
    for d in reader.docs(split):
        if budget <= 0:
            break
        if lm_tokenizer is None:
            t = np.asarray(reader.tokens[d.first : d.first + d.n]).reshape(-1)
            t = t[t != TOKEN_PAD]
        else:
            text = "".join(reader.texts(d.chunk_ids))
            t = np.asarray(lm_tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        t = t[:budget]
        budget -= len(t)
        if len(t) >= 2:
            out.append(t.astype(np.int64))
    return out


# ------------------------------------------------------------------------------------------ the stage


class ReferenceStage(Stage):
    name = "reference"
    version = 1
    Config = Config
    description = (
        "the scoring LM: adopt a local HF causal-LM folder or train a small GPT-NeoX on the train split"
    )
    preferred_runner = "serial"
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"chunks": InputRef("chunks"), "tokenizer": InputRef("tokenizer")}

    def fingerprint(self, cfg: Config) -> Any:
        if not cfg.path:
            return None
        return {"model_files": causal_lm_digest(cfg.path, "reference.path")}

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0, 1)]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        import torch

        cfg: Config = ctx.cfg
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        amp = None if dtype == torch.float32 else dtype  # autocast dtype; fp32 runs without autocast
        reader = ChunkReader(ctx.inputs["chunks"])
        pipe_tok = ctx.local_input("tokenizer", TOKENIZER_FILE)
        stats = self._adopt(ctx, cfg) if cfg.path else self._train(ctx, cfg, reader, device, amp)
        from model.lm_scoring import COPY_CACHE_FILE, CopyCache

        copy = CopyCache(cfg.copy_weight, cfg.copy_order) if cfg.copy_weight else None
        if copy is not None:  # read by the scores stage's ScoringLM.load with the model
            with ctx.local_dir(REFERENCE_MODEL_DIR) as mdir:
                (mdir / COPY_CACHE_FILE).write_text(json.dumps(dataclasses.asdict(copy)))
        # validation perplexity, with the model as saved (one code path for both sources)
        from transformers import AutoModelForCausalLM

        from stages.reference.lm import copy_probe, param_counts, perplexity

        with ctx.local_dir(REFERENCE_MODEL_DIR) as mdir:
            model = AutoModelForCausalLM.from_pretrained(str(mdir), local_files_only=True, dtype=dtype).to(
                device
            )
            differs = not same_tokenizer(mdir / TOKENIZER_FILE, pipe_tok)
            lm_tok = load_tokenizer(mdir / TOKENIZER_FILE) if differs else None
        t0 = time.perf_counter()
        docs = doc_token_arrays(reader, "valid", cfg.eval_tokens, lm_tok)
        if not docs and cfg.eval_tokens:
            log.warning("reference: the valid split is empty; no validation perplexity")
        seq = cfg.seq_len if not cfg.path else 4 * reader.chunk_len
        stats.update(perplexity(model, docs, seq, max(1, 8192 // seq), device, None))  # loaded in `dtype`
        stats.update(copy_probe(model, docs, reader.chunk_len, COPY_PASSAGES, cfg.seed, device, copy))
        stats["eval_s"] = time.perf_counter() - t0
        if stats["copy_gain"] is not None and stats["copy_gain"] < COPY_GAIN_MIN:
            log.warning(
                "reference: the scoring LM does not copy in context (NLL %.2f on a repeated %d-token passage, "
                "%.2f where it first occurs): its scores cannot single out the chunk that holds a "
                "continuation, so RPT-Sem's positives are blind to copies. Adopt a larger LM "
                "(reference.path, e.g. Pythia-1.4B), or mix in a copy model (reference.copy_weight), "
                "or train this one longer (docs/supervision.md)",
                stats["copy_repeat_nll"],
                reader.chunk_len,
                stats["copy_first_nll"],
            )
        stats.update(param_counts(model))
        stats["tokenizer_differs"] = differs
        stats["architecture"] = type(model).__name__
        log.info(
            "reference: %s, %s params, valid ppl %s, in-context copy gain %s nats",
            stats["architecture"],
            f"{stats['params']:,}",
            f"{stats['valid_ppl']:.2f}" if stats.get("valid_ppl") else "n/a",
            f"{stats['copy_gain']:.2f}" if stats["copy_gain"] is not None else "n/a",
        )
        for p in sorted(ctx.fs.find(ctx.path(REFERENCE_MODEL_DIR))):  # checked again on resume
            ctx.written.append(ctx.file_entry(p[len(ctx.workdir.rstrip("/")) + 1 :]))
        return stats

    # -- adopt a given folder
    def _adopt(self, ctx: StageContext, cfg: Config) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        src = Path(cfg.path)
        log.info("reference: adopting %s", src)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype="auto")
        except (OSError, ValueError) as e:
            raise ConfigError(f"reference.path: cannot load {src} as a causal LM: {e}") from None
        with ctx.local_dir(REFERENCE_MODEL_DIR) as mdir:
            model.save_pretrained(str(mdir))
            if (src / TOKENIZER_FILE).is_file():
                shutil.copyfile(src / TOKENIZER_FILE, mdir / TOKENIZER_FILE)
            else:  # e.g. vocab.json + merges.txt only: let transformers build the fast tokenizer
                try:
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
                    (mdir / TOKENIZER_FILE).write_text(tok.backend_tokenizer.to_str(), encoding="utf-8")
                except Exception as e:
                    raise ConfigError(
                        f"reference.path: {src} has no tokenizer.json and no tokenizer transformers can load "
                        f"({e}); put the model's tokenizer.json into the folder"
                    ) from None
        return {"source": "given", "steps": 0}

    # -- train a small GPT-NeoX
    def _train(
        self, ctx: StageContext, cfg: Config, reader: ChunkReader, device: Any, amp: Any
    ) -> dict[str, Any]:
        from stages.reference.lm import ReferenceTrainer

        vocab = load_tokenizer(ctx.inputs["tokenizer"]).get_vocab_size()
        eos_id = ctx.inputs["tokenizer"].meta.get("eos_id")
        sampler = WindowSampler(reader, "train", cfg.seq_len, cfg.seed)
        trainer = ReferenceTrainer(ctx, cfg, sampler, vocab, eos_id, device, amp)
        stats = trainer.train()
        with ctx.local_dir(REFERENCE_MODEL_DIR) as mdir:
            trainer.model.save_pretrained(str(mdir))
            shutil.copyfile(ctx.local_input("tokenizer", TOKENIZER_FILE), mdir / TOKENIZER_FILE)
        return stats

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        ctx.drop(CKPT_DIR)  # the checkpoints served resume; the artifact holds the final model
        return dict(results[0].stats)

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        mcfg = json.loads(ctx.fs.cat(ctx.path(f"{REFERENCE_MODEL_DIR}/config.json")))
        lm_tok = ctx.fs.cat(ctx.path(f"{REFERENCE_MODEL_DIR}/{TOKENIZER_FILE}")).decode("utf-8")
        pipe_tok = ctx.local_input("tokenizer", TOKENIZER_FILE).read_text(encoding="utf-8")
        return {
            "source": "given" if cfg.path else "trained",
            "model_dir": REFERENCE_MODEL_DIR,
            "model_type": mcfg.get("model_type"),
            "tokenizer_differs": tokenizer_identity(lm_tok) != tokenizer_identity(pipe_tok),
        }


STAGE = ReferenceStage()

"""Stage `reference`: the scoring LM whose log-probabilities supervise the retriever (paper: Pythia-1.4B).

Either adopt a local Hugging Face causal-LM folder (`reference.path`, e.g. Pythia-1.4B on a cluster; it
enters the version by a checksum of its files, never by its path) or train a small, randomly
initialised GPT-NeoX (the Pythia architecture) with the pipeline's tokenizer on the train split.
Both end as the same thing: `model/` in the artifact, written by `save_pretrained` (safetensors) with
the tokenizer.json beside it, so `scores` has one code path. Training checkpoints (weights, optimizer,
scheduler and RNG state, all safetensors + JSON) go to the build's partial folder every
`checkpoint_every` steps; a killed run resumes from the last one and ends bit-identical to an
uninterrupted run. The manifest records the validation perplexity (valid split) and parameter counts.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import ConfigError, InputError
from pipeline.formats import (
    REFERENCE_MODEL_DIR,
    TOKEN_PAD,
    TOKENIZER_FILE,
    ChunkReader,
    load_tokenizer,
    same_tokenizer,
    tokenizer_identity,
)
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext
from pipeline.versioning import tree_digest

log = logging.getLogger("rpt.reference")

CKPT_DIR = "_checkpoints"
# Files of a given model folder that decide its outputs (weights, architecture, tokenizer).
MODEL_FILES = (
    "*.safetensors",
    "*.bin",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
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
)


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
    eval_tokens: int = Field(262_144, ge=0, description="validation perplexity over at most this many tokens")
    device: str = Field("auto", description="auto (GPU when present), cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")

    UNHASHED = frozenset({"path", "device", "dtype", "checkpoint_every"})

    def hashed_dict(self) -> dict[str, Any]:
        d = super().hashed_dict()
        if self.path:  # an adopted model is identified by its files; training settings do not apply
            d = {k: v for k, v in d.items() if k not in SIZE_FIELDS}
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


def perplexity(
    model: Any, docs: list[np.ndarray], seq_len: int, batch: int, device: Any, amp: Any
) -> dict[str, Any]:
    """Perplexity over non-overlapping windows of `seq_len` tokens (a window's first token is not predicted)."""
    import torch
    import torch.nn.functional as F

    windows = [d[i : i + seq_len] for d in docs for i in range(0, len(d), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        return {"valid_ppl": None, "valid_tokens": 0}
    windows.sort(key=len)
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        i = 0
        while i < len(windows):
            n = len(windows[i])
            j = i
            while j < len(windows) and j - i < batch and len(windows[j]) == n:
                j += 1
            x = torch.from_numpy(np.stack(windows[i:j])).to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(input_ids=x).logits[:, :-1].float()
            nll += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            )
            count += (j - i) * (n - 1)
            i = j
    model.train(was_training)
    return {"valid_ppl": math.exp(nll / count), "valid_nll": nll / count, "valid_tokens": count}


# ------------------------------------------------------------------------------------------ checkpoints


def _after_step(step: int) -> None:
    """Called after every optimizer step (tests replace it to simulate a kill)."""


def save_checkpoint(ctx: StageContext, step: int, model: Any, opt: Any, sched: Any) -> None:
    """Weights, optimizer tensors and RNG state as safetensors, the rest as JSON; `state.json` last marks
    the checkpoint complete. Older checkpoints are removed once the new one is complete."""
    import torch
    from safetensors.torch import save_file, save_model

    name = f"{CKPT_DIR}/step-{step:08d}"
    with ctx.local_dir(name) as d:
        save_model(model, str(d / "model.safetensors"))
        osd = opt.state_dict()
        tensors = {
            f"{i}.{k}": v.detach().cpu().contiguous()
            for i, st in osd["state"].items()
            for k, v in st.items()
            if torch.is_tensor(v)
        }
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(d / "optimizer.safetensors"))
        state = {"step": step, "param_groups": osd["param_groups"], "scheduler": sched.state_dict()}
        (d / "state.json").write_text(json.dumps(state))
    for p in ctx.fs.ls(ctx.path(CKPT_DIR), detail=False):
        if p.rstrip("/").rsplit("/", 1)[-1] < f"step-{step:08d}":
            ctx.fs.rm(p, recursive=True)


def latest_checkpoint(ctx: StageContext) -> str | None:
    if not ctx.fs.exists(ctx.path(CKPT_DIR)):
        return None
    done = sorted(
        p.rstrip("/")
        for p in ctx.fs.ls(ctx.path(CKPT_DIR), detail=False)
        if ctx.fs.exists(p.rstrip("/") + "/state.json")
    )
    return done[-1] if done else None


def load_checkpoint(ctx: StageContext, path: str, model: Any, opt: Any, sched: Any) -> int:
    import torch
    from safetensors.torch import load_file, load_model

    local = Path(path)
    tmp = None
    if not ctx.store.is_local:
        tmp = Path(tempfile.mkdtemp(prefix="rpt-ckpt-"))
        ctx.fs.get(path, str(tmp), recursive=True)
        local = tmp
    try:
        state = json.loads((local / "state.json").read_text())
        load_model(model, str(local / "model.safetensors"))
        tensors = load_file(str(local / "optimizer.safetensors"))
        dev = next(model.parameters()).device
        per_param: dict[int, dict[str, Any]] = {}
        for key, t in tensors.items():
            if key.startswith("rng."):
                continue
            i, name = key.split(".", 1)
            # AdamW keeps `step` on the CPU and the moments beside the parameter
            per_param.setdefault(int(i), {})[name] = t if name == "step" else t.to(dev)
        opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        return int(state["step"])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ the stage


def build_model(cfg: Config, vocab_size: int, eos_id: int | None) -> Any:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if cfg.hidden % cfg.heads:
        raise ConfigError(f"reference.hidden={cfg.hidden} must be divisible by reference.heads={cfg.heads}")
    mcfg = GPTNeoXConfig(
        vocab_size=-(-vocab_size // 64) * 64,  # padded like Pythia's, for matmul-friendly shapes
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=max(cfg.seq_len, 256),
        rotary_pct=0.25,
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(cfg.seed)
    return GPTNeoXForCausalLM(mcfg)


def param_counts(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        emb += out.weight.numel()
    return {"params": int(total), "non_embedding_params": int(total - emb)}


def lr_lambda(warmup: int, steps: int) -> Any:
    """Linear warmup, then cosine decay to 0.1 x the peak (Pythia's schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return f


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
        p = Path(cfg.path)
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"reference.path: {cfg.path} is not a Hugging Face model folder (no config.json)"
            )
        return {"model_files": tree_digest(p, MODEL_FILES)}

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
        # validation perplexity, with the model as saved (one code path for both sources)
        from transformers import AutoModelForCausalLM

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
        stats["eval_s"] = time.perf_counter() - t0
        stats.update(param_counts(model))
        stats["tokenizer_differs"] = differs
        stats["architecture"] = type(model).__name__
        log.info(
            "reference: %s, %s params, valid ppl %s",
            stats["architecture"],
            f"{stats['params']:,}",
            f"{stats['valid_ppl']:.2f}" if stats.get("valid_ppl") else "n/a",
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
        import torch

        tok = load_tokenizer(ctx.inputs["tokenizer"])
        eos_id = ctx.inputs["tokenizer"].meta.get("eos_id")
        sampler = WindowSampler(reader, "train", cfg.seq_len, cfg.seed)
        model = build_model(cfg, tok.get_vocab_size(), eos_id).to(device)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps))
        start = 0
        ck = latest_checkpoint(ctx)
        if ck is not None:
            start = load_checkpoint(ctx, ck, model, opt, sched)
            log.info("reference: resuming training from step %d (%s)", start, ck.rsplit("/", 1)[-1])
        model.train()
        log.info(
            "reference: training GPT-NeoX (%s params) for %d steps of %d x %d tokens on %s",
            f"{param_counts(model)['params']:,}",
            cfg.steps,
            cfg.batch,
            cfg.seq_len,
            device,
        )
        t0 = time.perf_counter()
        loss_v = float("nan")
        bar = progress(total=cfg.steps, initial=start, desc="reference train", unit="step")
        try:
            for step in range(start, cfg.steps):
                x = torch.from_numpy(sampler.batch(step, cfg.batch)).to(device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_v = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                done = step + 1
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    save_checkpoint(ctx, done, model, opt, sched)
                _after_step(done)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        trained = cfg.steps - start
        with ctx.local_dir(REFERENCE_MODEL_DIR) as mdir:
            model.save_pretrained(str(mdir))
            shutil.copyfile(ctx.local_input("tokenizer", TOKENIZER_FILE), mdir / TOKENIZER_FILE)
        return {
            "source": "trained",
            "steps": cfg.steps,
            "resumed_from_step": start,
            "final_train_loss": loss_v,
            "train_tokens_seen": cfg.steps * cfg.batch * cfg.seq_len,
            "train_split_tokens": sampler.n_tokens,
            "train_s": seconds,
            "train_tokens_per_s": trained * cfg.batch * cfg.seq_len / seconds if seconds > 0 else None,
        }

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        if ctx.fs.exists(ctx.path(CKPT_DIR)):
            ctx.fs.rm(ctx.path(CKPT_DIR), recursive=True)
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

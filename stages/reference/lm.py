"""The reference stage's language model, the torch side of stages.reference.stage: the GPT-NeoX it builds
(`build_model`), its training loop (torchtitan-style: `ReferenceTrainer.train_step(step)` is one
optimizer step, `train()` the loop with its checkpoints), and what the manifest reports of a model
(`perplexity`, `param_counts`).

The optimizer (model.optim), the learning rate (model.schedules) and the checkpoints (model.checkpointer)
are the train stage's. Checkpoints go to the partial folder's `_checkpoints/`; on a remote store they are
written locally and copied there (`RemoteCheckpoints`).

Imported only inside stages.reference.stage's run_shard (it imports torch; the stage module must not).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model import schedules as sch
from model.checkpointer import LATEST, STATE_FILE, Checkpointer, load_state, rng_state, save_state
from model.lm_scoring import CopyCache, copy_cache_probs, mix_copy
from model.optim import adamw, set_lr
from pipeline.errors import ConfigError
from pipeline.progress import progress
from pipeline.stage import StageContext
from stages.reference.stage import CKPT_DIR, Config, WindowSampler

log = logging.getLogger("rpt.reference")

BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
MIN_LR_RATIO = 0.1  # cosine decay to 0.1 x the peak (Pythia's schedule)


def _after_step(step: int) -> None:
    """Called after every optimizer step (tests replace it to simulate a kill)."""


# ------------------------------------------------------------------------------------------ the model
def build_model(cfg: Config, vocab_size: int, eos_id: int | None) -> Any:
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
        initializer_range=cfg.init_std,
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


def perplexity(
    model: Any, docs: list[np.ndarray], seq_len: int, batch: int, device: Any, amp: Any
) -> dict[str, Any]:
    """Perplexity over non-overlapping windows of `seq_len` tokens (a window's first token is not predicted)."""
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


def copy_probe(
    model: Any,
    docs: list[np.ndarray],
    piece: int,
    n: int,
    seed: int,
    device: Any,
    copy: CopyCache | None = None,
) -> dict[str, Any]:
    """Can the scoring LM copy in context? The scores stage asks it how much a candidate (c_j, c_j+1)
    placed before the query c_q raises log P(c_t); when c_q repeats c_j, a model that copies finds c_t in
    c_j+1. So: n passages (a, b) of `piece` tokens each, b following a in a document, fed as [a, b, a, b];
    the mean NLL of b's tokens where b first occurs and where it repeats. An LM whose repeat NLL is no
    lower than the first cannot single out the chunk that holds a continuation, and RPT-Sem's positives
    are then blind to what makes retrieval pay (docs/supervision.md, "Can the scoring LM copy?").
    With a copy cache the figures are the scorer's as the scores stage uses it (LM and cache mixed), and
    `copy_gain_lm` is the LM's alone."""
    long_docs = [d for d in docs if len(d) >= 2 * piece]
    if not long_docs or n <= 0:
        return {"copy_first_nll": None, "copy_repeat_nll": None, "copy_gain": None, "copy_passages": 0}
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        d = long_docs[int(rng.integers(len(long_docs)))]
        s = int(rng.integers(len(d) - 2 * piece + 1))
        ab = d[s : s + 2 * piece]
        rows.append(np.concatenate([ab, ab]))
    nll = []
    # 16 passages at a time: [16, 4 piece, vocab] logits stay small for a 50K vocabulary
    for i in range(0, n, 16):
        x = torch.from_numpy(np.stack(rows[i : i + 16]).astype(np.int64)).to(device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
        nll.append(-logp.gather(-1, x[:, 1:, None])[..., 0].cpu())  # [:, t]: the NLL of token t + 1
    nll_t = torch.cat(nll).double().numpy()

    def first_repeat(nll_t: np.ndarray) -> tuple[float, float]:
        return float(nll_t[:, piece - 1 : 2 * piece - 1].mean()), float(
            nll_t[:, 3 * piece - 1 : 4 * piece - 1].mean()
        )

    out: dict[str, Any] = {}
    if copy is not None:
        lm_first, lm_repeat = first_repeat(nll_t)
        out["copy_gain_lm"] = lm_first - lm_repeat
        p_copy, matched = copy_cache_probs(np.stack(rows), copy.order)
        nll_t = -mix_copy(-nll_t, p_copy, matched, copy.weight)
    first, repeat = first_repeat(nll_t)
    return {
        "copy_first_nll": first,
        "copy_repeat_nll": repeat,
        "copy_gain": first - repeat,
        "copy_passages": n,
        **out,
    }


# ------------------------------------------------------------------------------------------ checkpoints
class RemoteCheckpoints:
    """On a remote store: the Checkpointer writes into a local folder, each new checkpoint is copied to
    `_checkpoints/` in the partial folder (LATEST last, older ones removed), and a resumed run first
    copies the latest one back."""

    def __init__(self, ctx: StageContext, local: Path):
        self.fs, self.remote, self.local = ctx.fs, ctx.path(CKPT_DIR).rstrip("/"), local

    def pull(self) -> None:
        latest = f"{self.remote}/{LATEST}"
        if not self.fs.exists(latest):
            return
        name = self.fs.cat(latest).decode().strip()
        src = f"{self.remote}/{name}"
        if not self.fs.exists(f"{src}/{STATE_FILE}"):
            return
        (self.local / name).mkdir(parents=True, exist_ok=True)
        for p in self.fs.ls(src, detail=False):
            self.fs.get_file(p, str(self.local / name / p.rstrip("/").rsplit("/", 1)[-1]))
        (self.local / LATEST).write_text(name)

    def push(self, folder: Path) -> None:
        dest = f"{self.remote}/{folder.name}"
        self.fs.makedirs(dest, exist_ok=True)
        for f in sorted(folder.iterdir()):
            self.fs.put_file(str(f), f"{dest}/{f.name}")
        self.fs.pipe_file(f"{self.remote}/{LATEST}", folder.name.encode())
        for p in self.fs.ls(self.remote, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and name != folder.name:
                self.fs.rm(p, recursive=True)


# ------------------------------------------------------------------------------------------ training
class ReferenceTrainer:
    """Trains the reference GPT-NeoX from its seed (or resumes it from the latest checkpoint) on the
    windows of `sampler`; the batch, the learning rate and so the weights of step s depend only on
    (config, s), so a killed run resumes to the bytes of an uninterrupted one."""

    def __init__(
        self,
        ctx: StageContext,
        cfg: Config,
        sampler: WindowSampler,
        vocab_size: int,
        eos_id: int | None,
        device: torch.device,
        amp: torch.dtype | None,
    ):
        self.cfg, self.sampler, self.device, self.amp = cfg, sampler, device, amp
        self.model = build_model(cfg, vocab_size, eos_id).to(device)
        self.opt = adamw(self.model, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)
        self.remote: RemoteCheckpoints | None = None
        if ctx.store.is_local:
            self.ckpt = Checkpointer(Path(ctx.path(CKPT_DIR)))
        else:
            self.ckpt = Checkpointer(Path(tempfile.mkdtemp(prefix="rpt-ckpt-")))
            self.remote = RemoteCheckpoints(ctx, self.ckpt.root)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return sch.learning_rate(step, cfg.steps, cfg.lr, cfg.warmup, MIN_LR_RATIO, peak_times_ratio=True)

    def train_step(self, step: int) -> float:
        """One optimizer step on the batch of `step`; its loss."""
        set_lr(self.opt, self.lr(step))
        x = torch.from_numpy(self.sampler.batch(step, self.cfg.batch)).to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def train(self) -> dict[str, Any]:
        """Train to `cfg.steps`, checkpointing every `checkpoint_every` steps; the training stats."""
        cfg = self.cfg
        start = self._resume()
        self.model.train()
        log.info(
            "reference: training GPT-NeoX (%s params) for %d steps of %d x %d tokens on %s",
            f"{param_counts(self.model)['params']:,}",
            cfg.steps,
            cfg.batch,
            cfg.seq_len,
            self.device,
        )
        t0 = time.perf_counter()
        loss = float("nan")
        bar = progress(total=cfg.steps, initial=start, desc="reference train", unit="step")
        try:
            for step in range(start, cfg.steps):
                loss = self.train_step(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.lr(step):.2e}")
                done = step + 1
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self._checkpoint(done)
                _after_step(done)
        finally:
            bar.close()
            if self.remote is not None:  # the local copies of the remote checkpoints
                shutil.rmtree(self.ckpt.root, ignore_errors=True)
        seconds = time.perf_counter() - t0
        tokens_per_step = cfg.batch * cfg.seq_len
        return {
            "source": "trained",
            "steps": cfg.steps,
            "resumed_from_step": start,
            "final_train_loss": loss,
            "train_tokens_seen": cfg.steps * tokens_per_step,
            "train_split_tokens": self.sampler.n_tokens,
            "train_s": seconds,
            "train_tokens_per_s": (cfg.steps - start) * tokens_per_step / seconds if seconds > 0 else None,
        }

    def _resume(self) -> int:
        if self.remote is not None:
            self.remote.pull()
        ck = self.ckpt.latest()
        if ck is None:
            return 0
        start = int(load_state(ck, self.model, self.opt, device=self.device)["step"])
        log.info("reference: resuming training from step %d (%s)", start, ck.name)
        return start

    def _checkpoint(self, done: int) -> None:
        rngs = [rng_state(self.device)]
        folder = self.ckpt.save(done, lambda d: save_state(d, self.model, self.opt, step=done, rngs=rngs))
        if self.remote is not None:
            self.remote.push(folder)

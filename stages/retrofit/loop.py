"""The retrofit stage's torch side: build the retrofitted model on the frozen base, train the new parts
(`RetrofitTrainer.train_step(step)` is one optimizer step; `train()` the loop with its checkpoints), then
measure frozen / own neighbors / no neighbors on the same evaluation windows.

Imported only by stages.retrofit.stage's run_shard (it imports torch; the stage module must not).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.neighbors import load_neighbor_table
from data.retrofit import Windows, batch_arrays, sample, tiling_windows, training_windows
from model import schedules as sch
from model.checkpointer import Checkpointer, load_state, module_bytes, rng_state, save_state, write_atomic
from model.config import IGNORE
from model.optim import adamw, set_lr
from model.retrofit import RetrofitLM, load_base, retrofit_config, save_retrofit
from pipeline.bootstrap import paired_delta
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import ConfigError, InputError, RptError
from pipeline.formats import CAUSAL_LM_FILES, REFERENCE_MODEL_DIR, TOKENIZER_FILE, ChunkReader, same_tokenizer
from pipeline.parquet import parquet_bytes
from pipeline.progress import progress
from pipeline.stage import StageContext
from pipeline.versioning import tree_digest
from stages.retrofit.stage import CKPT_DIR, EVAL_FILE, Config

log = logging.getLogger("rpt.retrofit")

BETAS = (0.9, 0.95)
SETTINGS = ("frozen", "own", "empty")  # the frozen LM; retrofitted with its neighbors; with none
BLOCK_CHUNKS = 16  # the bootstrap's block when there are few documents (evaluate.block_chunks' default)
METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens", pa.int64()),
        ("tokens_per_s", pa.float64()),
        ("elapsed_s", pa.float64()),
    ]
)
EVAL_SCHEMA = pa.schema(
    [
        ("window", pa.int64()),
        ("doc_idx", pa.int64()),
        ("first_chunk", pa.int64()),
        ("setting", pa.string()),
        ("nll_sum", pa.float64()),
        ("tokens", pa.int64()),
    ]
)


def _after_step(step: int) -> None:
    """Called after every optimizer step (tests replace it to simulate a kill)."""


def base_folder(ctx: StageContext, cfg: Config) -> tuple[Path, dict[str, Any]]:
    """The base model's folder and its identity (what retrofit.json records)."""
    if cfg.base_path:
        path = Path(cfg.base_path).resolve()
        return path, {"path": str(path), "digest": tree_digest(path, CAUSAL_LM_FILES)}
    ref = ctx.inputs["reference"]
    path = ctx.local_input("reference", REFERENCE_MODEL_DIR)
    return path, {
        "artifact": ref.ref,
        "model_dir": REFERENCE_MODEL_DIR,
        "digest": tree_digest(path, CAUSAL_LM_FILES),
    }


def context_len(base: Any, cfg: Config, chunk_len: int) -> int:
    """Tokens per example: retrofit.seq_len, or the base's context (at most 2,048) in whole chunks."""
    if cfg.seq_len is not None:
        if cfg.seq_len % chunk_len:
            raise ConfigError(
                f"retrofit.seq_len={cfg.seq_len} must be a multiple of chunks.chunk_len={chunk_len}"
            )
        return cfg.seq_len
    ctx_len = int(getattr(base.config, "max_position_embeddings", 2048) or 2048)
    n = min(ctx_len, 2048) // chunk_len * chunk_len
    if n < 2 * chunk_len:
        raise ConfigError(f"the base's context ({ctx_len} tokens) holds fewer than 2 chunks of {chunk_len}")
    return n


class RetrofitTrainer:
    def __init__(self, ctx: StageContext, cfg: Config, root: Path):
        self.cfg = cfg
        self.root = root
        self.device = device = resolve_device(cfg.device, "retrofit.device")
        self.bf16 = resolve_dtype(cfg.dtype, device, "retrofit.dtype") == torch.bfloat16
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        base_dir, self.base_info = base_folder(ctx, cfg)
        pipe_tok = ctx.local_input("tokenizer", TOKENIZER_FILE)
        if (base_dir / TOKENIZER_FILE).is_file() and not same_tokenizer(base_dir / TOKENIZER_FILE, pipe_tok):
            raise ConfigError(
                f"the base at {base_dir} has another tokenizer than {ctx.inputs['tokenizer'].ref}: set "
                f"tokenizer.path to {base_dir / TOKENIZER_FILE} so the chunks use the base's token ids"
            )
        base = load_base(base_dir, torch.bfloat16 if self.bf16 else None)  # frozen: bf16 weights on a GPU
        self.reader = reader = ChunkReader(ctx.inputs["chunks"])
        m = reader.chunk_len
        self.seq_len = context_len(base, cfg, m)
        self.c = self.seq_len // m
        vocab = int(base.get_input_embeddings().weight.shape[0])
        self.tokens = np.asarray(reader.tokens)
        if self.tokens.max(initial=0) >= vocab:
            raise InputError(f"{ctx.inputs['chunks'].ref} has token ids >= the base's vocabulary ({vocab})")
        self.chunk_doc = reader.chunk_doc
        self.table = load_neighbor_table(ctx.inputs["neighbors"], reader.n_chunks).ids
        self.windows = training_windows(reader.docs("train"), self.c)
        self.fill = neighbor_fill(self.table, reader.docs("train"), cfg.n_neighbors)
        if self.fill == 0:
            raise InputError(
                f"{ctx.inputs['neighbors'].ref} has no neighbors for any train chunk: nothing to train CCA on"
            )
        if len(self.windows.first) == 0:
            raise InputError(
                f"{ctx.inputs['chunks'].ref}: no train document has {self.c} chunks ({self.seq_len} tokens); "
                "lower retrofit.seq_len"
            )
        rcfg = retrofit_config(
            base, m, n_neighbors=cfg.n_neighbors, cca_layers=cfg.cca_layers, encoder_layers=cfg.encoder_layers
        )
        torch.manual_seed(cfg.seed)
        self.model = RetrofitLM(base, rcfg, cfg.init_std).to(device)
        self.opt = adamw(self.model.parts, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)
        self.ckpt = Checkpointer(root / CKPT_DIR)
        self.rows: list[dict[str, Any]] = []
        self.base_tokens = _base_tokens(ctx)

    def batch(self, picks: np.ndarray, windows: Windows) -> dict[str, torch.Tensor]:
        arrays = batch_arrays(
            self.tokens, self.chunk_doc, self.table, windows, picks, self.c, self.cfg.n_neighbors
        )
        return {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        lr = sch.learning_rate(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        set_lr(self.opt, lr)
        b = self.batch(sample(self.windows, cfg.seed, step, cfg.batch_size), self.windows)
        with self.autocast:
            loss = self.model(b["tokens"], b["neighbors"], b["labels"]).loss
        loss.backward()
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.trainable(), cfg.grad_clip or float("inf"))
        )
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
            raise RptError(
                f"retrofit: loss {loss.item()} / gradient norm {grad_norm} at step {step}; lower retrofit.lr "
                f"(the last good checkpoint is {self.ckpt.latest() or 'none'}, and the run resumes from it)"
            )
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": float(loss.item()), "lr": lr, "grad_norm": grad_norm}

    def _save(self, folder: Path, step: int) -> None:
        files = {"metrics.parquet": _metrics_bytes(self.rows)}
        save_state(
            folder,
            self.model.parts,
            self.opt,
            step=step,
            rngs=[rng_state(self.device)],
            weights=module_bytes,
            files=files,
        )

    def train(self) -> float:
        cfg = self.cfg
        start, elapsed0 = 0, 0.0
        ck = self.ckpt.latest()
        if ck is not None:
            state = load_state(ck, self.model.parts, self.opt, device=self.device)
            start = int(state["step"])
            self.rows = pq.read_table(ck / "metrics.parquet").to_pylist()
            elapsed0 = self.rows[-1]["elapsed_s"] if self.rows else 0.0
            log.info("retrofit: resuming from %s (step %d of %d)", ck, start, cfg.steps)
        self.model.train()
        bar = progress(total=cfg.steps, initial=start, desc="retrofit", unit="step")
        t0 = t_last = time.perf_counter()
        losses: list[float] = []
        per_step = cfg.batch_size * self.seq_len
        last_done = start
        for step in range(start, cfg.steps):
            m = self.train_step(step)
            done = step + 1
            losses.append(m["loss"])
            bar.update(1)
            _after_step(step)
            if done % cfg.log_every == 0 or done == cfg.steps or done % cfg.checkpoint_every == 0:
                now = time.perf_counter()
                row = {
                    "step": done,
                    "loss": float(np.mean(losses)),
                    "lr": m["lr"],
                    "grad_norm": m["grad_norm"],
                    "tokens": done * per_step,
                    "tokens_per_s": (done - last_done) * per_step / max(now - t_last, 1e-9),
                    "elapsed_s": elapsed0 + now - t0,
                }
                self.rows.append(row)
                losses, t_last, last_done = [], now, done
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                log.info(
                    "retrofit step %d/%d loss %.4f lr %.2e %.0f tok/s",
                    done,
                    cfg.steps,
                    row["loss"],
                    row["lr"],
                    row["tokens_per_s"],
                )
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.ckpt.save(done, lambda folder, done=done: self._save(folder, done))
        bar.close()
        return self.rows[-1]["elapsed_s"] if self.rows else 0.0

    @torch.no_grad()
    def evaluate(self, split: str, max_tokens: int | None) -> list[dict[str, Any]]:
        """NLL sums per evaluation window and setting: every setting scores the same tokens."""
        docs = self.reader.docs(split)
        if not docs:
            raise InputError(
                f"{self.reader.art.ref} has no {split!r} document to evaluate; set documents.split_lists"
            )
        w = tiling_windows(docs, self.c)
        if max_tokens is not None:  # whole windows, in document order, up to the budget
            keep = np.cumsum(w.n_chunks * self.reader.chunk_len) <= max(max_tokens, self.seq_len)
            w = Windows(w.first[keep], w.n_chunks[keep], w.doc_idx[keep])
        self.model.eval()
        rows: list[dict[str, Any]] = []
        bs = max(1, self.cfg.batch_size)
        for s in progress(range(0, len(w.first), bs), desc=f"retrofit eval {split}", unit="batch"):
            picks = np.arange(s, min(s + bs, len(w.first)))
            b = self.batch(picks, w)
            for setting in SETTINGS:
                nb = {"frozen": None, "own": b["neighbors"], "empty": torch.full_like(b["neighbors"], -1)}[
                    setting
                ]
                with self.autocast:
                    nll = self.model(b["tokens"], nb, b["labels"]).token_nll.double()
                n_tok = (b["labels"] != IGNORE).sum(1)
                for r, i in enumerate(picks):
                    rows.append(
                        {
                            "window": int(i),
                            "doc_idx": int(w.doc_idx[i]),
                            "first_chunk": int(w.first[i]),
                            "setting": setting,
                            "nll_sum": float(nll[r].sum()),
                            "tokens": int(n_tok[r]),
                        }
                    )
        return rows


def neighbor_fill(table: np.ndarray, docs: list[Any], k: int) -> float:
    """Share of the documents' chunks with at least one of their first k neighbors."""
    ids = np.concatenate([d.chunk_ids for d in docs]) if docs else np.zeros(0, np.int64)
    return float((table[ids, :k] >= 0).any(1).mean()) if len(ids) else 0.0


def _base_tokens(ctx: StageContext) -> int | None:
    """Tokens the base was trained on, when the pipeline trained it (the reference stage's steps x batch x
    seq_len); None for a given model."""
    ref = ctx.inputs.get("reference")
    if ref is None or ref.manifest.stats.get("source") == "given":
        return None
    rc = ref.manifest.config
    return int(rc["steps"]) * int(rc["batch"]) * int(rc["seq_len"])


def _metrics_bytes(rows: list[dict[str, Any]]) -> bytes:
    return parquet_bytes(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA))


def bootstrap_units(rows: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """What the intervals resample, as the evaluate stage does: documents when there are 8 or more, else
    blocks of BLOCK_CHUNKS chunks (neighbouring windows of one book are correlated; single windows would
    give intervals too narrow). Returns the unit's name and each row's unit key."""
    docs = {r["doc_idx"] for r in rows}
    if len(docs) >= 8:
        return "document", [(r["doc_idx"], 0) for r in rows]
    return f"block of {BLOCK_CHUNKS} chunks", [(r["doc_idx"], r["first_chunk"] // BLOCK_CHUNKS) for r in rows]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Perplexity per setting and the paired ΔNLL (own - empty, own - frozen, empty - frozen) with 95%
    bootstrap intervals over units (`bootstrap_units`)."""
    unit, keys = bootstrap_units(rows)
    sums: dict[str, dict[tuple[int, int], list[float]]] = {s: {} for s in SETTINGS}
    for r, key in zip(rows, keys):
        acc = sums[r["setting"]].setdefault(key, [0.0, 0.0])
        acc[0] += r["nll_sum"]
        acc[1] += r["tokens"]
    order = sorted(sums["own"])
    tok = np.array([sums["own"][k][1] for k in order])
    nll = {s: np.array([sums[s][k][0] for k in order]) for s in SETTINGS}
    out: dict[str, Any] = {
        "eval_tokens": int(tok.sum()),
        "eval_windows": sum(r["setting"] == "own" for r in rows),
        "bootstrap_unit": unit,
        "bootstrap_units": len(order),
    }
    for s in SETTINGS:
        out[f"ppl_{s}"] = float(np.exp(nll[s].sum() / tok.sum()))
    rng = np.random.default_rng(0)
    for a, b in (("own", "empty"), ("own", "frozen"), ("empty", "frozen")):
        point, lo, hi = paired_delta(nll[a], nll[b], tok, rng)
        out[f"nll_{a}_minus_{b}"] = [round(point, 5), round(lo, 5), round(hi, 5)]
    return out


def run_retrofit(ctx: StageContext) -> dict[str, Any]:
    cfg: Config = ctx.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with ctx.local_dir("") as root:
        tr = RetrofitTrainer(ctx, cfg, root)
        train_s = tr.train()
        t0 = time.perf_counter()
        rows = tr.evaluate(cfg.eval_split, cfg.eval_tokens)
        eval_s = time.perf_counter() - t0
        save_retrofit(tr.model, root, tr.base_info)
        write_atomic(root / "metrics.parquet", _metrics_bytes(tr.rows))
        write_atomic(root / EVAL_FILE, parquet_bytes(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)))
        counts = tr.model.param_counts()
        tokens = cfg.steps * cfg.batch_size * tr.seq_len
        stats: dict[str, Any] = {
            **counts,
            "trainable_share": counts["trainable_params"]
            / (counts["trainable_params"] + counts["frozen_params"]),
            "base_model_type": tr.model.base.config.model_type,
            "cca_layers": tr.model.cfg.cca_layers,
            "seq_len": tr.seq_len,
            "steps": cfg.steps,
            "train_tokens": tokens,
            "base_train_tokens": tr.base_tokens,
            "train_token_share": tokens / tr.base_tokens if tr.base_tokens else None,
            "train_windows": len(tr.windows.first),
            "train_neighbor_fill": round(tr.fill, 4),
            "final_loss": tr.rows[-1]["loss"] if tr.rows else None,
            "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2),
            "eval_split": cfg.eval_split,
            **summarize(rows),
        }
        log.info(
            "retrofit: %s ppl frozen %.3f, own %.3f, empty %.3f; own - empty %s nats/token",
            cfg.eval_split,
            stats["ppl_frozen"],
            stats["ppl_own"],
            stats["ppl_empty"],
            stats["nll_own_minus_empty"],
        )
    return stats

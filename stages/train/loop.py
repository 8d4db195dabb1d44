"""The train stage's training loop (torchtitan-style): a `Trainer` whose `train_step(step)` is one
optimizer step (gradient accumulation over micro-batches, the scheduled-sampling draws, clipping, the
NaN/inf stop) and whose `train()` loops over steps, writing metrics rows, logs and checkpoints.
Its parts live beside it: the metric sums and rows in stages.train.metrics, the optimizer in
model.optim, the schedules in model.training / model.schedules, checkpoints in model.checkpointer
(the scheme the reference stage shares).

Imported only by `stages.train.stage.run_training` (it imports torch; the stage module must not).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from model.checkpoint import config_json, load_weights, model_bytes
from model.checkpointer import Checkpointer, load_state, rng_state, save_state
from model.config import RPTConfig
from model.optim import adamw, set_lr
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import ConfigError, InputError, RptError
from stages.train.metrics import MetricSums, add_micro_batch, metrics_bytes, metrics_row, step_sums
from stages.train.stage import CKPT_DIR, Config, TrainJob

log = logging.getLogger("rpt.train")


# ------------------------------------------------------------------------------------------ helpers
class _Dist:
    """Thin helpers over torch.distributed that are no-ops in a single process."""

    def __init__(self, world: int):
        self.world = world

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def _tensorboard(root: Path, rank: int) -> Any:
    """A SummaryWriter into the artifact's `tensorboard/` folder when tensorboard is installed (rank 0)."""
    if rank:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(root / "tensorboard"))


def _gold_draw(seed: int, step: int, micro: int, p: float) -> bool:
    """One Bernoulli(p) per micro-batch (the official code draws one per forward pass), a pure
    function of (seed, step, micro-batch index) so resumed and DDP runs draw the same."""
    return bool(np.random.default_rng([seed, 7, step, micro]).random() < p)


# ------------------------------------------------------------------------------------------ the trainer
class Trainer:
    """One training process of `world`: set up by the constructor (data, model, optimizer), run by
    `train()`. Rank 0 writes checkpoints and the final files."""

    def __init__(self, job: TrainJob, rank: int = 0, world: int = 1, local_rank: int = 0):
        from data.loader import TrainSequences
        from data.neighbors import lex_targets, load_neighbor_table, load_scores_table, supervision_stats
        from data.sequences import plan_sequences
        from model.rpt import RPT
        from model.training import Schedule
        from pipeline.formats import TOKENS_NPY, ChunkReader

        self.job, self.rank, self.world = job, rank, world
        self.cfg = cfg = Config(**job.train)
        self.mcfg = mcfg = RPTConfig(**job.model)
        self.root = root = Path(job.workdir)
        self.dist = _Dist(world)
        self.ckpt = Checkpointer(root / CKPT_DIR)
        # under torchrun LOCAL_RANK's GPU; in one process the shard's GPU lane or a free GPU
        self.device = device = resolve_device(cfg.device, "train.device")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.use_bf16 = resolve_dtype(cfg.dtype, device, "train.dtype") == torch.bfloat16  # else fp32
        self.micro = micro = cfg.micro_batch or max(1, cfg.batch_size // world)
        if cfg.batch_size % (micro * world):
            raise ConfigError(
                f"train.batch_size={cfg.batch_size} is not a multiple of micro_batch ({micro}) "
                f"x processes ({world})"
            )
        self.accum = accum = cfg.batch_size // (micro * world)

        # ---- data
        chunks = job.artifact("chunks")
        reader = ChunkReader(chunks)
        n_chunks = cfg.seq_len // mcfg.chunk_len
        plan = plan_sequences(reader, cfg.split, n_chunks)
        if len(plan) == 0:
            raise InputError(
                f"no training examples: {chunks.ref} has no {cfg.split!r} document with 2 or more tokens"
            )
        bm25 = cand = None
        # memory-mapped .npy copies of the tables (removed with the checkpoints when the artifact is published)
        tables = root / CKPT_DIR / "tables" / f"rank-{rank}"
        if cfg.variant != "baseline":
            table = load_neighbor_table(job.artifact("bm25"), reader.n_chunks, cache=tables)
            if cfg.variant == "retro_bm25":
                bm25 = table
            elif cfg.variant == "rpt_lex":
                cand = lex_targets(table)
            else:
                cand = load_scores_table(job.artifact("scores"), reader.n_chunks, cache=tables)
        self.ds = TrainSequences(
            str(chunks.local_path(TOKENS_NPY)),
            plan,
            mcfg.chunk_len,
            exclude_recent=mcfg.exclude_recent,
            bm25=bm25,
            n_neighbors=cfg.n_neighbors,
            cand=cand,
        )
        sup_stats = (
            supervision_stats(plan, cand if cand is not None else bm25, mcfg.exclude_recent)
            if (cand is not None or bm25 is not None)
            else {}
        )

        # ---- model, optimizer
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = model = RPT(mcfg)
        self.opt = adamw(
            model,
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            fused=device.type == "cuda" or None,
        )
        model.to(device)
        torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # dropout stream of this rank
        if device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed * 1000 + 1 + rank)
        self.net: torch.nn.Module = model  # DDP- and compile-wrapped by train()

        self.schedule = Schedule(
            steps=cfg.steps,
            lr=cfg.lr,
            warmup=cfg.warmup_steps,
            min_lr_ratio=cfg.min_lr_ratio,
            alpha_ret=cfg.alpha_ret,
            alpha_ramp=cfg.alpha_ret_ramp_steps
            if cfg.alpha_ret_ramp_steps is not None
            else int(0.2 * cfg.steps),
            tau_max=cfg.tau_max,
            tau_ramp=cfg.tau_ramp_steps if cfg.tau_ramp_steps is not None else int(0.9 * cfg.steps),
            ss_fraction=cfg.ss_fraction,
        )
        self.has_ret = mcfg.has_retriever
        self.n_cca = len(mcfg.upper_cca)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.stats: dict[str, Any] = {
            "params": model.num_params(),
            **{k: plan.stats[k] for k in ("docs", "examples", "example_chunks", "padding_share")},
            **{f"supervision_{k}": v for k, v in sup_stats.items()},
            "exclude_recent": mcfg.exclude_recent,
            "world": world,
            "micro_batch": micro,
            "accum": accum,
        }
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()
        self.rows: list[dict[str, Any]] = []
        self.batches: Any = None  # the loader's iterator, from train()

    # ---- one optimizer step
    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step: the step's schedules, `accum` micro-batches (each with its own gold
        draw), the metric sums over micro-batches and ranks, clipping, the NaN/inf stop, the update.
        Returns the schedules' values, `sums` (MetricSums on the host) and `grad_norm`."""
        from data.loader import close_batches
        from model.training import forward_loss

        cfg, accum, world = self.cfg, self.accum, self.world
        at = self.schedule.at(step, self.has_ret)
        lr, alpha, tau, pg = at["lr"], at["alpha_ret"], at["tau"], at["p_gold"]
        set_lr(self.opt, lr)
        sums = step_sums(self.n_cca, self.device)
        for a in range(accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()}
            gold = self.has_ret and _gold_draw(cfg.seed, step, a * world + self.rank, pg)
            sync = a == accum - 1 or world == 1
            ctx_sync = nullcontext() if sync else self.net.no_sync()
            with ctx_sync, self.autocast:
                loss, out = forward_loss(self.net, batch, alpha=alpha, tau=tau, gold=gold)
            with ctx_sync:
                (loss / accum).backward()
            add_micro_batch(sums, loss, out, gold, self.n_cca)
        reduced = sums.all_reduce(self.dist.all_reduce)
        step_loss = reduced.total("loss") / (accum * world)
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        )
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            close_batches(self.batches)
            last = self.ckpt.latest()
            what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {grad_norm}"
            raise RptError(
                f"train: {what} at step {step} (lr {lr:.3g}); stopped without updating the weights. The last "
                f"good checkpoint is {last if last else 'none (none was written yet)'}; lower train.lr or raise "
                "train.warmup_steps, then rerun: the run resumes from it"
            )
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {**at, "sums": reduced, "grad_norm": grad_norm}

    # ---- the loop
    def train(self) -> None:
        from data.loader import StreamSampler, close_batches, make_loader
        from pipeline.progress import progress

        cfg, rank, root, device = self.cfg, self.rank, self.root, self.device
        final_state = root / "train_state.json"
        if final_state.is_file() and json.loads(final_state.read_text()).get("step") == cfg.steps:
            return  # finished earlier (killed before the executor recorded it)
        start = self._resume()
        sampler = StreamSampler(
            len(self.ds), cfg.seed, self.micro, self.accum, rank, self.world, start, cfg.steps
        )
        loader = make_loader(self.ds, sampler, workers=cfg.workers, pin_memory=device.type == "cuda")
        self.batches = iter(loader)
        bar = progress(
            total=cfg.steps,
            initial=start,
            desc=f"train {cfg.variant}",
            unit="step",
            **({"disable": True} if rank else {}),
        )
        self.t_last, self.tok_last = time.perf_counter(), 0
        self.t_start = time.perf_counter()
        self.elapsed0 = self.rows[-1]["elapsed_s"] if self.rows else 0.0
        window: MetricSums | None = None  # the metric sums since the last metrics row
        grad_sum, window_steps = 0.0, 0
        tb = _tensorboard(root, rank)
        self.model.train()
        for step in range(start, cfg.steps):
            m = self.train_step(step)
            done = step + 1
            bar.update(1)
            window = m["sums"] if window is None else window + m["sums"]
            grad_sum, window_steps = grad_sum + m["grad_norm"], window_steps + 1
            if done % cfg.log_every == 0 or done == cfg.steps or done % cfg.checkpoint_every == 0:
                # a row holds means over the steps since the previous row (rows fall on checkpoints too,
                # so a resumed run rebuilds the same rows)
                row = self._metrics_row(done, start, window, grad_sum / window_steps, window_steps, m)
                window, grad_sum, window_steps = None, 0.0, 0
                self.rows.append(row)
                self._log(row, done, bar, tb)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self._checkpoint(done)
        close_batches(self.batches)
        bar.close()
        if tb is not None:
            tb.close()
        self._finish()

    def _resume(self) -> int:
        """Restore the latest checkpoint if there is one; wrap the model (DDP, compile). The start step."""
        start = 0
        ck = self.ckpt.latest()
        if ck is not None:
            state = load_state(
                ck, self.model, self.opt, rank=self.rank, device=self.device, load_weights=load_weights
            )
            start, self.rows = int(state["step"]), pq.read_table(ck / "metrics.parquet").to_pylist()
            if self.rank == 0:
                log.info("resuming from %s (step %d of %d)", ck, start, self.cfg.steps)
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.cfg.compile:
            self.net = torch.compile(self.net)
        return start

    def _metrics_row(
        self, done: int, start: int, window: MetricSums, grad_norm: float, n_steps: int, m: dict[str, Any]
    ) -> dict[str, Any]:
        now = time.perf_counter()
        tok = (done - start) * self.tokens_per_step
        tps = (tok - self.tok_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tok_last = now, tok
        row = metrics_row(window, self.accum * self.world, n_steps, self.has_ret, self.n_cca)
        row.update(
            grad_norm=grad_norm,
            step=done,
            p_gold=m["p_gold"],
            lr=m["lr"],
            alpha_ret=m["alpha_ret"],
            tau=m["tau"],
            tokens=done * self.tokens_per_step,
            tokens_per_s=tps,
            elapsed_s=self.elapsed0 + now - self.t_start,
        )
        return row

    def _log(self, row: dict[str, Any], done: int, bar: Any, tb: Any) -> None:
        if tb is not None:
            for key, val in row.items():
                vals = val if isinstance(val, list) else [val]
                for i, v in enumerate(vals):
                    if key != "step" and math.isfinite(v):
                        tb.add_scalar(f"train/{key}" + (f"/{i}" if isinstance(val, list) else ""), v, done)
        if self.rank == 0:
            bar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm_loss']:.3f}")
            if done % self.cfg.log_every == 0:
                log.info(
                    "step %d/%d loss %.4f lm %.4f ret %.4f p@2 %.2f r@10 %.2f gate %.2f cca %s lr %.2e "
                    "%.0f tok/s",
                    done,
                    self.cfg.steps,
                    row["loss"],
                    row["lm_loss"],
                    row["ret_loss"],
                    row["p_at_2"],
                    row["recall_at_10"],
                    row["gate_mean"],
                    "/".join(f"{r:.2f}" for r in row["cca_ratio"]),
                    row["lr"],
                    row["tokens_per_s"],
                )

    def _save(self, folder: Path, step: int, rngs: list[dict[str, torch.Tensor]]) -> None:
        """The training state (model.checkpointer) with the RPT config and the metrics rows so far."""
        files = {
            "config.json": config_json(self.mcfg, train=self.job.train, step=step).encode(),
            "metrics.parquet": metrics_bytes(self.rows),
        }
        save_state(
            folder,
            self.model,
            self.opt,
            step=step,
            rngs=rngs,
            weights=model_bytes,
            files=files,
            stats=self.stats,
        )

    def _checkpoint(self, done: int) -> None:
        rngs = self.dist.gather_objects(rng_state(self.device))
        if self.rank == 0:
            self.ckpt.save(done, lambda folder: self._save(folder, done, rngs))
        self.dist.barrier()

    def _finish(self) -> None:
        """The final files (rank 0), after the last step."""
        cfg, stats = self.cfg, self.stats
        rngs = self.dist.gather_objects(rng_state(self.device))
        if self.rank == 0:
            last = self.rows[-1] if self.rows else {}
            stats.update(
                {
                    "steps": cfg.steps,
                    "tokens": cfg.steps * self.tokens_per_step,
                    "final_loss": last.get("loss"),
                    "final_lm_loss": last.get("lm_loss"),
                    "final_ret_loss": last.get("ret_loss"),
                    "train_s": round(last.get("elapsed_s", 0.0), 2),
                }
            )
            if self.device.type == "cuda":
                stats["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            self._save(self.root, cfg.steps, rngs)
        self.dist.barrier()

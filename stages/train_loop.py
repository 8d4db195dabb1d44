"""The train stage's training loop (torchtitan-style): a `Trainer` whose `train_step(step)` is one
optimizer step (gradient accumulation over micro-batches, the scheduled-sampling draws, clipping, the
NaN/inf stop) and whose `train()` loops over steps, writing metrics rows, logs and checkpoints; the
named metric sums (`MetricSums`) that DDP all-reduces as one packed vector; and the checkpoint helpers.

Imported only by `stages.train.run_training` (it imports torch; the stage module must not).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.config import RPTConfig
from pipeline.errors import ConfigError, InputError, RptError
from stages.train import CKPT_DIR, METRICS_SCHEMA, Config, TrainJob, _device

log = logging.getLogger("rpt.train")


# ------------------------------------------------------------------------------------------ metrics
class MetricSums:
    """Named float64 sums kept on the device (one host sync per step) in one packed vector, so DDP
    all-reduces them in one call. A `summed` name is one slot; a `mean` name is two, (sum, count),
    and NaN values are not counted. Read back by name: `total(name)`, `mean(name)`."""

    def __init__(self, summed: Iterable[str], means: Iterable[str], device: torch.device | str = "cpu"):
        self.slots: dict[str, int] = {}
        for name in summed:
            self.slots[name] = len(self.slots)
        self.mean_names = tuple(means)
        base = len(self.slots)
        for i, name in enumerate(self.mean_names):
            self.slots[name] = base + 2 * i  # the sum; the count is the next slot
        self.size = base + 2 * len(self.mean_names)
        self.vec = torch.zeros(self.size, dtype=torch.float64, device=device)

    def _like(self, vec: torch.Tensor) -> MetricSums:
        new = object.__new__(MetricSums)
        new.slots, new.mean_names, new.size, new.vec = self.slots, self.mean_names, self.size, vec
        return new

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Add to a summed name (a tensor is detached and added as float64 on the device)."""
        self.vec[self.slots[name]] += value.detach().double() if isinstance(value, torch.Tensor) else value

    def add_mean(self, name: str, value: torch.Tensor) -> None:
        """Add a value (sum) and 1 (count) to a mean name, unless the value is NaN."""
        v = value.detach().double()
        ok = ~torch.isnan(v)
        i = self.slots[name]
        self.vec[i] += torch.where(ok, v, 0.0)
        self.vec[i + 1] += ok.double()

    def all_reduce(self, dist: _Dist) -> MetricSums:
        """The sums over all ranks (one all_reduce of the packed vector), on the host."""
        return self._like(dist.all_reduce(self.vec).cpu())

    def __add__(self, other: MetricSums) -> MetricSums:
        return self._like(self.vec + other.vec)

    def total(self, name: str) -> float:
        return self.vec[self.slots[name]].item()

    def mean(self, name: str) -> float:
        i = self.slots[name]
        s, c = self.vec[i].item(), self.vec[i + 1].item()
        return s / c if c else float("nan")


# a micro-batch's metrics: SUMMED are summed (n_pairs per step, the rest per micro-batch); MEANS and
# each CCA layer's |CCA output| / |residual| ratio are means over the micro-batches that have them
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
RETRIEVAL_KEYS = {  # MEANS name -> key of RPTOutput.retrieval
    "recall_at_2": 2,
    "recall_at_5": 5,
    "recall_at_10": 10,
    "recall_at_20": 20,
    "p_at_2": "p@2",
    "positive_share": "positive_share",
    "universe": "universe",
}


def step_sums(n_cca: int, device: torch.device) -> MetricSums:
    return MetricSums(SUMMED, (*MEANS, *(f"cca_ratio.{i}" for i in range(n_cca))), device)


def add_micro_batch(sums: MetricSums, loss: torch.Tensor, out: Any, gold: bool, n_cca: int) -> None:
    """Add one micro-batch's loss and RPTOutput diagnostics."""
    sums.add("loss", loss)
    sums.add("lm_loss", out.lm_loss)
    sums.add("used_gold", float(gold))
    if out.ret_loss is not None:
        sums.add("ret_loss", out.ret_loss)
        sums.add("n_pairs", out.n_pairs.double())
        for name, key in RETRIEVAL_KEYS.items():
            sums.add_mean(name, out.retrieval[key])
    if out.gate is not None and out.neighbor_pos is not None:
        valid = out.neighbor_pos >= 0
        g = torch.where(valid, out.gate.float(), 0.0).sum() / valid.sum().clamp(min=1)
        sums.add_mean("gate_mean", torch.where(valid.any(), g, float("nan")))
    for i, r in enumerate(out.cca_ratio[:n_cca]):
        sums.add_mean(f"cca_ratio.{i}", r)


def metrics_row(window: MetricSums, micro_per_step: int, n_steps: int, has_ret: bool, n_cca: int) -> dict:
    """A metrics.parquet row (its metric columns) from the sums over `n_steps` steps and all processes."""
    n_micro = n_steps * micro_per_step
    row: dict[str, Any] = {
        "loss": window.total("loss") / n_micro,
        "lm_loss": window.total("lm_loss") / n_micro,
        "ret_loss": window.total("ret_loss") / n_micro if has_ret else float("nan"),
        "used_gold": window.total("used_gold") / n_micro,
        "n_pairs": round(window.total("n_pairs") / n_steps),
    }
    for name in MEANS:
        row[name] = window.mean(name)
    row["cca_ratio"] = [window.mean(f"cca_ratio.{i}") for i in range(n_cca)]
    return row


# ------------------------------------------------------------------------------------------ helpers
def _param_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "null_" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


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


def _latest_checkpoint(root: Path) -> Path | None:
    ck = root / CKPT_DIR
    if not ck.is_dir():
        return None
    for p in ck.iterdir():  # debris of a writer killed mid-checkpoint
        if ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
    latest = ck / "LATEST"
    if latest.is_file():
        d = ck / latest.read_text().strip()
        if (d / "train_state.json").is_file():
            return d
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _metrics_bytes(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _save_state(
    folder: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    mcfg: RPTConfig,
    train: dict[str, Any],
    step: int,
    rows: list[dict[str, Any]],
    rngs: list[dict[str, torch.Tensor]],
    stats: dict[str, Any],
) -> None:
    from safetensors.torch import save

    from model.checkpoint import config_json, model_bytes, optimizer_state

    tensors, meta = optimizer_state(opt)
    for r, rng in enumerate(rngs):
        tensors.update({f"rng.{r}.{k}": v for k, v in rng.items()})
    _write_atomic(folder / "model.safetensors", model_bytes(model))
    _write_atomic(folder / "config.json", config_json(mcfg, train=train, step=step).encode())
    _write_atomic(folder / "optimizer.safetensors", save(tensors))
    _write_atomic(folder / "metrics.parquet", _metrics_bytes(rows))
    state = {"step": step, "optimizer": meta, "world": len(rngs), "stats": stats}
    _write_atomic(folder / "train_state.json", json.dumps(state, indent=1).encode())


def _checkpoint(root: Path, step: int, save: Any, keep: int = 1) -> None:
    """Write a checkpoint folder atomically (tmp folder + rename), point LATEST at it, drop older ones."""
    ck = root / CKPT_DIR
    ck.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = ck / f"{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    save(tmp)
    final = ck / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(ck / "LATEST", name.encode())
    done = sorted(
        p for p in ck.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name
    )
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _restore(
    folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, device: torch.device
) -> tuple[int, list[dict[str, Any]]]:
    from safetensors.torch import load_file

    from model.checkpoint import load_optimizer_state, load_weights

    state = json.loads((folder / "train_state.json").read_text())
    load_weights(model, load_file(str(folder / "model.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    # Optimizer.load_state_dict moves each state tensor to its parameter's device
    load_optimizer_state(
        opt, {k: v for k, v in tensors.items() if k.startswith("state.")}, state["optimizer"]
    )
    rng = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{rank}.")}
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    rows = pq.read_table(folder / "metrics.parquet").to_pylist()
    return int(state["step"]), rows


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
        from data.neighbors import lex_targets, neighbor_table, scores_table, supervision_stats
        from data.sequences import plan_sequences
        from model.rpt import RPT
        from model.training import Schedule
        from pipeline.formats import TOKENS_NPY, ChunkReader

        self.job, self.rank, self.world = job, rank, world
        self.cfg = cfg = Config(**job.train)
        self.mcfg = mcfg = RPTConfig(**job.model)
        self.root = root = Path(job.workdir)
        self.dist = _Dist(world)
        self.device = device = _device(cfg.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
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
            table = neighbor_table(job.artifact("bm25"), reader.n_chunks, cache=tables)
            if cfg.variant == "retro_bm25":
                bm25 = table
            elif cfg.variant == "rpt_lex":
                cand = lex_targets(table)
            else:
                cand = scores_table(job.artifact("scores"), reader.n_chunks, cache=tables)
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
        self.opt = torch.optim.AdamW(
            _param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.betas,
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
        for g in self.opt.param_groups:
            g["lr"] = lr
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
        reduced = sums.all_reduce(self.dist)
        step_loss = reduced.total("loss") / (accum * world)
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        )
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            close_batches(self.batches)
            last = _latest_checkpoint(self.root)
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
        ck = _latest_checkpoint(self.root)
        if ck is not None:
            start, self.rows = _restore(ck, self.model, self.opt, self.rank, self.device)
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

    def _checkpoint(self, done: int) -> None:
        rngs = self.dist.gather_objects(_rng_tensors(self.device))
        if self.rank == 0:
            save = partial(
                _save_state,
                model=self.model,
                opt=self.opt,
                mcfg=self.mcfg,
                train=self.job.train,
                step=done,
                rows=self.rows,
                rngs=rngs,
                stats=self.stats,
            )
            _checkpoint(self.root, done, save)
        self.dist.barrier()

    def _finish(self) -> None:
        """The final files (rank 0), after the last step."""
        cfg, stats = self.cfg, self.stats
        rngs = self.dist.gather_objects(_rng_tensors(self.device))
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
            _save_state(
                self.root, self.model, self.opt, self.mcfg, self.job.train, cfg.steps, self.rows, rngs, stats
            )
        self.dist.barrier()

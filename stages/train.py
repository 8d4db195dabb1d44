"""Stage `train`: train an RPT variant (or a baseline) on the chunks artifact's train split.

Inputs by variant (each variant is its own artifact version):
  baseline     chunks, tokenizer
  retro_bm25   + the supervision table (pipeline.supervision: bm25 chunk+target, top scores.candidates,
               bounded to the training example): its top-K are the CCA neighbors
  rpt_lex      + the same table: its candidates are the positives (target 1)
  rpt_sem      + the same table and the scores built on it: positives have delta > 0
The model's exclude_recent is the table's. Training examples are train.seq_len tokens, cut from each
document as the table's examples are (data.sequences), so every candidate lies inside its example.

The artifact: model.safetensors + config.json (`model.checkpoint.load_checkpoint`), the optimizer and
RNG state (optimizer.safetensors, train_state.json) and metrics.parquet. While it runs, checkpoints
go to `ckpt/step-NNNNNNN/` in the partial folder; a killed run resumes from the latest one and
continues with the same losses. `nproc_per_node > 1` runs DDP under torchrun (gloo on CPU, NCCL on
GPUs); rank 0 writes. A NaN/inf loss stops the run with an error and keeps the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationError, field_validator

from model.config import VARIANTS, RPTConfig, Variant, preset
from pipeline.config import RunConfigBase, StageConfig, bool_where_number
from pipeline.devices import resolve_device
from pipeline.errors import ConfigError, InputError, RptError
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext
from pipeline.supervision import supervision_bm25

# torch is imported by the functions that train, not here: `rpt config`, the registry and the flows
# load this module for its Config, and importing torch costs them over a second.
if TYPE_CHECKING:
    import torch

log = logging.getLogger("rpt.train")

# model fields the stage sets from its inputs or its own keys
DERIVED_MODEL_FIELDS = {"variant", "chunk_len", "vocab_size", "exclude_recent", "n_neighbors"}
FINAL_FILES = (
    "model.safetensors",
    "config.json",
    "optimizer.safetensors",
    "train_state.json",
    "metrics.parquet",
)
CKPT_DIR = "ckpt"

METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("lm_loss", pa.float64()),
        ("ret_loss", pa.float64()),
        ("p_gold", pa.float64()),
        ("used_gold", pa.float64()),
        ("recall_at_2", pa.float64()),
        ("recall_at_5", pa.float64()),
        ("recall_at_10", pa.float64()),
        ("recall_at_20", pa.float64()),
        ("p_at_2", pa.float64()),
        ("positive_share", pa.float64()),
        ("universe", pa.float64()),
        ("gate_mean", pa.float64()),
        ("cca_ratio", pa.list_(pa.float64())),
        ("n_pairs", pa.int64()),
        ("lr", pa.float64()),
        ("alpha_ret", pa.float64()),
        ("tau", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens", pa.int64()),
        ("tokens_per_s", pa.float64()),
        ("elapsed_s", pa.float64()),
    ]
)


class Config(StageConfig):
    variant: Variant = Field("rpt_sem", description=" | ".join(VARIANTS))
    preset: Literal["tiny", "small", "paper"] = "tiny"
    model: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the preset's RPTConfig fields"
    )
    split: str = Field("train", description="documents split to train on")
    steps: int = Field(1000, ge=1)
    seq_len: int = Field(
        4096,
        ge=1,
        description="tokens per training example (a multiple of chunk_len; the paper: 16,384); it also "
        "bounds the supervision table's candidates (pipeline.supervision)",
    )
    batch_size: int = Field(8, ge=1, description="global batch in sequences per optimizer step")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at min_lr_ratio * lr")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    alpha_ret: float = Field(0.1, ge=0, description="retriever-loss weight after its ramp")
    alpha_ret_ramp_steps: int | None = Field(
        None, ge=0, description="linear 0 -> alpha_ret; None: 20% of steps"
    )
    tau_max: float = Field(4.0, gt=0, description="LambdaRank margin after its ramp (paper: PG19 4, code 2)")
    tau_ramp_steps: int | None = Field(None, ge=0, description="linear 1 -> tau_max; None: 90% of steps")
    ss_fraction: float = Field(0.9, ge=0, le=1, description="scheduled sampling: P(gold) 1 -> 0 by then")
    n_neighbors: int = Field(2, ge=1, description="K neighbors per chunk")
    seed: int = 0
    # how, not what
    micro_batch: int | None = Field(
        None, ge=1, description="sequences per forward; None: batch_size / processes"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 autocast on GPU")
    compile: bool = Field(False, description="torch.compile the model")
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    workers: int = Field(2, ge=0, description="DataLoader worker processes")
    nproc_per_node: int = Field(1, ge=1, description=">1: DDP under torchrun with this many processes")

    UNHASHED = frozenset(
        {
            "micro_batch",
            "device",
            "dtype",
            "compile",
            "checkpoint_every",
            "log_every",
            "workers",
            "nproc_per_node",
        }
    )

    @field_validator("model")
    @classmethod
    def _model_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        known = set(RPTConfig.model_fields)
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"unknown model field(s) {bad} (valid: {sorted(known - DERIVED_MODEL_FIELDS)})")
        derived = sorted(set(v) & DERIVED_MODEL_FIELDS)
        if derived:
            raise ValueError(
                f"{derived} are set by the stage (train.variant, train.n_neighbors, the chunks, "
                "tokenizer and bm25 inputs), not in train.model"
            )
        bools = sorted(k for k, x in v.items() if bool_where_number(RPTConfig.model_fields[k].annotation, x))
        if bools:
            raise ValueError(f"train.model {bools}: expected a number, got a boolean")
        return v


def build_model_config(cfg: Config, chunk_len: int, vocab_size: int, exclude_recent: int) -> RPTConfig:
    try:
        return preset(
            cfg.preset,
            **cfg.model,
            variant=cfg.variant,
            chunk_len=chunk_len,
            vocab_size=vocab_size,
            exclude_recent=exclude_recent,
            n_neighbors=cfg.n_neighbors,
        )
    except (ValidationError, ValueError) as e:
        raise ConfigError(
            f"train.model (preset {cfg.preset}, chunk_len {chunk_len} from the chunks input): {e}"
        ) from None


# ------------------------------------------------------------------------------------------ the job
@dataclass
class TrainJob:
    """Everything a training process needs, JSON-able (torchrun workers read it from a file)."""

    store: str
    inputs: dict[str, list[str]]  # role -> [stage, version]
    workdir: str  # local folder: checkpoints and final files
    train: dict[str, Any]
    model: dict[str, Any]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> TrainJob:
        return cls(**json.loads(Path(path).read_text()))

    def artifact(self, role: str) -> Any:
        from pipeline.store import ArtifactStore

        stage, version = self.inputs[role]
        return ArtifactStore(self.store).get(stage, version)


class TrainStage(Stage):
    name = "train"
    version = 1
    Config = Config
    description = "train an RPT variant or baseline; checkpoints and metrics"
    preferred_runner = "serial"
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        cfg: Config = run.section("train")
        refs = {"chunks": InputRef("chunks"), "tokenizer": InputRef("tokenizer")}
        if cfg.variant != "baseline":  # the supervision table: the very bm25 artifact the scores stage scored
            refs["bm25"] = InputRef("bm25", supervision_bm25(run))
        if cfg.variant == "rpt_sem":
            refs["scores"] = InputRef("scores")
        return refs

    def _model_config(self, ctx: StageContext) -> RPTConfig:
        from data.neighbors import exclude_recent_of
        from pipeline.formats import load_tokenizer

        cfg: Config = ctx.cfg
        chunk_len = int(ctx.inputs["chunks"].manifest.config["chunk_len"])
        vocab = load_tokenizer(ctx.inputs["tokenizer"]).get_vocab_size()
        w = exclude_recent_of(ctx.inputs["bm25"]) if "bm25" in ctx.inputs else 0
        mcfg = build_model_config(cfg, chunk_len, vocab, w)
        if cfg.seq_len % chunk_len:
            raise ConfigError(
                f"train.seq_len={cfg.seq_len} must be a multiple of chunks.chunk_len={chunk_len}"
            )
        if "bm25" in ctx.inputs:
            bcfg = ctx.inputs["bm25"].manifest.config
            if int(bcfg.get("example_chunks") or 0) != cfg.seq_len // chunk_len or cfg.split not in (
                bcfg.get("example_splits") or []
            ):
                raise InputError(
                    f"{ctx.inputs['bm25'].ref} bounds candidates to examples of {bcfg.get('example_chunks')} "
                    f"chunks of {bcfg.get('example_splits')}, but training examples are "
                    f"{cfg.seq_len // chunk_len} chunks of {cfg.split!r}; build it from this run's config "
                    "(pipeline.supervision)"
                )
        always_seen = (mcfg.window - mcfg.stride) // chunk_len
        if "bm25" in ctx.inputs and w != always_seen:
            log.info(
                "bm25.exclude_recent=%d; the %d chunks before a chunk are always inside its attention "
                "window (window-stride)/chunk_len, so exclude_recent=%d avoids retrieving them",
                w,
                always_seen,
                always_seen,
            )
        return mcfg

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        mcfg = self._model_config(ctx)
        with ctx.local_dir("") as root:
            job = TrainJob(
                store=ctx.store.uri,
                inputs={r: [a.stage, a.version] for r, a in ctx.inputs.items()},
                workdir=str(root),
                train=cfg.model_dump(mode="json"),
                model=mcfg.model_dump(mode="json"),
            )
            if cfg.nproc_per_node > 1:
                launch_torchrun(job, cfg.nproc_per_node)
            else:
                run_training(job)
            state = json.loads((root / "train_state.json").read_text())
            n_rows = pq.ParquetFile(root / "metrics.parquet").metadata.num_rows
        for name in FINAL_FILES:
            ctx.written.append(ctx.file_entry(name, rows=n_rows if name == "metrics.parquet" else None))
        return state["stats"]

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        if ctx.fs.exists(ctx.path(CKPT_DIR)):
            ctx.fs.rm(ctx.path(CKPT_DIR), recursive=True)
        return dict(results[0].stats)

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        return {"variant": cfg.variant, "preset": cfg.preset}


def launch_torchrun(job: TrainJob, nproc: int) -> None:
    """Run DDP workers (`python -m stages.train --job ...`) under torchrun and wait for them."""
    root = Path(job.workdir)
    (root / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    job_file = root / CKPT_DIR / "job.json"
    job.save(job_file)
    err_file = root / CKPT_DIR / "error.txt"
    err_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "stages.train",
        "--job",
        str(job_file),
    ]
    log.info("launching %s", " ".join(cmd))
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        msg = err_file.read_text() if err_file.exists() else f"torchrun exited with status {rc}"
        raise RptError(msg)


# ------------------------------------------------------------------------------------------ training loop
def _device(spec: str, local_rank: int) -> torch.device:
    import torch

    if spec in ("auto", "cuda") and torch.cuda.is_available():
        # under torchrun: the rank's GPU; in one process: the flow lane's GPU, or a free one
        return torch.device(f"cuda:{local_rank}") if "LOCAL_RANK" in os.environ else resolve_device("auto")
    if spec == "auto":
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec} but CUDA is not available; use train.device=cpu")
    return torch.device(spec)


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
        import torch

        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        import torch

        if self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch

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
    import torch

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
    import torch
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


def run_training(job: TrainJob, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
    """The training loop (one process of `world`). Rank 0 writes checkpoints and the final files."""
    import torch

    from data.loader import StreamSampler, TrainSequences, close_batches, make_loader
    from data.neighbors import lex_targets, neighbor_table, scores_table, supervision_stats
    from data.sequences import plan_sequences
    from model.rpt import RPT
    from model.training import Schedule, StepMetrics, forward_loss, metrics_row
    from pipeline.formats import TOKENS_NPY, ChunkReader
    from pipeline.progress import progress

    cfg = Config(**job.train)
    mcfg = RPTConfig(**job.model)
    root = Path(job.workdir)
    dist = _Dist(world)
    device = _device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    micro = cfg.micro_batch or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not a multiple of micro_batch ({micro}) "
            f"x processes ({world})"
        )
    accum = cfg.batch_size // (micro * world)

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
    ds = TrainSequences(
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

    # ---- model, optimizer, resume
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = RPT(mcfg)
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        fused=device.type == "cuda" or None,
    )
    model.to(device)
    torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # dropout stream of this rank
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed * 1000 + 1 + rank)
    final_state = root / "train_state.json"
    if final_state.is_file() and json.loads(final_state.read_text()).get("step") == cfg.steps:
        return  # finished earlier (killed before the executor recorded it)
    start, rows = 0, []
    ck = _latest_checkpoint(root)
    if ck is not None:
        start, rows = _restore(ck, model, opt, rank, device)
        if rank == 0:
            log.info("resuming from %s (step %d of %d)", ck, start, cfg.steps)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)

    sampler = StreamSampler(len(ds), cfg.seed, micro, accum, rank, world, start, cfg.steps)
    loader = make_loader(ds, sampler, workers=cfg.workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    schedule = Schedule(
        steps=cfg.steps,
        lr=cfg.lr,
        warmup=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        alpha_ret=cfg.alpha_ret,
        alpha_ramp=cfg.alpha_ret_ramp_steps if cfg.alpha_ret_ramp_steps is not None else int(0.2 * cfg.steps),
        tau_max=cfg.tau_max,
        tau_ramp=cfg.tau_ramp_steps if cfg.tau_ramp_steps is not None else int(0.9 * cfg.steps),
        ss_fraction=cfg.ss_fraction,
    )
    has_ret = mcfg.has_retriever
    n_cca = len(mcfg.upper_cca)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    stats = {
        "params": model.num_params(),
        **{k: plan.stats[k] for k in ("docs", "examples", "example_chunks", "padding_share")},
        **{f"supervision_{k}": v for k, v in sup_stats.items()},
        "exclude_recent": mcfg.exclude_recent,
        "world": world,
        "micro_batch": micro,
        "accum": accum,
    }
    bar = progress(
        total=cfg.steps,
        initial=start,
        desc=f"train {cfg.variant}",
        unit="step",
        **({"disable": True} if rank else {}),
    )
    t_last, tok_last = time.perf_counter(), 0
    t_start = time.perf_counter()
    elapsed0 = rows[-1]["elapsed_s"] if rows else 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    window = None  # sums of the StepMetrics vectors since the last metrics row
    grad_sum, window_steps = 0.0, 0
    tb = _tensorboard(root, rank)
    model.train()
    for step in range(start, cfg.steps):
        at = schedule.at(step, has_ret)
        lr, alpha, tau, pg = at["lr"], at["alpha_ret"], at["tau"], at["p_gold"]
        for g in opt.param_groups:
            g["lr"] = lr
        sums = StepMetrics(n_cca, device)
        for a in range(accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            gold = has_ret and _gold_draw(cfg.seed, step, a * world + rank, pg)
            sync = a == accum - 1 or world == 1
            ctx_sync = nullcontext() if sync else net.no_sync()
            with ctx_sync, autocast:
                loss, out = forward_loss(net, batch, alpha=alpha, tau=tau, gold=gold)
            with ctx_sync:
                (loss / accum).backward()
            sums.add(loss, out, gold)
        vec = dist.all_reduce(sums.vec).cpu()
        step_loss = vec[0].item() / (accum * world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            close_batches(batches)
            last = _latest_checkpoint(root)
            what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {grad_norm}"
            raise RptError(
                f"train: {what} at step {step} (lr {lr:.3g}); stopped without updating the weights. The last "
                f"good checkpoint is {last if last else 'none (none was written yet)'}; lower train.lr or raise "
                "train.warmup_steps, then rerun: the run resumes from it"
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        window = vec if window is None else window + vec
        grad_sum, window_steps = grad_sum + grad_norm, window_steps + 1
        if done % cfg.log_every == 0 or done == cfg.steps or done % cfg.checkpoint_every == 0:
            # a row holds means over the steps since the previous row (rows fall on checkpoints too,
            # so a resumed run rebuilds the same rows)
            now = time.perf_counter()
            tok = (done - start) * tokens_per_step
            tps = (tok - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tok
            row = metrics_row(window, accum * world, window_steps, has_ret, n_cca)
            row.update(
                grad_norm=grad_sum / window_steps,
                step=done,
                p_gold=pg,
                lr=lr,
                alpha_ret=alpha,
                tau=tau,
                tokens=done * tokens_per_step,
                tokens_per_s=tps,
                elapsed_s=elapsed0 + now - t_start,
            )
            window, grad_sum, window_steps = None, 0.0, 0
            rows.append(row)
            if tb is not None:
                for key, val in row.items():
                    vals = val if isinstance(val, list) else [val]
                    for i, v in enumerate(vals):
                        if key != "step" and math.isfinite(v):
                            tb.add_scalar(
                                f"train/{key}" + (f"/{i}" if isinstance(val, list) else ""), v, done
                            )
            if rank == 0:
                bar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm_loss']:.3f}")
                if done % cfg.log_every == 0:
                    log.info(
                        "step %d/%d loss %.4f lm %.4f ret %.4f p@2 %.2f r@10 %.2f gate %.2f cca %s lr %.2e "
                        "%.0f tok/s",
                        done,
                        cfg.steps,
                        row["loss"],
                        row["lm_loss"],
                        row["ret_loss"],
                        row["p_at_2"],
                        row["recall_at_10"],
                        row["gate_mean"],
                        "/".join(f"{r:.2f}" for r in row["cca_ratio"]),
                        lr,
                        tps,
                    )
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            rngs = dist.gather_objects(_rng_tensors(device))
            if rank == 0:
                save = partial(
                    _save_state,
                    model=model,
                    opt=opt,
                    mcfg=mcfg,
                    train=job.train,
                    step=done,
                    rows=rows,
                    rngs=rngs,
                    stats=stats,
                )
                _checkpoint(root, done, save)
            dist.barrier()
    close_batches(batches)
    bar.close()
    if tb is not None:
        tb.close()
    rngs = dist.gather_objects(_rng_tensors(device))
    if rank == 0:
        last = rows[-1] if rows else {}
        stats.update(
            {
                "steps": cfg.steps,
                "tokens": cfg.steps * tokens_per_step,
                "final_loss": last.get("loss"),
                "final_lm_loss": last.get("lm_loss"),
                "final_ret_loss": last.get("ret_loss"),
                "train_s": round(last.get("elapsed_s", 0.0), 2),
            }
        )
        if device.type == "cuda":
            stats["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        _save_state(root, model, opt, mcfg, job.train, cfg.steps, rows, rngs, stats)
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: `python -m torch.distributed.run ... -m stages.train --job JOB.json`."""
    ap = argparse.ArgumentParser(description="an RPT training worker (started by the train stage)")
    ap.add_argument("--job", required=True)
    args = ap.parse_args(argv)
    import torch

    from pipeline.progress import setup_logging

    setup_logging("INFO")
    job = TrainJob.load(args.job)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() and job.train.get("device", "auto") != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    try:
        run_training(job, rank, world, local)
    except RptError as e:
        if rank == 0:
            (Path(job.workdir) / CKPT_DIR / "error.txt").write_text(str(e))
        raise
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


STAGE = TrainStage()

if __name__ == "__main__":
    main()

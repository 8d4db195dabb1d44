"""Stage `train`: train an RPT variant (or a baseline) on the chunks artifact's train split.

Inputs by variant (each variant is its own artifact version):
  baseline     chunks, tokenizer
  retro_bm25   + the supervision table (stages.supervision_table: bm25 chunk+target, top scores.candidates,
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
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationError, field_validator

from model.config import VARIANTS, RPTConfig, Variant, preset
from pipeline.config import RunConfigBase, StageConfig, bool_where_number
from pipeline.devices import DeviceSetting
from pipeline.errors import ConfigError, InputError, RptError
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext
from stages.supervision_table import supervision_bm25

# torch is imported by the functions that train, not here: `rpt config`, the registry and the flows
# load this module for its Config, and importing torch costs them over a second.
if TYPE_CHECKING:
    pass

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
        "bounds the supervision table's candidates (stages.supervision_table)",
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
    device: DeviceSetting = Field("auto", description="auto | cpu | cuda | cuda:N")
    # narrower than DtypeSetting on purpose: fp16 training would need a loss scaler
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
        exclude_recent = exclude_recent_of(ctx.inputs["bm25"]) if "bm25" in ctx.inputs else 0
        mcfg = build_model_config(cfg, chunk_len, vocab, exclude_recent)
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
                    "(stages.supervision_table)"
                )
        always_seen = (mcfg.window - mcfg.stride) // chunk_len
        if "bm25" in ctx.inputs and exclude_recent != always_seen:
            log.info(
                "bm25.exclude_recent=%d; the %d chunks before a chunk are always inside its attention "
                "window (window-stride)/chunk_len, so exclude_recent=%d avoids retrieving them",
                exclude_recent,
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
        ctx.drop(CKPT_DIR)  # the checkpoints served resume; the artifact holds the final model
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


def run_training(job: TrainJob, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
    """The training loop (one process of `world`): `stages.train.loop.Trainer`. Rank 0 writes checkpoints
    and the final files."""
    from stages.train.loop import Trainer

    Trainer(job, rank, world, local_rank).train()


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

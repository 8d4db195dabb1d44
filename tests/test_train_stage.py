"""Stage `train`: end to end on the small books, kill-and-resume equality, NaN stop, DDP (gloo, 2
processes) against one process on the same global batch, config errors."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from model.checkpoint import load_checkpoint
from pipeline.errors import ConfigError, RptError
from pipeline.executor import build, build_node, resolve
from pipeline.store import ArtifactStore
from stages import config_from_dict
from tests.conftest import TINY_REFERENCE

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("tokens_per_s", "elapsed_s")  # wall-clock columns
TRAIN = {
    "variant": "baseline",
    "steps": 8,
    "seq_len": 512,  # 8 chunks: room to retrieve; also the examples of the supervision table
    "batch_size": 4,
    "micro_batch": 2,
    "lr": 3e-3,
    "warmup_steps": 2,
    "log_every": 1,
    "checkpoint_every": 2,
    "workers": 0,
    "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "window": 128, "stride": 64},
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one torch thread is fastest


def _config(small_run, root: Path, **train):
    data = small_run.model_dump(mode="json")
    data["artifacts_root"] = str(root)
    data["train"] = {**TRAIN, **train}
    data["bm25"] = {"exclude_recent": 1}  # = (window - stride) / chunk_len of the model below
    data["scores"] = {"candidates": 20}  # the same bm25 table for every variant
    # a tiny scoring LM for the real scores stage, train split only
    data["reference"] = dict(TINY_REFERENCE)
    data["scores"] |= {"splits": ["train"], "batch_tokens": 4096}
    return config_from_dict(data)


@pytest.fixture(scope="module")
def stores(small_run, tmp_path_factory):
    """store_copy(dest, **train): a run config over a private copy of a store that already holds every
    input of train (documents, tokenizer, chunks, bm25 chunk+target, scores) for the small books."""
    template = tmp_path_factory.mktemp("train-template")
    src = Path(small_run.root())
    for stage in ("documents", "tokenizer", "chunks"):
        shutil.copytree(src / stage, template / stage)
    build_node(
        resolve("train", _config(small_run, template, variant="rpt_sem")).inputs["scores"], with_deps=True
    )

    def store_copy(dest: Path, **train):
        shutil.copytree(template, dest, dirs_exist_ok=True)
        return _config(small_run, dest, **train)

    return store_copy


def metrics(art) -> pl.DataFrame:
    return pl.read_parquet(art.local_path("metrics.parquet"))


def test_train_baseline_end_to_end(stores, tmp_path: Path) -> None:
    run = stores(tmp_path)
    art = build("train", run)
    names = {f.path for f in art.manifest.files}
    assert {
        "model.safetensors",
        "config.json",
        "optimizer.safetensors",
        "train_state.json",
        "metrics.parquet",
    } <= names
    assert not any(n.startswith("ckpt/") for n in names) and art.verify() == []
    m = metrics(art)
    assert m["step"].to_list() == list(range(1, 9))
    assert m["lm_loss"][-1] < m["lm_loss"][0]
    model, cfg = load_checkpoint(art.local_path())
    assert cfg.variant == "baseline" and cfg.chunk_len == 64 and cfg.vocab_size == 2048
    tok = torch.randint(0, 2048, (1, 128))
    assert model(tok, return_logits=True).logits.shape == (1, 128, 2048)
    assert art.manifest.stats["steps"] == 8 and art.manifest.meta["variant"] == "baseline"
    assert build("train", run).version == art.version  # a rerun is a no-op


@pytest.mark.parametrize("variant", ["retro_bm25", "rpt_lex", "rpt_sem"])
def test_retrieval_variants_train(stores, tmp_path: Path, variant: str) -> None:
    run = stores(tmp_path, variant=variant, steps=3)
    art = build("train", run)
    assert "bm25" in art.manifest.inputs and ("scores" in art.manifest.inputs) == (variant == "rpt_sem")
    m = metrics(art)
    _, cfg = load_checkpoint(art.local_path())
    assert cfg.variant == variant and cfg.exclude_recent == 1 and cfg.has_cca
    if variant == "retro_bm25":
        assert m["ret_loss"].is_nan().all() and (m["used_gold"] == 0).all()
    else:
        assert m["p_gold"][0] == 1.0 and m["used_gold"][0] == 1.0 and m["p_gold"].is_sorted(descending=True)
        assert m["ret_loss"].is_finite().all() and m["n_pairs"].sum() > 0
        rec = m["recall_at_2"].drop_nans()
        assert len(rec) > 0 and rec.is_between(0, 1).all()
        assert m["p_at_2"].drop_nans().is_between(0, 1).all() and m["positive_share"].drop_nans().len() > 0
        assert m["universe"].drop_nans().is_between(0, 8 - 2).all()  # at most l - 1 - exclude_recent
    assert m["gate_mean"].drop_nans().is_between(0.1, 1.0).all() and m["gate_mean"].drop_nans().len() > 0
    assert all(len(r) == len(cfg.upper_cca) and all(x > 0 for x in r) for r in m["cca_ratio"].to_list())
    st = art.manifest.stats
    assert st["supervision_candidate_share_in_example"] == 1.0  # the table is bounded to the examples
    assert 0 < st["supervision_positive_share"] <= 1 and 0 < st["supervision_universe"] <= 8 - 2


def test_kill_and_resume_gives_the_same_losses(stores, tmp_path: Path, caplog) -> None:
    # rpt_lex: retriever and scheduled sampling; dropout and a loader worker: RNG and loader state
    train = {"variant": "rpt_lex", "steps": 12, "workers": 1, "model": {**TRAIN["model"], "dropout": 0.1}}
    ref = build("train", stores(tmp_path / "a", **train))
    run = stores(tmp_path / "b", **train)
    cfg_file = tmp_path / "b.yaml"
    cfg_file.write_text(yaml.safe_dump(run.model_dump(mode="json")))
    node = resolve("train", run)
    ckpt = Path(run.root()) / "train" / f".partial-{node.version}" / "ckpt" / "LATEST"
    env = {**os.environ, "RPT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cli = "from app.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", cli, "run", "train", "-c", str(cfg_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.read_text().strip()
    assert not ArtifactStore(run.root()).exists("train", node.version), "the run finished before the kill"
    with caplog.at_level("INFO", logger="rpt.train"):
        art = build("train", run)
    assert any("resuming from" in r.getMessage() and killed_at in r.getMessage() for r in caplog.records)
    a, b = metrics(ref).drop(VOLATILE), metrics(art).drop(VOLATILE)
    assert a.equals(b), f"resumed losses differ:\n{a}\n{b}"
    assert (
        ref.local_path("model.safetensors").read_bytes() == art.local_path("model.safetensors").read_bytes()
    )


def test_nan_loss_stops_and_keeps_last_checkpoint(stores, tmp_path: Path, monkeypatch) -> None:
    from model.rpt import RPT

    run = stores(tmp_path, steps=6)
    real = RPT.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] > 2 * 3:  # from step 4 on (2 micro-batches per step)
            out.lm_loss = out.lm_loss * float("nan")
        return out

    monkeypatch.setattr(RPT, "forward", poisoned)
    with pytest.raises(RptError, match=r"loss is nan at step 3.*step-0000002"):
        build("train", run)
    node = resolve("train", run)
    partial = Path(run.root()) / "train" / f".partial-{node.version}" / "ckpt"
    assert (partial / "LATEST").read_text() == "step-0000002"
    assert (partial / "step-0000002" / "model.safetensors").exists()
    assert not ArtifactStore(run.root()).exists("train", node.version)


def test_ddp_two_processes_match_one(stores, tmp_path: Path) -> None:
    """gloo, 2 CPU processes x micro-batch 2 == 1 process x 2 accumulation steps x micro-batch 2."""
    kw = {"variant": "rpt_lex", "steps": 3}  # retriever gradients and per-micro-batch gold draws too
    one = build("train", stores(tmp_path / "one", **kw))
    two = build("train", stores(tmp_path / "two", nproc_per_node=2, device="cpu", **kw))
    assert two.manifest.stats["world"] == 2 and one.manifest.stats["accum"] == 2
    a, b = metrics(one), metrics(two)
    assert a["used_gold"].to_list() == b["used_gold"].to_list()
    for col in ("loss", "lm_loss", "ret_loss", "grad_norm", "lr"):
        for x, y in zip(a[col].to_list(), b[col].to_list()):
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), (col, x, y)


def test_config_errors(stores, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.model.*unknown model field"):
        config_from_dict({"train": {"model": {"depth": 3}}})
    with pytest.raises(ConfigError, match=r"set by the stage"):
        config_from_dict({"train": {"model": {"chunk_len": 32}}})
    with pytest.raises(ConfigError, match=r"multiple of chunks\.chunk_len"):
        build("train", stores(tmp_path / "a", seq_len=100))
    # longer than any document: one padded example per document, nothing dropped
    art = build("train", stores(tmp_path / "b", seq_len=64 * 512, steps=1, batch_size=2, micro_batch=2))
    st = art.manifest.stats
    assert st["examples"] >= st["docs"] and st["padding_share"] > 0

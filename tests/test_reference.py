"""reference: a trained small GPT-NeoX resumes from its checkpoint to exactly the uninterrupted result;
an adopted model folder enters the version by content, never by path; bad settings are clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.executor import build, resolve
from pipeline.formats import REFERENCE_MODEL_DIR, TOKENIZER_FILE
from pipeline.store import ArtifactStore
from tests.conftest import TINY_REFERENCE, make_config

TINY_LM = {**TINY_REFERENCE, "steps": 6, "checkpoint_every": 2, "warmup": 2}


def tiny_run(root: Path, corpus: Path, **reference):
    return make_config(
        root,
        runner={"kind": "serial"},
        documents={"paths": [str(corpus)], "min_chars": 20, "split_lists": {"valid": ["docs/valid.txt"]}},
        tokenizer={"vocab_size": 300},
        reference={**TINY_LM, **reference},
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_corpus):
    """A store with documents, tokenizer and chunks of the tiny corpus."""
    run = tiny_run(tmp_path_factory.mktemp("ref"), tiny_corpus)
    build("chunks", run, with_deps=True)
    return run


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one torch thread is fastest


def copy_upstream(run, root: Path, **reference):
    store = ArtifactStore(run.root())
    for stage in ("documents", "tokenizer", "chunks"):
        shutil.copytree(store.stage_dir(stage), root / stage)
    return run.model_copy(update={"artifacts_root": str(root)}).with_section("reference", reference)


def weights(art) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(art.local_path(f"{REFERENCE_MODEL_DIR}/model.safetensors")))


def test_killed_training_resumes_to_identical_weights(upstream, tmp_path, monkeypatch):
    import stages.reference.lm as ref

    clean = build("reference", upstream)
    st = clean.manifest.stats
    assert st["source"] == "trained" and st["steps"] == 6 and st["resumed_from_step"] == 0
    assert (
        1 < st["valid_ppl"] < 1e4 and st["valid_tokens"] > 0 and st["params"] > st["non_embedding_params"] > 0
    )
    assert clean.manifest.meta["tokenizer_differs"] is False
    assert not any(f.path.startswith("_checkpoints") for f in clean.manifest.files)

    run2 = copy_upstream(upstream, tmp_path / "store")

    def crash(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt("killed after step 5")

    monkeypatch.setattr(ref, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        build("reference", run2)
    store2 = ArtifactStore(run2.root())
    version = resolve("reference", run2).version
    assert version == clean.version and not store2.exists("reference", version)
    ckpts = store2.fs.ls(f"{store2.partial_dir('reference', version)}/_checkpoints", detail=False)
    assert sorted(Path(p).name for p in ckpts) == ["LATEST", "step-0000004"]  # older ones are pruned

    monkeypatch.setattr(ref, "_after_step", lambda step: None)
    resumed = build("reference", run2)
    assert resumed.manifest.stats["resumed_from_step"] == 4
    a, b = weights(clean), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.manifest.stats["valid_ppl"] == pytest.approx(st["valid_ppl"], rel=1e-6)
    # the saved folder is a plain Hugging Face model that loads offline
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        str(resumed.local_path(REFERENCE_MODEL_DIR)), local_files_only=True
    )
    assert m.config.model_type == "gpt_neox"
    assert (resumed.local_path(REFERENCE_MODEL_DIR) / TOKENIZER_FILE).is_file()
    # validation perplexity = exp(mean NLL) over consecutive 64-token windows of the valid document
    from pipeline.formats import ChunkReader

    reader = ChunkReader(ArtifactStore(upstream.root()).get("chunks", resolve("chunks", upstream).version))
    (doc,) = reader.docs("valid")
    toks = np.asarray(reader.tokens[doc.first : doc.first + doc.n]).reshape(-1)
    toks = toks[toks >= 0][: TINY_LM["eval_tokens"]]
    nll, n = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(toks), 64):
            w = torch.from_numpy(toks[a : a + 64].astype(np.int64))[None]
            if w.shape[1] > 1:
                nll += float(m(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
                n += w.shape[1] - 1
    assert resumed.manifest.stats["valid_tokens"] == n
    assert resumed.manifest.stats["valid_ppl"] == pytest.approx(np.exp(nll / n), rel=1e-4)


def save_tiny_lm(folder: Path, tokenizer_json: Path, seed: int = 0) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(folder)
    shutil.copyfile(tokenizer_json, folder / TOKENIZER_FILE)


def test_adopted_folder_versions_by_content(upstream, tmp_path, caplog):
    store = ArtifactStore(upstream.root())
    pipe_tok = store.get("tokenizer", resolve("tokenizer", upstream).version).local_path(TOKENIZER_FILE)
    folder = tmp_path / "lm-a"
    save_tiny_lm(folder, pipe_tok)
    run = upstream.with_section("reference", {"path": str(folder)})
    art = build("reference", run)
    assert art.manifest.meta["source"] == "given" and art.manifest.meta["tokenizer_differs"] is False
    assert np.isfinite(art.manifest.stats["valid_ppl"])
    # a random-weight LM cannot copy in context: the manifest says so, and so does the log
    from stages.reference.stage import COPY_GAIN_MIN, COPY_PASSAGES

    st = art.manifest.stats
    assert st["copy_passages"] == COPY_PASSAGES and st["copy_gain"] < COPY_GAIN_MIN
    assert any("does not copy in context" in r.getMessage() for r in caplog.records)
    from safetensors.torch import load_file

    src = load_file(str(folder / "model.safetensors"))
    got = weights(art)
    assert all(torch.equal(src[k], got[k]) for k in src)

    # the same files elsewhere: the same version; other training sizes do not matter for a given model
    moved = tmp_path / "elsewhere" / "lm"
    shutil.copytree(folder, moved)
    same = upstream.with_section("reference", {"path": str(moved), "hidden": 64, "steps": 1})
    assert resolve("reference", same).version == art.version
    # other weights: another version
    other = tmp_path / "lm-b"
    save_tiny_lm(other, pipe_tok, seed=1)
    assert (
        resolve("reference", upstream.with_section("reference", {"path": str(other)})).version != art.version
    )


class _Logits(torch.nn.Module):
    """A stand-in causal LM: `logits(x)` [B, T, V] from the token ids, returned as HF models return them."""

    def __init__(self, vocab: int, copies: bool):
        super().__init__()
        self.vocab, self.copies = vocab, copies

    def forward(self, input_ids: torch.Tensor):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        # a copier is an induction head: it predicts what followed the latest earlier occurrence of the
        # last two tokens
        for b in range(B if self.copies else 0):
            seq = input_ids[b].tolist()
            for t in range(1, T):
                prev = [p for p in range(1, t) if seq[p - 1 : p + 1] == seq[t - 1 : t + 1]]
                if prev:
                    logits[b, t, seq[prev[-1] + 1]] = 10.0
        return type("Out", (), {"logits": logits})()


def test_copy_probe_tells_a_model_that_copies_from_one_that_cannot():
    from stages.reference.lm import copy_probe
    from stages.reference.stage import COPY_GAIN_MIN

    rng = np.random.default_rng(0)
    V, piece = 64, 8
    docs = [rng.integers(0, V, int(n)) for n in rng.integers(40, 200, 6)]
    cpu = torch.device("cpu")
    copier = copy_probe(_Logits(V, copies=True), docs, piece, 32, 0, cpu)
    uniform = copy_probe(_Logits(V, copies=False), docs, piece, 32, 0, cpu)
    assert copier["copy_passages"] == uniform["copy_passages"] == 32
    assert uniform["copy_first_nll"] == pytest.approx(np.log(V)) and uniform["copy_gain"] == pytest.approx(
        0.0
    )
    # the copier finds b in its first occurrence; where b first occurs only accidental repeats help it
    assert copier["copy_repeat_nll"] < 0.1 and copier["copy_gain"] > 2.0 > COPY_GAIN_MIN
    # documents too short for a passage: no figures, no error
    assert (
        copy_probe(_Logits(V, copies=True), [docs[0][: 2 * piece - 1]], piece, 8, 0, cpu)["copy_gain"] is None
    )


def test_copy_probe_matches_the_nll_computed_by_hand():
    """One document of exactly two pieces, so every passage is (a, b) = that document: the probe's
    figures are b's NLL after [a] and after [a, b, a], computed here token by token."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from stages.reference.lm import copy_probe

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    lm = GPTNeoXForCausalLM(cfg).eval()
    piece = 6
    doc = np.random.default_rng(1).integers(0, 96, 2 * piece)
    got = copy_probe(lm, [doc], piece, 5, 3, torch.device("cpu"))

    def nll_of_last(prefix: np.ndarray, target: np.ndarray) -> float:
        total = 0.0
        for i, tok in enumerate(target):
            ctx = torch.from_numpy(np.concatenate([prefix, target[:i]]).astype(np.int64))[None]
            with torch.no_grad():
                logp = torch.log_softmax(lm(input_ids=ctx).logits[0, -1].float(), -1)
            total -= float(logp[int(tok)])
        return total / len(target)

    a, b = doc[:piece], doc[piece:]
    assert got["copy_first_nll"] == pytest.approx(nll_of_last(a, b), rel=1e-4)
    assert got["copy_repeat_nll"] == pytest.approx(nll_of_last(np.concatenate([a, b, a]), b), rel=1e-4)
    assert got["copy_gain"] == pytest.approx(got["copy_first_nll"] - got["copy_repeat_nll"])


def test_bad_settings_are_clear_errors(upstream, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        resolve("reference", upstream.with_section("reference", {"path": str(tmp_path / "not-a-model")}))
    with pytest.raises(ConfigError, match="divisible"):
        build("reference", copy_upstream(upstream, tmp_path / "s1", hidden=30, heads=4))
    with pytest.raises(InputError, match="seq_len"):
        build("reference", copy_upstream(upstream, tmp_path / "s2", seq_len=100_000))


def lambda_lr_sequence(lr: float, warmup: int, steps: int) -> list[float]:
    """The reference stage's learning rates before it shared the train stage's schedule: torch's LambdaLR
    over Pythia's multiplier (linear warm-up, cosine to 0.1 x the peak), stepped after each step."""
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # what opt.step() trains this step with
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "lr,warmup,steps",
    [
        (2e-3, 20, 150),  # configs/demo.yaml
        (1e-3, 100, 1000),  # gpu-check.yaml
        (2e-3, 50, 500),  # gutenberg-cpu.yaml
        (1e-3, 200, 4000),  # gutenberg-gpu.yaml
        (1e-3, 100, 1500),  # the defaults
        (1e-3, 2, 6),  # TINY_LM
        (3e-4, 7, 40),
        (5e-4, 0, 30),
        (1e-3, 30, 20),  # warm-up longer than the run
    ],
)
def test_learning_rates_are_the_lambdalr_ones(lr, warmup, steps):
    """The shared schedule (model.schedules) reproduces the reference's former LambdaLR sequence bit for
    bit, so its trained weights did not change; the train stage's rounding of the warm-up would not."""
    from stages.reference import Config
    from stages.reference.lm import ReferenceTrainer

    trainer = object.__new__(ReferenceTrainer)  # only its schedule
    trainer.cfg = Config(lr=lr, warmup=warmup, steps=steps)
    got = [trainer.lr(s) for s in range(steps)]
    assert got == lambda_lr_sequence(lr, warmup, steps)
    if (lr, warmup) == (2e-3, 20):  # the demo's: 5 of its 20 warm-up steps round differently
        from model.schedules import learning_rate

        assert got != [learning_rate(s, steps, lr, warmup, 0.1) for s in range(steps)]


def test_init_std_sets_the_initial_weights_and_the_version(upstream):
    """reference.init_std is GPT-NeoX's initializer_range: the initial weight matrices have that std; the
    default keeps the versions from before the setting, another value is another version."""
    from stages.reference.lm import build_model
    from stages.reference.stage import Config

    for std in (0.02, 0.05):
        model = build_model(Config(hidden=64, layers=1, heads=2, intermediate=128, init_std=std), 1024, 0)
        w = model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
        assert abs(float(w.detach().std()) - std) < 0.1 * std
    run = upstream.with_section("reference", TINY_REFERENCE)
    v = resolve("reference", run).version
    assert (
        resolve("reference", upstream.with_section("reference", {**TINY_REFERENCE, "init_std": 0.02})).version
        == v
    )
    assert (
        resolve("reference", upstream.with_section("reference", {**TINY_REFERENCE, "init_std": 0.05})).version
        != v
    )

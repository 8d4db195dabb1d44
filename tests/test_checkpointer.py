"""model.checkpointer, the checkpoints the train and reference stages share: a save/load round trip gives
back the model and optimizer state bit for bit (the RPT model, with tied embeddings, and the reference's
GPT-NeoX), and the run after a restore continues exactly; a run's folder keeps the newest complete
checkpoint only, survives a writer killed mid-write, and mirrors to a remote store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_weights, model_bytes
from model.checkpointer import (
    LATEST,
    STATE_FILE,
    Checkpointer,
    load_state,
    module_state,
    rng_state,
    save_state,
    tied_names,
)
from model.config import preset
from model.optim import adamw, param_groups
from model.rpt import RPT

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one torch thread is fastest

CPU = torch.device("cpu")
V, T = 97, 64


def rpt(seed: int) -> RPT:
    torch.manual_seed(seed)
    cfg = preset(
        "tiny",
        variant="baseline",
        vocab_size=V,
        d_model=32,
        n_heads=2,
        ffn_dim=48,
        chunk_len=8,
        window=24,
        stride=8,
        dropout=0.1,  # the RNG state matters
    )
    return RPT(cfg)


def gpt_neox(seed: int) -> torch.nn.Module:
    from stages.reference import Config
    from stages.reference.lm import build_model

    return build_model(Config(hidden=32, layers=2, heads=2, intermediate=64, seq_len=64, seed=seed), V, 0)


def rpt_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    tok = torch.randint(0, V, (2, T), generator=g)
    model.train()
    model(tok, tok).lm_loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def neox_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, V, (2, 32), generator=g)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


CASES = {
    # model, one training step, the weights encoder/decoder the stage uses
    "rpt": (rpt, rpt_step, {"weights": model_bytes}, {"load_weights": load_weights}),
    "gpt_neox": (gpt_neox, neox_step, {}, {}),
}


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, oa: torch.optim.Optimizer, ob) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    da, db = oa.state_dict(), ob.state_dict()
    assert da["param_groups"] == db["param_groups"]
    assert da["state"].keys() == db["state"].keys()
    for i, st in da["state"].items():
        assert st.keys() == db["state"][i].keys()
        for key, v in st.items():
            w = db["state"][i][key]
            assert v.dtype == w.dtype and v.device == w.device and torch.equal(v, w), (i, key)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact_and_continues_exactly(case: str, tmp_path: Path) -> None:
    make, step, save_kw, load_kw = CASES[case]
    model = make(0)
    opt = adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for s in range(2):
        step(model, opt, s)
    ck = Checkpointer(tmp_path / "ckpt")
    folder = ck.save(
        2, lambda d: save_state(d, model, opt, step=2, rngs=[rng_state(CPU)], note="x", **save_kw)
    )
    assert folder.name == "step-0000002" and ck.latest() == folder

    other = make(1)  # other weights, a fresh optimizer
    other_opt = adamw(other, lr=5.0, betas=(0.9, 0.95), weight_decay=0.1)
    torch.manual_seed(123)  # another RNG state
    state = load_state(ck.latest(), other, other_opt, device=CPU, **load_kw)
    assert state["step"] == 2 and state["note"] == "x" and state["world"] == 1
    assert_same_state(model, other, opt, other_opt)
    assert torch.equal(torch.get_rng_state(), rng_state(CPU)["cpu"])

    # the run goes on exactly as the uninterrupted one (dropout draws included)
    rng = torch.get_rng_state()  # the saved state, restored by load_state
    step(model, opt, 2)
    torch.set_rng_state(rng)
    step(other, other_opt, 2)
    assert_same_state(model, other, opt, other_opt)


def test_tied_weights_are_stored_once() -> None:
    model = rpt(0)
    assert model.cfg.tie_embeddings and tied_names(model) == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in module_state(model) and "embed.weight" in module_state(model)
    assert tied_names(gpt_neox(0)) == {}  # the reference's GPT-NeoX unties its embeddings


def test_param_groups_decay_matrices_only() -> None:
    for model in (rpt(0), gpt_neox(0)):
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        assert all(p.dim() >= 2 and "null_" not in names[id(p)] for p in decay["params"])
        assert all(p.dim() < 2 or "null_" in names[id(p)] for p in no_decay["params"])
        assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_latest_survives_a_killed_writer_and_older_checkpoints_go(tmp_path: Path) -> None:
    model = gpt_neox(0)
    opt = adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ck = Checkpointer(tmp_path)
    assert ck.latest() is None
    for s in (2, 4):
        ck.save(s, lambda d, s=s: save_state(d, model, opt, step=s, rngs=[rng_state(CPU)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-0000004"]

    def killed(d: Path) -> None:
        save_state(d, model, opt, step=6, rngs=[rng_state(CPU)])
        (d / STATE_FILE).unlink()
        raise KeyboardInterrupt  # killed while writing step 6

    with pytest.raises(KeyboardInterrupt):
        ck.save(6, killed)
    (tmp_path / f"{LATEST}.tmp-99").write_text("step-0000006")  # and a half-replaced pointer
    assert ck.latest() == tmp_path / "step-0000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-0000004"]  # debris removed
    assert json.loads((ck.latest() / STATE_FILE).read_text())["step"] == 4


def test_a_restarted_run_keeps_its_own_checkpoint_not_a_stale_later_one(tmp_path: Path) -> None:
    """A folder of a later step than the one just written is left from an earlier run that this one did
    not resume (e.g. the 8-digit folders of the reference stage's old layout): it goes, not the new one."""
    model = gpt_neox(0)
    opt = adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    (tmp_path / "step-00000400").mkdir(parents=True)  # old layout, no LATEST: not resumable
    ck = Checkpointer(tmp_path)
    assert ck.latest() is None
    ck.save(2, lambda d: save_state(d, model, opt, step=2, rngs=[rng_state(CPU)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-0000002"]
    assert ck.latest() == tmp_path / "step-0000002"


def test_remote_mirror_round_trip(tmp_path: Path) -> None:
    """The reference stage on a remote store: checkpoints written locally are copied to the partial
    folder (LATEST last) and copied back by a resumed run."""
    import fsspec

    from stages.reference.lm import RemoteCheckpoints

    fs = fsspec.filesystem("memory")
    base = f"/rpt-ckpt-test-{tmp_path.name}"

    class Ctx:  # the two things RemoteCheckpoints uses of a StageContext
        def __init__(self) -> None:
            self.fs = fs

        def path(self, name: str) -> str:
            return f"{base}/{name}"

    model = gpt_neox(0)
    opt = adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    neox_step(model, opt, 0)
    writer = Checkpointer(tmp_path / "a")
    remote = RemoteCheckpoints(Ctx(), writer.root)
    for s in (1, 2):
        remote.push(writer.save(s, lambda d, s=s: save_state(d, model, opt, step=s, rngs=[rng_state(CPU)])))
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{base}/_checkpoints", detail=False))
    assert names == [LATEST, "step-0000002"]

    reader = Checkpointer(tmp_path / "b")
    RemoteCheckpoints(Ctx(), reader.root).pull()
    other = gpt_neox(1)
    other_opt = adamw(other, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert load_state(reader.latest(), other, other_opt)["step"] == 2
    assert_same_state(model, other, opt, other_opt)
    fs.rm(base, recursive=True)

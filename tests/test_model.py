"""RPT model: causality, sliding window and CCA against naive versions, retriever masking, gating,
schedules, LambdaRank, overfitting and checkpoint round trips. Tiny shapes, CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from model import schedules as sch
from model.cca import ChunkedCrossAttention, NeighborMemory
from model.checkpoint import config_json, load_checkpoint, model_bytes
from model.config import RPTConfig, preset
from model.layers import WindowSelfAttention, apply_rope, rope_cos_sin
from model.losses import gold_positions, lambdarank_loss, retrieval_recall
from model.retriever import retrievable_mask
from model.rpt import RPT, shift_labels
from pipeline.formats import causal_retrievable

M, L, V = 8, 10, 97  # chunk_len, chunks per sequence, vocab


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one torch thread is fastest


def tiny(variant: str, **kw) -> RPTConfig:
    base = dict(
        variant=variant,
        vocab_size=V,
        d_model=32,
        n_heads=2,
        ffn_dim=48,
        chunk_len=M,
        window=24,
        stride=8,
        exclude_recent=1,
    )
    return preset("tiny", **{**base, **kw})


def supervision(B: int, n: int, C: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(-1, n, (B, n, C), generator=g)
    return pos, torch.randn(B, n, C, generator=g) + 0.5


def given_neighbors(B: int, n: int, K: int = 2, seed: int = 1) -> torch.Tensor:
    """Random retrievable positions (j <= i - 2) or -1."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n)[None, :, None]
    pos = (torch.rand(B, n, K, generator=g) * (i - 1).clamp(min=0)).long()
    return torch.where(i >= 2, pos, torch.full_like(pos, -1))


SOURCES = [
    ("baseline", "none"),
    ("retro_bm25", "given"),
    ("rpt_lex", "retriever"),
    ("rpt_sem", "retriever"),
    ("rpt_sem", "gold"),
]


@pytest.mark.parametrize(("variant", "source"), SOURCES)
def test_causality_every_variant(variant: str, source: str) -> None:
    """Changing the token at position t changes no logit before t (attention, retrieval, CCA)."""
    torch.manual_seed(0)
    model = RPT(tiny(variant)).eval()
    B, T = 2, L * M
    tok = torch.randint(0, V, (B, T))
    cand_pos, cand_t = supervision(B, L)
    kw = dict(
        source=source,
        neighbor_pos=given_neighbors(B, L),
        cand_pos=cand_pos,
        cand_target=cand_t,
        return_logits=True,
    )
    with torch.no_grad():
        base = model(tok, **kw).logits
        for t in (3, M - 1, M, 2 * M + 5, 5 * M - 1, T - 1):
            tok2 = tok.clone()
            tok2[:, t] = (tok2[:, t] + 1 + torch.arange(B)) % V
            out = model(tok2, **kw).logits
            assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
            assert not torch.allclose(out[:, t:], base[:, t:]), "the change had no effect at all"
        if source != "none":  # neighbors really enter the computation
            assert not torch.allclose(model(tok, **{**kw, "source": "none"}).logits, base)


def naive_window_attention(attn: WindowSelfAttention, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    H, dh, S, W = attn.n_heads, attn.head_dim, attn.stride, attn.window
    pos = torch.arange(T)
    cos, sin = rope_cos_sin(pos, dh, attn.theta)
    q = apply_rope(attn.wq(x).view(B, T, H, dh), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(B, T, H, dh), cos, sin).transpose(1, 2)
    v = attn.wv(x).view(B, T, H, dh).transpose(1, 2)
    i, j = pos[:, None], pos[None, :]
    allowed = (j <= i) & (j >= (i // S) * S - (W - S))
    a = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
    a = a.masked_fill(~allowed, float("-inf")).softmax(-1)
    return attn.wo((a @ v).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize(("window", "stride", "T"), [(16, 8, 40), (24, 8, 37), (8, 8, 29), (32, 16, 12)])
def test_window_attention_matches_naive(window: int, stride: int, T: int) -> None:
    torch.manual_seed(1)
    attn = WindowSelfAttention(tiny("baseline", window=window, stride=stride))
    x = torch.randn(2, T, 32)
    torch.testing.assert_close(attn(x), naive_window_attention(attn, x), atol=1e-5, rtol=1e-4)


def test_cca_matches_naive_per_chunk() -> None:
    """Position p attends to the neighbors of chunk (p - m + 1) // m; positions < m - 1 get nothing.
    Keys are the RMS-normalised neighbor states; each neighbor's gate scales its values only."""
    torch.manual_seed(2)
    cfg = tiny("rpt_sem")
    cca = ChunkedCrossAttention(cfg)
    with torch.no_grad():
        cca.kv_norm.weight.uniform_(0.5, 1.5)
    B, n, K, d = 2, 4, 2, 32
    T = n * M
    x = torch.randn(B, T, d)
    states = torch.randn(B, n, K * 2 * M, d) * 0.02  # lower-decoder scale: the norm must undo it
    mask = torch.rand(B, n, K * 2 * M) > 0.3
    gate = torch.rand(B, n, K) * 0.9 + 0.1
    out = cca(x, NeighborMemory(states, mask, gate, torch.zeros(B, n, K)))
    assert torch.equal(out[:, : M - 1], torch.zeros_like(out[:, : M - 1]))
    k_pos = torch.arange(2 * M).repeat(K)
    normed = states / states.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt() * cca.kv_norm.weight
    H, dh = cfg.n_heads, cfg.head_dim
    for u in range(n):
        rows = torch.arange(u * M + M - 1, min(u * M + 2 * M - 1, T))
        q_pos = torch.arange(M - 1, M - 1 + len(rows))
        a = cca.attn
        q = apply_rope(a.wq(x[:, rows]).view(B, -1, H, dh), *rope_cos_sin(q_pos, dh, a.theta))
        k = apply_rope(a.wk(normed[:, u]).view(B, -1, H, dh), *rope_cos_sin(k_pos, dh, a.theta))
        v = a.wv(normed[:, u]).view(B, -1, H, dh) * gate[:, u].repeat_interleave(2 * M, -1)[..., None, None]
        k = torch.cat([k, a.null_k[None, None].expand(B, 1, H, dh)], 1)
        v = torch.cat([v, a.null_v[None, None].expand(B, 1, H, dh)], 1)
        km = torch.cat([mask[:, u], torch.ones(B, 1, dtype=torch.bool)], 1)
        logit = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        w = logit.masked_fill(~km[:, None, None], float("-inf")).softmax(-1)
        ref = a.wo(torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, len(rows), d))
        torch.testing.assert_close(out[:, rows], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exclude_recent", [0, 1, 3])
def test_retriever_scores_only_retrievable_chunks(exclude_recent: int) -> None:
    torch.manual_seed(3)
    model = RPT(tiny("rpt_sem", exclude_recent=exclude_recent))
    B, T = 2, L * M
    tok = torch.randint(0, V, (B, T))
    cand_pos, cand_t = supervision(B, L, C=L)
    out = model(tok, shift_labels(tok), cand_pos=cand_pos, cand_target=cand_t)
    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    rule = torch.from_numpy(causal_retrievable(i, j, exclude_recent))
    s = out.ret_scores
    assert torch.equal(torch.isfinite(s), rule.expand_as(s))
    top = out.ret_topk
    ii = torch.arange(L)[None, :, None].expand_as(top)
    assert bool(
        ((top == -1) | torch.from_numpy(causal_retrievable(ii.numpy(), top.numpy(), exclude_recent))).all()
    )
    assert bool((top[:, : exclude_recent + 1] == -1).all())  # the first chunks have nothing to retrieve
    # the loss gives no gradient to any non-retrievable score
    s_leaf = s.detach().clone().requires_grad_(True)
    loss, n = lambdarank_loss(s_leaf, cand_pos, cand_t, tau=1.0)
    loss.backward()
    assert n > 0
    assert torch.equal(s_leaf.grad[~rule.expand_as(s)], torch.zeros(int((~rule.expand_as(s)).sum())))


def test_gate_within_bounds_with_a_gradient_everywhere() -> None:
    """g = eta + (1 - eta) sigmoid(s): in [eta, 1], and still trainable far below where the paper's
    max(eta, sigmoid) would have clamped it (zero gradient there)."""
    torch.manual_seed(4)
    model = RPT(tiny("retro_bm25")).eval()
    d = 1
    B, T = 2, L * M
    tok = torch.randint(0, V, (B, T))
    nb = given_neighbors(B, L)
    with torch.no_grad():
        g = model(tok, neighbor_pos=nb).gate
        assert g.min() >= 0.1 and g.max() <= 1.0
        model.neighbors.gate.bias.fill_(50.0 * d)
        assert torch.allclose(model(tok, neighbor_pos=nb).gate, torch.ones_like(g))
        model.neighbors.gate.bias.fill_(-8.0 * d)  # sigmoid ~ 3e-4: at the floor
    g = model(tok, neighbor_pos=nb).gate
    assert torch.allclose(g, torch.full_like(g, 0.1), atol=1e-3)
    g.sum().backward()
    assert model.neighbors.gate.bias.grad.abs().item() > 0


def test_gate_temperature_divides_the_score_and_slows_the_collapse() -> None:
    """With gate_temperature t the gate is eta + (1 - eta) sigmoid(w.x / t) (the official code's t = d),
    recomputed here from the encoder's own pooled states; under steady pressure to close (100 Adam steps
    at lr 3e-3 on the gate's mean, as noisy neighbors exert early in training) a t = d gate stays far
    from its floor, where the unscaled one (t = 1) ends within those steps."""
    B, T = 2, L * M
    tok = torch.randint(0, V, (B, T))
    nb = given_neighbors(B, L)
    d = tiny("retro_bm25").d_model

    def model_with(t: float) -> RPT:
        torch.manual_seed(5)
        return RPT(tiny("retro_bm25", gate_temperature=t))

    model = model_with(d).eval()
    enc = model.neighbors
    seen: dict[str, torch.Tensor] = {}
    hook = enc.x_norm2.register_forward_hook(lambda m, i, o: seen.update(x=o))
    with torch.no_grad():
        g = model(tok, neighbor_pos=nb).gate
    hook.remove()
    s = (seen["x"] @ enc.gate.weight.T + enc.gate.bias).squeeze(-1) / d
    assert torch.allclose(g.reshape(-1), (0.1 + 0.9 * torch.sigmoid(s)).reshape(-1), atol=1e-6)

    def pushed_down(t: float) -> float:
        m = model_with(t)
        opt = torch.optim.Adam(m.neighbors.gate.parameters(), lr=3e-3)
        for _ in range(100):
            opt.zero_grad()
            m(tok, neighbor_pos=nb).gate.mean().backward()
            opt.step()
        with torch.no_grad():
            return float(m(tok, neighbor_pos=nb).gate.mean())

    assert pushed_down(d) > 0.4
    assert pushed_down(1.0) < 0.2  # at the floor (0.1) or nearly


def test_detached_neighbors_send_no_gradient_into_the_lower_decoder() -> None:
    """detach_neighbors: the lower decoder learns from the LM path only (and the retriever's loss); CCA
    and the neighbor encoder still train. Without it the neighbor path reaches the lower decoder."""
    B, T = 2, L * M
    tok = torch.randint(0, V, (B, T))
    nb = given_neighbors(B, L)
    for detach in (False, True):
        torch.manual_seed(6)
        model = RPT(tiny("retro_bm25", detach_neighbors=detach))
        out = model(tok, neighbor_pos=nb)
        lower = list(model.lower.parameters())
        grads = torch.autograd.grad(out.gate.sum(), [*lower, model.neighbors.gate.weight], allow_unused=True)
        reached = any(g is not None and g.abs().sum() > 0 for g in grads[:-1])
        assert reached is not detach
        assert grads[-1] is not None and grads[-1].abs().sum() > 0
        # the forward pass is the same either way
        torch.manual_seed(6)
        ref = RPT(tiny("retro_bm25"))
        with torch.no_grad():
            assert torch.equal(
                ref(tok, neighbor_pos=nb, return_logits=True).logits,
                model(tok, neighbor_pos=nb, return_logits=True).logits,
            )


def test_schedules_at_endpoints() -> None:
    T = 1000
    assert sch.p_gold(0, T) == 1.0
    assert sch.p_gold(450, T) == pytest.approx(0.5)
    assert sch.p_gold(900, T) == 0.0 and sch.p_gold(999, T) == 0.0
    assert sch.p_gold(899, T) == pytest.approx(0.0, abs=1e-4)
    assert sch.alpha_ret(0, 200, 0.1) == 0.0 and sch.alpha_ret(200, 200, 0.1) == pytest.approx(0.1)
    assert sch.alpha_ret(100, 200, 0.1) == pytest.approx(0.05) and sch.alpha_ret(
        5000, 200, 0.1
    ) == pytest.approx(0.1)
    assert (
        sch.margin(0, 900, 4.0) == 1.0
        and sch.margin(900, 900, 4.0) == 4.0
        and sch.margin(10**6, 900, 4.0) == 4.0
    )
    assert sch.learning_rate(0, T, 1e-3, 10, 0.1) == pytest.approx(1e-4)
    assert sch.learning_rate(9, T, 1e-3, 10, 0.1) == pytest.approx(1e-3)
    assert sch.learning_rate(T, T, 1e-3, 10, 0.1) == pytest.approx(1e-4)


def naive_lambdarank(s: np.ndarray, pos: np.ndarray, tgt: np.ndarray, tau: float) -> tuple[float, int]:
    """Loop version for one query row: s [l] (-inf not retrievable), candidates pos/tgt [C]."""
    retr = np.isfinite(s)
    t = np.full(len(s), -np.inf)
    for p, v in zip(pos, tgt):
        if p >= 0 and retr[p]:
            t[p] = max(t[p], v)
    gain = np.where((t > 0) & retr, 2.0 ** np.clip(t, None, 100) - 1, 0.0)
    order = sorted(range(len(s)), key=lambda j: -s[j] if retr[j] else np.inf)
    rank = np.empty(len(s))
    rank[order] = np.arange(len(s))
    disc = np.log2(rank + 2)  # the official code's |log2(r_l + 2) - log2(r_j + 2)|
    idcg = sum(g / np.log2(r + 2) for r, g in enumerate(sorted(gain, reverse=True)))
    total, n = 0.0, 0
    for a in range(len(s)):
        for b in range(len(s)):
            if t[a] > 0 and retr[a] and retr[b] and t[a] > t[b]:
                lam = abs(gain[a] - gain[b]) * abs(disc[a] - disc[b]) / max(idcg, 1e-3)
                total += lam * max(0.0, tau - (s[a] - s[b]))
                n += 1
    return total, n


def test_lambdarank_matches_naive_and_gradient_direction() -> None:
    # one query (chunk 5) with chunks 0..3 retrievable; chunk 2 is the best positive, chunk 0 a weak
    # positive, chunk 3 a negative candidate and chunk 1 a non-candidate (also a negative)
    s = torch.full((1, 6, 6), float("-inf"))
    s[0, 5, :4] = torch.tensor([0.5, 2.0, -1.0, 1.0])
    pos = torch.full((1, 6, 3), -1)
    tgt = torch.full((1, 6, 3), float("nan"))
    pos[0, 5] = torch.tensor([2, 0, 3])
    tgt[0, 5] = torch.tensor([1.5, 0.3, -0.2])
    leaf = s.clone().requires_grad_(True)
    loss, n = lambdarank_loss(leaf, pos, tgt, tau=1.0)
    ref, ref_n = naive_lambdarank(
        s[0, 5].numpy().astype(np.float64), pos[0, 5].numpy(), tgt[0, 5].numpy(), 1.0
    )
    assert int(n) == ref_n == 5  # (2 vs 0, 1, 3) and (0 vs 1, 3)
    assert loss.item() == pytest.approx(ref / ref_n, rel=1e-5)
    loss.backward()
    g = leaf.grad[0, 5]
    assert g[2] < 0  # descent raises the best positive's score (the weak positive 0 is pushed both ways)
    assert g[1] > 0 and g[3] > 0  # and lowers the negatives'
    assert torch.equal(leaf.grad[0, :5], torch.zeros(5, 6))
    # a gradient step lowers the loss
    stepped = (s - 0.5 * leaf.grad).detach()
    assert lambdarank_loss(stepped, pos, tgt, tau=1.0)[0].item() < loss.item()
    # random cases against the loop version
    rng = np.random.default_rng(0)
    for _ in range(5):
        n_ch = 9
        sc = torch.from_numpy(rng.normal(size=(1, n_ch, n_ch)) * 2).float()
        sc = sc.masked_fill(~retrievable_mask(n_ch, 1), float("-inf"))
        cp = torch.from_numpy(rng.integers(-1, n_ch, size=(1, n_ch, 4)))
        ct = torch.from_numpy(rng.normal(size=(1, n_ch, 4)) + 0.3).float()
        got, got_n = lambdarank_loss(sc, cp, ct, tau=2.0)
        tot, cnt = 0.0, 0
        for q in range(n_ch):
            r, c = naive_lambdarank(
                sc[0, q].double().numpy(), cp[0, q].numpy(), ct[0, q].double().numpy(), 2.0
            )
            tot, cnt = tot + r, cnt + c
        assert int(got_n) == cnt
        assert float(got) == pytest.approx(tot / max(cnt, 1), rel=1e-4, abs=1e-7)


def test_recall_and_gold_positions() -> None:
    s = torch.full((1, 4, 4), float("-inf"))
    s[0, 3, :3] = torch.tensor([3.0, 2.0, 1.0])  # ranking 0 > 1 > 2
    pos = torch.tensor([[[-1, -1], [-1, -1], [-1, -1], [2, 1]]])
    tgt = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.9, 0.4]]])
    r = retrieval_recall(s, pos, tgt, ks=(1, 2, 3))
    assert float(r[1]) == 0.0 and float(r[2]) == 0.5 and float(r[3]) == 1.0
    assert math.isnan(float(retrieval_recall(s, pos, -tgt, ks=(2,))[2]))  # no positives: undefined
    g = gold_positions(s, pos, tgt, k=3)
    assert g[0, 3].tolist() == [2, 1, -1] and bool((g[0, :3] == -1).all())


def test_tiny_model_overfits_small_batch() -> None:
    torch.manual_seed(5)
    model = RPT(tiny("rpt_sem", d_model=64, ffn_dim=128))
    B, T = 2, L * M
    tok = torch.randint(0, V, (B, T))
    labels = shift_labels(tok)
    cand_pos, cand_t = supervision(B, L)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(120):
        out = model(
            tok, labels, cand_pos=cand_pos, cand_target=cand_t, source="gold" if step % 2 else "retriever"
        )
        loss = out.lm_loss + 0.1 * out.ret_loss
        first = first if first is not None else out.lm_loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0
    assert out.lm_loss.item() < 0.5, f"did not overfit: {first:.2f} -> {out.lm_loss.item():.2f}"
    assert float(out.retrieval[2]) > 0.5


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(6)
    cfg = tiny("rpt_lex")
    model = RPT(cfg).eval()
    (tmp_path / "model.safetensors").write_bytes(model_bytes(model))
    (tmp_path / "config.json").write_text(config_json(cfg, step=3))
    loaded, cfg2 = load_checkpoint(tmp_path)
    assert cfg2 == cfg
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # still tied
    tok = torch.randint(0, V, (1, L * M))
    with torch.no_grad():
        assert torch.equal(model(tok, return_logits=True).logits, loaded(tok, return_logits=True).logits)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")
    # a checkpoint written before gate_temperature and detach_neighbors existed loads as it was trained
    old = json.loads((tmp_path / "config.json").read_text())
    for key in ("gate_temperature", "detach_neighbors"):
        del old["model"][key]
    (tmp_path / "config.json").write_text(json.dumps(old))
    again, cfg3 = load_checkpoint(tmp_path)
    assert cfg3 == cfg
    with torch.no_grad():
        assert torch.equal(model(tok, return_logits=True).logits, again(tok, return_logits=True).logits)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_layers must be even"):
        RPTConfig(n_layers=3)
    with pytest.raises(ValueError, match="multiple of stride"):
        RPTConfig(window=100, stride=64)
    with pytest.raises(ValueError, match="out of range"):
        RPTConfig(n_layers=4, cca_layers=[2])
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    model = RPT(tiny("baseline"))
    with pytest.raises(ValueError, match="multiple of chunk_len"):
        model(torch.zeros(1, M + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="no CCA"):
        model(torch.zeros(1, M, dtype=torch.long), source="retriever")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["baseline", "retro_bm25", "rpt_sem"])
def test_gpu_bf16_causal_and_trains(variant: str) -> None:
    """bf16 autocast with the flash/efficient SDPA kernels: causal, finite, and the loss goes down."""
    torch.manual_seed(7)
    dev = torch.device("cuda")
    model = RPT(tiny(variant, d_model=64, n_heads=4, ffn_dim=128)).to(dev)
    B, T = 2, L * M
    tok = torch.randint(0, V, (B, T), device=dev)
    cand_pos, cand_t = (x.to(dev) for x in supervision(B, L))
    kw = dict(neighbor_pos=given_neighbors(B, L).to(dev), cand_pos=cand_pos, cand_target=cand_t)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        base = model(tok, return_logits=True, **kw).logits
        tok2 = tok.clone()
        tok2[:, 3 * M + 2] = (tok2[:, 3 * M + 2] + 1) % V
        assert torch.equal(model(tok2, return_logits=True, **kw).logits[:, : 3 * M + 2], base[:, : 3 * M + 2])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tok, shift_labels(tok), **kw)
            loss = out.lm_loss + (0.1 * out.ret_loss if out.ret_loss is not None else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0


def test_loss_in_slices_equals_full_logits(monkeypatch) -> None:
    import model.rpt as rpt_module

    torch.manual_seed(8)
    model = RPT(tiny("retro_bm25")).eval()
    tok = torch.randint(0, V, (2, L * M))
    labels = shift_labels(tok)
    labels[0, :5] = -100
    with torch.no_grad():
        full = model(tok, labels, neighbor_pos=given_neighbors(2, L), return_logits=True)
        monkeypatch.setattr(rpt_module, "LOGIT_SLICE", 7)
        sliced = model(tok, labels, neighbor_pos=given_neighbors(2, L))
    assert sliced.logits is None
    torch.testing.assert_close(sliced.token_nll, full.token_nll)
    torch.testing.assert_close(sliced.lm_loss, full.lm_loss)
    assert bool((full.token_nll[0, :5] == 0).all())

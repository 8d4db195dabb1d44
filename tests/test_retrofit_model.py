"""model.retrofit: a frozen Hugging Face LM with CCA and a neighbor encoder (tiny random GPT-NeoX and Llama
configs made here). Equal logits at init, frozen weights untouched by training, causality through CCA and
the encoder, save/load, and that the new parts learn to copy from a neighbor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.retrofit import neighbor_tokens, tiling_windows, training_windows, window_tokens
from model.config import IGNORE
from model.retrofit import (
    RetrofitLM,
    default_cca_layers,
    load_retrofit,
    retrofit_config,
    save_retrofit,
)
from pipeline.errors import InputError
from pipeline.formats import DocSpan
from stages.retrofit.load import load_retrofitted

M = 8  # chunk length


def tiny_base(kind: str, vocab: int = 48, d: int = 32, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * d,
            max_position_embeddings=128,
            rotary_pct=0.25,
            tie_word_embeddings=False,
        )
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * d,
            max_position_embeddings=128,
        )
        model = LlamaForCausalLM(cfg)
    return model.eval()


def randomise(model: RetrofitLM, seed: int = 1) -> None:
    """Move the new parts off their initialisation (zero output projections included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parts.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def batch(vocab: int, B: int = 2, n: int = 4, K: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, n * M), generator=g)
    nb = torch.randint(0, vocab, (B, n, K, 2 * M), generator=g)
    nb[0, 1, 1] = -1  # a missing neighbor
    nb[-1, 2, 0, M:] = -1  # a neighbor without continuation
    return tokens, nb


@pytest.mark.parametrize("kind", ["gpt_neox", "llama"])
def test_logits_equal_the_frozen_lm_at_init(kind: str) -> None:
    base = tiny_base(kind)
    tokens, nb = batch(48)
    with torch.no_grad():
        ref = base(input_ids=tokens).logits
        model = RetrofitLM(base, retrofit_config(base, M, cca_layers=[1, 3]))
        own = model(tokens, nb).logits
        empty = model(tokens, torch.full_like(nb, -1)).logits
    assert torch.equal(own, ref) and torch.equal(empty, ref)  # bit-identical, whatever the neighbors
    randomise(model)
    with torch.no_grad():
        assert not torch.allclose(model(tokens, nb).logits, ref)  # the test above can fail


@pytest.mark.parametrize("kind", ["gpt_neox", "llama"])
def test_training_moves_only_the_new_parameters(kind: str) -> None:
    base = tiny_base(kind)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = RetrofitLM(base, retrofit_config(base, M, cca_layers=[2]))
    new0 = {k: v.clone() for k, v in model.parts.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable(), lr=1e-2, weight_decay=0.1)
    tokens, nb = batch(48)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE)], 1)
    model.train()
    for _ in range(3):
        model(tokens, nb, labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(frozen[k], v) for k, v in base.state_dict().items())
    assert all(not p.requires_grad for p in base.parameters())
    moved = [k for k, v in model.parts.state_dict().items() if not torch.equal(new0[k], v)]
    assert any("wo" in k for k in moved) and any("encoder" in k for k in moved)


@pytest.mark.parametrize("kind", ["gpt_neox", "llama"])
def test_no_future_token_reaches_a_position(kind: str) -> None:
    base = tiny_base(kind)
    model = RetrofitLM(base, retrofit_config(base, M, cca_layers=[1, 2, 3])).eval()
    randomise(model)
    tokens, nb = batch(48, B=1, n=5)
    with torch.no_grad():
        ref = model(tokens, nb).logits
        for p in (3, M - 1, M, 2 * M + 5, 4 * M):
            t2 = tokens.clone()
            t2[0, p:] = (t2[0, p:] + 7) % 48
            out = model(t2, nb).logits
            assert torch.equal(out[0, :p], ref[0, :p]), p
            assert not torch.allclose(out[0, p], ref[0, p])
        # the neighbors of chunk u reach the last token of u and later positions only
        for u in range(4):
            nb2 = nb.clone()
            nb2[0, u] = (nb2[0, u].clamp(min=0) + 5) % 48
            out = model(tokens, nb2).logits
            first = (u + 1) * M - 1
            assert torch.equal(out[0, :first], ref[0, :first]), u
            assert not torch.allclose(out[0, first:], ref[0, first:]), u


def test_save_and_load_back(tmp_path) -> None:
    base = tiny_base("gpt_neox")
    base.save_pretrained(tmp_path / "base")
    model = RetrofitLM(base, retrofit_config(base, M, cca_layers=[1, 3])).eval()
    randomise(model)
    from pipeline.formats import CAUSAL_LM_FILES
    from pipeline.versioning import tree_digest

    digest = tree_digest(tmp_path / "base", CAUSAL_LM_FILES)
    save_retrofit(model, tmp_path / "rf", {"path": str(tmp_path / "base"), "digest": digest})
    back = load_retrofitted(tmp_path / "rf")  # the base found from retrofit.json, checked by digest
    tokens, nb = batch(48)
    with torch.no_grad():
        assert torch.equal(back(tokens, nb).logits, model(tokens, nb).logits)
    other = tiny_base("gpt_neox", seed=5)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(InputError, match="content digest"):
        load_retrofitted(tmp_path / "rf", base=tmp_path / "other")
    assert torch.equal(
        load_retrofit(tmp_path / "rf", other)(tokens, None).logits, other(input_ids=tokens).logits
    )


def test_config_defaults_and_errors() -> None:
    assert default_cca_layers(12) == [5, 8, 11]  # RETRO: every third block from the sixth
    assert default_cca_layers(4) == [2, 3]
    base = tiny_base("llama")
    with pytest.raises(ValueError, match="cca_layers"):
        retrofit_config(base, M, cca_layers=[4])
    model = RetrofitLM(base, retrofit_config(base, M))
    with pytest.raises(ValueError, match="multiple of chunk_len"):
        model(torch.zeros(1, M + 1, dtype=torch.long), None)


def test_windows_and_neighbor_tokens_against_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    docs = [DocSpan(0, "train", 0, 5), DocSpan(1, "train", 5, 3), DocSpan(2, "train", 8, 1)]
    tokens = rng.integers(0, 50, (9, 4)).astype(np.int32)
    tokens[4, 2:] = -1  # doc 0's last chunk is short
    chunk_doc = np.array([0] * 5 + [1] * 3 + [2])
    table = rng.integers(-1, 9, (9, 3))
    q = np.array([0, 3, 7, -1])
    got = neighbor_tokens(tokens, chunk_doc, table, q, 2)
    for a, qi in enumerate(q):
        for b in range(2):
            j = table[qi, b] if qi >= 0 else -1
            want = np.full(8, -1)
            if j >= 0:
                want[:4] = tokens[j]
                if j + 1 < 9 and chunk_doc[j + 1] == chunk_doc[j]:
                    want[4:] = tokens[j + 1]
            assert (got[a, b] == want).all(), (a, b)
    ids, labels = window_tokens(tokens, chunk_doc, 3, 2, 3)
    flat = tokens[3:5].reshape(-1)
    assert (ids[:6] == flat[:6]).all() and (ids[6:] == 0).all()
    assert labels[0] == flat[1] and (labels[5:] == IGNORE).all()  # pads predict nothing
    ids, labels = window_tokens(tokens, chunk_doc, 1, 2, 2)
    assert labels[-1] == tokens[3, 0]  # the next chunk of the same document
    ids, labels = window_tokens(tokens, chunk_doc, 5, 3, 3)  # a full last chunk; the next is doc 2's
    assert labels[-1] == IGNORE and labels[-2] == tokens[7, 3]
    ids, labels = window_tokens(tokens, chunk_doc, 5, 2, 2)
    assert labels[-1] == tokens[7, 0]
    assert len(training_windows(docs, 3).first) == 3 + 1
    tw = tiling_windows(docs, 2)
    assert tw.first.tolist() == [0, 2, 4, 5, 7, 8] and tw.n_chunks.tolist() == [2, 2, 1, 2, 1, 1]


def test_the_new_parts_learn_to_copy_from_a_neighbor() -> None:
    """Random text the frozen LM cannot predict; each chunk's first neighbor is the true copy (chunk u and
    u+1), the second a random distractor. Training only the new parts must bring the NLL of the copied
    chunks below 0.5 nats, while the frozen LM and the same model given no neighbors stay near chance."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    V, n, B = 32, 4, 16
    base = tiny_base("gpt_neox", vocab=V, d=64, layers=2)
    with torch.no_grad():  # a trained LM's head can make peaked distributions; a 0.02-random one cannot
        base.get_output_embeddings().weight.mul_(10.0)
    model = RetrofitLM(base, retrofit_config(base, M, cca_layers=[0, 1], encoder_layers=1))
    opt = torch.optim.AdamW(model.trainable(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)

    def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = torch.randint(0, V, (B, (n + 1) * M), generator=g)
        x, nxt = tok[:, : n * M], tok[:, n * M]
        labels = torch.cat([x[:, 1:], nxt[:, None]], 1)
        chunks = tok.reshape(B, n + 1, M)
        true = torch.cat([chunks[:, :n], chunks[:, 1:]], dim=2)  # chunk u and its continuation u+1
        noise = torch.randint(0, V, true.shape, generator=g)
        order = torch.rand(B, n, generator=g) < 0.5  # the true copy in either rank
        first = torch.where(order[..., None], true, noise)
        second = torch.where(order[..., None], noise, true)
        return x, torch.stack([first, second], dim=2), labels

    model.train()
    for _ in range(500):
        x, nb, labels = data()
        model(x, nb, labels).loss.backward()
        opt.step()
        opt.zero_grad()
    x, nb, labels = data()
    model.eval()
    with torch.no_grad():
        copied = slice(M, n * M)  # positions whose target lies in a neighbor's continuation
        frozen = model(x, None, labels).token_nll[:, copied].mean().item()
        own = model(x, nb, labels).token_nll[:, copied].mean().item()
        empty = model(x, torch.full_like(nb, -1), labels).token_nll[:, copied].mean().item()
    chance = float(np.log(V))
    assert own < 0.5, (own, frozen, empty)
    assert frozen > chance - 0.1 and empty > chance - 0.5, (own, frozen, empty)  # the gain is retrieval's

"""RETROfit (Borgeaud et al. 2021, section 4.4): a pretrained causal LM, frozen, with chunked
cross-attention (CCA) inserted after chosen blocks and a neighbor encoder; only those new parts train.

    tokens -> frozen embedding -> frozen block 0 .. block l [+ CCA_l(neighbors)] .. -> frozen norm, head
    neighbors [B, n, K, 2m] token ids (chunk j and its continuation j+1; -1 pads)
      -> frozen input embedding -> encoder layers (bidirectional self-attention over the 2m tokens,
         cross-attention to the query chunk's states at the first CCA block, SwiGLU) -> CCA keys/values

The base is any Hugging Face causal LM whose blocks are `base_model.layers` and return the hidden
states (GPT-NeoX/Pythia, which the reference stage trains, and the Llama family). CCA is RETRO's
(model.cca: with the left shift, the neighbors of chunk u reach only the last token of u and the
tokens of u+1), its keys/values RMS-normalised; the encoder reads the states of chunk u only for the
neighbors of u, which are retrieved from u's content. So no position sees its future through CCA.

Equal to the base before training: every CCA's output projection starts at zero, so each insertion adds
exactly 0 and the logits are bit-identical to the frozen LM's whatever the neighbors (tested). The output
projection's gradient is not zero, so training moves it off zero first (as ControlNet's zero
convolutions and LoRA's B = 0). With `neighbors=None` the hooks are not installed: the frozen LM itself.

Default insertion points: RETRO's, every third block from the sixth (0-based 5, 8, 11, ...); a base with
fewer than six blocks gets CCA after each block of its upper half.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from model.cca import ChunkedCrossAttention, NeighborMemory
from model.config import RPTConfig
from model.layers import Attention, RMSNorm, SwiGLU
from model.losses import lm_loss

WEIGHTS_FILE = "retrofit.safetensors"  # the new parameters only
CONFIG_FILE = "retrofit.json"  # RetrofitConfig + the base's identity (content digest)
SUPPORTED = ("gpt_neox", "llama")


class RetrofitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    d_model: int = Field(ge=8, description="the base's hidden size")
    n_base_layers: int = Field(ge=1)
    chunk_len: int = Field(ge=1)
    n_neighbors: int = Field(2, ge=1)
    cca_layers: list[int] = Field(description="0-based base blocks after which CCA is inserted")
    encoder_layers: int = Field(2, ge=1)
    heads: int = Field(ge=1, description="heads of the new attention layers")
    ffn_dim: int = Field(ge=1)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def module_config(self) -> RPTConfig:
        """The RPTConfig the shared layers (Attention, CCA) read their sizes from."""
        window = 2 * self.chunk_len
        return RPTConfig(
            variant="retro_bm25",
            d_model=self.d_model,
            n_heads=self.heads,
            n_layers=2,
            ffn_dim=self.ffn_dim,
            chunk_len=self.chunk_len,
            window=window,
            stride=window,
            n_neighbors=self.n_neighbors,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
        )


def default_cca_layers(n_layers: int) -> list[int]:
    """RETRO's every third block from the sixth; for bases of fewer than six blocks, the upper half."""
    retro = list(range(5, n_layers, 3))
    return retro or list(range(n_layers // 2, n_layers))


def base_blocks(base: nn.Module) -> nn.ModuleList:
    model_type = getattr(base.config, "model_type", None)
    layers = getattr(getattr(base, "base_model", None), "layers", None)
    if model_type not in SUPPORTED or not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"retrofit supports causal LMs of the families {SUPPORTED} (blocks at base_model.layers); "
            f"got model_type {model_type!r}"
        )
    return layers


def new_heads(d_model: int, base_heads: int) -> int:
    """The base's head count when its head size is even (RoPE rotates pairs), else 64-wide heads."""
    if d_model % base_heads == 0 and (d_model // base_heads) % 2 == 0:
        return base_heads
    for h in (d_model // 64, 2, 1):
        if h >= 1 and d_model % h == 0 and (d_model // h) % 2 == 0:
            return h
    raise ValueError(f"no even head size divides d_model={d_model}")


def retrofit_config(
    base: nn.Module,
    chunk_len: int,
    *,
    n_neighbors: int = 2,
    cca_layers: list[int] | None = None,
    encoder_layers: int = 2,
    ffn_mult: float = 8 / 3,
) -> RetrofitConfig:
    n = len(base_blocks(base))
    layers = sorted(set(cca_layers)) if cca_layers is not None else default_cca_layers(n)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"cca_layers {layers}: the base has blocks 0..{n - 1}; name at least one of them")
    d = int(base.config.hidden_size)
    return RetrofitConfig(
        d_model=d,
        n_base_layers=n,
        chunk_len=chunk_len,
        n_neighbors=n_neighbors,
        cca_layers=layers,
        encoder_layers=encoder_layers,
        heads=new_heads(d, int(base.config.num_attention_heads)),
        ffn_dim=max(8, round(ffn_mult * d / 8) * 8),
        norm_eps=float(
            getattr(base.config, "rms_norm_eps", None) or getattr(base.config, "layer_norm_eps", 1e-6)
        ),
    )


# ------------------------------------------------------------------------------------------ new parts
class EncoderLayer(nn.Module):
    """Pre-norm: x += self-attention (bidirectional over the neighbor's 2m tokens); x += cross-attention
    to the query chunk's states; x += SwiGLU."""

    def __init__(self, cfg: RPTConfig):
        super().__init__()
        d = cfg.d_model
        self.self_norm, self.self_attn = RMSNorm(d, cfg.norm_eps), Attention(cfg)
        self.x_norm, self.q_norm, self.x_attn = (
            RMSNorm(d, cfg.norm_eps),
            RMSNorm(d, cfg.norm_eps),
            Attention(cfg),
        )
        self.ffn_norm, self.ffn = RMSNorm(d, cfg.norm_eps), SwiGLU(d, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, query: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [N, 2m, d] neighbor states, query [N, m, d] its query chunk's states, key_mask [N, 2m]."""
        dev = x.device
        pos = torch.arange(x.shape[1], device=dev)
        # every row may attend to itself: a neighbor of pads only is never an empty softmax row (its
        # output is masked in CCA)
        self_mask = key_mask[:, None, :] | torch.eye(x.shape[1], dtype=torch.bool, device=dev)[None]
        x = x + self.self_attn(self.self_norm(x), q_pos=pos, attn_mask=self_mask)
        qpos = torch.arange(query.shape[1], device=dev)
        x = x + self.x_attn(self.x_norm(x), self.q_norm(query), q_pos=pos, k_pos=qpos)
        return x + self.ffn(self.ffn_norm(x))


class NeighborEncoder(nn.Module):
    """RETRO's encoder: frozen token embeddings of each neighbor (2m tokens), conditioned on the query
    chunk it was retrieved for."""

    def __init__(self, cfg: RetrofitConfig):
        super().__init__()
        mc = cfg.module_config()
        self.layers = nn.ModuleList(EncoderLayer(mc) for _ in range(cfg.encoder_layers))

    def forward(self, emb: torch.Tensor, valid: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """emb [B, n, K, 2m, d], valid [B, n, K, 2m] bool, query [B, T, d] -> [B, n, K * 2m, d]."""
        B, n, K, L, d = emb.shape
        m = query.shape[1] // n
        x = emb.reshape(B * n * K, L, d)
        q = query.reshape(B, n, 1, m, d).expand(B, n, K, m, d).reshape(B * n * K, m, d)
        mask = valid.reshape(B * n * K, L)
        for layer in self.layers:
            x = layer(x, q, mask)
        return x.reshape(B, n, K * L, d)


class CrossBlock(nn.Module):
    """Pre-norm CCA added to a block's output; the output projection starts at zero (identity at init)."""

    def __init__(self, cfg: RetrofitConfig):
        super().__init__()
        mc = cfg.module_config()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cca = ChunkedCrossAttention(mc)
        nn.init.zeros_(self.cca.attn.wo.weight)

    def forward(self, h: torch.Tensor, mem: NeighborMemory) -> torch.Tensor:
        # in the new parts' dtype: a bf16 base with float32 new parts runs with or without autocast
        x = self.norm(h.to(self.norm.weight.dtype))
        return h + self.cca(x, mem).to(h.dtype)


class RetrofitParts(nn.Module):
    """Everything that trains (and all that `retrofit.safetensors` holds)."""

    def __init__(self, cfg: RetrofitConfig, init_std: float = 0.02):
        super().__init__()
        self.encoder = NeighborEncoder(cfg)
        self.cross = nn.ModuleDict({str(i): CrossBlock(cfg) for i in cfg.cca_layers})
        for name, p in self.named_parameters():  # matrices; not the null key/value (1e-4, model.layers)
            if p.dim() == 2 and not name.endswith("cca.attn.wo.weight") and ".null_" not in name:
                nn.init.normal_(p, 0.0, init_std)


@dataclass
class RetrofitOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # mean NLL over labelled tokens
    token_nll: torch.Tensor | None = None  # [B, T], 0 where the label is IGNORE


# ------------------------------------------------------------------------------------------ the model
class RetrofitLM(nn.Module):
    def __init__(self, base: nn.Module, cfg: RetrofitConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.base = base
        self.blocks = base_blocks(base)
        if len(self.blocks) != cfg.n_base_layers or int(base.config.hidden_size) != cfg.d_model:
            raise ValueError(
                f"the base has {len(self.blocks)} blocks of width {base.config.hidden_size}; the retrofit "
                f"config was made for {cfg.n_base_layers} of width {cfg.d_model}"
            )
        for p in base.parameters():
            p.requires_grad_(False)
        base.eval()
        self.parts = RetrofitParts(cfg, init_std)

    def train(self, mode: bool = True) -> RetrofitLM:
        super().train(mode)
        self.base.eval()  # frozen: its dropout stays off
        return self

    def trainable(self) -> list[nn.Parameter]:
        return list(self.parts.parameters())

    def param_counts(self) -> dict[str, int]:
        new = sum(p.numel() for p in self.parts.parameters())
        base = sum(p.numel() for p in self.base.parameters())
        return {"trainable_params": new, "frozen_params": base}

    @contextmanager
    def _cca_hooks(self, neighbors: torch.Tensor, T: int) -> Iterator[None]:
        """Forward hooks that add CCA after the chosen blocks. The first one builds the neighbor memory
        from the states it sees (the query chunks' states at the first CCA block)."""
        cfg = self.cfg
        B, n, K, L = neighbors.shape
        if n != T // cfg.chunk_len or 2 * cfg.chunk_len != L:
            raise ValueError(
                f"neighbors {tuple(neighbors.shape)}: expected [B, {T // cfg.chunk_len}, K, {2 * cfg.chunk_len}]"
            )
        valid = neighbors >= 0
        state: dict[str, NeighborMemory] = {}

        def hook(idx: int):
            def fn(mod: nn.Module, args: Any, out: Any) -> Any:
                h = out[0] if isinstance(out, tuple) else out
                if "mem" not in state:
                    emb = self.base.get_input_embeddings()(neighbors.clamp(min=0)).to(self._dtype)
                    states = self.parts.encoder(emb, valid, h.detach().to(self._dtype))
                    any_valid = valid.any(-1)
                    state["mem"] = NeighborMemory(
                        states,
                        valid.reshape(B, n, K * L),
                        torch.ones(B, n, K, device=h.device, dtype=self._dtype),
                        torch.where(any_valid, 0, -1),
                    )
                new = self.parts.cross[str(idx)](h, state["mem"])
                return (new, *out[1:]) if isinstance(out, tuple) else new

            return fn

        handles = [self.blocks[i].register_forward_hook(hook(i)) for i in cfg.cca_layers]
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parts.parameters()).dtype

    def forward(
        self, tokens: torch.Tensor, neighbors: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> RetrofitOutput:
        """tokens [B, T] (T a multiple of chunk_len); neighbors [B, T/m, K, 2m] token ids (-1 pads) or
        None (the frozen LM); labels [B, T] next tokens (IGNORE: no loss)."""
        T = tokens.shape[1]
        if T % self.cfg.chunk_len:
            raise ValueError(f"sequence length {T} is not a multiple of chunk_len {self.cfg.chunk_len}")
        if neighbors is None:
            logits = self.base(input_ids=tokens, use_cache=False).logits
        else:
            with self._cca_hooks(neighbors.to(tokens.device), T):
                logits = self.base(input_ids=tokens, use_cache=False).logits
        out = RetrofitOutput(logits=logits)
        if labels is not None:
            out.loss, out.token_nll = lm_loss(logits, labels)
        return out


# ------------------------------------------------------------------------------------------ save / load
def save_retrofit(model: RetrofitLM, folder: str | Path, base_info: dict[str, Any]) -> None:
    """The new parameters (safetensors) and retrofit.json: the config and the base's identity."""
    from model.checkpointer import module_bytes, write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / WEIGHTS_FILE, module_bytes(model.parts))
    meta = {"config": model.cfg.model_dump(mode="json"), "base": base_info}
    write_atomic(folder / CONFIG_FILE, json.dumps(meta, indent=1).encode())


def load_base(path: str | Path, dtype: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=dtype or torch.float32
    )


def load_retrofit(folder: str | Path, base: str | Path | nn.Module, device: Any = "cpu") -> RetrofitLM:
    """A retrofitted model from the folder `save_retrofit` wrote and its base (a model folder or a loaded
    model). `stages.retrofit.load.load_retrofitted` finds the base by itself and checks its digest."""
    from safetensors.torch import load_file

    from model.checkpointer import load_module_state

    folder = Path(folder)
    cfg = RetrofitConfig(**read_meta(folder)["config"])
    model = RetrofitLM(base if isinstance(base, nn.Module) else load_base(base), cfg)
    load_module_state(model.parts, load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device).eval()


def read_meta(folder: str | Path) -> dict[str, Any]:
    """retrofit.json: {"config": RetrofitConfig fields, "base": the base's identity}."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text())

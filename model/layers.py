"""Building blocks: RMSNorm, rotary embeddings, SwiGLU, multi-head attention, sliding-window attention.

Every attention goes through `F.scaled_dot_product_attention`, so a GPU picks flash/efficient kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from model.config import RPTConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # the fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()  # lower precision: statistics in float32
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ------------------------------------------------------------------------------------------ RoPE
def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables [*pos.shape, head_dim] for integer positions, laid out for `apply_rope`:
    ([cos, cos], [-sin, sin]) over the two halves of a head.

    Angles are computed in float64 (a few thousand elements, cheap even on a GPU), so positions of
    long documents (1e5+) stay exact and attention depends only on relative positions. The tables are
    built once per call site (not per apply): small models run hundreds of attentions per step, where
    the concatenations were a measurable share of the step."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=pos.device) / head_dim))
    ang = pos.to(torch.float64)[..., None] * inv
    cos, sin = ang.cos().float(), ang.sin().float()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [..., L, H, dh]; cos/sin [L, dh] from `rope_cos_sin` (broadcast over heads).
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), as x * [cos, cos] + (x2, x1) * [-sin, sin]:
    two products instead of four over the activations, computed in float32."""
    h = x.shape[-1] // 2
    xf = x.float()
    swapped = torch.cat([xf[..., h:], xf[..., :h]], dim=-1)
    return torch.addcmul(xf * cos.unsqueeze(-2), swapped, sin.unsqueeze(-2)).to(x.dtype)


# ------------------------------------------------------------------------------------------ attention
class Attention(nn.Module):
    """Multi-head attention over [N, L, d] inputs with RoPE at given positions.

    Self-attention (kv=None) or cross-attention; an optional learned null key/value that every
    query may attend to (so a query whose keys are all masked gets a defined output).
    """

    def __init__(self, cfg: RPTConfig, null_kv: bool = False):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim, self.theta = cfg.n_heads, cfg.head_dim, cfg.rope_theta
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        if null_kv:
            self.null_k = nn.Parameter(torch.randn(cfg.n_heads, cfg.head_dim) * 1e-4)
            self.null_v = nn.Parameter(torch.randn(cfg.n_heads, cfg.head_dim) * 1e-4)
        else:
            self.null_k = self.null_v = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        *,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        value_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [N, Lq, d], kv [N, Lk, d]; key_mask [N, Lk] (True: may attend); attn_mask [Lq, Lk] or
        [N, Lq, Lk] (True: may attend); value_scale [N, Lk] multiplies each key's value (not its key).
        Returns [N, Lq, d]."""
        src = x if kv is None else kv
        q_rot = rope_cos_sin(q_pos, self.head_dim, self.theta)
        k_rot = q_rot if k_pos is None or k_pos is q_pos else rope_cos_sin(k_pos, self.head_dim, self.theta)
        q = apply_rope(self._heads(self.wq(x)), *q_rot)
        k = apply_rope(self._heads(self.wk(src)), *k_rot)
        v = self._heads(self.wv(src))
        if value_scale is not None:
            v = v * value_scale[..., None, None].to(v.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, L, dh]
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask[:, None]
        if key_mask is not None:
            km = key_mask[:, None, None, :]
            mask = km if mask is None else mask & km
        if self.null_k is not None:
            n = k.shape[0]
            nk = self.null_k.to(k.dtype)[None, :, None, :].expand(n, -1, 1, -1)
            nv = self.null_v.to(v.dtype)[None, :, None, :].expand(n, -1, 1, -1)
            k, v = torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)
            if mask is not None:
                mask = F.pad(mask, (0, 1), value=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


# CausalBias lets SDPA pick flash/efficient kernels with a lower-right causal mask. Tools that
# intercept dispatch (torch.utils.flop_counter) cannot handle that tensor subclass; they set this.
EXPLICIT_MASKS = False


def lower_right_causal(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """Mask for queries that are the last n_q of n_k keys: query i sees keys j <= i + n_k - n_q."""
    if not EXPLICIT_MASKS:
        return causal_lower_right(n_q, n_k)
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)


class WindowSelfAttention(Attention):
    """Causal sliding-window self-attention (Transformer-XL style, as in the paper).

    The sequence is cut into blocks of `stride` tokens; a block's queries attend causally to their
    own block and to the `window - stride` tokens before it (window 2048 / stride 1024: the block
    plus the previous one). Full blocks run as one batched SDPA call with a lower-right causal mask
    (flash-compatible); the first window/stride - 1 blocks, which have less history, run separately.
    """

    def __init__(self, cfg: RPTConfig):
        super().__init__(cfg)
        self.window, self.stride = cfg.window, cfg.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, T, _ = x.shape
        S, n = self.stride, self.window // self.stride
        pos = torch.arange(T, device=x.device)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.theta)
        q = apply_rope(self._heads(self.wq(x)), cos, sin)  # [B, T, H, dh]
        k = apply_rope(self._heads(self.wk(x)), cos, sin)
        v = self._heads(self.wv(x))
        if T <= S:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
            return self.wo(out.reshape(B, T, -1))
        pad = (-T) % S  # padding after the last token never influences earlier tokens (causal)
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        nb = (T + pad) // S
        H, dh = self.n_heads, self.head_dim
        outs = []
        for b in range(min(n - 1, nb)):  # early blocks: all history from position 0
            qq = q[:, b * S : (b + 1) * S].transpose(1, 2)
            kk, vv = (t[:, : (b + 1) * S].transpose(1, 2) for t in (k, v))
            mask = None if b == 0 else lower_right_causal(S, (b + 1) * S, x.device)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=b == 0)
            outs.append(o.transpose(1, 2))
        if nb >= n:
            m = nb - n + 1  # blocks with a full window
            kb, vb = k.view(B, nb, S, H, dh), v.view(B, nb, S, H, dh)
            kw = torch.cat([kb[:, s : s + m] for s in range(n)], dim=2)  # [B, m, n*S, H, dh]
            vw = torch.cat([vb[:, s : s + m] for s in range(n)], dim=2)
            qq = q[:, (n - 1) * S :].reshape(B * m, S, H, dh).transpose(1, 2)
            kk = kw.reshape(B * m, n * S, H, dh).transpose(1, 2)
            vv = vw.reshape(B * m, n * S, H, dh).transpose(1, 2)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=lower_right_causal(S, n * S, x.device))
            outs.append(o.transpose(1, 2).reshape(B, m * S, H, dh))
        out = torch.cat(outs, dim=1)[:, :T]
        return self.wo(out.reshape(B, T, -1))

"""Reference-LM scoring of (prefix, query, target) token pairs: log P(target | prefix, query), summed over
the target's tokens, for many pairs that share prefixes (RPT section 3.2: the retriever's supervision).
Arrays and token ids in, scores out; the `scores` stage turns artifacts into these arrays.

How it is fast: every score is log P(c_t | prefix, c_q, c_t) with a prefix of one or two chunks
(the candidate pair, or the local pair, which is the candidate pair of j = i-2). A prefix sits at
positions 0..P-1 whatever follows, so its key/value states are computed once (per call) and each
scored pair runs only its (c_q, c_t) tokens against the gathered cache: about half the forward tokens
of one forward per pair. Logits are computed only where a target token is predicted, in float32.
Pairs are grouped by prefix length and sorted by suffix length, so batches carry no padding when all
chunks but a document's last have the same length.

The model is a Hugging Face causal LM (transformers, torch: imported inside the functions that use them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------ the copy cache
COPY_CACHE_FILE = "copy_cache.json"  # beside the model's files: {"weight": w, "order": n}


@dataclass(frozen=True)
class CopyCache:
    """An in-context copy model mixed into the scoring LM (a cache LM: Grave et al. 2017, with n-gram
    matching): where the `order` tokens up to position t occurred earlier in the same sequence,
    P(x_t+1) = (1 - weight) P_LM + weight * (share of those occurrences followed by x_t+1); elsewhere the
    LM alone. A large pretrained scorer (the paper's Pythia-1.4B) copies in context by itself; a small LM
    trained here does not (the reference stage's copy probe), and without copying its scores cannot tell
    the candidate that holds the target's continuation from any other on the topic."""

    weight: float
    order: int = 2


def copy_cache_probs(seqs: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """For int [B, T] sequences: p [B, T-1] and matched [B, T-1] for the prediction made at position t
    (of token t+1): matched when the `order` tokens ending at t also end at some s < t (s >= order - 1);
    p the share of those s whose next token equals token t+1 (0 where unmatched)."""
    B, T = seqs.shape
    if T < 2:
        return np.zeros((B, max(T - 1, 0))), np.zeros((B, max(T - 1, 0)), bool)
    same = np.ones((B, T, T), bool)  # same[b, t, s]: the order-grams ending at t and at s are equal
    for k in range(min(order, T)):  # (order >= T: no order-gram fits before t; cut below)
        eq = np.zeros((B, T, T), bool)
        eq[:, k:, k:] = seqs[:, : T - k, None] == seqs[:, None, : T - k]
        same &= eq
    same[:, :, : order - 1] = False
    same &= np.tri(T, T, -1, dtype=bool)[None]  # s < t
    same = same[:, : T - 1, : T - 1]  # a prediction at t reads token t+1; a match s needs its token s+1
    nxt = seqs[:, 1:, None] == seqs[:, None, 1:]  # [b, t, s]: token t+1 == token s+1
    n = same.sum(-1)
    hits = (same & nxt).sum(-1)
    return np.where(n > 0, hits / np.maximum(n, 1), 0.0), n > 0


def mix_copy(logp_lm: np.ndarray, p_copy: np.ndarray, matched: np.ndarray, weight: float) -> np.ndarray:
    """log((1 - w) P_LM + w P_copy) where matched, log P_LM elsewhere (elementwise, float64)."""
    mixed = np.logaddexp(np.log1p(-weight) + logp_lm, np.log(weight) + np.log(np.maximum(p_copy, 1e-300)))
    return np.where(matched, mixed, logp_lm)


def load_copy_cache(model_dir: str) -> CopyCache | None:
    f = Path(model_dir) / COPY_CACHE_FILE
    return CopyCache(**json.loads(f.read_text())) if f.exists() else None


# ------------------------------------------------------------------------------------------ the scoring LM


class ScoringLM:
    """A causal LM that scores log P(target | prefix, query) with reusable prefix key/value states."""

    def __init__(self, model: Any, device: Any, dtype: Any, copy: CopyCache | None = None):
        self.model = model.eval()
        self.copy = copy
        self.base = model.base_model
        self.device = device
        self.dtype = dtype
        head = model.get_output_embeddings()
        self.head_w = head.weight
        self.head_b = getattr(head, "bias", None)
        cfg = model.config
        self.logit_scale = getattr(cfg, "logit_scale", None)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self._head_w32: Any = None
        self._kv_bytes: int | None = None

    @classmethod
    def load(cls, model_dir: str, device: Any, dtype: Any) -> ScoringLM:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        return cls(model.to(device), device, dtype, load_copy_cache(model_dir))

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def kv_bytes_per_token(self) -> int:
        if self._kv_bytes is None:
            kv = self.prefix_kv([np.zeros(1, np.int64)])
            self._kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        return self._kv_bytes

    def _ids(self, seqs: Sequence[np.ndarray]) -> Any:
        """[B, max_len] ids; callers batch equal lengths, and any right padding would sit after every
        real token, where a causal model's outputs at real positions cannot see it."""
        import torch

        n = max(len(s) for s in seqs)
        out = np.zeros((len(seqs), n), dtype=np.int64)
        for r, s in enumerate(seqs):
            out[r, : len(s)] = s
        return torch.from_numpy(out).to(self.device)

    def prefix_kv(self, seqs: Sequence[np.ndarray]) -> list[tuple[Any, Any]]:
        """Per layer (keys, values) [B, heads, max_len, head_dim] of a batch of prefixes."""
        import torch

        with torch.inference_mode():
            cache = self.base(input_ids=self._ids(seqs), use_cache=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def logits(self, h: Any) -> Any:
        """float32 logits of hidden states h [N, d] (bf16 GEMM with fp32 output on GPUs that have it)."""
        import torch

        if h.dtype == torch.float32:
            out = h @ self.head_w.t()
        else:
            try:
                out = torch.mm(h, self.head_w.t(), out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                if self._head_w32 is None:
                    self._head_w32 = self.head_w.float()
                out = h.float() @ self._head_w32.t()
        if self.head_b is not None:
            out = out + self.head_b.float()
        if self.logit_scale is not None:
            out = out * self.logit_scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def target_logp(self, h: Any, targets: Any, rows: Any, n_rows: int) -> Any:
        """Sum over each row's target tokens of log P(token): h [N, d] are the hidden states that predict
        `targets` [N]; `rows` [N] says which row each belongs to. Returns float64 [n_rows]."""
        import torch

        out = torch.zeros(n_rows, dtype=torch.float64, device=h.device)
        return out.index_add_(0, rows, self.token_logp(h, targets))

    def token_logp(self, h: Any, targets: Any) -> Any:
        """log P(targets[n]) under the LM from hidden states h [N, d]: float64 [N]."""
        import torch

        out = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
        vocab = self.head_w.shape[0]
        # float32 logits in blocks: cache-sized on a CPU (about 2x faster than large blocks), large on a GPU
        block_bytes = (512 << 20) if h.device.type == "cuda" else (4 << 20)
        step = max(1, block_bytes // (4 * vocab))
        for a in range(0, h.shape[0], step):
            # fused log-softmax + gather (one pass over the logits block)
            nll = torch.nn.functional.cross_entropy(
                self.logits(h[a : a + step]), targets[a : a + step], reduction="none"
            )
            out[a : a + step] = -nll.double()
        return out

    def suffix_logp(
        self,
        kv: list[tuple[Any, Any]] | None,
        q_lens: np.ndarray,
        suffixes: Sequence[np.ndarray],
        prefixes: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """log P(target | prefix, query) for a batch of rows that share one prefix length. `kv` holds each
        row's prefix states (None when the prefix is empty); suffix r = query tokens (q_lens[r]) + target.
        With a copy cache, `prefixes` (the prefix tokens of each row) are its context too."""
        import torch
        from transformers import DynamicCache

        ids = self._ids(suffixes)
        b_idx, pos, tgt, row = [], [], [], []
        empty_prefix = kv is None
        for r, (s, lq) in enumerate(zip(suffixes, q_lens)):
            p = np.arange(int(lq) - 1, len(s) - 1)
            if lq == 0:  # an empty query (possible after re-tokenization): its target's first token is
                p = p[1:]  # predicted from no state of this suffix, so no pair of this query scores it
            b_idx.append(np.full(len(p), r))
            pos.append(p)
            tgt.append(s[p + 1])
            row.append(np.full(len(p), r))
        to = lambda a: torch.from_numpy(np.concatenate(a).astype(np.int64)).to(self.device)  # noqa: E731
        with torch.inference_mode():
            cache = None if empty_prefix else DynamicCache(ddp_cache_data=kv)
            h = self.base(input_ids=ids, past_key_values=cache, use_cache=cache is not None).last_hidden_state
            h = h[to(b_idx), to(pos)]
            if self.copy is None:
                return self.target_logp(h, to(tgt), to(row), len(suffixes)).cpu().numpy()
            logp = self.token_logp(h, to(tgt)).cpu().numpy()
        if prefixes is None and not empty_prefix:
            raise ValueError("suffix_logp: a copy cache needs the prefix tokens of every row")
        n_pre = 0 if empty_prefix else len(prefixes[0])
        full = np.stack([np.concatenate([prefixes[r], s]) if n_pre else s for r, s in enumerate(suffixes)])
        p_copy, matched = copy_cache_probs(full, self.copy.order)
        b, p = np.concatenate(b_idx), np.concatenate(pos) + n_pre
        logp = mix_copy(logp, p_copy[b, p], matched[b, p], self.copy.weight)
        return np.bincount(np.concatenate(row), weights=logp, minlength=len(suffixes))


# ------------------------------------------------------------------------------------------ scoring core


@dataclass
class PairWork:
    """What to score: unique prefixes, (query, target) token pairs, and pairs (prefix index, query index)."""

    prefixes: list[np.ndarray]
    queries: list[np.ndarray]
    targets: list[np.ndarray]
    pair_prefix: np.ndarray  # int64 [n_pairs]
    pair_query: np.ndarray  # int64 [n_pairs]


def score_pairs(
    lm: ScoringLM,
    work: PairWork,
    batch_tokens: int,
    kv_cache_mb: int,
    bar: Any = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """log P(target | prefix, query) of every pair, summed over target tokens (float64 [n_pairs]).

    Prefixes are processed in blocks that fit `kv_cache_mb`; each prefix's key/value states are computed
    once, then every pair that uses a prefix of the block runs its query+target tokens against the cached
    states gathered per row. Returns the scores and counts of forward tokens.
    """
    import torch

    n_pairs = len(work.pair_prefix)
    out = np.full(n_pairs, np.nan)
    plen = np.array([len(p) for p in work.prefixes], dtype=np.int64)
    slen = np.array([len(q) + len(t) for q, t in zip(work.queries, work.targets)], dtype=np.int64)
    counts = {"prefix_tokens": 0, "suffix_tokens": 0, "pairs": n_pairs, "batches": 0}
    by_prefix = np.argsort(work.pair_prefix, kind="stable")
    pair_starts = np.searchsorted(work.pair_prefix[by_prefix], np.arange(len(plen) + 1))

    def run_pairs(
        pairs: np.ndarray, kv_rows: np.ndarray | None, kv: list[tuple[Any, Any]] | None, P: int
    ) -> None:
        """Score pairs that all have prefix length P; kv_rows[i] = row of pair i's prefix in kv."""
        order = np.argsort(slen[work.pair_query[pairs]], kind="stable")
        pairs = pairs[order]
        rows = kv_rows[order] if kv_rows is not None else None
        s_sorted = slen[work.pair_query[pairs]]
        i = 0
        while i < len(pairs):
            j = i + 1  # one suffix length per batch (no padding), as many rows as batch_tokens allows
            cap = max(1, batch_tokens // int(s_sorted[i]))
            while j < len(pairs) and j - i < cap and s_sorted[j] == s_sorted[i]:
                j += 1
            batch = pairs[i:j]
            qi = work.pair_query[batch]
            suffixes = [np.concatenate([work.queries[q], work.targets[q]]) for q in qi]
            q_lens = np.array([len(work.queries[q]) for q in qi])
            bkv = None
            if kv is not None and P > 0:
                idx = torch.from_numpy(rows[i:j]).to(lm.device)
                bkv = [(k.index_select(0, idx)[:, :, :P], v.index_select(0, idx)[:, :, :P]) for k, v in kv]
            prefixes = [work.prefixes[work.pair_prefix[x]] for x in batch] if lm.copy is not None else None
            out[batch] = lm.suffix_logp(bkv, q_lens, suffixes, prefixes)
            counts["suffix_tokens"] += int(slen[qi].sum())
            counts["batches"] += 1
            if bar is not None:
                bar.update(len(batch))
            i = j

    # prefixes that some pair uses, longest first; the empty prefix needs no cache
    used = np.flatnonzero(np.diff(pair_starts) > 0)
    empty = used[plen[used] == 0]
    for p in empty:
        run_pairs(by_prefix[pair_starts[p] : pair_starts[p + 1]], None, None, 0)
    used = used[plen[used] > 0]
    used = used[np.argsort(-plen[used], kind="stable")]
    per_token = lm.kv_bytes_per_token()
    b0 = 0
    while b0 < len(used):
        pmax = int(plen[used[b0]])
        n_fit = max(1, (kv_cache_mb << 20) // (per_token * pmax))
        block = used[b0 : b0 + n_fit]
        b0 += len(block)
        # the block's prefix states, computed in batches of <= batch_tokens, one prefix length per batch
        kv: list[tuple[Any, Any]] = []
        a = 0
        while a < len(block):
            n = max(1, batch_tokens // int(plen[block[a]]))
            other = np.flatnonzero(plen[block[a : a + n]] != plen[block[a]])
            sub = block[a : a + (int(other[0]) if len(other) else n)]
            part = lm.prefix_kv([work.prefixes[p] for p in sub])
            if not kv:  # one tensor per layer for the whole block, padded in time to its longest prefix
                kv = [
                    (
                        k.new_zeros((len(block), k.shape[1], pmax, k.shape[3])),
                        v.new_zeros((len(block), v.shape[1], pmax, v.shape[3])),
                    )
                    for k, v in part
                ]
            for (bk, bv), (k, v) in zip(kv, part):
                bk[a : a + len(sub), :, : k.shape[2]] = k
                bv[a : a + len(sub), :, : v.shape[2]] = v
            del part
            counts["prefix_tokens"] += int(plen[sub].sum())
            a += len(sub)
        # the block's pairs, grouped by exact prefix length (no padding inside the cache)
        block_row = {int(p): r for r, p in enumerate(block)}
        for P in np.unique(plen[block]):
            members = block[plen[block] == P]
            pairs = np.concatenate([by_prefix[pair_starts[p] : pair_starts[p + 1]] for p in members])
            kv_rows = np.array([block_row[int(work.pair_prefix[x])] for x in pairs], dtype=np.int64)
            run_pairs(pairs, kv_rows, kv, int(P))
        del kv
    return out, counts


# ------------------------------------------------------------------------------------------ queries -> pairs


@dataclass
class QueryScores:
    chunk_id: np.ndarray  # [n] query chunk ids
    candidates: list[np.ndarray]  # per query: candidate ids in bm25 order
    logp_candidate: list[np.ndarray]
    logp_local: np.ndarray


def plan_pairs(
    query_ids: np.ndarray,
    candidates: list[np.ndarray],
    doc_start: np.ndarray,
    doc_end: np.ndarray,
    tokens_of: Any,
) -> tuple[PairWork, list[np.ndarray], np.ndarray]:
    """Build the pair work for queries (each must have a target in its document).

    doc_start/doc_end: first and one-past-last chunk id of each chunk's document (indexed by chunk id).
    tokens_of(chunk_id) -> token ids. Returns the work, per query the pair index of each candidate, and
    per query the pair index of its local-context pair.
    """
    prefix_index: dict[tuple[int, ...], int] = {}
    prefixes: list[np.ndarray] = []

    def prefix(chunks: tuple[int, ...]) -> int:
        k = prefix_index.get(chunks)
        if k is None:
            k = prefix_index[chunks] = len(prefixes)
            prefixes.append(
                np.concatenate([tokens_of(c) for c in chunks]) if chunks else np.zeros(0, np.int64)
            )
        return k

    queries, targets, pp, pq = [], [], [], []
    cand_pairs: list[np.ndarray] = []
    local_pairs = np.zeros(len(query_ids), dtype=np.int64)
    for qi, (i, cands) in enumerate(zip(query_ids.tolist(), candidates)):
        queries.append(tokens_of(i))
        targets.append(tokens_of(i + 1))
        local = tuple(range(max(int(doc_start[i]), i - 2), i))
        conts = [(j, j + 1) if j + 1 < doc_end[j] else (j,) for j in cands.tolist()]
        seen: dict[int, int] = {}  # prefix -> pair, so a candidate equal to the local pair is scored once
        idx = []
        for chunks in [local, *conts]:
            p = prefix(chunks)
            if p not in seen:
                seen[p] = len(pp)
                pp.append(p)
                pq.append(qi)
            idx.append(seen[p])
        local_pairs[qi] = idx[0]
        cand_pairs.append(np.asarray(idx[1:], dtype=np.int64))
    work = PairWork(
        prefixes, queries, targets, np.asarray(pp, dtype=np.int64), np.asarray(pq, dtype=np.int64)
    )
    return work, cand_pairs, local_pairs


def score_queries(
    lm: ScoringLM,
    query_ids: np.ndarray,
    candidates: list[np.ndarray],
    doc_start: np.ndarray,
    doc_end: np.ndarray,
    tokens_of: Any,
    batch_tokens: int = 16384,
    kv_cache_mb: int = 4096,
    bar: Any = None,
) -> tuple[QueryScores, dict[str, int]]:
    """Score every (query, candidate) pair and each query's local context."""
    work, cand_pairs, local_pairs = plan_pairs(query_ids, candidates, doc_start, doc_end, tokens_of)
    if bar is not None:
        bar.total = (bar.total or 0) + len(work.pair_prefix)
        bar.refresh()
    logp, counts = score_pairs(lm, work, batch_tokens, kv_cache_mb, bar)
    return QueryScores(query_ids, candidates, [logp[c] for c in cand_pairs], logp[local_pairs]), counts

"""Synthetic documents whose later passages repeat earlier ones verbatim, for the mechanism tests.

A document is random tokens in which some spans are copies of earlier spans. A copy starts at an
arbitrary token offset (not at a chunk boundary; real repeats never are) and lies further back than
the attention window, so only retrieval can bring its source into view. Everything a test needs to
judge retrieval comes with the tokens:

- `source[p]`: the position that token p was copied from (-1: not a copy);
- `true_chunks(doc)`: per chunk u, the earlier chunks holding what chunk u copies (its source or
  another copy of it: the chunks a retriever should find from c_u alone);
- `true_neighbor(doc)`: per chunk u, the chunk j whose pair (c_j, c_j+1) holds the copy's source of
  the next chunk's first copied token, i.e. the neighbor from which CCA can copy c_u+1;
- `predictable(doc)`: label positions whose next token continues a copy (it and its predecessor are
  copies of consecutive source tokens): the tokens a model that reads the right neighbor can predict;
- `copy_lm_delta`: a stand-in for the scoring LM of RPT-Sem, a trigram copy model (a token is likely
  when it followed its two predecessors somewhere in the context), so supervision can be built the
  way the scores stage builds it without training a reference LM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.config import IGNORE


@dataclass
class CopyDoc:
    tokens: np.ndarray  # int64 [n_chunks * m]
    source: np.ndarray  # int64 [n_chunks * m], -1 where the token is not a copy
    chunk_len: int

    @property
    def n_chunks(self) -> int:
        return len(self.tokens) // self.chunk_len


def copy_document(
    rng: np.random.Generator,
    n_chunks: int,
    chunk_len: int,
    vocab: int,
    min_gap: int,
    span_chunks: tuple[int, int] = (2, 4),
    align: bool = False,
    zipf: float = 0.0,
    skip_repeat: float = 0.0,
) -> CopyDoc:
    """Random tokens in [0, vocab), then, from the first position that can have a source, spans of
    span_chunks chunks (uniform, in tokens) copied from original (not copied) text at least `min_gap`
    tokens earlier, separated by 1/2 to 2 chunks of new random tokens. Copy and source offsets are
    arbitrary."""
    m = chunk_len
    T = n_chunks * m
    if zipf > 0:
        w = 1.0 / np.arange(1, vocab + 1) ** zipf
        tokens = rng.choice(vocab, T, p=w / w.sum())
    else:
        tokens = rng.integers(0, vocab, T)
    if skip_repeat > 0:  # x_t = x_t-2 with this probability: local structure that needs a previous-token head
        rep = rng.random(T) < skip_repeat
        for t in range(2, T):
            if rep[t]:
                tokens[t] = tokens[t - 2]
    source = np.full(T, -1, np.int64)
    lo, hi = span_chunks[0] * m, span_chunks[1] * m
    p = min_gap + hi + int(rng.integers(0, m))
    while p < T:
        length = min(int(rng.integers(lo, hi + 1)), T - p)
        # the source ends min_gap before the copy and is original text, so every copied passage has
        # exactly one earlier occurrence (its source) and "the true source chunk" is well defined
        for _ in range(20):
            s = int(rng.integers(0, p - min_gap - length + 1))
            if source[s : s + length].max(initial=-1) < 0:
                break
        else:
            p += m
            continue
        if align:  # chunk-aligned copies (a positional shortcut suffices; for comparison only)
            p, s = -(-p // m) * m, (s // m) * m
            length = min(length, T - p)
            if length <= 0:
                break
        tokens[p : p + length] = tokens[s : s + length]
        source[p : p + length] = np.arange(s, s + length)
        p += length + int(rng.integers(m // 2, 2 * m))
    return CopyDoc(tokens.astype(np.int64), source, m)


def copy_corpus(
    seed: int, n_docs: int, n_chunks: int, chunk_len: int, vocab: int, min_gap: int, **kw: object
) -> list[CopyDoc]:
    rng = np.random.default_rng(seed)
    return [copy_document(rng, n_chunks, chunk_len, vocab, min_gap, **kw) for _ in range(n_docs)]


def _copied_run(doc: CopyDoc) -> np.ndarray:
    """bool [T]: token p continues a copy (p and p-1 are copies of consecutive source tokens)."""
    s = doc.source
    run = np.zeros(len(s), bool)
    run[1:] = (s[1:] >= 0) & (s[:-1] >= 0) & (s[1:] == s[:-1] + 1)
    return run


def predictable(doc: CopyDoc) -> np.ndarray:
    """bool [T] over label positions t (label = token t+1): the label continues a copy."""
    run = _copied_run(doc)
    out = np.zeros(len(run), bool)
    out[:-1] = run[1:]
    return out


def retrievable_copies(doc: CopyDoc, exclude_recent: int) -> np.ndarray:
    """bool [T] over label positions: `predictable`, and the chunk whose neighbors CCA uses there
    (position p reads the neighbors of chunk (p + 1) // m - 1) is itself entirely a copy of text
    retrievable from it, so a retriever that sees only that chunk can find the source. A copy's first
    chunk is not: until a chunk repeats something, nothing says what it will repeat."""
    m = doc.chunk_len
    full = [bool((doc.source[u * m : (u + 1) * m] >= 0).all()) for u in range(doc.n_chunks)]
    src = true_chunks(doc)
    ok_chunk = [
        full[u] and bool(src[u]) and min(src[u]) <= u - 1 - exclude_recent for u in range(doc.n_chunks)
    ]
    out = predictable(doc)
    for p in range(len(out)):
        u = (p + 1) // m - 1
        out[p] &= u >= 0 and ok_chunk[u]
    return out


def true_chunks(doc: CopyDoc) -> list[set[int]]:
    """Per chunk u: the earlier chunks holding an occurrence (the source, or another copy of it) of one
    of c_u's copied tokens; empty when c_u holds no copied token."""
    m = doc.chunk_len
    origin = np.where(doc.source >= 0, doc.source, np.arange(len(doc.source)))
    where: dict[int, list[int]] = {}
    for p, o in enumerate(origin.tolist()):
        where.setdefault(o, []).append(p)
    out: list[set[int]] = []
    for u in range(doc.n_chunks):
        lo = u * m
        found: set[int] = set()
        for p in range(lo, lo + m):
            if doc.source[p] >= 0:
                found.update(q // m for q in where[int(origin[p])] if q < lo)
        out.append(found)
    return out


def true_neighbor(doc: CopyDoc) -> np.ndarray:
    """int64 [n_chunks]: per chunk u, the chunk j whose pair (c_j, c_j+1) holds the source of c_u+1's
    first copied token (-1: c_u+1 has no copied token, or j is not earlier than u)."""
    m, n = doc.chunk_len, doc.n_chunks
    out = np.full(n, -1, np.int64)
    for u in range(n - 1):
        s = doc.source[(u + 1) * m : (u + 2) * m]
        s = s[s >= 0]
        if len(s):
            j = int(s[0]) // m
            out[u] = j if j + 1 <= u else -1
    return out


def copy_lm_logp(context: np.ndarray, target: np.ndarray, vocab: int, p_copy: float = 0.9) -> float:
    """log P(target | context) under a trigram copy model: the next token is, with probability p_copy,
    one of the tokens that followed the current two tokens earlier (in proportion to how often), else
    uniform; where the two tokens never occurred together before, uniform. (Conditioning on two tokens
    keeps chance matches rare: with one, random text matches a random candidate often enough that
    noise candidates become positives.)"""
    follows: dict[tuple[int, int], dict[int, int]] = {}
    seq = np.concatenate([context, target]).tolist()
    total = 0.0
    for pos in range(len(seq)):
        tok = seq[pos]
        key = (seq[pos - 2], seq[pos - 1]) if pos >= 2 else None
        if pos >= len(context):
            seen = follows.get(key) if key is not None else None
            if seen:
                p = p_copy * seen.get(tok, 0) / sum(seen.values()) + (1 - p_copy) / vocab
            else:
                p = 1.0 / vocab
            total += math.log(p)
        if key is not None:
            d = follows.setdefault(key, {})
            d[tok] = d.get(tok, 0) + 1
    return total


def copy_lm_delta(doc: CopyDoc, query: int, candidates: np.ndarray, vocab: int) -> np.ndarray:
    """The scores stage's delta for query chunk i = `query` (target c_i+1) and candidate chunks j:
    log P(c_i+1 | c_j, c_j+1, c_i) - log P(c_i+1 | c_i-2, c_i-1, c_i), under `copy_lm_logp`."""
    m = doc.chunk_len
    tok = doc.tokens

    def ch(j: int) -> np.ndarray:
        return tok[j * m : (j + 1) * m]

    target = ch(query + 1)
    local = tok[max(0, query - 2) * m : (query + 1) * m]
    base = copy_lm_logp(local, target, vocab)
    out = np.full(len(candidates), np.nan, np.float32)
    for c, j in enumerate(candidates.tolist()):
        if j < 0:
            continue
        ctx = np.concatenate([ch(j), ch(j + 1), ch(query)])
        out[c] = copy_lm_logp(ctx, target, vocab) - base
    return out


def copy_lm_logp_rows(seqs: np.ndarray, n_context: int, vocab: int, p_copy: float = 0.9) -> np.ndarray:
    """`copy_lm_logp` of many rows at once: seqs [R, L] int, each row a context of `n_context` tokens
    followed by its target; float64 [R]. The same model, counted with array comparisons over the rows
    (the per-token loop of `copy_lm_logp` is what made the mechanism tests' batches slow)."""
    seqs = np.asarray(seqs, dtype=np.int64)
    R, L = seqs.shape
    keys = np.full((R, L), -1, np.int64)
    keys[:, 2:] = seqs[:, :-2] * vocab + seqs[:, 1:-1]
    total = np.zeros(R)
    for p in range(max(n_context, 2), L):
        same = keys[:, 2:p] == keys[:, p, None]
        n = same.sum(1)
        c = (same & (seqs[:, 2:p] == seqs[:, p, None])).sum(1)
        prob = np.where(n > 0, p_copy * c / np.maximum(n, 1) + (1 - p_copy) / vocab, 1.0 / vocab)
        total += np.log(prob)
    if n_context < 2:
        total += (min(2, L) - n_context) * math.log(1.0 / vocab)
    return total


def copy_lm_deltas(doc: CopyDoc, cand_pos: np.ndarray, vocab: int) -> np.ndarray:
    """`copy_lm_delta` for every query chunk of a document at once: cand_pos [n_chunks, C] (-1: none)
    -> float32 [n_chunks, C], NaN where there is no candidate or no target (the last chunk)."""
    m, n = doc.chunk_len, doc.n_chunks
    ch = doc.tokens[: n * m].reshape(n, m)
    out = np.full(cand_pos.shape, np.nan, np.float32)
    base = np.zeros(n)
    for q in range(min(2, n - 1)):  # short local contexts at the start of the document
        base[q] = copy_lm_logp_rows(ch[None, : q + 2].reshape(1, -1), (q + 1) * m, vocab)[0]
    if n - 1 > 2:
        q = np.arange(2, n - 1)
        rows = np.concatenate([ch[q - 2], ch[q - 1], ch[q], ch[q + 1]], axis=1)
        base[2 : n - 1] = copy_lm_logp_rows(rows, 3 * m, vocab)
    qi, ci = np.nonzero(cand_pos[: n - 1] >= 0)
    if len(qi):
        j = cand_pos[qi, ci]
        rows = np.concatenate([ch[j], ch[j + 1], ch[qi], ch[qi + 1]], axis=1)
        out[qi, ci] = copy_lm_logp_rows(rows, 3 * m, vocab) - base[qi]
    return out


def distractor_neighbors(doc: CopyDoc, exclude_recent: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n_chunks, 2]: per chunk, its true neighbor and a random retrievable chunk, in random
    order (-1 where there is no true neighbor or nothing retrievable)."""
    n = doc.n_chunks
    true = true_neighbor(doc)
    out = np.full((n, 2), -1, np.int64)
    for u in range(n):
        last = u - 1 - exclude_recent
        if true[u] < 0 or last < 0:
            continue
        pair = [int(true[u]), int(rng.integers(0, last + 1))]
        out[u] = pair if rng.random() < 0.5 else pair[::-1]
    return out


def copy_batch(
    docs: list[CopyDoc],
    neighbor_pos: list[np.ndarray] | None = None,
    cand_pos: list[np.ndarray] | None = None,
    cand_target: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """A training batch in the layout of data.loader.TrainSequences (tokens, next-token labels with
    -100 at the end, optional neighbor_pos [l, K] and supervision cand_pos/cand_target [l, C])."""
    import torch

    tok = torch.from_numpy(np.stack([d.tokens for d in docs]))
    labels = torch.cat([tok[:, 1:], torch.full_like(tok[:, :1], IGNORE)], dim=1)
    batch: dict[str, Any] = {"tokens": tok, "labels": labels}
    if neighbor_pos is not None:
        batch["neighbor_pos"] = torch.from_numpy(np.stack(neighbor_pos))
    if cand_pos is not None and cand_target is not None:
        batch["cand_pos"] = torch.from_numpy(np.stack(cand_pos))
        batch["cand_target"] = torch.from_numpy(np.stack(cand_target).astype(np.float32))
    return batch

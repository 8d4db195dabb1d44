"""Examples for a retrofitted LM (model.retrofit), from the chunks artifact and a neighbor table.

An example is `c` consecutive chunks of one document (c x m tokens, the base's context), starting at a
chunk boundary so that CCA's chunks are the table's chunks. Each chunk's K neighbors come from the
table by chunk id, whatever its scope (corpus: other documents of the train split; document-causal:
earlier chunks of the same document); a neighbor is chunk j with its continuation j+1 when j+1 lies in
the same document (2m tokens, -1 where there is none). Everything here is numpy; the batch of a step is a
pure function of (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.config import IGNORE
from pipeline.formats import NEIGHBOR_PAD, TOKEN_PAD, DocSpan


@dataclass
class Windows:
    """Examples as (first chunk id, chunks) over some documents."""

    first: np.ndarray  # int64 [n]
    n_chunks: np.ndarray  # int64 [n]
    doc_idx: np.ndarray  # int64 [n]


def training_windows(docs: list[DocSpan], c: int) -> Windows:
    """Every full window of c chunks (any start chunk) of the documents."""
    first, doc = [], []
    for d in docs:
        if d.n >= c:
            first.append(np.arange(d.first, d.first + d.n - c + 1, dtype=np.int64))
            doc.append(np.full(d.n - c + 1, d.doc_idx, dtype=np.int64))
    if not first:
        return Windows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    f = np.concatenate(first)
    return Windows(f, np.full(len(f), c, dtype=np.int64), np.concatenate(doc))


def tiling_windows(docs: list[DocSpan], c: int) -> Windows:
    """Each document cut into consecutive windows of c chunks from its first chunk (the last may be
    shorter): every chunk of the documents once, for evaluation."""
    first, size, doc = [], [], []
    for d in docs:
        for s in range(0, d.n, c):
            first.append(d.first + s)
            size.append(min(c, d.n - s))
            doc.append(d.doc_idx)
    return Windows(np.array(first, np.int64), np.array(size, np.int64), np.array(doc, np.int64))


def sample(windows: Windows, seed: int, step: int, batch: int) -> np.ndarray:
    """Indices of the step's windows (with replacement), a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, 11, step])
    return rng.integers(0, len(windows.first), batch)


def window_tokens(
    tokens: np.ndarray, chunk_doc: np.ndarray, first: int, n: int, c: int
) -> tuple[np.ndarray, np.ndarray]:
    """Input ids and next-token labels [c * m] of chunks first..first+n-1 (n <= c; the rest padded):
    the label of the last token is the next chunk's first token when that chunk is in the same
    document. Pads: id 0, label IGNORE."""
    m = tokens.shape[1]
    ids = np.full(c * m, TOKEN_PAD, dtype=np.int64)
    ids[: n * m] = np.asarray(tokens[first : first + n]).reshape(-1)
    nxt = TOKEN_PAD
    after = first + n
    if after < len(chunk_doc) and chunk_doc[after] == chunk_doc[first]:
        nxt = int(tokens[after, 0])
    labels = np.concatenate([ids[1:], [nxt]])
    # a short last chunk leaves pads inside the row: the token before the first pad predicts nothing
    labels = np.where((labels == TOKEN_PAD) | (ids == TOKEN_PAD), IGNORE, labels)
    return np.where(ids == TOKEN_PAD, 0, ids), labels


def neighbor_tokens(
    tokens: np.ndarray, chunk_doc: np.ndarray, table: np.ndarray, query_ids: np.ndarray, k: int
) -> np.ndarray:
    """[len(query_ids), k, 2m] token ids of each query chunk's first k neighbors (chunk j, then j+1 when
    it is in j's document); -1 where a neighbor, its continuation or a token is missing. Query ids
    < 0 (padding chunks of a window) get no neighbors."""
    m = tokens.shape[1]
    nq = len(query_ids)
    out = np.full((nq, k, 2 * m), TOKEN_PAD, dtype=np.int64)
    ok_q = query_ids >= 0
    nb = np.full((nq, k), NEIGHBOR_PAD, dtype=np.int64)
    width = min(k, table.shape[1])
    nb[ok_q, :width] = table[query_ids[ok_q], :width]
    has = nb != NEIGHBOR_PAD
    j = nb[has]
    out[has, :m] = tokens[j]
    cont = j + 1
    same = cont < len(chunk_doc)
    same[same] = chunk_doc[cont[same]] == chunk_doc[j[same]]
    rows = np.flatnonzero(has.reshape(-1))[same]
    flat = out.reshape(nq * k, 2 * m)
    flat[rows, m:] = tokens[cont[same]]
    return flat.reshape(nq, k, 2 * m)


def batch_arrays(
    tokens: np.ndarray,
    chunk_doc: np.ndarray,
    table: np.ndarray,
    windows: Windows,
    picks: np.ndarray,
    c: int,
    k: int,
) -> dict[str, np.ndarray]:
    """tokens, labels [B, c*m] and neighbors [B, c, k, 2m] of the picked windows."""
    ids, labels, nbs = [], [], []
    for w in picks:
        first, n = int(windows.first[w]), int(windows.n_chunks[w])
        t, lab = window_tokens(tokens, chunk_doc, first, n, c)
        q = np.full(c, -1, dtype=np.int64)
        q[:n] = np.arange(first, first + n)
        ids.append(t)
        labels.append(lab)
        nbs.append(neighbor_tokens(tokens, chunk_doc, table, q, k))
    return {"tokens": np.stack(ids), "labels": np.stack(labels), "neighbors": np.stack(nbs)}

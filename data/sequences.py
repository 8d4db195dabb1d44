"""Cut documents into training examples of l chunks (L = l * chunk_len tokens).

An example is the unit that training and its supervision share (stages.supervision_table): a document is
cut into consecutive examples of l chunks from its first chunk on, the same cut the bm25 stage uses to
bound the supervision table's candidates (`example_chunks`), so every scored candidate of a chunk lies
inside the chunk's example and the retriever in training ranks all earlier chunks of it.

Every token of a document is predicted exactly once, from its own example: the last example of a
document (and a document shorter than l chunks) is shorter and padded at the end; padding comes after
every real token, so it changes no real prediction, and its labels are ignored. A document's final
chunk may be short (its padding is treated the same way). The label of an example's last token is the
first token of the next example of the document, when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.config import IGNORE
from pipeline.formats import TOKEN_PAD, ChunkReader


@dataclass
class SequencePlan:
    first_chunk: np.ndarray  # int64 [N] chunk_id of each example's first chunk
    n_real: np.ndarray  # int32 [N] chunks of the document in the example (<= n_chunks; the rest is padding)
    next_token_chunk: np.ndarray  # int64 [N] chunk holding the token after the example (-1: none)
    n_chunks: int  # l, chunks per example (the padded length)
    stats: dict

    def __len__(self) -> int:
        return len(self.first_chunk)


def plan_sequences(reader: ChunkReader, split: str, n_chunks: int) -> SequencePlan:
    """The examples of every document of `split`, in document order."""
    docs = reader.docs(split)
    starts, n_real, nxt = [], [], []
    tokens = 0
    for d in docs:
        n_tok = int(reader.lengths(np.arange(d.first, d.first + d.n)).sum()) if d.n else 0
        if n_tok < 2:
            continue
        tokens += n_tok
        for e0 in range(0, d.n, n_chunks):
            e1 = min(d.n, e0 + n_chunks)
            starts.append(d.first + e0)
            n_real.append(e1 - e0)
            nxt.append(d.first + e1 if e1 < d.n else -1)
    plan = SequencePlan(
        np.asarray(starts, np.int64), np.asarray(n_real, np.int32), np.asarray(nxt, np.int64), n_chunks, {}
    )
    slots = len(plan) * n_chunks
    plan.stats = {
        "docs": len(docs),
        "examples": len(plan),
        "example_chunks": n_chunks,
        "tokens": tokens,
        "padding_share": round(1 - int(plan.n_real.sum()) / slots, 4) if slots else None,
    }
    return plan


def example_tokens(reader_tokens: np.ndarray, plan: SequencePlan, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [l*m] int64 with padding as 0, labels [l*m] int64 with IGNORE (-100) where nothing is predicted)."""
    f, n, l_ = int(plan.first_chunk[i]), int(plan.n_real[i]), plan.n_chunks
    m = reader_tokens.shape[1]
    raw = np.full((l_, m), TOKEN_PAD, np.int64)
    raw[:n] = reader_tokens[f : f + n]
    flat = raw.reshape(-1)
    labels = np.full_like(flat, IGNORE)
    labels[:-1] = flat[1:]
    nxt = int(plan.next_token_chunk[i])
    if nxt >= 0:  # the chunk before a next chunk is full, so the example's last real token is at n*m-1
        labels[n * m - 1] = int(reader_tokens[nxt, 0])
    labels[labels == TOKEN_PAD] = IGNORE
    labels[flat == TOKEN_PAD] = IGNORE
    return np.where(flat == TOKEN_PAD, 0, flat), labels

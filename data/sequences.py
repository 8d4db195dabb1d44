"""Cut documents into training sequences of L = n_chunks * chunk_len tokens at chunk boundaries.

Conventions (the paper's official code keeps only documents of >= 0.9 L tokens; we keep every
document with at least L tokens of full chunks and lose nothing else of them):
- Only full chunks enter a sequence: a document's final chunk, usually shorter than chunk_len, is
  never part of a sequence (but its first token is the label of the last full chunk's last token).
- A document with f full chunks gives floor(f / l) non-overlapping sequences; when f is not a
  multiple of l, one more sequence holds the document's last l full chunks, and the tokens that the
  previous sequence already predicted keep their context role but get no loss (`loss_from`).
- Documents with fewer than l full chunks are skipped (counted in the stats): there is no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.formats import TOKEN_PAD, ChunkReader


@dataclass
class SequencePlan:
    first_chunk: np.ndarray  # int64 [N] chunk_id of each sequence's first chunk
    loss_from: np.ndarray  # int32 [N] chunk offset in the sequence from which targets are new
    next_token_chunk: np.ndarray  # int64 [N] chunk holding the token after the sequence (-1: none)
    n_chunks: int  # l, chunks per sequence
    stats: dict

    def __len__(self) -> int:
        return len(self.first_chunk)


def plan_sequences(reader: ChunkReader, split: str, n_chunks: int) -> SequencePlan:
    docs = reader.docs(split)
    if not docs:
        return SequencePlan(
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            n_chunks,
            {"docs": 0, "sequences": 0, "docs_too_short": 0},
        )
    first = np.array([d.first for d in docs], dtype=np.int64)
    n = np.array([d.n for d in docs], dtype=np.int64)
    last = first + n - 1
    last_full = reader.tokens[last, -1] != TOKEN_PAD  # is the final chunk full?
    full = n - (~last_full).astype(np.int64)
    starts, loss_from, nxt = [], [], []
    too_short = 0
    for f0, f, nn in zip(first.tolist(), full.tolist(), n.tolist()):
        if f < n_chunks:
            too_short += 1
            continue
        k = f // n_chunks
        s = list(range(0, k * n_chunks, n_chunks))
        lf = [0] * k
        if f % n_chunks:
            s.append(f - n_chunks)
            lf.append(k * n_chunks - (f - n_chunks))
        for st in s:
            starts.append(f0 + st)
            end = st + n_chunks  # chunk index after the sequence, within the document
            nxt.append(f0 + end if end < nn else -1)
        loss_from.extend(lf)
    plan = SequencePlan(
        np.asarray(starts, np.int64), np.asarray(loss_from, np.int32), np.asarray(nxt, np.int64), n_chunks, {}
    )
    plan.stats = {
        "docs": len(docs),
        "docs_too_short": too_short,
        "sequences": len(plan),
        "tokens": int(len(plan) * n_chunks * reader.chunk_len),
    }
    return plan

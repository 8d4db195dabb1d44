"""Torch Dataset and a resumable, DDP-aware sampler over training sequences.

An example holds, for one training example of l chunks of m tokens (data.sequences):
  tokens [l*m] int64, labels [l*m] (next token; -100 where there is none: padding),
  neighbor_pos [l, K] (BM25 neighbors as in-sequence positions, -1 none)           when bm25 is given,
  cand_pos [l, C], cand_target [l, C] (supervision candidates and their targets)   when cand is given.
Tokens come from the chunks artifact's memory-mapped tokens.npy (opened lazily in each worker).

Order: an endless stream of epochs, each a permutation seeded by (seed, epoch). Step s consumes the
stream positions [s*G, (s+1)*G) with G = micro_batch * accum * world; rank r's micro-batch a of that
step takes the slice at offset (a*world + r)*micro_batch. So the order is a pure function of
(seed, step): resuming at a step needs no saved loader state, and the same global batch is seen
whatever its split into processes and accumulation steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.neighbors import ChunkTable, compact, to_positions
from data.sequences import SequencePlan, example_tokens


class TrainSequences(Dataset):
    def __init__(
        self,
        tokens_path: str,
        plan: SequencePlan,
        chunk_len: int,
        *,
        exclude_recent: int = 0,
        bm25: ChunkTable | None = None,
        n_neighbors: int = 2,
        cand: ChunkTable | None = None,
    ):
        self.tokens_path, self.plan, self.m = tokens_path, plan, chunk_len
        self.exclude_recent, self.bm25, self.k, self.cand = exclude_recent, bm25, n_neighbors, cand
        self._tokens: np.ndarray | None = None

    def __getstate__(self) -> dict:  # workers re-open the memory map
        return {**self.__dict__, "_tokens": None}

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.tokens_path, mmap_mode="r")
        return self._tokens

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.plan
        f, n, l_ = int(p.first_chunk[i]), int(p.n_real[i]), p.n_chunks
        tok, labels = example_tokens(self.tokens, p, i)
        item = {"tokens": torch.from_numpy(tok), "labels": torch.from_numpy(labels)}
        if self.bm25 is not None:
            pos = to_positions(self.bm25.ids[f : f + n], f, n, self.exclude_recent)
            item["neighbor_pos"] = torch.from_numpy(_pad_rows(compact(pos, None, self.k)[0], l_, -1))
        if self.cand is not None:
            pos = to_positions(self.cand.ids[f : f + n], f, n, self.exclude_recent)
            cp, cv = compact(pos, self.cand.values[f : f + n], self.cand.width)
            item["cand_pos"] = torch.from_numpy(_pad_rows(cp, l_, -1))
            item["cand_target"] = torch.from_numpy(_pad_rows(cv.astype(np.float32), l_, np.nan))
        return item


def _pad_rows(a: np.ndarray, rows: int, value: float) -> np.ndarray:
    """a [n, C] padded with rows of `value` to [rows, C] (the padding chunks of a short example)."""
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.full((rows - a.shape[0], *a.shape[1:]), value, a.dtype)])


class StreamSampler(Sampler[int]):
    """This rank's example indices for steps [start_step, end_step), in training order."""

    def __init__(
        self,
        n: int,
        seed: int,
        micro_batch: int,
        accum: int,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        end_step: int = 0,
    ):
        if n <= 0:
            raise ValueError("no training sequences")
        self.n, self.seed, self.b, self.a, self.rank, self.world = n, seed, micro_batch, accum, rank, world
        self.start, self.end = start_step, end_step
        self._epoch, self._perm = -1, np.zeros(0, np.int64)

    @property
    def global_batch(self) -> int:
        return self.b * self.a * self.world

    def at(self, g: int) -> int:
        """Example index at stream position g."""
        e, r = divmod(g, self.n)
        if e != self._epoch:
            self._epoch, self._perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
        return int(self._perm[r])

    def __iter__(self) -> Iterator[int]:
        G = self.global_batch
        for s in range(self.start, self.end):
            for a in range(self.a):
                base = s * G + (a * self.world + self.rank) * self.b
                for j in range(self.b):
                    yield self.at(base + j)

    def __len__(self) -> int:
        return (self.end - self.start) * self.a * self.b


def _forget_parent_thread_exits(_worker_id: int) -> None:
    """A forked worker inherits the parent's thread-exit hooks, e.g. those of Prefect's log and event
    services when training runs inside a flow. At the worker's exit they would try to drain services
    whose threads do not exist in this process, fail, and end the worker with exit code 1, which the
    DataLoader reports as a crash."""
    import threading

    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def make_loader(
    ds: TrainSequences, sampler: StreamSampler, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=sampler.b,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_forget_parent_thread_exits if workers else None,
        drop_last=False,
        # its own generator: creating the iterator must not draw from the global RNG, or a resumed
        # run's dropout stream would be shifted against the uninterrupted run's
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def close_batches(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's worker processes now. A run takes exactly the sampler's batches and so
    never reaches StopIteration; left to the garbage collector, the workers' shutdown races interpreter
    and test teardown (a "worker exited unexpectedly" at some later collection)."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # only the multi-process iterator has one
    if shutdown is not None:
        shutdown()

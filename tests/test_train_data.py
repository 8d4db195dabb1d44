"""data/: sequences cut from the chunks artifact, neighbor/candidate mapping, the resumable sampler."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.loader import StreamSampler, TrainSequences, close_batches, make_loader
from data.neighbors import (
    ChunkTable,
    compact,
    exclude_recent_of,
    load_neighbor_table,
    load_scores_table,
    to_positions,
)
from data.sequences import plan_sequences
from model.config import IGNORE
from pipeline.errors import InputError
from pipeline.formats import SCORES_SCHEMA, TOKENS_NPY, ChunkReader
from pipeline.formats import build_neighbor_table as make_neighbor_table
from pipeline.store import ArtifactStore


@pytest.fixture(scope="module")
def reader(small_run) -> ChunkReader:
    store = ArtifactStore(small_run.root())
    art = store.resolve("chunks")
    return ChunkReader(art)


class FakeArtifact:
    """Just enough of pipeline.store.Artifact for the table readers."""

    def __init__(self, table: pa.Table, config: dict | None = None, batch_size: int = 1):
        self.table, self.ref, self.version = table, "fake@0", "0"
        self.manifest = SimpleNamespace(config=config or {})
        self.batch_size = batch_size  # one row per batch by default: the readers stream

    def read(self, columns=None, **_):
        return self.table.select(columns) if columns else self.table

    def iter_batches(self, columns=None, **_):
        yield from self.read(columns).to_batches(max_chunksize=self.batch_size)


def test_examples_predict_every_token_once_within_their_example(reader: ChunkReader) -> None:
    """Documents are cut into examples of n chunks from their first chunk (the cut the supervision
    table uses); every token but a document's first is a label exactly once, predicted from tokens of
    its own example; padding comes last and is never a label."""
    n = 8
    plan = plan_sequences(reader, "train", n)
    docs = reader.docs("train")
    assert plan.stats["examples"] == len(plan) > 0 and plan.stats["example_chunks"] == n
    ds = TrainSequences(str(reader.art.local_path(TOKENS_NPY)), plan, reader.chunk_len)
    m = reader.chunk_len
    seen: dict[int, list[int]] = {d.doc_idx: [] for d in docs}
    doc_of = {d.first: d for d in docs}
    starts = sorted(doc_of)
    for i in range(len(ds)):
        item = ds[i]
        f = int(plan.first_chunk[i])
        d = doc_of[starts[np.searchsorted(starts, f, side="right") - 1]]
        assert (f - d.first) % n == 0, "an example starts off the cut"
        assert len(item["tokens"]) == n * m
        flat = reader.tokens[d.first : d.first + d.n].reshape(-1)
        doc_tokens = flat[flat >= 0]
        off = (f - d.first) * m
        real = min(n * m, len(doc_tokens) - off)
        assert torch.equal(
            item["tokens"][:real], torch.from_numpy(doc_tokens[off : off + real].astype(np.int64))
        )
        assert bool((item["tokens"][real:] == 0).all())
        labelled = np.flatnonzero(item["labels"].numpy() != IGNORE)
        assert labelled.max(initial=0) < real
        for p in labelled:
            assert item["labels"][p] == doc_tokens[off + p + 1]
            seen[d.doc_idx].append(off + p + 1)
    for d in docs:
        n_tok = int((reader.tokens[d.first : d.first + d.n] >= 0).sum())
        assert sorted(seen[d.doc_idx]) == list(range(1, n_tok)), (
            f"doc {d.doc_idx}: a label is missing or twice"
        )
    assert 0 <= plan.stats["padding_share"] < 1


def naive_positions(ids: np.ndarray, first: int, w: int, k: int) -> list[list[int]]:
    out = []
    for i, row in enumerate(ids):
        keep = [
            int(x) - first for x in row if x >= 0 and 0 <= x - first < len(ids) and (x - first) <= i - 1 - w
        ]
        out.append((keep + [-1] * k)[:k])
    return out


@pytest.mark.parametrize("w", [0, 2])
def test_positions_and_compaction_match_naive(w: int) -> None:
    rng = np.random.default_rng(w)
    first, n = 100, 12
    ids = np.stack([rng.choice(np.arange(80, 120), 7, replace=False) for _ in range(n)])  # unique per row
    ids[rng.random(ids.shape) < 0.2] = -1
    pos = to_positions(ids, first, n, w)
    vals = rng.normal(size=ids.shape).astype(np.float32)
    got, gv = compact(pos, vals, 4)
    assert got.tolist() == naive_positions(ids, first, w, 4)
    for i in range(n):  # values follow their positions
        for j in range(4):
            if got[i, j] >= 0:
                src = np.flatnonzero(pos[i] == got[i, j])[0]
                assert gv[i, j] == vals[i, src]
            else:
                assert np.isnan(gv[i, j])


def test_items_map_tables_into_the_sequence(reader: ChunkReader) -> None:
    n, w, K = 8, 1, 2
    plan = plan_sequences(reader, "train", n)
    rng = np.random.default_rng(0)
    N = reader.n_chunks
    q = np.arange(N)

    def back(width: int) -> np.ndarray:  # distinct earlier chunk ids per row (-1 before the start)
        off = np.stack([rng.choice(np.arange(1, 12), width, replace=False) for _ in range(N)])
        return np.where(q[:, None] - off >= 0, q[:, None] - off, -1)

    bm = ChunkTable(back(5), rng.random((N, 5)).astype(np.float32))
    cand = ChunkTable(back(6), rng.normal(size=(N, 6)).astype(np.float32))
    ds = TrainSequences(
        str(reader.art.local_path(TOKENS_NPY)),
        plan,
        reader.chunk_len,
        exclude_recent=w,
        bm25=bm,
        n_neighbors=K,
        cand=cand,
    )
    for i in (0, len(ds) // 2, len(ds) - 1):
        f = int(plan.first_chunk[i])
        item = ds[i]
        assert item["neighbor_pos"].tolist() == naive_positions(bm.ids[f : f + n], f, w, K)
        assert item["cand_pos"].tolist() == naive_positions(cand.ids[f : f + n], f, w, 6)
        cp, ct = item["cand_pos"].numpy(), item["cand_target"].numpy()
        for r in range(n):
            for c in range(6):
                if cp[r, c] >= 0:
                    src = list(cand.ids[f + r]).index(f + cp[r, c])
                    assert ct[r, c] == cand.values[f + r, src]
    batch = next(iter(make_loader(ds, StreamSampler(len(ds), 0, 3, 1, end_step=1), workers=0)))
    assert batch["tokens"].shape == (3, n * reader.chunk_len) and batch["cand_pos"].shape == (3, n, 6)


def test_sampler_is_resumable_and_splits_global_batches() -> None:
    n, b, steps = 23, 2, 9

    def order(**kw) -> list[int]:
        return list(StreamSampler(n, 5, b, **kw))

    single = order(accum=2, world=1, end_step=steps)
    r0 = order(accum=1, rank=0, world=2, end_step=steps)
    r1 = order(accum=1, rank=1, world=2, end_step=steps)
    for s in range(steps):  # each step's global batch: rank 0's micro-batch, then rank 1's
        assert single[4 * s : 4 * s + 4] == r0[2 * s : 2 * s + 2] + r1[2 * s : 2 * s + 2]
    assert order(accum=2, start_step=4, end_step=steps) == single[16:]
    first_epoch = [StreamSampler(n, 5, 1, 1).at(g) for g in range(n)]
    assert sorted(first_epoch) == list(range(n))
    assert [StreamSampler(n, 5, 1, 1).at(g) for g in range(n, 2 * n)] != first_epoch


def test_tables_from_artifacts(tmp_path) -> None:
    q = np.array([3, 1])
    ids = np.array([[0, 2, -1], [0, -1, -1]])
    nt = load_neighbor_table(FakeArtifact(make_neighbor_table(q, ids, np.ones((2, 3)))), 5)
    assert nt.ids[3].tolist() == [0, 2, -1] and nt.ids[0].tolist() == [-1, -1, -1]
    assert np.isnan(nt.values[3, 2]) and nt.values[1, 0] == 1.0
    sc = pa.table(
        {
            "chunk_id": [4, 2],
            "candidate_ids": [[1, 0, 2], [0]],
            "logp_candidate": [[0.0] * 3, [0.0]],
            "logp_local": [0.0, 0.0],
            "delta": [[0.5, -0.1, 0.2], [1.0]],
        },
        schema=SCORES_SCHEMA,
    )
    st = load_scores_table(FakeArtifact(sc), 5)
    assert st.ids[4].tolist() == [1, 0, 2] and st.ids[2].tolist() == [0, -1, -1]
    assert st.values[4].tolist() == pytest.approx([0.5, -0.1, 0.2]) and np.isnan(st.values[2, 1])
    with pytest.raises(InputError, match="out of range"):
        load_scores_table(FakeArtifact(sc), 3)
    # memory-mapped (training): the same tables, read-only .npy files in the cache folder
    for read, art in [
        (load_neighbor_table, FakeArtifact(make_neighbor_table(q, ids, np.ones((2, 3))))),
        (load_scores_table, FakeArtifact(sc)),
    ]:
        mem, mapped = read(art, 5), read(art, 5, cache=tmp_path)
        assert isinstance(mapped.ids, np.memmap) and not mapped.ids.flags.writeable
        assert np.array_equal(mem.ids, mapped.ids)
        assert np.array_equal(mem.values, mapped.values, equal_nan=True)
    assert exclude_recent_of(FakeArtifact(sc, {"exclude_recent": 3, "scope": "document-causal"})) == 3
    with pytest.raises(InputError, match="document-causal"):
        exclude_recent_of(FakeArtifact(sc, {"exclude_recent": 3, "scope": "corpus"}))


class _Range(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"i": torch.tensor(i)}


def _failing_thread_exit() -> None:
    raise RuntimeError("a service whose thread does not exist in this process")


def test_loader_workers_end_cleanly_under_parent_thread_exit_hooks() -> None:
    """Inside a Prefect flow the parent holds thread-exit hooks (its log/event services); a forked
    DataLoader worker must not run them, or it exits with code 1 and the run fails as it closes."""
    import threading

    threading._register_atexit(_failing_thread_exit)
    hook = threading._threading_atexits[-1]  # the registered partial
    try:
        sampler = StreamSampler(8, 0, 2, 1, end_step=4)
        batches = iter(make_loader(_Range(), sampler, workers=1))
        seen = [int(x) for _ in range(4) for x in next(batches)["i"]]
        close_batches(batches)  # raises "DataLoader worker ... exited unexpectedly" without the fix
        assert sorted(seen) == list(range(8))
    finally:
        threading._threading_atexits.remove(hook)

"""BM25 over token ids, exact, with numba kernels: document-causal tables and a corpus index.

A library (numpy arrays in, numpy arrays out): it knows nothing of artifacts, manifests or configs;
`stages.bm25` is the stage that reads chunks, shards the work and writes the neighbor tables.

Query `chunk` is c_i; `chunk+target` is c_i followed by c_{i+1} (a document's last chunk has no
target, so its query is c_i alone). A repeated query token counts each time. Variants: `lucene`
(IDF ln(1 + (N - n + .5)/(n + .5)), TF tf/(tf + k1(1 - b + b dl/avgdl)), as bm25s "lucene") and
`okapi` (exactly rank-bm25's BM25Okapi: Robertson IDF, negative IDFs replaced by epsilon x mean IDF,
TF with the (k1 + 1) numerator).

Order: score descending, ties by the more recent chunk (higher chunk_id) first. Every retrievable
chunk is eligible, a zero score included; -1 pads only when fewer than k are retrievable.

Why numba kernels instead of a library: the causal IDF differs per query (prefix document frequency
and N), which no search library expresses, and a per-query Python loop is ~100x slower. Per document
the kernel builds term postings once and, per query, accumulates term-at-a-time over the postings
inside the query's prefix (a binary search gives the prefix df, hence the exact causal IDF); terms in
many chunks add a dense weight row instead (contiguous, SIMD), which is where most of the work is.
The corpus scope is exhaustive and exact: the database is walked in cache-sized blocks of rows, with
the same dense/sparse split, and the query's own rows are masked before selection.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from dataclasses import dataclass

import numpy as np
from numba import njit

from retrieval.ranking import merge_top_k

CORPUS_DENSE_DF_DIVISOR = 6  # corpus: terms in more than 1/6 of the database use dense rows ...
CORPUS_MAX_DENSE = 64  # ... at most this many (memory: 64 x 8 bytes per database chunk)
CORPUS_BLOCK_ROWS = 16384  # corpus: database rows per block (accumulator and dense slices stay in cache)
DENSE_DF_DIVISOR = 8  # document-causal: terms in more than 1/8 of a document's chunks use dense rows


# ----------------------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True)
def _chunk_terms(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-chunk term counts of an int32 [n, L] token block (-1 pads ignored): CSR (indptr, term ids
    ascending within a row, counts) and the chunk lengths in tokens."""
    n, width = tokens.shape
    indptr = np.zeros(n + 1, np.int64)
    terms = np.empty(n * width, np.int64)
    counts = np.empty(n * width, np.float64)
    dl = np.zeros(n, np.float64)
    nnz = 0
    for r in range(n):
        row = np.sort(tokens[r])
        prev = -1
        for x in range(width):
            t = row[x]
            if t < 0:
                continue
            dl[r] += 1.0
            if t == prev:
                counts[nnz - 1] += 1.0
            else:
                terms[nnz] = t
                counts[nnz] = 1.0
                nnz += 1
                prev = t
        indptr[r + 1] = nnz
    return indptr, terms[:nnz].copy(), counts[:nnz].copy(), dl


@njit(cache=True, nogil=True)
def _with_next(
    indptr: np.ndarray,
    terms: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query rows c_i + c_{i+1} (term counts added) from per-chunk rows; the last row stays c_i."""
    n = indptr.shape[0] - 1
    q_indptr = np.zeros(n + 1, np.int64)
    q_terms = np.empty(2 * terms.shape[0], np.int64)
    q_counts = np.empty(2 * terms.shape[0], np.float64)
    nnz = 0
    for r in range(n):
        a, ae = indptr[r], indptr[r + 1]
        b, be = (indptr[r + 1], indptr[r + 2]) if r + 1 < n else (0, 0)
        while a < ae or b < be:
            if b >= be or (a < ae and terms[a] < terms[b]):
                q_terms[nnz] = terms[a]
                q_counts[nnz] = counts[a]
                a += 1
            elif a >= ae or terms[b] < terms[a]:
                q_terms[nnz] = terms[b]
                q_counts[nnz] = counts[b]
                b += 1
            else:
                q_terms[nnz] = terms[a]
                q_counts[nnz] = counts[a] + counts[b]
                a += 1
                b += 1
            nnz += 1
        q_indptr[r + 1] = nnz
    return q_indptr, q_terms[:nnz].copy(), q_counts[:nnz].copy()


@njit(cache=True)
def _postings(
    indptr: np.ndarray,
    terms: np.ndarray,
    counts: np.ndarray,
    vocab: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transpose chunk rows into term postings (CSC): per term the rows ascending and their counts."""
    n = indptr.shape[0] - 1
    p_indptr = np.zeros(vocab + 1, np.int64)
    for p in range(terms.shape[0]):
        p_indptr[terms[p] + 1] += 1
    for t in range(vocab):
        p_indptr[t + 1] += p_indptr[t]
    fill = p_indptr[:-1].copy()
    p_rows = np.empty(terms.shape[0], np.int64)
    p_tf = np.empty(terms.shape[0], np.float64)
    for r in range(n):
        for p in range(indptr[r], indptr[r + 1]):
            t = terms[p]
            p_rows[fill[t]] = r
            p_tf[fill[t]] = counts[p]
            fill[t] += 1
    return p_indptr, p_rows, p_tf


@njit(cache=True, inline="always")
def _push(top_s: np.ndarray, top_i: np.ndarray, cnt: int, k: int, s: float, i: int) -> int:
    """Insert (score s, id i) into the sorted top-k buffers: score descending, ties by higher id first."""
    if cnt == k:
        if not (s > top_s[k - 1] or (s == top_s[k - 1] and i > top_i[k - 1])):
            return cnt
        pos = k - 1
    else:
        pos = cnt
        cnt += 1
    while pos > 0 and (top_s[pos - 1] < s or (top_s[pos - 1] == s and top_i[pos - 1] < i)):
        top_s[pos] = top_s[pos - 1]
        top_i[pos] = top_i[pos - 1]
        pos -= 1
    top_s[pos] = s
    top_i[pos] = i
    return cnt


@njit(cache=True)
def _select(acc: np.ndarray, width: int, base: int, top_s: np.ndarray, top_i: np.ndarray, n_top: int) -> int:
    """Merge acc[0:width] (ids base + j; -inf marks an excluded row) into the sorted top buffers."""
    k = top_s.shape[0]
    thr = top_s[k - 1] if n_top == k else -np.inf
    for j in range(width - 1, -1, -1):
        v = acc[j]
        if v < thr or v == -np.inf:  # the common case: one compare per row
            continue
        n_top = _push(top_s, top_i, n_top, k, v, base + j)
        if n_top == k:
            thr = top_s[k - 1]
    return n_top


@njit(cache=True)
def _okapi_mean_idf_prefix(indptr: np.ndarray, terms: np.ndarray, vocab: int, lg: np.ndarray) -> np.ndarray:
    """mean[m] = mean Robertson IDF over the distinct terms of chunks 0..m-1 (rank-bm25's average_idf
    for the corpus of the first m chunks). A histogram of document frequencies makes each m O(m)."""
    n = indptr.shape[0] - 1
    df = np.zeros(vocab, np.int64)
    hist = np.zeros(n + 2, np.int64)
    mean = np.zeros(n + 1, np.float64)
    distinct = 0
    for m in range(1, n + 1):
        for p in range(indptr[m - 1], indptr[m]):
            t = terms[p]
            d = df[t]
            if d > 0:
                hist[d] -= 1
            else:
                distinct += 1
            df[t] = d + 1
            hist[d + 1] += 1
        s = 0.0
        for d in range(1, m + 1):
            if hist[d] != 0:
                s += hist[d] * (lg[m - d] - lg[d])
        mean[m] = s / distinct if distinct > 0 else 0.0
    return mean


@njit(cache=True, nogil=True)
def _document_kernel(
    c_indptr: np.ndarray,
    c_terms: np.ndarray,
    c_counts: np.ndarray,
    dl: np.ndarray,
    q_indptr: np.ndarray,
    q_terms: np.ndarray,
    q_counts: np.ndarray,
    exclude_recent: int,
    k: int,
    okapi: bool,
    k1: float,
    b: float,
    epsilon: float,
    causal: bool,
    dense_divisor: int,
    out_pos: np.ndarray,
    out_scores: np.ndarray,
) -> None:
    """Top-k of every chunk of one document over its retrievable chunks (positions 0 .. i-1-exclude_recent)."""
    n = dl.shape[0]
    vocab = 1
    for p in range(c_terms.shape[0]):
        vocab = max(vocab, c_terms[p] + 1)
    for p in range(q_terms.shape[0]):
        vocab = max(vocab, q_terms[p] + 1)
    p_indptr, p_rows, p_tf = _postings(c_indptr, c_terms, c_counts, vocab)
    lg = np.log(np.arange(n + 1, dtype=np.float64) + 0.5)  # rank-bm25's log(x + 0.5)
    numer = k1 + 1.0 if okapi else 1.0  # okapi keeps the (k1 + 1) TF numerator, lucene drops it
    cum = np.zeros(n + 1)
    for r in range(n):
        cum[r + 1] = cum[r] + dl[r]
    # uniform[m]: chunks 0..m-1 have equal lengths, so dl/avgdl is exactly 1 and the TF part is precomputed
    uniform = np.ones(n + 1, np.bool_)
    for m in range(2, n + 1):
        uniform[m] = uniform[m - 1] and dl[m - 1] == dl[0]
    w = np.empty(p_tf.shape[0])
    if causal:
        for p in range(w.shape[0]):
            w[p] = numer * p_tf[p] / (p_tf[p] + k1 * (1.0 - b + b * 1.0))
        mean_idf = _okapi_mean_idf_prefix(c_indptr, c_terms, vocab, lg) if okapi else np.zeros(n + 1)
        eps_doc = 0.0
    else:
        avg = cum[n] / n
        for p in range(w.shape[0]):
            w[p] = numer * p_tf[p] / (p_tf[p] + k1 * (1.0 - b + b * dl[p_rows[p]] / avg))
        mean_idf = np.zeros(n + 1)
        s = 0.0
        distinct = 0
        for t in range(vocab):
            d = p_indptr[t + 1] - p_indptr[t]
            if d > 0:
                s += lg[n - d] - lg[d]
                distinct += 1
        eps_doc = epsilon * s / distinct if distinct > 0 else 0.0
    # Frequent terms also get a dense weight row: adding a contiguous row (SIMD) beats scattering
    # postings once a term is in more than 1/dense_divisor of the chunks.
    dense_id = np.full(vocab, -1, np.int64)
    n_dense = 0
    for t in range(vocab):
        if (p_indptr[t + 1] - p_indptr[t]) * dense_divisor > n:
            dense_id[t] = n_dense
            n_dense += 1
    dense_w = np.zeros((n_dense, n))
    for t in range(vocab):
        if dense_id[t] >= 0:
            for p in range(p_indptr[t], p_indptr[t + 1]):
                dense_w[dense_id[t], p_rows[p]] = w[p]
    acc = np.zeros(n)
    for i in range(n):
        m = i - exclude_recent  # retrievable: positions 0 .. m-1
        cnt = 0
        if m > 0:
            if causal:
                big_n = m
                avgdl = cum[m] / m
                uni = uniform[m]
                eps = epsilon * mean_idf[m]
            else:
                big_n = n
                avgdl = cum[n] / n
                uni = True
                eps = eps_doc
            acc[:m] = 0.0
            for q in range(q_indptr[i], q_indptr[i + 1]):
                t = q_terms[q]
                s0 = p_indptr[t]
                e0 = p_indptr[t + 1]
                lo, hi = s0, e0  # first posting at row >= m
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if p_rows[mid] < m:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo == s0:
                    continue  # no retrievable chunk has this term
                df = lo - s0 if causal else e0 - s0
                if okapi:
                    idf = eps if 2 * df > big_n else lg[big_n - df] - lg[df]
                else:
                    idf = math.log(1.0 + (big_n - df + 0.5) / (df + 0.5))
                f = q_counts[q] * idf
                if uni and dense_id[t] >= 0:
                    row = dense_w[dense_id[t]]
                    for j in range(m):
                        acc[j] += f * row[j]
                elif uni:
                    for p in range(s0, lo):
                        acc[p_rows[p]] += f * w[p]
                else:
                    base = k1 * (1.0 - b)
                    slope = k1 * b / avgdl
                    for p in range(s0, lo):
                        tf = p_tf[p]
                        acc[p_rows[p]] += f * numer * tf / (tf + base + slope * dl[p_rows[p]])
            cnt = _select(acc, m, 0, out_scores[i], out_pos[i], 0)
        for x in range(cnt, k):
            out_pos[i, x] = -1
            out_scores[i, x] = np.nan


@njit(cache=True, inline="always")
def _first_at_least(rows: np.ndarray, lo: int, hi: int, value: int) -> int:
    """First index in rows[lo:hi] (ascending) whose value is >= value (hi when none)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if rows[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _corpus_kernel(
    q_indptr: np.ndarray,
    q_terms: np.ndarray,
    q_counts: np.ndarray,
    own_lo: np.ndarray,
    own_hi: np.ndarray,
    p_indptr: np.ndarray,
    p_rows: np.ndarray,
    p_w: np.ndarray,
    dense_id: np.ndarray,
    dense_w: np.ndarray,
    block: int,
    out_rows: np.ndarray,
    out_scores: np.ndarray,
) -> None:
    """Top-k database rows of every query over all rows but own_lo[q] .. own_hi[q]-1 (exhaustive).

    The database is walked in blocks of rows (outer loop) so that a block's accumulator and its slice
    of the frequent terms' dense weight rows stay in cache across the queries (inner loop). Frequent
    terms add a contiguous weight row (SIMD); the others scatter their postings inside the block.
    """
    nq = q_indptr.shape[0] - 1
    k = out_rows.shape[1]
    n_db = dense_w.shape[1]
    vocab = p_indptr.shape[0] - 1
    cnt = np.zeros(nq, np.int64)
    acc = np.empty(block)
    for b0 in range(0, n_db, block):
        b1 = min(n_db, b0 + block)
        width = b1 - b0
        for qi in range(nq):
            acc[:width] = 0.0
            for q in range(q_indptr[qi], q_indptr[qi + 1]):
                t = q_terms[q]
                if t >= vocab:
                    continue
                c = q_counts[q]
                d = dense_id[t]
                if d >= 0:
                    row = dense_w[d, b0:b1]
                    for j in range(width):
                        acc[j] += c * row[j]
                else:
                    lo = _first_at_least(p_rows, p_indptr[t], p_indptr[t + 1], b0)
                    hi = _first_at_least(p_rows, lo, p_indptr[t + 1], b1)
                    for p in range(lo, hi):
                        acc[p_rows[p] - b0] += c * p_w[p]
            for r in range(max(own_lo[qi], b0), min(own_hi[qi], b1)):
                acc[r - b0] = -np.inf
            cnt[qi] = _select(acc, width, b0, out_scores[qi], out_rows[qi], cnt[qi])
    for qi in range(nq):
        for x in range(cnt[qi], k):
            out_rows[qi, x] = -1
            out_scores[qi, x] = np.nan


# ----------------------------------------------------------------------------------------- numpy API


@dataclass(frozen=True)
class Params:
    """The scoring settings of one table (picklable; `stages.bm25.params_of` fills it from the stage's
    config)."""

    k: int = 20
    query: str = "chunk"
    exclude_recent: int = 16
    variant: str = "lucene"
    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25
    stats: str = "causal"


def _query_rows(
    terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    query: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr, t, c, _ = terms
    return _with_next(indptr, t, c) if query == "chunk+target" else (indptr, t, c)


def document_neighbors(tokens: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Document-causal top-k of every chunk of one document.

    tokens: int32 [n, L] (-1 padded) of the document's chunks in order. Returns positions within the
    document int64 [n, k] (-1 pads) and float64 scores [n, k] (NaN at pads).
    """
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    n = tokens.shape[0]
    pos = np.empty((n, p.k), np.int64)
    scores = np.empty((n, p.k), np.float64)
    if n == 0:
        return pos, scores
    terms = _chunk_terms(tokens)
    qi, qt, qc = _query_rows(terms, p.query)
    _document_kernel(
        terms[0],
        terms[1],
        terms[2],
        terms[3],
        qi,
        qt,
        qc,
        p.exclude_recent,
        p.k,
        p.variant == "okapi",
        p.k1,
        p.b,
        p.epsilon,
        p.stats == "causal",
        DENSE_DF_DIVISOR,
        pos,
        scores,
    )
    return pos, scores


def example_neighbors(tokens: np.ndarray, p: Params, example_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """`document_neighbors` with every example of `example_chunks` chunks scored as a document of its
    own (0: the whole document is one example). Positions are within the document."""
    n = tokens.shape[0]
    if example_chunks <= 0 or n <= example_chunks:
        return document_neighbors(tokens, p)
    pos = np.empty((n, p.k), np.int64)
    scores = np.empty((n, p.k), np.float64)
    for e0 in range(0, n, example_chunks):
        e1 = min(n, e0 + example_chunks)
        ep, es = document_neighbors(tokens[e0:e1], p)
        pos[e0:e1] = np.where(ep >= 0, ep + e0, -1)
        scores[e0:e1] = es
    return pos, scores


@dataclass(frozen=True)
class CorpusStats:
    """The BM25 statistics of a database: rows, total length, document frequency per term. Computed per
    shard (`of`) and summed (`+`): the map-reduce pass of a sharded database."""

    n: int
    total_len: int
    df: np.ndarray  # int64 [vocab]

    @classmethod
    def of(cls, tokens: np.ndarray, vocab: int) -> CorpusStats:
        _, terms, _, dl = _chunk_terms(np.ascontiguousarray(tokens, dtype=np.int32))
        return cls(len(dl), int(dl.sum()), np.bincount(terms, minlength=vocab))

    def __add__(self, other: CorpusStats) -> CorpusStats:
        return CorpusStats(self.n + other.n, self.total_len + other.total_len, self.df + other.df)

    @property
    def avgdl(self) -> float:
        return float(np.int64(self.total_len) / np.int64(self.n))


@dataclass
class CorpusIndex:
    """BM25 weights of the database (train-split chunks): postings per term (rows ascending) and,
    for the frequent terms, dense weight rows over all database rows."""

    db_ids: np.ndarray  # chunk_id of each database row (ascending)
    p_indptr: np.ndarray
    p_rows: np.ndarray
    p_w: np.ndarray
    dense_id: np.ndarray  # term -> row of dense_w, -1 for sparse terms
    dense_w: np.ndarray
    avgdl: float

    @property
    def size(self) -> int:
        return len(self.db_ids)

    @classmethod
    def build(
        cls, tokens: np.ndarray, db_ids: np.ndarray, p: Params, vocab: int, stats: CorpusStats | None = None
    ) -> CorpusIndex:
        """tokens: int32 [n_db, L] of the database rows, db_ids their chunk ids (ascending). `stats`: the
        whole database's statistics when these rows are one shard of it (`ShardedCorpus`), so that every
        weight is the one the unsharded index has; None: these rows are the whole database."""
        indptr, terms, tf, dl = _chunk_terms(np.ascontiguousarray(tokens, dtype=np.int32))
        if stats is None:
            stats = CorpusStats(len(dl), int(dl.sum()), np.bincount(terms, minlength=vocab))
        n = stats.n
        avgdl = stats.avgdl
        df = stats.df.astype(np.float64)
        if p.variant == "okapi":  # rank-bm25 BM25Okapi._calc_idf
            raw = np.log(n - df + 0.5) - np.log(df + 0.5)
            eps = p.epsilon * raw[df > 0].mean()
            idf = np.where(raw < 0, eps, raw)
            numer = p.k1 + 1.0
        else:
            idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
            numer = 1.0
        row = np.repeat(np.arange(len(dl)), np.diff(indptr))
        w = idf[terms] * (numer * tf / (tf + p.k1 * (1.0 - p.b + p.b * dl[row] / avgdl)))
        p_indptr, p_rows, _ = _postings(indptr, terms, tf, vocab)
        p_w = w[np.argsort(terms, kind="stable")]  # the postings' order: by term, rows ascending
        frequent = np.flatnonzero(df * CORPUS_DENSE_DF_DIVISOR > n)
        frequent = frequent[np.argsort(-df[frequent], kind="stable")][:CORPUS_MAX_DENSE]
        dense_id = np.full(vocab, -1, np.int64)
        dense_id[frequent] = np.arange(len(frequent))
        dense_w = np.zeros((len(frequent), len(dl)))
        hit = dense_id[terms] >= 0
        dense_w[dense_id[terms[hit]], row[hit]] = w[hit]
        return cls(np.asarray(db_ids, np.int64), p_indptr, p_rows, p_w, dense_id, dense_w, avgdl)

    def search(
        self,
        tokens: np.ndarray,
        own: tuple[int, int],
        p: Params,
        overfetch: int = 0,
        own_ids: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k chunk ids and scores of every chunk of one document (its chunks in order).

        own: the document's database row range [lo, hi) (empty when it is not in the database), masked
        exactly. With overfetch > 0 the mask is replaced by over-fetch-and-filter: top k + overfetch of
        the whole database, chunk ids in `own_ids` [lo, hi) dropped, -1 padded."""
        terms = _chunk_terms(np.ascontiguousarray(tokens, dtype=np.int32))
        qi, qt, qc = _query_rows(terms, p.query)
        n = len(qi) - 1
        kk = p.k + overfetch
        lo = np.full(n, own[0] if overfetch == 0 else 0, np.int64)
        hi = np.full(n, own[1] if overfetch == 0 else 0, np.int64)
        rows = np.empty((n, kk), np.int64)
        scores = np.empty((n, kk), np.float64)
        _corpus_kernel(
            qi,
            qt,
            qc,
            lo,
            hi,
            self.p_indptr,
            self.p_rows,
            self.p_w,
            self.dense_id,
            self.dense_w,
            CORPUS_BLOCK_ROWS,
            rows,
            scores,
        )
        ids = np.where(rows >= 0, self.db_ids[np.maximum(rows, 0)], -1)
        if overfetch:
            keep = ids >= 0
            if own_ids is not None:
                keep &= ~((ids >= own_ids[0]) & (ids < own_ids[1]))
            order = np.argsort(~keep, axis=1, kind="stable")[:, : p.k]  # kept ones first, in rank order
            ids = np.take_along_axis(np.where(keep, ids, -1), order, 1)
            scores = np.take_along_axis(np.where(keep, scores, np.nan), order, 1)
        return ids, scores


@dataclass
class ShardedCorpus:
    """A database cut into row shards, each a CorpusIndex built with the whole database's statistics;
    a search runs each shard and merges the top-k (score descending, ties by higher chunk id, as the
    unsharded kernel ranks), so its table equals the unsharded one. A shard's memory is bounded by its
    rows (postings and dense rows of its rows only)."""

    shards: list[CorpusIndex]
    offsets: np.ndarray  # first database row of each shard (ascending), then the total

    @classmethod
    def build(
        cls, tokens: np.ndarray, db_ids: np.ndarray, p: Params, vocab: int, shard_rows: int
    ) -> ShardedCorpus:
        """In one process, for tests and benchmarks; a cluster runs `CorpusStats.of` and
        `CorpusIndex.build(..., stats=)` per shard as tasks."""
        bounds = [*range(0, len(db_ids), max(1, shard_rows)), len(db_ids)]
        parts = list(itertools.pairwise(bounds))
        stats = functools.reduce(operator.add, (CorpusStats.of(tokens[a:b], vocab) for a, b in parts))
        shards = [CorpusIndex.build(tokens[a:b], db_ids[a:b], p, vocab, stats) for a, b in parts]
        return cls(shards, np.asarray(bounds, np.int64))

    def search(self, tokens: np.ndarray, own: tuple[int, int], p: Params) -> tuple[np.ndarray, np.ndarray]:
        """As CorpusIndex.search (exact mask of the database rows `own`), over every shard, merged."""
        ids, scores = [], []
        for shard, start in zip(self.shards, self.offsets[:-1]):
            lo = min(max(own[0] - start, 0), shard.size)
            hi = min(max(own[1] - start, lo), shard.size)
            i, s = shard.search(tokens, (int(lo), int(hi)), p)
            ids.append(i)
            scores.append(s)
        return merge_top_k(np.concatenate(ids, axis=1), np.concatenate(scores, axis=1), p.k)

"""The synthetic copy corpus's scoring-LM stand-in: the batched delta equals the per-token reference."""

from __future__ import annotations

import numpy as np

from data.synthetic import copy_corpus, copy_lm_delta, copy_lm_deltas
from retrieval.bm25 import Params, document_neighbors

M, N, V = 8, 32, 256


def test_batched_copy_lm_deltas_equal_the_per_query_reference() -> None:
    for doc in copy_corpus(5, 3, N, M, V, 6 * M, span_chunks=(3, 6)):
        pos, _ = document_neighbors(
            doc.tokens.reshape(N, M).astype(np.int32), Params(k=8, query="chunk+target", exclude_recent=2)
        )
        pos[3, 1] = -1  # a hole among the candidates stays NaN
        got = copy_lm_deltas(doc, pos, V)
        want = np.full(pos.shape, np.nan, np.float32)
        for u in range(N - 1):
            want[u] = copy_lm_delta(doc, u, pos[u], V)
        assert np.isnan(got[-1]).all() and np.isnan(got[3, 1])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, equal_nan=True)
        assert (got[np.isfinite(got)] > 0).any()  # copies make some candidates positive

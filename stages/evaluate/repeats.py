"""Repeated passages: the test tokens that copying from earlier in the document would predict.

A label position t (predicting token t+1) is a *repeat* when the n tokens ending at t occurred earlier
in the same document, ending at some j whose distance t - j exceeds the attention window, and the token
after that earlier occurrence equals token t+1 (the most recent such occurrence is the one judged). No
local attention can see that source; a chunk retriever can bring it into CCA's view. The NLL on these
tokens, beside the NLL on all others, says whether a model copies from its neighbors (a model that does
predicts them at a fraction of a nat) or only gains the soft, topical help that lowers every token a
little. The choice of tokens depends only on the text, so every row of the report scores the same ones.

`repeat_mask` is a rolling hash over n-grams in one pass (a dict from n-gram to its last end), linear in
the document; the tests check it against a direct search over all earlier positions.
"""

from __future__ import annotations

import numpy as np

REPEAT_NGRAM = 12  # long enough that a match is a copied passage, not a common phrase of code or prose


def repeat_mask(tokens: np.ndarray, n_tokens: int, window: int, n: int = REPEAT_NGRAM) -> np.ndarray:
    """Bool [len(tokens)]: True at label positions t < n_tokens - 1 whose n tokens ending at t last
    occurred ending at j with t - j > window, and tokens[j + 1] == tokens[t + 1]. Positions past the
    document's real tokens (padding) are False."""
    x = np.asarray(tokens[:n_tokens], dtype=np.int64)
    out = np.zeros(len(tokens), dtype=bool)
    if n_tokens <= n:
        return out
    last: dict[bytes, int] = {}
    view = np.lib.stride_tricks.sliding_window_view(x, n)  # view[s] = x[s : s + n], ends at s + n - 1
    for s in range(len(view)):
        t = s + n - 1
        key = view[s].tobytes()
        j = last.get(key)
        if j is not None and t - j > window and t + 1 < n_tokens and x[j + 1] == x[t + 1]:
            out[t] = True
        last[key] = t
    return out

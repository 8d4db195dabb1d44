"""The supervision table: one definition shared by bm25, scores, train, evaluate and the flows.

RPT's retriever is supervised per query chunk c_i by candidates c_j scored for how much (c_j, c_j+1)
raises the probability of the target c_i+1. The candidates are the top-k of a BM25 table with
  scope document-causal   (j of the same document, j <= i - 1 - exclude_recent)
  query chunk+target      (c_i followed by c_i+1: the paper's pre-filter)
  k = scores.candidates   (the paper: 20)
  example_chunks          the training example: for a train-split chunk, only chunks of its own
                          example of `train.seq_len` tokens are candidates
The last bound is what makes training examples and supervision agree by construction (the paper and
the official code: the 20 scored candidates of a chunk lie inside its 16,384-token example, and in
training the retriever ranks all earlier chunks of the example, as it ranks a document at test). A
document is cut into examples of `example_chunks` chunks from its first chunk on; the last example of
a document may be shorter. Valid and test chunks keep whole-document candidates: evaluation ranks
every earlier chunk of the document, and their gold must come from the same universe.

The same table gives retro_bm25 its training neighbors (its top-K) and rpt_lex its positives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import RunConfigBase

SUPERVISION_QUERY = "chunk+target"
BOUNDED_SPLITS = ("train",)


def example_chunks(run: RunConfigBase) -> int:
    """Chunks per training example: train.seq_len / chunks.chunk_len (validated by the train stage)."""
    return max(1, int(run.section("train").seq_len) // int(run.section("chunks").chunk_len))


def supervision_bm25(run: RunConfigBase) -> dict[str, Any]:
    """The bm25 settings of the supervision table (applied over the run's own bm25 section)."""
    return {
        "scope": "document-causal",
        "query": SUPERVISION_QUERY,
        "k": int(run.section("scores").candidates),
        "example_chunks": example_chunks(run),
        "example_splits": list(BOUNDED_SPLITS),
    }

"""Stage `dense`: nearest-neighbor tables over chunk embeddings (RETRO-style frozen-encoder retrieval).

Two scopes, with the same output schema as `bm25` (`pipeline.formats.build_neighbor_table`):

- `corpus` (RETRO): the database is every train-split chunk, the queries are all chunks; a query's
  own document is excluded by doc id. Exact search (`flat`) is a blocked matrix product + top-k with
  the own document masked out. Approximate search (`ivfpq`, `hnsw`, faiss) over-fetches
  `k + overfetch` candidates, drops the own document, re-scores the survivors exactly from the
  stored embeddings, and re-fetches more for rows that are still short; -1 pads what is left.
  The index is trained on a seeded random sample, saved as `index.faiss` (reused on resume), and
  `nprobe` / `efSearch` are tuned on a sample of queries to reach `target_recall` unless given.
  Recall@k of what was written, against exact search, is measured on a held-out sample of queries.
- `document-causal` (RPT self-retrieval): chunk i retrieves chunks j of its own document with
  j <= i - 1 - exclude_recent (`pipeline.formats.causal_retrievable`); exact, one matrix product
  per document, no index.

Scores are higher-is-better: the inner product (`metric: ip`) or the negative squared L2 distance
(`metric: l2`). Rows are ordered by score, ties broken by the more recent chunk (higher chunk_id),
as in the bm25 tables.

The search kernels are a library: exact search in `retrieval.exact`, faiss indexes in
`retrieval.faiss_index`; this package is the stage around them (samples, files, shards, stats).

Modules: config (the `dense:` section, the index file names), index_plan (index kind and backend, the
seeded samples, faiss and its GPU), database (the train-split database, query embeddings, own-document
ranges, the per-process cache), build_files (index.json, the written neighbors read back), search (one
shard's search: exact, faiss, document-causal), index_build (train, tune, save and reuse the faiss index),
stage (inputs, plan, run_shard, finalize, meta).
"""

from stages.dense.config import Config
from stages.dense.index_plan import faiss_module
from stages.dense.stage import STAGE, DenseStage

__all__ = ["STAGE", "Config", "DenseStage", "faiss_module"]

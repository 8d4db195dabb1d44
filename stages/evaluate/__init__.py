"""Stage `evaluate`: test perplexity of every trained variant and retrieval quality of every retriever,
as metrics.parquet, report.md and plots (the paper's Table 2, Table 3 and Fig. 4).

Perplexity. The evaluated text is a prefix of each document of the split (whole documents unless
`max_doc_tokens` / `max_tokens` / `max_docs` bound it, at chunk boundaries). A document prefix runs
through the model as one sequence: attention is windowed, and retrieval spans every earlier chunk of the
document (the paper's inference). Every token of the prefix except the document's first is predicted
once, from everything before it; the same tokens for every row. Perplexity = exp(sum NLL / tokens).
Neighbor sources per variant:
  baseline     none
  retro_bm25   BM25 top-K of the query chunk c_i (document-causal; the paper's inference query)
  rpt_lex/sem  the model's own retriever (top-K of its scores over the retrievable chunks), and
               `oracle`: the top-K gold chunks of the scores table (delta > 0, by delta), fed the same way
  all three    `empty` (ablation): CCA with no neighbor at all, only its null key/value
K takes every value of `neighbors` (2, 3, 4); the baseline and `empty` have one row (neighbors 0).
These setting names are stored (metrics.parquet); what each feeds the model, and how they map to the
model's own `source` names (`given`, `gold`), is said once: `perplexity.Setting`.

Retrieval (Table 3). Queries: the evaluated chunks c_i that have at least one gold chunk, i.e. a scored
candidate (BM25 chunk+target top-`scores.candidates`) with delta = log P(c_i+1 | c_j, c_j+1, c_i) -
log P(c_i+1 | c_i-2, c_i-1, c_i) > 0; grade = delta. Universe: the chunks c_i may retrieve (same document,
j <= i - 1 - exclude_recent). Rankings: the bm25 table (query = chunk), the dense table (frozen encoder,
document-causal) and the learned retrievers of rpt_lex / rpt_sem (their scores over the same universe).
Metrics: retrieval.ranking. Token overlap (Fig. 4): the best neighbor (c_j with c_j+1) against c_i and c_i+1.

Shards: one per variant (its perplexity rows, and its retriever's rankings); finalize computes the
retrieval metrics and writes the report. A killed evaluation resumes at the next variant.

Modules: config (the `evaluate:` section), stage (inputs, plan, run_shard, finalize, meta), perplexity
(evaluated documents, settings, the NLL passes, the perplexity table), use (own - empty and own -
baseline NLL with bootstrap intervals), retrieval_metrics (Table 3 and Fig. 4 against the gold),
training_diagnostics (what the train artifacts report), rows (metrics.parquet rows), report (the tables,
`rpt report`), paper (the paper's numbers), plots.
"""

from stages.evaluate.config import Config
from stages.evaluate.stage import STAGE, EvaluateStage

__all__ = ["STAGE", "Config", "EvaluateStage"]

"""Stage `documents`: raw corpus files (or the embedded stdlib corpus) -> one row per document.

Modules: config (the `documents:` section), stage (units of work, shard plan, run_shard, finalize:
splits, global doc_idx, duplicates), discovery (files, folders and globs of documents.paths), readers
(streaming .txt(.gz), .jsonl(.gz) and .parquet readers; bad input as a Skip), decoding (encodings,
newlines, binary files), gutenberg (Project Gutenberg header and footer), stdlib_corpus (the embedded
corpus), recurrences (copies of earlier lines inserted into train documents).
"""

from stages.documents.config import Config
from stages.documents.stage import STAGE, DocumentsStage

__all__ = ["STAGE", "Config", "DocumentsStage"]

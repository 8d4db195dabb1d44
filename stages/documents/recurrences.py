"""Passages that recur: copies of earlier lines inserted into training documents.

A model learns to copy what it retrieves only from examples in which a retrieved chunk holds the
continuation. Natural text has them (a package's code repeats its own names and idioms beyond any
attention window), but too rarely for a small run: the demo's RETRO began to copy between 5M and 16M
training tokens (docs/evaluate.md). Inserting verbatim copies of earlier passages into the *training*
documents puts such examples in every training sequence; validation and test documents are never
touched, so what the models learn from them is measured on natural text only.

Copies are whole lines, inserted at a line break, so the tokens of a copy are cut into chunks at other
offsets than those of its source (the retriever meets a copy as it meets a natural repeat). Most
sources lie anywhere earlier in the document (beyond the attention window: retrieval's part); a share
lie within the last few lines, repeats an attention window can copy (the demo's 150-step scoring LM did
not learn to from them: copy gain 0.01 nats; `reference.copy_weight` is what makes it copy). The draws
depend only on the document's id and the settings. Applied in the stage's finalize, after the
duplicate check, which compares the texts as read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from pipeline.config import NoBoolNumbers


class Recurrences(NoBoolNumbers):
    """`documents.recurrences`: copies of earlier passages inserted into the train split's documents."""

    model_config = ConfigDict(extra="forbid")
    every_lines: int = Field(
        0, ge=0, description="one copy per this many lines of a training document, on average; 0: none"
    )
    min_lines: int = Field(2, ge=1, description="a copy's length in lines: at least")
    max_lines: int = Field(8, ge=1, description="and at most")
    near_share: float = Field(
        0.25, ge=0, le=1, description="share of copies whose source ends within the last `near_lines` lines"
    )
    near_lines: int = Field(12, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Recurrences:
        if self.max_lines < self.min_lines:
            raise ValueError(f"recurrences: max_lines ({self.max_lines}) < min_lines ({self.min_lines})")
        return self


@dataclass
class Inserted:
    copies: int = 0
    chars: int = 0
    # (original line after which the copy was inserted, first source line, lines copied)
    spans: list[tuple[int, int, int]] = field(default_factory=list)


def _rng(doc_id: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big"))


def insert_recurrences(text: str, doc_id: str, cfg: Recurrences) -> tuple[str, Inserted]:
    """`text` with copies of its earlier passages inserted at line breaks (unchanged when every_lines is
    0). A copy's source is a run of the original lines that ends before the insertion point."""
    done = Inserted()
    if not cfg.every_lines:
        return text, done
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"  # a copy inserted after the last line must not join it
        trailing_newline_added = True
    else:
        trailing_newline_added = False
    rng = _rng(doc_id)
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        n = int(rng.integers(cfg.min_lines, cfg.max_lines + 1))
        if rng.random() >= 1.0 / cfg.every_lines or i + 1 < n:
            continue
        # the source is lines[s : s + n], ending at or before line i
        last = i + 1 - n
        first = max(0, last - cfg.near_lines) if rng.random() < cfg.near_share else 0
        s = int(rng.integers(first, last + 1))
        copy = "".join(lines[s : s + n])
        out.append(copy)
        done.copies += 1
        done.chars += len(copy)
        done.spans.append((i, s, n))
    result = "".join(out)
    if trailing_newline_added:
        result = result[:-1]
    return result, done

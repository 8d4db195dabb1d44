"""Tokenizing a long document in bounded pieces whose tokens equal those of the whole document.

HF `tokenizers` holds about 150 bytes per byte of input while it encodes (per-byte alignments of the
normalized string, per-token strings and offsets, then Python lists of ids and offset tuples), so one
200 MB document encoded whole needs about 30 GB. Here a document is encoded in pieces of about
`piece_bytes` of UTF-8, a few at a time, and the pieces' tokens are joined back into exactly the token
sequence of the whole document:

- **Exact cuts** (`safe_cut_chars`): for byte-level BPE with the GPT-2 pre-tokenizer regex (what the
  tokenizer stage trains; GPT-2, GPT-NeoX, RoBERTa ...), a cut before a whitespace character that follows
  a non-whitespace one provably changes no token. Such pieces are disjoint.
- **Stitched windows** (`DocTokenizer`): for any other tokenizer, and for stretches with no exact cut (a
  line of megabytes without whitespace), the text is encoded in overlapping windows. Two consecutive
  windows are joined at a character p where the tokenizer's own pre-tokenizer (if it has one) starts a
  pre-token, both windows have a token starting at p and agree token for token (ids and offsets) from p
  to the last pre-token start before the final quarter of the overlap, and the earlier window's tokens
  just before p are those of the text cut at p. The earlier window brings the true left context, the
  later one the true right context. Where no such p exists (a pre-token longer than the overlap, tokens
  that depend on far context) the window absorbs the next one, doubling, and is encoded again: memory
  then grows with that stretch, the tokens stay exact.

Cuts are found in, and pieces decoded from, the UTF-8 bytes of the Arrow string column without a copy of
the document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# A document is cut before one of these (when the tokenizer allows); all three are whitespace to the
# GPT-2 regex, map to themselves under the allowed normalizers, and are stable starters for Unicode
# normalization (nothing composes across them).
CUT_CHARS = " \n\t"
# A piece with exact cuts may run to this many times `piece_bytes` looking for one; a longer stretch
# without a safe cut is encoded in stitched windows.
MAX_PIECE_FACTOR = 2


class StitchError(RuntimeError):
    """Overlapping windows disagree in a way that growing them cannot repair."""


# ------------------------------------------------------------------------------------- exact cuts


def _normalizer_ok(spec: dict[str, Any] | None) -> bool:
    # per character, or with a boundary before every stable starter; none maps a non-whitespace
    # character to whitespace (checked over all code points in the tests)
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_normalizer_ok(s) for s in spec.get("normalizers", []))
    return spec.get("type") in {"NFC", "NFD", "Lowercase"}


def _post_processor_ok(spec: dict[str, Any] | None) -> bool:
    # without special tokens (add_special_tokens=False) these change offsets at most, per token; the
    # ByteLevel/Roberta offset trimming treats a sequence's first token apart when add_prefix_space is on
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_post_processor_ok(s) for s in spec.get("processors", []))
    if kind in {"TemplateProcessing", "BertProcessing"}:
        return True
    if kind in {"ByteLevel", "RobertaProcessing"}:
        return not (spec.get("trim_offsets", True) and spec.get("add_prefix_space", True))
    return False


def safe_cut_chars(tok: Any) -> str:
    """The characters before which a document may be cut, when the character before the cut is not
    whitespace, without changing any token or offset; "" when this tokenizer gives no such guarantee.

    Why a cut at c (text[c-1] not whitespace, text[c] one of CUT_CHARS) is exact for
    `ByteLevel(add_prefix_space=False, use_regex=True)`: the GPT-2 pattern
    `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+` matches any
    character, so its matches tile the text. No alternative that matches a non-whitespace character goes
    on to take whitespace (the optional space only leads), so the match holding text[c-1] ends at c, in
    the whole text and in text[:c] alike, and the matches before it see the same characters (their runs
    and the `(?!\\S)` look-ahead stop at or before text[c-1]). The next match starts at c and the pattern
    has no look-behind, so text[c:] splits as the whole text does from c. The model then encodes each
    pre-token alone. Added tokens are split out first: none may contain a cut character (an occurrence
    across c would hold text[c]) nor strip whitespace beside it (lstrip/rstrip reach across c).
    """
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space", True) or not pre.get("use_regex", True):
        return ""
    if not _normalizer_ok(spec.get("normalizer")) or not _post_processor_ok(spec.get("post_processor")):
        return ""
    if (spec.get("model") or {}).get("dropout"):  # sampled merges: not even the whole text is reproducible
        return ""
    chars = CUT_CHARS
    for added in spec.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip"):
            return ""
        chars = "".join(c for c in chars if c not in added.get("content", ""))
    return chars


def cut_pattern(chars: str) -> re.Pattern[bytes] | None:
    """A bytes pattern whose matches end at candidate cuts: a byte that may end a non-whitespace
    character (ASCII from '!', or the last byte of a multi-byte character), then a cut character."""
    if not chars:
        return None
    return re.compile(b"[\\x21-\\xff][" + b"".join(re.escape(c.encode()) for c in chars) + b"]")


# ------------------------------------------------------------------------------------- documents


class DocBytes:
    """One document's UTF-8 text, a view into the Arrow buffer (never copied whole)."""

    def __init__(self, data: memoryview):
        self.data = data
        self.u8 = np.frombuffer(data, np.uint8) if len(data) else np.zeros(0, np.uint8)
        self.n = len(data)

    def decode(self, start: int, end: int) -> str:
        return str(self.data[start:end], "utf-8")

    def n_chars(self, start: int, end: int) -> int:
        # every byte but a continuation byte (10xxxxxx) starts a character
        return int(np.count_nonzero((self.u8[start:end] & 0xC0) != 0x80))

    def char_boundary(self, i: int) -> int:
        """The first character boundary at or after byte i."""
        while i < self.n and (self.u8[i] & 0xC0) == 0x80:
            i += 1
        return min(i, self.n)


def find_cut(doc: DocBytes, pattern: re.Pattern[bytes], start: int, stop: int) -> int | None:
    """The first exact cut c with start <= c < stop (0 < c < doc.n), or None."""
    start = max(start, 1)
    m = pattern.search(doc.data, start - 1, stop)
    while m is not None:
        c = m.start() + 1
        if doc.u8[c - 1] < 0x80:
            return c
        lead = c - 1
        while (doc.u8[lead] & 0xC0) == 0x80:
            lead -= 1
        if not doc.decode(lead, c).isspace():  # U+00A0, U+3000 ... are whitespace to the regex too
            return c
        m = pattern.search(doc.data, c, stop)
    return None


@dataclass
class Piece:
    """A byte range of a document to encode. `exact_end`: it ends at the document's end or at an exact
    cut; otherwise the next piece is a window that overlaps it."""

    start: int
    end: int
    char_start: int
    exact_end: bool
    doc_end: bool
    region_end: int  # the next exact cut (or the document's end) at or after `end`


def window_overlap(piece_bytes: int) -> int:
    return min(piece_bytes // 2, max(4096, piece_bytes // 8))


def plan_pieces(doc: DocBytes, pattern: re.Pattern[bytes] | None, piece_bytes: int | None) -> Iterator[Piece]:
    """Pieces of at most about `piece_bytes` (exact cuts) or windows of `piece_bytes` plus the overlap,
    in document order; one piece for a short document, or for any document when piece_bytes is None."""
    n = doc.n
    if piece_bytes is None or n <= piece_bytes:
        yield Piece(0, n, 0, True, True, n)
        return
    overlap = window_overlap(piece_bytes)
    pos = cpos = 0
    while pos < n:
        if n - pos <= piece_bytes:
            yield Piece(pos, n, cpos, True, True, n)
            return
        far = min(n, pos + MAX_PIECE_FACTOR * piece_bytes)
        c = find_cut(doc, pattern, pos + piece_bytes, far) if pattern is not None else None
        if c is not None:
            yield Piece(pos, c, cpos, True, False, c)
            cpos += doc.n_chars(pos, c)
            pos = c
            continue
        # no exact cut near: overlapping windows up to the next exact cut, or the end
        end = (find_cut(doc, pattern, far, n) if pattern is not None and far < n else None) or n
        w = pos
        while end - w > piece_bytes + overlap:
            nxt = doc.char_boundary(w + piece_bytes)
            yield Piece(w, min(end, doc.char_boundary(nxt + overlap)), cpos, False, False, end)
            cpos += doc.n_chars(w, nxt)
            w = nxt
        yield Piece(w, end, cpos, True, end == n, end)
        cpos += doc.n_chars(w, end)
        pos = end


# ------------------------------------------------------------------------------------- stitching


@dataclass
class Window:
    """An encoded piece; offsets are absolute character offsets in the document."""

    piece: Piece
    text: str
    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    first: int = 0  # tokens before this index belong to an earlier window (or are emitted)
    seg_start: int = 0  # character offset of the text not yet emitted
    checked_to: int = 0  # tokens starting in [seg_start, checked_to) agreed with the previous window

    @classmethod
    def encoded(cls, piece: Piece, text: str, enc: Any) -> Window:
        ids = np.asarray(enc.ids, dtype=np.int32)
        offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) + piece.char_start
        return cls(piece, text, ids, offs[:, 0], offs[:, 1], 0, piece.char_start, piece.char_start)

    @property
    def char_end(self) -> int:
        return self.piece.char_start + len(self.text)

    def agrees(self, i: int, other: Window, j: int, n: int) -> int:
        """How many of the n tokens from i here and from j there are equal (ids and offsets) before the
        first difference (n when all are)."""
        if j + n > len(other.ids) or i + n > len(self.ids):
            return 0
        eq = (
            (self.ids[i : i + n] == other.ids[j : j + n])
            & (self.starts[i : i + n] == other.starts[j : j + n])
            & (self.ends[i : i + n] == other.ends[j : j + n])
        )
        return n if eq.all() else int(np.argmin(eq))


def stitch_candidates(
    a: Window, b: Window, bounds: np.ndarray | None = None
) -> Iterator[tuple[int, int, int, int]]:
    """Where window b (which starts inside a) may take over: (i, j, p, q) such that a's tokens from i and
    b's tokens from j both start at character p and are equal for every token of a that starts before q.
    p lies in the first half of the overlap; q is 3/4 into it (a lacks right context after that), or,
    given the pre-token starts `bounds` (sorted), p must be one of them and q is the last one up to there
    (a pre-token running past a's end is cut short in a, so there a and b may rightly differ)."""
    lo, a_end = b.piece.char_start, a.char_end
    ov = a_end - lo
    if ov <= 0:
        return
    mid, limit = lo + ov // 2, a_end - ov // 4
    last = None
    if bounds is not None:
        k = int(np.searchsorted(bounds, limit, "right"))
        last = int(bounds[k - 1]) if k else None
    i = max(a.first, int(np.searchsorted(a.starts, lo, "left")))
    stop = min(int(np.searchsorted(a.starts, mid, "left")), int(np.searchsorted(a.starts, limit, "left")))
    while i < stop:
        p = int(a.starts[i])
        if i > a.first and a.starts[i - 1] == p:  # the second token of a split character: not a boundary
            i += 1
            continue
        if bounds is not None:
            k = int(np.searchsorted(bounds, p, "left"))
            if k == len(bounds) or bounds[k] != p:
                i += 1
                continue
        q = last if last is not None and last > p else limit
        k_end = int(np.searchsorted(a.starts, q, "left"))
        j = int(np.searchsorted(b.starts, p, "left"))
        n = k_end - i
        if j >= len(b.ids) or b.starts[j] != p:
            i += 1
            continue
        # a short probe first: most candidates fail at once, and a full compare at each is quadratic
        same = a.agrees(i, b, j, min(n, 16))
        if same == min(n, 16):
            same = a.agrees(i, b, j, n)
        if same == n:
            yield i, j, p, q
            i += 1
        else:
            i += max(same, 1)


@dataclass
class Segment:
    """Tokens of the document with the exact text they cover: consecutive segments concatenate to the
    document's token sequence and to its text."""

    ids: np.ndarray
    starts: np.ndarray  # absolute character offsets
    text: str
    char_start: int


class DocTokenizer:
    """Turns a document's encoded pieces, fed in order, into segments of its whole-document tokens."""

    def __init__(self, doc: DocBytes, tok: Any):
        self.doc = doc
        self.tok = tok
        self.cur: Window | None = None
        self.covered = 0  # pieces ending here or before are inside a regrown window: skipped
        self.pieces = 0
        self.regrown = 0

    def _segment(self, w: Window, stop: int, char_stop: int) -> Segment:
        base = w.piece.char_start
        return Segment(
            w.ids[w.first : stop],
            w.starts[w.first : stop],
            w.text[w.seg_start - base : char_stop - base],
            w.seg_start,
        )

    def feed(self, piece: Piece, text: str, enc: Any) -> Iterator[Segment]:
        if piece.end <= self.covered:
            return
        self.pieces += 1
        w = Window.encoded(piece, text, enc)
        if self.cur is None:
            self.cur = w
        else:
            a = self.cur
            for i, j, p, limit in stitch_candidates(a, w, self._pre_token_starts(a, w)):
                if self._separable(a, i, p):
                    yield self._segment(a, i, p)
                    w.first, w.seg_start, w.checked_to = j, p, limit
                    self.cur = w
                    break
            else:
                self.cur = self._regrow(a, w)
        a = self.cur
        if a.piece.exact_end:
            yield self._segment(a, len(a.ids), a.char_end)
            self.cur = None

    def _pre_token_starts(self, a: Window, b: Window) -> np.ndarray | None:
        """Where the tokenizer's own pre-tokenizer starts a pre-token inside the overlap of a and b (None
        without one). Windows are joined only there: the model encodes a pre-token as a whole (Unigram's
        Viterbi path through a megabyte of one letter depends on where it ends), so a join inside one is
        never safe, however well the windows agree."""
        if self.tok.pre_tokenizer is None:
            return None
        lo, base = b.piece.char_start, a.piece.char_start
        splits = self.tok.pre_tokenizer.pre_tokenize_str(a.text[lo - base :])
        return np.asarray([lo + s for _, (s, _) in splits if s > 0], dtype=np.int64)

    def _separable(self, a: Window, i: int, p: int) -> bool:
        """Whether a's tokens just before p come out the same when the text ends at p (checked over the
        second half of up to 16K characters before p): agreement of two windows after p does not show
        that a's tokens before p ignore what follows a (a Viterbi path through one long pre-token
        depends on where it ends)."""
        width = max(64, min(1 << 14, (a.char_end - a.piece.char_start) // 16))
        left = max(a.piece.char_start, p - width)
        base = a.piece.char_start
        text = a.text[left - base : p - base]
        enc = self.tok.encode(text, add_special_tokens=False)
        starts = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0] + left
        q = left + (p - left) // 2
        k = int(np.searchsorted(a.starts, q, "left"))
        k = max(k, a.first)
        m = int(np.searchsorted(starts, a.starts[k] if k < i else p, "left"))
        return (
            len(starts) - m == i - k
            and np.array_equal(np.asarray(enc.ids, dtype=np.int32)[m:], a.ids[k:i])
            and np.array_equal(starts[m:], a.starts[k:i])
        )

    def _regrow(self, a: Window, b: Window) -> Window:
        """The windows never agree (a pre-token longer than the overlap, or far context): encode from a's
        start, with a's left context, over twice the span, or to the next exact cut; doubling keeps the
        re-encoding linear in the length of such a stretch."""
        self.regrown += 1
        end = b.piece.region_end
        if end > b.piece.end + (b.piece.end - a.piece.start):
            end = self.doc.char_boundary(b.piece.end + (b.piece.end - a.piece.start))
        exact = end == b.piece.region_end
        piece = Piece(
            a.piece.start, end, a.piece.char_start, exact, exact and end == self.doc.n, b.piece.region_end
        )
        self.covered = end
        text = self.doc.decode(piece.start, piece.end)
        m = Window.encoded(piece, text, self.tok.encode(text, add_special_tokens=False))
        m.seg_start, m.checked_to = a.seg_start, a.checked_to
        if a.checked_to == a.seg_start:  # a starts a region: m starts at the same exact boundary
            return m
        # a's tokens from seg_start agreed with its predecessor's, but both may have lacked the end of a
        # long pre-token; m has more right context. A join at a pre-token start stays exact (the model
        # encodes pre-tokens alone); one found by agreement alone must be confirmed by m
        m.first = int(np.searchsorted(m.starts, a.seg_start, "left"))
        if m.first >= len(m.ids) or m.starts[m.first] != a.seg_start:
            confirmed = False
        elif self.tok.pre_tokenizer is not None:
            confirmed = True
        else:
            n = int(np.searchsorted(a.starts, a.checked_to, "left")) - a.first
            confirmed = n <= 0 or m.agrees(m.first, a, a.first, n) == n
        if not confirmed:
            raise StitchError(
                f"overlapping windows of a document disagree around character {a.seg_start}: this "
                "tokenizer's tokens depend on distant context; set chunks.piece_bytes: null to encode "
                "whole documents"
            )
        return m

"""Project Gutenberg boilerplate: the header (through the START line) and the licence footer."""

from __future__ import annotations

import re
from dataclasses import dataclass

_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$"
    r"|^[ \t]*\*END\*THE SMALL PRINT![^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$"
    r"|^[ \t]*End of (?:the )?Project Gutenberg(?:['’]s)?[ \t]+(?:E-?Book|E-?text|Etext|work)?[^\n]*$"
    r"|^[ \t]*End of (?:the )?Project Gutenberg(?:['’]s)? [^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_TITLE = re.compile(r"^Title:[ \t]*(.+)$", re.MULTILINE)


@dataclass
class Stripped:
    text: str
    title: str | None
    had_header: bool
    had_footer: bool


def strip_gutenberg(text: str) -> Stripped:
    """Remove the Project Gutenberg header (through the START line) and the licence footer (from the
    first END line). Text that carries no START marker is returned unchanged."""
    m = _START.search(text)
    if m is None:
        return Stripped(text, None, False, False)
    header = text[: m.start()]
    t = _TITLE.search(header)
    title = t.group(1).strip() if t else None
    body_start = m.end()
    e = _END.search(text, body_start)
    body = text[body_start : e.start()] if e else text[body_start:]
    return Stripped(body.strip("\n"), title, True, e is not None)

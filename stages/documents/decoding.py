"""Bytes to text: byte-order marks, UTF-8, Windows-1252 and the single-byte encodings of other scripts
(detected), newlines, and telling binary files from text.
"""

from __future__ import annotations

import codecs
import re


def _latin1_for_undefined(err: UnicodeDecodeError) -> tuple[str, int]:
    # cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined; Latin-1 maps them to the same code points.
    return "".join(chr(b) for b in err.object[err.start : err.end]), err.end


codecs.register_error("rpt_latin1", _latin1_for_undefined)


# Longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
_BOMS = [
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
]
_BOM_OF = {enc: bom for bom, enc in _BOMS}
# Single-byte encodings of scripts other than Latin that files still come in (Cyrillic, Greek, Hebrew,
# Arabic, Baltic/Turkish are Latin and so left to Windows-1252).
OTHER_SCRIPTS = [
    "cp1251",
    "koi8_r",
    "koi8_u",
    "iso8859_5",
    "cp866",
    "mac_cyrillic",
    "cp1253",
    "iso8859_7",
    "cp1255",
    "iso8859_8",
    "cp1256",
    "iso8859_6",
]


class UnknownEncoding(ValueError):
    """Bytes that are not UTF-8 and whose single-byte encoding cannot be told with confidence."""


def bom_encoding(data: bytes) -> str | None:
    return next((enc for bom, enc in _BOMS if data.startswith(bom)), None)


def decode(data: bytes) -> tuple[str, str]:
    """Text and the encoding used: by byte-order mark (UTF-8/16/32); else UTF-8; else Windows-1252, which
    is what files labelled Latin-1 almost always are (WHATWG decodes 'iso-8859-1' the same way; its five
    undefined bytes fall back to Latin-1), unless that reading is mojibake of another script, when the
    encoding is detected (charset-normalizer: cp1251, KOI8-R, cp1253, ...). Raises UnknownEncoding rather
    than return garbled text."""
    bom = bom_encoding(data)
    if bom is not None:
        try:
            return data[len(_BOM_OF[bom]) :].decode(bom), bom
        except UnicodeDecodeError as e:
            if bom != "utf-8-sig":
                raise UnknownEncoding(f"starts with a {bom} byte-order mark but is not {bom} ({e})") from None
            data = data[3:]
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    text = data.decode("cp1252", errors="rpt_latin1")
    foreign = foreign_words(text)
    if not foreign:
        return text, "cp1252"
    from charset_normalizer import from_bytes

    # only scripts whose letters Windows-1252 turns into accented Latin: a Western text must never be
    # switched to another Latin code page (a Portuguese list came out as cp1250 'năo, măe')
    best = from_bytes(data, cp_isolation=OTHER_SCRIPTS).best()
    if best is None:
        raise UnknownEncoding(
            f"not UTF-8, and read as Windows-1252 it holds words such as {' '.join(foreign[:3])!r} (mojibake "
            "of another script) whose encoding cannot be told: convert the file to UTF-8"
        )
    return str(best), best.encoding


def decode_as(data: bytes, encoding: str) -> tuple[str, str]:
    """UTF-8 if the bytes are UTF-8, else the given legacy encoding (strict, except cp1252's five undefined
    bytes, which are read as Latin-1 like everywhere else here)."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode(encoding, errors="rpt_latin1" if encoding == "cp1252" else "strict"), encoding
    except UnicodeDecodeError as e:
        raise UnknownEncoding(
            f"not UTF-8 and not {encoding} like the file's earlier lines ({e}): convert the file to UTF-8"
        ) from None


_WORD = re.compile(r"[^\W\d_]{3,}")


def foreign_words(text: str) -> list[str]:
    """Words of three or more letters made of non-ASCII letters only, when they are at least a fifth of
    the words that hold any: in Western text an accented letter sits among ASCII ones ('déjà', 'ÉTÉ'),
    while Cyrillic, Greek or Hebrew read as Windows-1252 gives whole words of them ('Ïðèâåò')."""
    accented = [w for w in _WORD.findall(text) if not w.isascii()]
    whole = [w for w in accented if not any(c.isascii() for c in w)]
    return whole if whole and len(whole) >= 0.2 * len(accented) else []


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


_CONTROL = set(range(0, 32)) - {9, 10, 12, 13}


def looks_binary(data: bytes, sample: int = 8192) -> bool:
    head = data[:sample]
    if not head:
        return False
    if b"\x00" in head:
        return True
    ctrl = sum(1 for b in head if b in _CONTROL)
    return ctrl / len(head) > 0.05

"""Text cleaning and chunking shared by every source extractor.

Normalisation keeps what a model should learn from (indentation, tabs, line breaks in code
and verse) and drops what it should not (control characters, terminal overstrikes, trailing
spaces, runs of blank lines). Chunking cuts only at paragraph boundaries, so no document
starts or ends mid-sentence.
"""

from __future__ import annotations

import re
import unicodedata

# A document longer than this is split; about 2,000 tokens, a few trainer contexts.
MAX_DOC_CHARS = 8_000
# Shorter documents are dropped: a bare stage direction or a two-word fortune teaches nothing,
# while one-line quips ("So much food; so little time!") are kept.
MIN_DOC_CHARS = 16

# C0 and C1 controls except tab and newline, plus the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def resolve_overstrike(line: str) -> str:
    """What a printing terminal shows for a line with backspaces.

    nroff-era files (some fortunes) draw bold as "x\\bx" and underline as "_\\bx" or
    "___\\b\\b\\bnot"; the struck-over cell keeps its letter rather than the underscore.
    """
    cells: list[str] = []
    pos = 0
    for ch in line:
        if ch == "\b":
            pos = max(pos - 1, 0)
            continue
        if pos == len(cells):
            cells.append(ch)
        elif cells[pos] in ("_", " "):
            cells[pos] = ch
        pos += 1
    return "".join(cells)


def normalise(text: str) -> str:
    """NFC, no control characters, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\b" in text:
        text = "\n".join(resolve_overstrike(line) if "\b" in line else line for line in text.split("\n"))
    text = _CONTROL.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip("\n").rstrip()


def paragraphs(text: str) -> list[str]:
    """The blank-line-separated paragraphs of normalised text, without empty ones."""
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def pack(blocks: list[str], max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Join consecutive blocks into chunks of at most max_chars where possible.

    A block longer than max_chars is first broken into its paragraphs; a single paragraph
    longer than max_chars stays whole rather than being cut mid-sentence.
    """
    pieces: list[str] = []
    for block in blocks:
        pieces.extend(paragraphs(block) if len(block) > max_chars else [block])
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        added = len(piece) + (2 if current else 0)
        if current and size + added > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
            added = len(piece)
        current.append(piece)
        size += added
    if current:
        chunks.append("\n\n".join(current))
    return [c.strip("\n") for c in chunks if c.strip()]

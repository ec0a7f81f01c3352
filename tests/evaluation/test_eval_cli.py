"""`moeflow eval perplexity|choice` on the bundled model, at CI size, and the errors a user meets."""

from __future__ import annotations

import json

import pytest

from moeflow.assets import default_model_dir
from moeflow.cli import main
from moeflow.data.corpus import Document, write_jsonl
from moeflow.evaluation.choice import NUM_CHOICES, build_items
from moeflow.evaluation.documents import load_documents
from moeflow.tokenizer import Tokenizer

HELDOUT = "tests/data/heldout"
SMALL = ["--data", HELDOUT, "--batch-size", "4", "--device", "cpu", "--no-progress"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_perplexity_json_has_the_three_figures_and_the_exact_baseline(capsys):
    code, out, _ = run(capsys, "eval", "perplexity", *SMALL, "--routing", "lynx", "--max-docs", "6",
                       "--max-tokens-per-doc", "12", "--json")
    assert code == 0
    report = json.loads(out)
    for key in ("perplexity", "agreement_top1", "distinct_experts_per_layer_step"):
        assert isinstance(report[key], float)
    assert report["routing"] == "lynx" and report["tokens"] == report["exact"]["tokens"] > 0
    assert report["exact"]["agreement_top1"] == 1.0 and 0 < report["agreement_top1"] <= 1
    assert 1 <= report["distinct_experts_per_layer_step"] <= 32
    assert report["lynx"]["alpha"] > 0 and report["documents"] == 6


def test_perplexity_exact_alone_prints_a_table(capsys):
    code, out, _ = run(capsys, "eval", "perplexity", default_model_dir(), *SMALL, "--max-docs", "3",
                       "--max-tokens-per-doc", "8")
    assert code == 0 and "| exact |" in out and "| lynx |" not in out


def test_choice_json_reports_accuracy_per_mode(capsys):
    code, out, _ = run(capsys, "eval", "choice", *SMALL, "--items", "6", "--passage-tokens", "8",
                       "--continuation-tokens", "4", "--json")
    assert code == 0
    report = json.loads(out)
    assert set(report["accuracy"]) == {"exact", "lynx"} and report["items"] == 6
    assert all(0 <= a <= 1 for a in report["accuracy"].values())
    assert report["runs"]["exact"]["same_pick_as_exact"] == 1.0


@pytest.mark.parametrize("argv,message", [
    (["perplexity", "--data", "no/such/file.jsonl"], "does not exist"),
    (["perplexity", "--data", HELDOUT, "--routing", "fast"], "routing 'fast' unknown"),
    (["choice", "--data", HELDOUT, "--routing", "exact,fast"], "routing 'fast' unknown"),
    (["perplexity", "--data", HELDOUT, "--batch-size", "0"], "batch size must be an integer >= 1"),
    (["perplexity", "--data", HELDOUT, "--max-tokens-per-doc", "2"], "at least 3"),
    (["perplexity", "--data", HELDOUT, "--split", "dev"], "unknown split"),
    (["perplexity", "--data", HELDOUT, "--domains", "klingon"], "no documents"),
    (["perplexity", "--data", HELDOUT, "--lynx-beta", "0", "--routing", "lynx"], "beta must be an integer >= 1"),
    (["choice", "--data", HELDOUT, "--items", "0"], "--items must be at least 1"),
])
def test_bad_inputs_are_clear_errors(capsys, argv, message):
    code, _, err = run(capsys, "eval", *argv, "--device", "cpu", "--no-progress")
    assert code == 2 and message in err and "Traceback" not in err


def test_documents_deal_the_domains_in_turn(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [Document(f"{d}/{i}", d, "s", f"text {i}") for d in "ab" for i in range(3)]
                + [Document("c/0", "c", "s", "only one")])
    docs = load_documents([tmp_path])
    assert [d.doc_id for d in docs] == ["a/0", "b/0", "c/0", "a/1", "b/1", "a/2", "b/2"]
    assert [d.doc_id for d in load_documents([tmp_path], domains=["b"], max_docs=2)] == ["b/0", "b/1"]


def test_choice_items_are_drawn_from_other_documents_of_the_domain_by_seed():
    tok = Tokenizer(default_model_dir())
    docs = load_documents([HELDOUT], max_docs=60)
    items = build_items(tok, docs, passage_tokens=8, continuation_tokens=4, num_items=20, seed=3)
    assert items == build_items(tok, docs, passage_tokens=8, continuation_tokens=4, num_items=20, seed=3)
    assert items != build_items(tok, docs, passage_tokens=8, continuation_tokens=4, num_items=20, seed=4)
    by_id = {d.doc_id: d for d in docs}
    continuation = {d.doc_id: tuple(tok.encode(d.text)[8:12]) for d in docs}
    for item in items:
        doc = by_id[item.key.split(":", 1)[1]]
        ids = tok.encode(doc.text)
        assert item.passage == ids[:8] and item.choices[item.answer] == tuple(ids[8:12])
        assert len(item.choices) == NUM_CHOICES and len(set(item.choices)) == NUM_CHOICES
        for c, choice in enumerate(item.choices):
            if c != item.answer:
                sources = [k for k, v in continuation.items() if v == choice]
                assert sources and all(by_id[k].domain == doc.domain for k in sources)
    assert len({item.answer for item in items}) > 1, "the answer's place is drawn"

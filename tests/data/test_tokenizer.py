"""The byte-level BPE: trained on the fixture corpus's train split, read by tokenizers and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.cli import main as moeflow_main
from moeflow.data.build import build_corpus
from moeflow.data.corpus import Document, write_jsonl
from moeflow.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from moeflow.errors import ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "sources"
VOCAB = 400

ROUND_TRIP = [
    "",
    "Grüße, café, naïve, œuvre — Ça va ? ¿Qué tal?",
    "日本語のテキスト、中文字符。한국어 문장.",
    "emoji 🎉 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "def f(x):\n\tif x:\n\t\treturn '\\t'\n    pass\r\n\n\n",
    "  leading and trailing spaces  ",
    "Cafe\u0301 stays decomposed: the tokenizer does not normalise",
    "\x00 NUL, \x1b[31mANSI\x1b[0m, and U+FFFF \uffff",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, FIXTURE, heldout_chars=0)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    assert moeflow_main(["data", "tokenizer", str(corpus), str(out), "--vocab-size", str(VOCAB)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tokenizer_dir: Path, hf_tokenizer, text: str) -> None:
    tok, _ = load_tokenizer(tokenizer_dir)
    ids = tok.encode(text).ids
    assert ids[0] == tok.token_to_id("<|endoftext|>")
    assert tok.decode(ids) == text
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_have_fixed_ids_and_are_never_split(tokenizer_dir: Path) -> None:
    tok, _ = load_tokenizer(tokenizer_dir)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = tok.encode("<|im_start|>user<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 2 and ids[-1] == 3 and not set(ids[1:-1]) & {0, 1, 2, 3}
    assert tok.get_vocab_size() == VOCAB


def test_config_for_moeflow_and_transformers(tokenizer_dir: Path, hf_tokenizer) -> None:
    _, config = load_tokenizer(tokenizer_dir)
    assert config["bos_token"] == config["eos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|pad|>" and config["add_bos_token"] is True
    assert config["model_max_length"] == 2048
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 0, 1)
    assert hf_tokenizer.model_max_length == 2048
    assert {"<|im_start|>", "<|im_end|>"} <= set(hf_tokenizer.all_special_tokens)


def test_chat_template_is_chatml(hf_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    closed = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert closed == prompt.removesuffix("<|im_start|>assistant\n")


def test_training_is_deterministic(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    assert moeflow_main(["data", "tokenizer", str(corpus), str(tmp_path), "--vocab-size", str(VOCAB)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_trains_on_the_train_split_only(tmp_path: Path) -> None:
    def docs(split: str, text: str) -> list[Document]:
        return [Document(f"wiki_en/{split}{i}", "wiki_en", "fixture", text) for i in range(50)]

    write_jsonl(tmp_path / "train.jsonl", docs("train", "the quick brown fox jumps over the lazy dog"))
    write_jsonl(tmp_path / "validation.jsonl", docs("validation", "zqxvzqxv " * 20))
    write_jsonl(tmp_path / "test.jsonl", docs("test", "zqxvzqxv " * 20))
    out = tmp_path / "tok"
    assert moeflow_main(["data", "tokenizer", str(tmp_path), str(out), "--vocab-size", "300"]) == 0
    tok, _ = load_tokenizer(out)
    assert not any("zq" in piece or "xv" in piece for piece in tok.get_vocab())
    assert "Ġlazy" in tok.get_vocab()


def test_build_counts_tokens_with_a_given_tokenizer(tokenizer_dir: Path, tmp_path: Path) -> None:
    summary = build_corpus(tmp_path, FIXTURE, tokenizer_dir=tokenizer_dir, heldout_chars=0)
    tok, _ = load_tokenizer(tokenizer_dir)
    train = [json.loads(line)["text"] for line in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["totals"]["train"]["tokens"] == sum(len(tok.encode(t, add_special_tokens=False).ids) for t in train)
    assert summary["tokenizer_sha256"] and "| tokens |" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def test_vocab_too_small_is_refused() -> None:
    with pytest.raises(ConfigError, match="no room for merges"):
        train_tokenizer(["text"], vocab_size=100)

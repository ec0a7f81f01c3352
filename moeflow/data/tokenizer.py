"""`moeflow data tokenizer`: a byte-level BPE trained on the corpus's train split.

Byte-level means every UTF-8 string encodes and decodes back exactly, with no unknown
token and no normaliser rewriting the input. The output directory is in the Hugging Face
layout (`tokenizer.json` + `tokenizer_config.json`), so both
`transformers.AutoTokenizer.from_pretrained(dir)` and `tokenizers.Tokenizer.from_file`
read it.

Special tokens, at fixed ids 0-3:
    <|endoftext|>  bos and eos: every document starts with it (add_bos_token), and a model
                   ends a document by predicting it
    <|pad|>        padding, never trained on
    <|im_start|>, <|im_end|>  ChatML turn markers for the chat template
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from moeflow.errors import ConfigError, MoeflowError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class TokenizerError(MoeflowError):
    """A tokenizer directory that is missing files, or a corpus it cannot be trained on."""

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = EOS_TOKEN
PAD_TOKEN = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)
_BYTE_ALPHABET = 256
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MODEL_MAX_LENGTH = 2048

# ChatML. It opens with bos_token because training documents open with it too.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, length: int | None = None) -> Tokenizer:
    """Train the BPE on texts; the same texts in the same order give the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    floor = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ConfigError(f"vocab size {vocab_size} leaves no room for merges; use more than {floor} "
                          f"({_BYTE_ALPHABET} bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, even those the corpus lacks, so no input ever falls outside the vocab.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # The same template transformers builds from add_bos_token, so both readers agree.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def train_from_corpus(corpus_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train on the train split only: validation and test stay unseen by the vocabulary too."""
    from moeflow.data.corpus import read_split

    docs = read_split(corpus_dir, "train")
    if not docs:
        raise TokenizerError(f"{corpus_dir}/train.jsonl holds no documents")
    return train_tokenizer((d.text for d in docs), vocab_size, length=len(docs))


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,  # byte-level: nothing is unknown
        # Read by moeflow and transformers 4; transformers 5 ignores these when tokenizer.json
        # exists and follows its post-processor, which train_tokenizer makes say the same.
        "add_bos_token": True,
        "add_eos_token": False,
        # The key both transformers 4 and 5 read; registers the chat markers as special.
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        # transformers' clean-up would rewrite " ." to "." and break exact round trips.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


def load_tokenizer(tokenizer_dir: Path) -> tuple[Tokenizer, dict]:
    """The tokenizers object and the config dict, without importing transformers."""
    from tokenizers import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    paths = [tokenizer_dir / "tokenizer.json", tokenizer_dir / "tokenizer_config.json"]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise TokenizerError(f"{tokenizer_dir} lacks {', '.join(missing)}; "
                           "train one with `moeflow data tokenizer CORPUS_DIR OUT_DIR`")
    return Tokenizer.from_file(str(paths[0])), json.loads(paths[1].read_text(encoding="utf-8"))


def tokenizer_sha256(tokenizer_dir: Path) -> str:
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()

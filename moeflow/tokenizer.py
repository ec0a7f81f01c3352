"""Tokenizer: a model directory's tokenizer.json and tokenizer_config.json, without transformers.

Encoding applies tokenizer.json's own post-processor (which adds BOS where the model
expects it); chat templates are the Jinja templates Hugging Face checkpoints ship, compiled
when the tokenizer loads, so a template that cannot compile (an unknown filter, a syntax
error) refuses the model at load instead of failing every chat request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeflow.errors import CheckpointError, RequestError


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate (JSON's "\\ud800", a non-UTF-8 byte in argv), which no tokenizer
    can encode; None when it is valid Unicode text."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


class TextTooLong(RequestError):
    """A text of more tokens than the caller's limit (found without building its list of ids)."""

    def __init__(self, num_tokens: int, limit: int):
        super().__init__(f"text has {num_tokens} tokens, more than {limit}")
        self.num_tokens, self.limit = num_tokens, limit


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...}, the AddedToken form
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as _Backend

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"{model_dir} has no tokenizer.json; moeflow needs the tokenizer beside the weights "
                "(or pass token ids and skip_tokenizer_init=True)"
            )
        try:
            self._tok = _Backend.from_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} could not be read as a tokenizer: {exc}") from None
        cfg_path = model_dir / "tokenizer_config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
        self.chat_template: str | None = self.config.get("chat_template")
        source = f"{cfg_path.name}'s chat_template"
        template_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template, source = template_file.read_text(), template_file.name
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self._template = _compile_template(self.chat_template, f"{model_dir / source}") if self.chat_template else None
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets and lets go of the GIL while it works
        self._encode_fast = getattr(self._tok, "encode_batch_fast", None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, *, limit: int | None = None) -> list[int]:
        """Token ids of `text`. With `limit`, a text of more tokens raises TextTooLong instead: the list of ids
        of a text of megabytes is built in one call that holds the GIL, and a caller that would refuse it
        anyway need not wait for that."""
        if (at := lone_surrogate(text)) is not None:
            raise RequestError(f"text holds a lone surrogate (U+{ord(text[at]):04X}) at character {at}: it is not "
                               f"valid Unicode and cannot be tokenized")
        if self._encode_fast is not None:
            encoding = self._encode_fast([text], add_special_tokens=add_special_tokens)[0]
        else:
            encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
        if limit is not None and len(encoding) > limit:
            raise TextTooLong(len(encoding), limit)
        return encoding.ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise RequestError("this model's tokenizer_config.json has no chat_template; use a plain completion")
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise RequestError(f"chat template rejected the messages: {exc}") from None
        except (TypeError, ValueError, LookupError, AttributeError) as exc:
            # what a template does with messages it did not expect (a list where it wants text, a missing key)
            raise RequestError(f"chat template rejected the messages: {type(exc).__name__}: {exc}") from None


def _compile_template(text: str, source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    if not isinstance(text, str):
        raise CheckpointError(f"{source} is not a string (named templates are not supported)")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(text)
    except TemplateError as exc:
        raise CheckpointError(f"{source} does not compile: {exc}") from None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-emitting or splitting characters.

    Decodes a short window of recent tokens twice (with and without the newest) and emits
    only the new suffix; a delta that ends in an incomplete UTF-8 sequence is held back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # context for tokenizers whose decoding depends on neighbours
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

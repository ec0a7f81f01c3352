"""Field types of the request bodies: strict numbers and booleans, text that is valid Unicode, and bounds.

Numbers are strict, as OpenAI's API and JSON Schema have them: true is not 1 (`max_tokens: false` is
not score-only mode, `[true, false]` are not token ids) and "5" is not 5. Text is any JSON string
but one holding a lone surrogate: JSON's "\\ud800" escape decodes to one, and no tokenizer or UTF-8
encoder can take it, so it is refused here, naming the field, like any other invalid value.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, Strict
from pydantic_core import PydanticCustomError

from moeflow.tokenizer import lone_surrogate

# Bounds on what one request may ask the engine to scan at every token, and on what it may make the
# server write back. OpenAI allows 4 stop strings; these leave room for evaluation harnesses.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROB_ENTRIES = 2**19  # (prompt tokens if echoed + generated tokens) x (logprobs + 1), over the call


def _valid_text(value: Any) -> Any:
    """Runs before pydantic's own checks (whose message for this case names no surrogate); types are theirs."""
    if isinstance(value, str) and (at := lone_surrogate(value)) is not None:
        raise PydanticCustomError("invalid_text", "holds a lone surrogate (U+{code}) at character {at}, which is "
                                  "not valid Unicode text", {"code": f"{ord(value[at]):04X}", "at": at})
    return value


def check_nested_text(value: Any) -> None:
    """Every string in a JSON value (keys included) is valid text; for fields passed through as given."""
    if isinstance(value, str):
        _valid_text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_nested_text(k)
            check_nested_text(v)
    elif isinstance(value, list):
        for v in value:
            check_nested_text(v)


Text = Annotated[str, BeforeValidator(_valid_text)]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an integer is a number too, as in JSON Schema; a boolean is not
Bool = Annotated[bool, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), BeforeValidator(_valid_text)]

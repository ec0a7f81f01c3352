"""What a request brings, checked before the engine accepts it: its prompt as token ids, its routing, its forced
output; and the Sequence the engine runs for it."""

from __future__ import annotations

from collections.abc import Callable

from moeflow.engine.sequence import Sequence
from moeflow.errors import RequestError
from moeflow.sampling import SamplingParams
from moeflow.tokenizer import IncrementalDetokenizer, Tokenizer


def new_sequence(request_id: str, prompt: str | list[int], params: SamplingParams, *, tokenizer: Tokenizer | None,
                 vocab_size: int, max_model_len: int, offered: tuple[str, ...], draw_seed: Callable[[], int],
                 arrival_time: float, forced_output: list[int] | None = None) -> Sequence:
    """The request checked and made a Sequence. `offered`: the routing modes the engine runs; `draw_seed`: the
    sampler's seed for params that bring none (called only for an accepted request, so a refused one changes no
    other request's seed)."""
    if not isinstance(params, SamplingParams):
        raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    if params.routing not in offered:
        raise RequestError(f"routing {params.routing!r} is not offered by this engine; it offers {', '.join(offered)}")
    text, ids = prompt_ids(prompt, tokenizer, vocab_size)
    if len(ids) >= max_model_len:
        raise RequestError(f"prompt has {len(ids)} tokens, but the context holds {max_model_len} (max_model_len) "
                           f"and at least one must be left to generate")
    detok = IncrementalDetokenizer(tokenizer, ids, params.skip_special_tokens) if tokenizer is not None else None
    forced = forced_tokens(forced_output, params, len(ids), vocab_size, max_model_len) if forced_output is not None \
        else None
    seed = params.seed if params.seed is not None else draw_seed()
    seq = Sequence(request_id, text, ids, params, arrival_time, detok, seed)
    seq.forced = forced
    return seq


def prompt_ids(prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int) -> tuple[str | None, list[int]]:
    """(the prompt's text, or None for ids, its token ids): a non-empty string (encoded) or list of token ids in
    the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty")
        if tokenizer is None:
            raise RequestError("this engine was started without a tokenizer: pass token ids")
        return prompt, tokenizer.encode(prompt)
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise RequestError("a prompt is a string or a list of token ids (ints)")
    if not prompt:
        raise RequestError("prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return None, list(prompt)


def forced_tokens(forced_output, params: SamplingParams, num_prompt: int, vocab_size: int,
                  max_model_len: int) -> list[int]:
    """Teacher forcing's output tokens: 1 to max_tokens ids in the vocabulary, within the context after the prompt."""
    forced = list(forced_output)
    if not forced or len(forced) > params.max_tokens or any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in forced):
        raise RequestError(f"forced_output must be 1 to max_tokens={params.max_tokens} token ids in "
                           f"[0, {vocab_size})")
    if num_prompt + len(forced) > max_model_len:
        raise RequestError(f"prompt and forced output hold {num_prompt + len(forced)} tokens, over "
                           f"max_model_len={max_model_len}")
    return forced

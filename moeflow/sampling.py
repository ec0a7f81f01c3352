"""SamplingParams (validated when made) and the Sampler that turns a batch's logits into tokens.

Names and defaults follow vLLM's SamplingParams, so code written for it reads the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from moeflow.errors import ConfigError

MAX_LOGPROBS = 20
ROUTING_MODES = ("exact", "lynx")


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # on tokens of the prompt or the output: logit / p if positive, else logit * p
    presence_penalty: float = 0.0  # on output tokens: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # on output tokens: logit -= frequency * count
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top-n logprobs per generated token (the sampled one always included)
    prompt_logprobs: int | None = None  # same for every prompt token after the first
    # request hints for schedulers and selectors; the sampler does not read them
    task: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    priority: int = 0
    routing: str = "exact"  # one of ROUTING_MODES

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_number("temperature", self.temperature, lo=0)
        _check_number("top_p", self.top_p, lo=0, lo_open=True, hi=1)
        _check_int("top_k", self.top_k, lo=-1)
        _check_number("min_p", self.min_p, lo=0, hi=1)
        _check_number("repetition_penalty", self.repetition_penalty, lo=0, lo_open=True)
        _check_number("presence_penalty", self.presence_penalty, lo=-2, hi=2)
        _check_number("frequency_penalty", self.frequency_penalty, lo=-2, hi=2)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**63 - 1)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entries", t, lo=0)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=0, hi=MAX_LOGPROBS)
        if self.task is not None and (not isinstance(self.task, str) or not self.task):
            raise ConfigError(f"task must be a non-empty string or None, got {self.task!r}")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, lo=0, lo_open=True)
        _check_int("priority", self.priority)
        if not isinstance(self.routing, str) or self.routing not in ROUTING_MODES:
            raise ConfigError(f"routing must be one of {', '.join(map(repr, ROUTING_MODES))}, got {self.routing!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _check_number(name: str, value: object, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False) -> None:
    """A finite int or float (a bool is not a number here) within [lo, hi], or (lo, hi] if lo_open."""
    if lo is None:
        bound = f"<= {hi}"
    elif hi is None:
        bound = f"> {lo}" if lo_open else f">= {lo}"
    else:
        bound = f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


# -- counter-based noise ------------------------------------------------------------------------------
# A draw needs one Exp(1) variate per (request seed, step, token). It is a pure function of those three, so a
# request samples the same tokens whatever shares its batch and whichever row it has. The bits come from
# splitmix64: key(seed, step) is computed on the host with numpy's uint64 (wrapping is defined there), and each
# token's word is mix64(key + token * GAMMA) computed on the device in int64. Torch has no uint64 shifts, so
# the shifts are arithmetic ones masked to be logical. int64 multiplication wraps modulo 2**64 on the CPU
# (scalar and vector kernels) and on CUDA alike: tests/test_sampling.py checks the CPU's words against plain Python
# integers, and CUDA's against the CPU's (bit-identical on an H200 with torch 2.11).

_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(c: int) -> int:
    return c - 2**64 if c >= 2**63 else c


def _mix64_np(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def _stream_keys(seeds: list[int], steps: list[int]) -> np.ndarray:
    """[n] int64: the key of each (seed, step) pair's token stream."""
    seed = np.asarray(seeds, dtype=np.uint64)
    step = np.asarray(steps, dtype=np.uint64)
    return _mix64_np(_mix64_np(seed) + (step + np.uint64(1)) * np.uint64(_GAMMA)).view(np.int64)


def _token_bits(keys: torch.Tensor, token_offsets: torch.Tensor) -> torch.Tensor:
    """[S, V] int64: mix64(key + token * GAMMA), given keys [S] and token_offsets = token * GAMMA ([V] or [S, V]).

    In place on two buffers: on the CPU, every fresh [S, V] tensor costs more in page faults than an op on it.
    """
    z = keys[:, None] + token_offsets
    shifted = torch.empty_like(z)
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)  # a logical shift
        z.bitwise_xor_(shifted)
        if multiplier is not None:
            z.mul_(_signed(multiplier))
    return z


def _exponential_noise(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) float32 variates from 64-bit words: u = (top 53 bits + 1/2) / 2**53, then -log1p(-u).

    53 bits, not 24, so that a variate near 0 (the one that wins a race whatever its token's probability) is
    resolved finely; float32 then keeps 24 significant bits of it. u rounds to 1 only in its top 2**-25 tail,
    which gives an infinite variate: that token cannot win this draw (Exp(1) is rarely above 17 anyway).
    Overwrites bits.
    """
    top = bits.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)
    return top.to(torch.float32).add_(0.5).mul_(-(2.0**-53)).log1p_().neg_()


# -- the sampler ----------------------------------------------------------------------------------
# B batch rows, V vocabulary, R KV-cache rows, S rows that sample (not greedy), P rows with penalties

_TOP_K_WITHOUT_SORT = 1024  # below this largest k, a batch without top-p finds its thresholds with topk, not a sort


class Sampler:
    """Samples one token per row of a [B, V] float32 logits tensor, every row in one pass whatever its params.

    Order: penalties (repetition, frequency, presence, as vLLM applies them), then greedy rows take the argmax;
    sampled rows: temperature, top-k, top-p (computed on the top-k survivors), min-p (relative to the most likely
    token, which top-k and top-p always keep), then one exponential race per row: argmax(p / E) with E ~ Exp(1)
    per token, which draws exactly from p (the Gumbel-max trick in another form). vLLM V1 applies min-p before
    top-k/top-p; the two orders differ only for rows that combine min-p with top-p.

    Reproducibility: a token depends only on the row's (seed, step), its penalised logits and its params. Its
    noise words are integers, bit-identical on every device. The float work around them (exp, log1p, the
    top-p cumulative sum) may differ by rounding between CPU and CUDA, so the same (seed, step, logits) gives
    the same token on both unless two candidates' scores p / E agree to about 1e-6 relative, or a token lies
    within rounding of a top-p or min-p cut.
    """

    def __init__(self, vocab_size: int, num_rows: int, device: torch.device):
        self.vocab_size = vocab_size
        self.num_rows = num_rows
        self.device = torch.device(device)
        self._token_offsets = torch.arange(vocab_size, dtype=torch.int64, device=self.device) * _signed(_GAMMA)
        self._penalised = [False] * num_rows  # whether the row's owner was admitted with a penalty
        # [R, V], allocated when the first request with a penalty is admitted
        self._output_counts: torch.Tensor | None = None  # int32: each output token's count
        self._in_prompt: torch.Tensor | None = None  # bool: the token is in the prompt
        self._one: torch.Tensor | None = None  # what a sampled token adds to its count
        # Draw rows that need no sort apart from those that do? On a CPU the sort dominates, so yes; on a GPU the
        # second group's ~40 extra kernel launches (B=32, V=151936, H200: ~0.7 ms of host time) cost more than
        # sorting every sampled row (~0.2 ms more on the device), so there a batch with any top-p row sorts all.
        self.split_sorted_rows = self.device.type == "cpu"

    def admit(self, row: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """A sequence now owns `row` (a KV-cache row, 0..num_rows-1): forget the previous owner's token counts and, if
        params uses a penalty, count the prompt's tokens (repetition penalty uses prompt+output, presence/frequency
        output only)."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is outside [0, {self.num_rows})")
        self._penalised[row] = params.uses_penalties
        if not params.uses_penalties:
            return  # its counts are never read, and the next owner with a penalty clears them
        if self._output_counts is None:
            self._output_counts = torch.zeros(self.num_rows, self.vocab_size, dtype=torch.int32, device=self.device)
            self._in_prompt = torch.zeros(self.num_rows, self.vocab_size, dtype=torch.bool, device=self.device)
            self._one = torch.ones((), dtype=torch.int32, device=self.device)
        self._output_counts[row].zero_()
        self._in_prompt[row].zero_()
        if prompt_ids:
            ids = self._upload(np.asarray(prompt_ids, dtype=np.int64))
            self._in_prompt[row].index_fill_(0, ids, True)

    def sample(self, logits: torch.Tensor, rows: list[int], params: list[SamplingParams], seeds: list[int],
               steps: list[int]) -> torch.Tensor:
        """logits [B, V] float32 on the device -> token ids [B] int64 on the device, without a host sync.
        rows: each row's owner row (for penalty counts); seeds: each row's 63-bit seed (the engine gives every
        request one: its own seed, or one drawn from the engine's seed); steps: how many tokens that request has
        generated before this one. Updates the penalty counts with the sampled tokens."""
        B, V = logits.shape
        if V != self.vocab_size:
            raise ValueError(f"logits have {V} columns, the sampler was made for a vocabulary of {self.vocab_size}")
        if not len(rows) == len(params) == len(seeds) == len(steps) == B:
            raise ValueError(f"{B} logits rows, but {len(rows)} rows, {len(params)} params, {len(seeds)} seeds "
                             f"and {len(steps)} steps")
        logits = logits.float()
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        penalised = [i for i, p in enumerate(params) if p.uses_penalties]
        for i in penalised:
            if not self._penalised[rows[i]]:
                raise ValueError(f"row {rows[i]} samples with a penalty, but was admitted without one")
        if not sampled and not penalised:
            return logits.argmax(dim=-1)

        # sampled rows that need a sort (top-p, or a top-k too large for topk) go first, so each group is a slice
        top_k = {i: params[i].top_k if 0 < params[i].top_k < V else 0 for i in sampled}  # 0: no limit
        sorts = {i: params[i].top_p < 1.0 or top_k[i] > _TOP_K_WITHOUT_SORT for i in sampled}
        if not self.split_sorted_rows and any(sorts.values()):
            sorts = dict.fromkeys(sampled, True)
        sampled = sorted(sampled, key=lambda i: not sorts[i])
        sp, pp = [params[i] for i in sampled], [params[i] for i in penalised]
        ints = {"pidx": penalised, "prow": [rows[i] for i in penalised], "sidx": sampled,
                "top_k": [top_k[i] for i in sampled],
                "keys": _stream_keys([seeds[i] for i in sampled], [steps[i] for i in sampled])}
        floats = {"rep": [p.repetition_penalty for p in pp], "pres": [p.presence_penalty for p in pp],
                  "freq": [p.frequency_penalty for p in pp], "temp": [p.temperature for p in sp],
                  "top_p": [p.top_p if p.top_p < 1.0 else math.inf for p in sp], "min_p": [p.min_p for p in sp]}
        t = self._upload_batch(ints, floats)

        x = logits
        if len(penalised) == B:
            x = self._penalise(x, t["prow"], t["rep"], t["pres"], t["freq"])
        elif penalised:
            x = x.index_put((t["pidx"],), self._penalise(x[t["pidx"]], t["prow"], t["rep"], t["pres"], t["freq"]))
        if not sampled:
            tokens = x.argmax(dim=-1)
        else:
            every_row = sampled == list(range(B))
            xs = (x if every_row else x[t["sidx"]]) / t["temp"][:, None]
            n_sorted = sum(sorts.values())
            drawn = [self._draw(xs[lo:hi], {k: t[k][lo:hi] for k in ("keys", "top_k", "top_p", "min_p")}, sort=sort,
                                max_k=max(ints["top_k"][lo:hi]), any_top_p=any(p.top_p < 1.0 for p in sp[lo:hi]),
                                any_min_p=any(p.min_p > 0.0 for p in sp[lo:hi]))
                     for lo, hi, sort in ((0, n_sorted, True), (n_sorted, len(sampled), False)) if lo < hi]
            drawn = drawn[0] if len(drawn) == 1 else torch.cat(drawn)
            tokens = drawn if every_row else x.argmax(dim=-1).index_copy_(0, t["sidx"], drawn)
        if penalised:  # one scatter: the penalised rows' tokens join their output counts
            self._output_counts.index_put_((t["prow"], tokens[t["pidx"]]), self._one, accumulate=True)
        return tokens

    def _penalise(self, x: torch.Tensor, rows: torch.Tensor, rep: torch.Tensor, pres: torch.Tensor,
                  freq: torch.Tensor) -> torch.Tensor:
        """x [P, V] -> the penalised logits, as vLLM applies them: repetition, frequency, presence."""
        counts = self._output_counts[rows]
        seen = counts > 0
        penalty = torch.where(seen | self._in_prompt[rows], rep[:, None], 1.0)
        x = torch.where(x > 0, x / penalty, x * penalty)
        x = x - freq[:, None] * counts
        return x - pres[:, None] * seen

    def _draw(self, x: torch.Tensor, t: dict[str, torch.Tensor], *, sort: bool, max_k: int, any_top_p: bool,
              any_min_p: bool) -> torch.Tensor:
        """x [n, V] temperature-scaled logits -> one token per row, by an exponential race over what the row's
        top-k, top-p and min-p keep. sort: the rows are sorted (needed for top-p); else top-k uses topk."""
        order = None  # [n, V] token ids in descending logit order, when the rows are sorted
        if sort:
            x, order = x.sort(dim=-1, descending=True, stable=True)  # stable: ties in token order on every device
            if max_k:
                x = _mask_below_kth(x, x, t["top_k"])
            w = (x - x[:, :1]).exp_()  # p / p_max
            if any_top_p:
                probs = w / w.sum(dim=-1, keepdim=True)
                # keep the token that crosses top_p (rows without top-p have top_p = inf)
                w.masked_fill_(probs.cumsum(dim=-1).sub_(probs) >= t["top_p"][:, None], 0.0)
        else:
            if max_k:
                x = _mask_below_kth(x, x.topk(max_k, dim=-1).values, t["top_k"])
            w = (x - x.amax(dim=-1, keepdim=True)).exp_()
        if any_min_p:
            w.masked_fill_(w < t["min_p"][:, None], 0.0)
        offsets = self._token_offsets if order is None else order * _signed(_GAMMA)
        choice = w.div_(_exponential_noise(_token_bits(t["keys"], offsets))).argmax(dim=-1)
        return choice if order is None else order.gather(1, choice[:, None])[:, 0]

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host->device copy, from pinned memory on CUDA (the caching host allocator keeps the block until the
        copy is done, so nothing here waits for it)."""
        tensor = torch.from_numpy(host)
        if self.device.type == "cuda":
            tensor = torch.empty_like(tensor, pin_memory=True).copy_(tensor)
        return tensor.to(self.device, non_blocking=True)

    def _upload_batch(self, ints: dict[str, list[int] | np.ndarray],
                      floats: dict[str, list[float]]) -> dict[str, torch.Tensor]:
        """The step's small parameter tensors, in one copy: int64 ones, and float32 ones sent as float64."""
        int_parts = [np.asarray(v, dtype=np.int64) for v in ints.values()]
        float_parts = [np.asarray(v, dtype=np.float64) for v in floats.values()]
        n_int = sum(len(a) for a in int_parts)
        host = np.empty(n_int + sum(len(a) for a in float_parts), dtype=np.int64)
        if int_parts:
            host[:n_int] = np.concatenate(int_parts)
        host[n_int:].view(np.float64)[:] = np.concatenate(float_parts)
        dev = self._upload(host)
        int_views = dev[:n_int].split([len(a) for a in int_parts])
        float_views = dev[n_int:].view(torch.float64).float().split([len(a) for a in float_parts])
        return {**dict(zip(ints, int_views)), **dict(zip(floats, float_views))}


def _mask_below_kth(x: torch.Tensor, ranked: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask x below each row's k-th largest value (ties with it stay); ranked holds each row's values in descending
    order, at least max(top_k) of them; rows with top_k 0 keep everything."""
    kth = ranked.gather(1, (top_k - 1).clamp(min=0)[:, None])
    kth = kth.masked_fill(top_k[:, None] == 0, -math.inf)
    return x.masked_fill(x < kth, -math.inf)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> list[dict[int, float]]:
    """Per row: {token: logprob} for the chosen token and the n most likely ones."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(-1, chosen[:, None])[:, 0].tolist()
    top_v, top_i = (torch.topk(logp, n, dim=-1) if n > 0 else (logp[:, :0], chosen[:, None][:, :0]))
    out = []
    for row, (c, lp) in enumerate(zip(chosen.tolist(), chosen_lp)):
        d = dict(zip(top_i[row].tolist(), top_v[row].tolist()))
        d[c] = lp
        out.append(d)
    return out

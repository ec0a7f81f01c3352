"""The batched Sampler against plain per-row references (SamplingParams' validation: test_sampling_params.py).

Distributions are checked with a chi-square test against target probabilities computed by the plain
per-row reference below (float64, one row at a time). The draws are pure functions of (seed, step), so each
test gives the same verdict on every run.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

import moeflow.sampling as sampling
from moeflow.sampling import Sampler, SamplingParams

CPU = torch.device("cpu")


# -- the reference: the old per-row sampler, plus min-p and penalties, written plainly ---------------------

def reference_penalise(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    x = logits.clone()
    for tok in set(prompt) | set(output):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok, count in Counter(output).items():
        x[tok] -= p.frequency_penalty * count
        x[tok] -= p.presence_penalty
    return x


def reference_probs(logits: torch.Tensor, p: SamplingParams, prompt: list[int] = (), output: list[int] = ()) -> torch.Tensor:
    """The exact distribution one row samples from (one-hot for greedy rows)."""
    logits = reference_penalise(logits.double(), p, list(prompt), list(output))
    if p.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).double()
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


class PerRowSampler:
    """The sampler moeflow had before: a softmax, a sort and a multinomial for every sampled row."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        for i, p in enumerate(params):
            if p.greedy:
                out[i] = logits[i].argmax()
            else:
                out[i] = torch.multinomial(reference_probs(logits[i], p).float(), 1, generator=generators[i])[0]
        return out


def reference_noise(seed: int, step: int, vocab: int) -> np.ndarray:
    """The Exp(1) variates a (seed, step) pair races with, in float64 from plain Python integers."""
    key = _mix64(_mix64(seed) + (step + 1) * _GAMMA)
    bits = [_mix64((key + tok * _GAMMA) % 2**64) for tok in range(vocab)]
    return np.array([-math.log1p(-((b >> 11) + 0.5) / 2**53) for b in bits])


_GAMMA = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z %= 2**64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return z ^ (z >> 31)


# -- chi-square ---------------------------------------------------------------------------------------

try:
    from scipy.stats import chi2 as _scipy_chi2
except ImportError:  # scipy is only a test convenience: the Wilson-Hilferty approximation is close enough here
    _scipy_chi2 = None


def wilson_hilferty_sf(stat: float, dof: int) -> float:
    """P(chi2(dof) >= stat) by the Wilson-Hilferty normal approximation: within 20% of the exact tail at
    p = 1e-3 for every dof (see the test below), and above it further out, so a rejection it reports is real."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi_square_sf(stat: float, dof: int) -> float:
    """P(chi2(dof) >= stat): scipy's when installed, else Wilson-Hilferty's."""
    return float(_scipy_chi2.sf(stat, dof)) if _scipy_chi2 is not None else wilson_hilferty_sf(stat, dof)


def test_the_fallback_chi_square_tail_matches_the_tables():
    # the chi-square critical values at p = 0.001 for 1, 5, 10 and 30 degrees of freedom, from the standard tables
    for dof, critical in [(1, 10.828), (5, 20.515), (10, 29.588), (30, 59.703)]:
        assert 0.8e-3 < wilson_hilferty_sf(critical, dof) < 1.2e-3


def chi_square_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of the drawn tokens under probs; tokens of probability 0 must never be drawn."""
    n = tokens.numel()
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    assert observed[probs == 0].sum() == 0, "a token the parameters rule out was drawn"
    expected = probs * n
    big = expected >= 5  # small cells are pooled, so that the chi-square approximation holds
    obs = torch.cat([observed[big], observed[~big & (probs > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if len(exp) < 2:
        return 1.0  # one possible outcome, and only it was drawn
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi_square_sf(stat, len(exp) - 1)


ALPHA = 1e-3
N_DRAWS = 20_000


def fixed_logits(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int, vary: str, seed: int = 3) -> torch.Tensor:
    """n draws for one row's logits, made as one batch of n rows that differ in their seed or in their step."""
    vocab = logits.shape[-1]
    sampler = Sampler(vocab, 1, CPU)
    seeds, steps = (list(range(seed, seed + n)), [0] * n) if vary == "seed" else ([seed] * n, list(range(n)))
    return sampler.sample(logits.expand(n, vocab), [0] * n, [params] * n, seeds, steps)


SINGLE = {
    "t0.5": SamplingParams(temperature=0.5),
    "t1": SamplingParams(temperature=1.0),
    "t2": SamplingParams(temperature=2.0),
    "top_k3": SamplingParams(top_k=3),
    "top_p0.8": SamplingParams(top_p=0.8),
    "min_p0.1": SamplingParams(min_p=0.1),
    "all": SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("vocab", [8, 50])
@pytest.mark.parametrize("name", list(SINGLE))
@pytest.mark.parametrize("vary", ["seed", "step"])
def test_each_parameter_alone_samples_the_target_distribution(vocab, name, vary):
    logits = fixed_logits(vocab)
    tokens = draw_many(logits, SINGLE[name], N_DRAWS, vary)
    assert chi_square_p(tokens, reference_probs(logits, SINGLE[name])) > ALPHA


@pytest.mark.parametrize("sort_free_top_k, split", [(True, True), (False, True), (True, False)])
def test_mixed_parameters_in_one_batch_each_sample_their_own_distribution(monkeypatch, sort_free_top_k, split):
    """Rows of different params and logits interleaved in one batch, with top-p rows present or not (so the sorted
    path and the topk path both run), top-k found by a sort when sort_free_top_k is off, and rows that need no sort
    drawn apart (split, the CPU's way) or sorted with the rest (the GPU's way)."""
    if not sort_free_top_k:
        monkeypatch.setattr(sampling, "_TOP_K_WITHOUT_SORT", 0)
    vocab, n = 50, N_DRAWS
    for mix in ([SamplingParams(temperature=0.5), SamplingParams(top_k=4, temperature=1.5), SamplingParams(min_p=0.2),
                 SamplingParams(temperature=0.0), SamplingParams(top_p=0.7, temperature=1.2)],
                [SamplingParams(temperature=2.0), SamplingParams(top_k=10), SamplingParams(top_k=2, min_p=0.3)]):
        logits = torch.stack([fixed_logits(vocab, seed=i) for i in range(len(mix))])
        rows = torch.arange(n * len(mix)) % len(mix)  # row r has params mix[r % len(mix)]
        sampler = Sampler(vocab, 1, CPU)
        sampler.split_sorted_rows = split
        tokens = sampler.sample(logits[rows], [0] * len(rows), [mix[r] for r in rows.tolist()],
                                list(range(len(rows))), [7] * len(rows))
        for j, p in enumerate(mix):
            assert chi_square_p(tokens[rows == j], reference_probs(logits[j], p)) > ALPHA, (j, p)


def test_chi_square_rejects_a_wrong_distribution():
    """The check has power: draws at temperature 1 fail against the target of temperature 0.8 or of top-p 0.95."""
    logits = fixed_logits(50)
    tokens = draw_many(logits, SamplingParams(temperature=1.0), N_DRAWS, "seed")
    assert chi_square_p(tokens, reference_probs(logits, SamplingParams(temperature=0.8))) < 1e-6
    with pytest.raises(AssertionError, match="rule out"):
        chi_square_p(tokens, reference_probs(logits, SamplingParams(top_p=0.95)))


def test_noise_bits_are_splitmix64():
    # splitmix64 seeded with 0 starts 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4
    assert [_mix64(_GAMMA), _mix64(2 * _GAMMA)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    seeds, steps = [0, 1, 2**63 - 1, 123456789, 2**62 + 17], [0, 5, 1, 2**31, 999]
    keys = sampling._stream_keys(seeds, steps)
    assert [int(k) % 2**64 for k in keys] == [_mix64(_mix64(s) + (t + 1) * _GAMMA) for s, t in zip(seeds, steps)]
    # an odd width and a strided [S, V] offset tensor, so both the vector kernels and their scalar tails run
    tokens = torch.randint(0, 200_000, (5, 37), generator=torch.Generator().manual_seed(1))
    offsets = (tokens * sampling._signed(_GAMMA)).t().contiguous().t()
    bits = sampling._token_bits(torch.from_numpy(keys), offsets)
    want = [[_mix64(int(k) + t * _GAMMA) for t in row] for k, row in zip(keys, tokens.tolist())]
    assert [[b % 2**64 for b in row] for row in bits.tolist()] == want


def test_sampled_tokens_are_the_exponential_race_of_the_reference():
    """Each sampled token is argmax(p / E) with p from the plain reference and E from plain-integer splitmix64."""
    vocab, n = 64, 200
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(2)) * 3
    choices = [SamplingParams(temperature=0.8), SamplingParams(top_k=5), SamplingParams(top_p=0.6),
               SamplingParams(min_p=0.1, temperature=1.3), SamplingParams(top_k=20, top_p=0.9, min_p=0.02)]
    params = [choices[i % len(choices)] for i in range(n)]
    seeds, steps = [1000 + i for i in range(n)], [i % 7 for i in range(n)]
    want = [int(np.argmax(reference_probs(logits[i], params[i]).numpy() / reference_noise(seeds[i], steps[i], vocab)))
            for i in range(n)]
    for split in (True, False):
        sampler = Sampler(vocab, 1, CPU)
        sampler.split_sorted_rows = split
        assert sampler.sample(logits, [0] * n, params, seeds, steps).tolist() == want


def test_a_seeded_row_samples_the_same_tokens_alone_and_in_any_batch():
    vocab = 1000
    gen = torch.Generator().manual_seed(4)
    mine = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, presence_penalty=0.5)
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3), SamplingParams(min_p=0.3),
              SamplingParams(temperature=1.4, repetition_penalty=1.2), SamplingParams(top_p=0.5)]
    prompt = [5, 6, 7]
    steps_logits = [torch.randn(vocab, generator=gen) * 2 for _ in range(6)]

    def run(batch_size: int, position: int, my_row: int) -> list[int]:
        sampler = Sampler(vocab, batch_size + 3, CPU)
        others_rows = [r for r in range(batch_size + 3) if r != my_row][: batch_size - 1]
        sampler.admit(my_row, prompt, mine)
        for j, r in enumerate(others_rows):
            sampler.admit(r, [1, 2], others[j % len(others)])
        mine_tokens = []
        for step, row_logits in enumerate(steps_logits):
            logits = torch.randn(batch_size, vocab, generator=gen)
            logits[position] = row_logits
            rows, params, seeds = list(others_rows), [others[j % len(others)] for j in range(batch_size - 1)], \
                [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in range(batch_size - 1)]
            rows.insert(position, my_row)
            params.insert(position, mine)
            seeds.insert(position, 2024)
            tokens = sampler.sample(logits, rows, params, seeds, [step] * batch_size)
            mine_tokens.append(int(tokens[position]))
        return mine_tokens

    alone = run(1, 0, 0)
    assert len(set(alone)) > 1  # the tokens are drawn, not forced
    for batch_size, position, my_row in [(2, 1, 3), (7, 0, 5), (7, 6, 1), (16, 9, 12)]:
        assert run(batch_size, position, my_row) == alone


def test_greedy_rows_are_the_argmax_also_next_to_sampled_rows():
    vocab = 4099
    logits = torch.randn(12, vocab, generator=torch.Generator().manual_seed(5))
    logits[3, 100] = logits[3, 200] = logits[3].max() + 1  # a tie: argmax's own choice (the first) stands
    before = logits.clone()
    want = logits.argmax(dim=-1)
    sampler = Sampler(vocab, 12, CPU)
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(sampler.sample(logits, list(range(12)), [greedy] * 12, [0] * 12, [0] * 12), want)
    mixed = [greedy if i % 3 else SamplingParams(top_p=0.9) for i in range(12)]
    out = sampler.sample(logits, list(range(12)), mixed, list(range(12)), [3] * 12)
    is_greedy = torch.tensor([p.greedy for p in mixed])
    assert out.dtype == torch.int64 and out.shape == (12,)
    assert torch.equal(out[is_greedy], want[is_greedy])
    assert torch.equal(logits, before)  # the engine reads the raw logits again for logprobs


def test_penalties_match_the_reference_over_steps_and_readmission():
    vocab, num_rows = 24, 6
    gen = torch.Generator().manual_seed(6)
    requests = [  # (row, prompt, params)
        (0, [1, 2, 3], SamplingParams(temperature=0.0, repetition_penalty=1.8)),
        (1, [4, 4, 5], SamplingParams(temperature=0.0, presence_penalty=1.5)),
        (2, [6], SamplingParams(temperature=0.0, frequency_penalty=0.7)),
        (3, [7, 8], SamplingParams(temperature=0.0, repetition_penalty=0.6, presence_penalty=-0.5,
                                   frequency_penalty=0.4)),
        (4, [9, 10], SamplingParams(temperature=0.9, top_k=8, repetition_penalty=1.3, frequency_penalty=1.0)),
        (5, [11], SamplingParams(temperature=0.0)),
    ]
    later = [  # new owners of rows 2, 3 and 5 after six steps: counts start again
        (2, [12, 13], SamplingParams(temperature=0.0, presence_penalty=2.0)),
        (3, [14], SamplingParams(temperature=0.0)),
        (5, [15, 16], SamplingParams(temperature=0.0, frequency_penalty=-1.0, repetition_penalty=1.5)),
    ]
    sampler = Sampler(vocab, num_rows, CPU)
    state = {}  # row -> (prompt, output, params, seed)

    def admit(row, prompt, params):
        sampler.admit(row, prompt, params)
        state[row] = (prompt, [], params, 77 + row + 10 * len(state))

    for request in requests:
        admit(*request)
    changed, penalties_mattered = False, 0
    for step in range(14):
        if step == 6:
            for request in later:
                admit(*request)
            changed = True
        rows = [0, 4, 1, 5, 3, 2] if step % 2 else sorted(state)  # the batch order changes, the rows do not
        logits = torch.randn(len(rows), vocab, generator=gen)
        params = [state[r][2] for r in rows]
        seeds = [state[r][3] for r in rows]
        steps = [len(state[r][1]) for r in rows]
        got = sampler.sample(logits, rows, params, seeds, steps).tolist()
        for i, r in enumerate(rows):
            prompt, output, p, seed = state[r]
            probs = reference_probs(logits[i], p, prompt, output).numpy()
            want = int(np.argmax(probs / reference_noise(seed, steps[i], vocab)))
            assert got[i] == want, (step, r, p)
            penalties_mattered += want != int(np.argmax(reference_probs(logits[i], p).numpy()
                                                        / reference_noise(seed, steps[i], vocab)))
            output.append(got[i])
    assert changed and penalties_mattered >= 10


def test_a_server_without_penalties_allocates_no_counts():
    sampler = Sampler(32, 4, CPU)
    p = SamplingParams(top_p=0.9)
    sampler.admit(0, [1, 2], p)
    sampler.sample(torch.randn(1, 32), [0], [p], [1], [0])
    assert sampler._output_counts is None
    with pytest.raises(ValueError, match="admitted without one"):
        sampler.sample(torch.randn(1, 32), [0], [SamplingParams(presence_penalty=1.0)], [1], [1])


def test_penalties_change_the_greedy_choice():
    """A sanity check of the reference-matching test's power: the penalised argmax differs from the plain one."""
    sampler = Sampler(4, 1, CPU)
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    sampler.admit(0, [0], p)
    logits = torch.tensor([[0.0, 2.5, 2.0, 0.0]])
    assert [int(sampler.sample(logits, [0], [p], [0], [s])) for s in range(3)] == [1, 2, 1]


# -- CUDA against the CPU ---------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_draws_the_same_tokens_as_the_cpu():
    vocab, n = 151936, 64
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(n, vocab, generator=gen) * 3
    keys = torch.from_numpy(sampling._stream_keys(list(range(n)), [5] * n))
    tokens = torch.randint(0, vocab, (n, 257), generator=gen)
    offsets = tokens * sampling._signed(_GAMMA)
    assert torch.equal(sampling._token_bits(keys.cuda(), offsets.cuda()).cpu(), sampling._token_bits(keys, offsets))
    choices = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7), SamplingParams(top_k=50),
               SamplingParams(top_p=0.9), SamplingParams(min_p=0.05, temperature=1.2),
               SamplingParams(top_k=40, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.3)]
    params = [choices[i % len(choices)] for i in range(n)]
    seeds = [31 * i + 1 for i in range(n)]
    results = []
    for device in (CPU, torch.device("cuda")):
        sampler = Sampler(vocab, n, device)
        for r, p in enumerate(params):
            sampler.admit(r, [r, r + 1, 7], p)
        out = [sampler.sample(logits.to(device), list(range(n)), params, seeds, [s] * n).cpu() for s in range(3)]
        results.append(torch.stack(out))
    assert torch.equal(results[0], results[1])

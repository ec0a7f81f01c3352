"""Route-aware decode batching: fair, exact, and it moves fewer expert bytes than fcfs."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from helpers import greedy, heldout_prompts
from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.bench.closed_loop import closed_loop
from moeflow.bench.workload import Request
from moeflow.engine.policies.route_aware import RouteAwarePolicy
from moeflow.engine.scheduler import MeasuredCosts, RequestRows, SchedulerContext


class FakeSeq:
    def __init__(self, i, routes):
        self.request_id, self.last_routes, self.last_step, self.prompt_ids, self.last_token = str(i), routes, -1, [0], 0


def ctx(step, batch, residency, free_kv_rows=0, max_num_batched_tokens=64):
    return SchedulerContext(step=step, free_kv_rows=free_kv_rows, max_num_batched_tokens=max_num_batched_tokens,
                            max_batch_size=batch, residency=residency, signatures={}, predictions={},
                            costs=MeasuredCosts())


@pytest.mark.parametrize("max_wait", [0, 2, 4])
def test_no_sequence_waits_past_its_bound_under_adversarial_routes(max_wait):
    """Half the sequences share one cheap route that is always resident; the other half each route to experts
    nothing else uses. Cost alone would starve the second half; the bound must not let it."""
    rng = np.random.default_rng(0)
    L, E, K, N, M = 3, 16, 2, 24, 4
    residency = np.zeros((L, E), dtype=bool)
    residency[:, :2] = True
    seqs = [FakeSeq(i, np.tile([0, 1], (L, 1)) if i % 2 == 0 else rng.choice(np.arange(2, E), (L, K), replace=False))
            for i in range(N)]
    policy = RouteAwarePolicy(max_decode_wait=max_wait)
    bound = policy.wait_bound(N, M)
    assert bound == N // M - 1 + max_wait
    worst, taken = 0, np.zeros(N, dtype=int)
    for step in range(200):
        plan = policy.plan([], seqs, ctx(step, M, residency))
        assert len(plan.decode) == M and not plan.admit
        for s in plan.decode:
            if s.last_step >= 0:
                worst = max(worst, step - s.last_step - 1)
            s.last_step = step
            taken[int(s.request_id)] += 1
    assert worst <= bound
    assert taken.min() > 0
    cheap, costly = taken[0::2].sum(), taken[1::2].sum()
    if max_wait > 0:
        assert cheap > costly, "within the bound it prefers the sequences that cost no loads"


def test_a_cohort_sharing_a_deadline_starts_early_enough_to_keep_the_bound():
    """Six costly sequences (admitted together) reach their bound at the same step, which takes four: two must
    decode a step early. Taking only the sequences at their bound left two of them one step past it."""
    rng = np.random.default_rng(1)
    L, E, M, step = 2, 16, 4, 10
    residency = np.zeros((L, E), dtype=bool)
    residency[:, :2] = True
    cheap = [FakeSeq(i, np.tile([0, 1], (L, 1))) for i in range(10)]
    costly = [FakeSeq(10 + i, rng.choice(np.arange(2, E), (L, 2), replace=False)) for i in range(6)]
    seqs = cheap + costly
    policy = RouteAwarePolicy(max_decode_wait=1)
    bound = policy.wait_bound(len(seqs), M)
    for s in cheap:
        s.last_step = step - 1
    for s in costly:
        s.last_step = step - bound  # one step from the bound
    worst = 0
    for now in range(step, step + 12):
        for s in policy.plan([], seqs, ctx(now, M, residency)).decode:
            worst = max(worst, now - s.last_step - 1)
            s.last_step = now
    assert worst <= bound, (worst, bound)


def test_fewer_running_than_a_step_takes_decodes_them_all():
    seqs = [FakeSeq(i, np.zeros((2, 2), dtype=int)) for i in range(3)]
    assert len(RouteAwarePolicy().plan([], seqs, ctx(0, 4, None)).decode) == 3


def test_predictions_as_one_array_choose_as_the_same_rows_in_a_dict():
    """The engine hands a predictor's rows for every running sequence as a RequestRows (one array, indexed by request
    id); route-aware takes them in one indexing, and chooses as it does from the same rows in a plain dict, for every
    step of a run in which the sequences wait and decode."""
    rng = np.random.default_rng(2)
    L, E, N, M = 3, 16, 20, 4
    residency = rng.random((L, E)) < 0.3
    seqs = [FakeSeq(i, rng.choice(E, (L, 2), replace=False)) for i in range(N)]
    scores = rng.random((N, L, E)).astype(np.float32) ** 4
    rows = RequestRows([s.request_id for s in seqs], scores)
    assert len(rows) == N and "3" in rows and "x" not in rows and list(rows)[:2] == ["0", "1"]
    np.testing.assert_array_equal(rows["7"], scores[7])
    np.testing.assert_array_equal(rows.rows(["5", "2"]), scores[[5, 2]])
    with pytest.raises(ValueError, match="3 request ids for 20 rows"):
        RequestRows(["a", "b", "c"], scores)
    as_array, as_dict = RouteAwarePolicy(max_decode_wait=2), RouteAwarePolicy(max_decode_wait=2)
    for step in range(12):
        a = as_array.plan([], seqs, replace(ctx(step, M, residency), predictions=rows)).decode
        b = as_dict.plan([], seqs, replace(ctx(step, M, residency), predictions=dict(rows.items()))).decode
        assert [s.request_id for s in a] == [s.request_id for s in b]
        for s in a:
            s.last_step = step


def decode_run(policy, prompts, steps, budget="25%", **engine):
    """Tokens, and the expert cache's counts over the decode steps (after the one prefill step that admits every
    prompt)."""
    llm = LLM(str(default_model_dir()), device="cpu", dtype="float32", max_model_len=64, max_num_seqs=len(prompts),
              max_batch_size=16, expert_budget=budget, scheduling=policy, **engine)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(steps))
    done = {o.request_id: o for o in engine.step()}
    assert engine.num_waiting == 0
    before = engine.cache.stats.total()
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step()})
    stats = engine.cache.stats.total()
    for name in stats.__dataclass_fields__:
        setattr(stats, name, getattr(stats, name) - getattr(before, name))
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))], stats


def decode_bytes(policy, prompts, steps, budget="25%", **engine):
    """Tokens, and the expert bytes moved over the decode steps: demand loads and prefetches."""
    tokens, stats = decode_run(policy, prompts, steps, budget, **engine)
    return tokens, stats.total_bytes


@pytest.fixture(scope="module")
def fcfs_run():
    """64 prompts of real text, and fcfs's tokens and decode bytes for them (64 running, 16 a step, 25%)."""
    prompts = heldout_prompts(LLM(str(default_model_dir()), device="cpu").tokenizer, 64)
    return prompts, *decode_bytes("fcfs", prompts, 12)


def test_route_aware_is_exact_and_moves_fewer_bytes_than_fcfs(fcfs_run):
    """64 prompts of real text, 64 running, 16 per decode step, a 25% budget: the same tokens as fcfs, and fewer
    expert bytes moved in decode (measured: 0.80 of fcfs's; the issue asks for at least 20% fewer)."""
    prompts, fcfs_tokens, fcfs = fcfs_run
    tokens, aware = decode_bytes("route-aware", prompts, 12)
    assert tokens == fcfs_tokens
    assert aware <= 0.8 * fcfs, (aware, fcfs, aware / fcfs)


def test_route_aware_with_the_predictive_cache_and_its_rounds_is_exact_and_moves_fewer_bytes(fcfs_run):
    """The same cell with the shipped predictor: its forecasts choose the steps and its predictive cache plans
    the copies, then also with rounds by value (expert_rounds=8). The tokens stay fcfs's; measured 0.670 and
    0.652 of fcfs's bytes (demand loads and prefetches)."""
    prompts, fcfs_tokens, fcfs = fcfs_run
    tokens, predicted = decode_bytes("route-aware", prompts, 12, predictor="auto")
    assert tokens == fcfs_tokens
    tokens, rounds = decode_bytes("route-aware", prompts, 12, predictor="auto", expert_rounds=8)
    assert tokens == fcfs_tokens
    assert predicted <= 0.69 * fcfs, (predicted, fcfs, predicted / fcfs)
    assert rounds <= 0.98 * predicted, (rounds, predicted, rounds / predicted)


def test_a_looser_prefetch_margin_prefetches_half_the_loads_for_a_few_more_bytes(fcfs_run):
    """The same cell with rounds, and prefetch_margin=1: a prefetch may evict any expert worth less than its own
    chance, where the default (0.25) let the predictive cache prefetch almost nothing at 16 rows a step. Measured:
    64 prefetches (0.652 of fcfs's bytes) against 2,108 (27 never used), about half the loads, for 0.686."""
    prompts, fcfs_tokens, fcfs = fcfs_run
    tokens, plain = decode_run("route-aware", prompts, 12, predictor="auto", expert_rounds=8)
    assert tokens == fcfs_tokens
    tokens, loose = decode_run("route-aware", prompts, 12, predictor="auto", expert_rounds=8, prefetch_margin=1.0)
    assert tokens == fcfs_tokens
    assert plain.prefetches < 0.05 * (plain.misses + plain.prefetches)
    assert loose.prefetches > 0.4 * (loose.misses + loose.prefetches) and loose.prefetches > 20 * plain.prefetches
    assert loose.wasted_prefetches < 0.03 * loose.prefetches
    moved = {name: s.total_bytes for name, s in (("plain", plain), ("loose", loose))}
    assert moved["loose"] <= 1.08 * moved["plain"] and moved["loose"] <= 0.72 * fcfs, (moved, fcfs)


def test_admission_is_held_back_only_while_it_pays_and_never_past_its_bound():
    """Offloaded, with a full decode step running without them, new requests wait to be prefilled together, at
    most the bound; resident, with a decode step to fill, with a full prefill, or with the prompt-token budget
    the limit, they are admitted at once, as fcfs admits them."""
    L, E, M = 2, 8, 4
    offloaded = np.zeros((L, E), dtype=bool)
    running = [FakeSeq(i, np.zeros((L, 2), dtype=int)) for i in range(8)]
    waiting = [FakeSeq(100 + i, None) for i in range(2)]

    def admitted(policy, step, waiting=waiting, running=running, residency=offloaded, tokens=64):
        plan = policy.plan(waiting, running, ctx(step, M, residency, free_kv_rows=8, max_num_batched_tokens=tokens))
        assert plan.admit or len(plan.decode) == min(M, len(running))
        return [s.request_id for s in plan.admit]

    ids = [s.request_id for s in waiting]
    policy = RouteAwarePolicy(max_decode_wait=1)
    assert policy.admit_wait_bound(len(running), M) == 2  # ceil(8 / 4) - 1 + 1, a running sequence's bound
    assert admitted(policy, 10) == [] and admitted(policy, 11) == []
    assert admitted(policy, 12) == ids  # the oldest has waited two steps
    later = [FakeSeq(200, None)]
    assert admitted(policy, 13, later) == [] and admitted(policy, 15, later) == ["200"]
    policy = RouteAwarePolicy(max_decode_wait=1, max_admit_wait=5)
    assert [admitted(policy, step) for step in range(20, 26)] == [[]] * 5 + [ids]
    four = [FakeSeq(300 + i, None) for i in range(4)]
    for case in (dict(residency=None), dict(running=running[:3]), dict(waiting=four), dict(tokens=1)):
        got = admitted(RouteAwarePolicy(max_decode_wait=1), 0, **case)
        assert got == [s.request_id for s in case.get("waiting", waiting)][: 1 if "tokens" in case else None], case
    assert admitted(RouteAwarePolicy(max_admit_wait=0), 0) == ids


def served(prompts, concurrency, batch, tokens, **engine):
    """Serving's closed loop (`bench serve --max-concurrency`; moeflow.bench.closed_loop) on the bundled model at
    25%: each request's tokens, each one's steps between its sending and its prefill, the prefill steps, the
    expert bytes moved, and each request's longest decode wait."""
    llm = LLM(str(default_model_dir()), device="cpu", dtype="float32", max_model_len=64, max_num_seqs=concurrency,
              max_batch_size=batch, expert_budget="25%", **engine)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    run = closed_loop(llm.engine, [Request(p, params) for p in prompts], concurrency)
    outputs = [run.outputs[str(i)] for i in range(len(prompts))]
    decode_waits = [o.metrics.max_decode_wait_steps for o in outputs]
    if engine["scheduling"] == "route-aware":
        assert max(decode_waits) <= llm.engine.scheduler.policy.wait_bound(concurrency, batch), decode_waits
    return ([o.outputs[0].token_ids for o in outputs], run.admission_waits, run.prefill_steps, run.bytes_moved,
            decode_waits)


def test_route_aware_prefills_new_requests_together_and_moves_fewer_bytes_served():
    """48 prompts, 16 in flight, 4 a decode step, 16 tokens each, 25%. Route-aware decodes sequences unevenly, so
    they finish one by one; admitting each newcomer at once took 30 prefills (fcfs: 9), and moved 1.06x fcfs's
    bytes. Held back (at most 7 steps here, a running sequence's bound), newcomers are prefilled together
    (measured: 13 prefills, 0.83 of the bytes, 0.88 of fcfs's), and every request's tokens stay its own."""
    prompts = heldout_prompts(LLM(str(default_model_dir()), device="cpu").tokenizer, 48, lengths=(20, 30, 40, 25, 35))
    base, _, _, fcfs, fcfs_waits = served(prompts, 16, 4, 16, scheduling="fcfs")
    at_once_tokens, _, at_once_prefills, at_once, _ = served(prompts, 16, 4, 16, scheduling="route-aware",
                                                             max_admit_wait=0)
    tokens, waits, prefills, held, decode_waits = served(prompts, 16, 4, 16, scheduling="route-aware")
    assert tokens == base and at_once_tokens == base
    assert max(waits) <= 7, waits
    assert prefills <= 0.5 * at_once_prefills, (prefills, at_once_prefills)
    assert held <= 0.9 * at_once, (held, at_once, held / at_once)
    assert held < fcfs, (held, fcfs, held / fcfs)
    # each request's decode waits, in its metrics: fcfs takes the 16 in turn, 4 a step (3 decode steps out
    # between tokens); route-aware's stay within its bound (checked in served) and go past that share
    assert max(fcfs_waits) <= 3 and max(decode_waits) > 3, (fcfs_waits, decode_waits)


def test_the_wait_bound_is_set_from_llm_the_cli_and_the_bench(capsys, caplog):
    from moeflow.bench import axes
    from moeflow.cli import build_parser
    from moeflow.commands.common import engine_kwargs
    from moeflow.errors import ConfigError

    llm = LLM(str(default_model_dir()), device="cpu", dtype="float32", max_model_len=32, max_num_seqs=2,
              scheduling="route-aware", max_decode_wait=7)
    assert llm.engine.scheduler.policy.max_decode_wait == 7
    for bad in (-1, 1.5):
        with pytest.raises(ConfigError, match="max_decode_wait must be an integer >= 0"):
            LLM(str(default_model_dir()), device="cpu", max_model_len=32, scheduling="route-aware",
                max_decode_wait=bad)
    args = build_parser().parse_args(["serve", "--scheduling", "route-aware", "--max-decode-wait", "2"])
    assert engine_kwargs(args)["max_decode_wait"] == 2
    assert engine_kwargs(build_parser().parse_args(["generate", "--prompt", "hi"]))["max_decode_wait"] == 4
    spec = llm.engine.spec
    assert axes.load_scheduling_arg("route-aware:wait=9", spec).max_decode_wait == 9
    assert axes.load_scheduling_arg("route-aware", spec).max_decode_wait == 4
    assert axes.load_scheduling_arg("route-aware:admit=3", spec).max_admit_wait == 3
    assert axes.load_scheduling_arg("route-aware:wait=2", spec).max_admit_wait is None
    llm = LLM(str(default_model_dir()), device="cpu", dtype="float32", max_model_len=32, max_num_seqs=2,
              scheduling="route-aware", max_admit_wait=0)
    assert llm.engine.scheduler.policy.max_admit_wait == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="max_admit_wait must be an integer >= 0"):
            LLM(str(default_model_dir()), device="cpu", max_model_len=32, scheduling="route-aware",
                max_admit_wait=bad)
    args = build_parser().parse_args(["serve", "--scheduling", "route-aware", "--max-admit-wait", "6"])
    assert engine_kwargs(args)["max_admit_wait"] == 6
    assert engine_kwargs(build_parser().parse_args(["generate", "--prompt", "hi"]))["max_admit_wait"] is None
    with caplog.at_level(logging.WARNING, logger="moeflow.engine"):
        LLM(str(default_model_dir()), device="cpu", dtype="float32", max_model_len=32, max_num_seqs=2,
            max_admit_wait=3)
    assert "max_admit_wait=3 has no effect with scheduling 'fcfs'" in caplog.text
    for bad in ("route-aware:w=9", "route-aware:wait=-1", "route-aware:admit=x", "fcfs:wait=1", "fcfs:admit=1"):
        with pytest.raises(ConfigError, match="route-aware"):
            axes.load_scheduling_arg(bad, spec)

"""How many bytes decode scheduling could save: fcfs, route-aware, and route-aware told each next route exactly.

    PYTHONPATH=. python3 tools/schedule_replay.py TRACE.npz [--model DIR] [--budget 25%] [--running 64]
        [--batch 16] [--prompt 64] [--tokens 64] [--waits 4] [--evictions lru,pending] [--windows]

Exact decoding gives a sequence the same tokens whatever the schedule, so the route of its j-th decode step is
fixed: here it is the route of token prompt+j of one of the trace's sequences (the trace's text stands in for what
the model generates). `--running` sequences decode `--tokens` steps each, at most `--batch` a step, through the
real ExpertCache (on-demand loading, LRU) and the real scheduling policies (engine/policies); the route-aware
policy learns its token table from the prompts' routes first, as it does from a prefill. The oracle is the same
policy whose every signature is the sequence's true next route (a predictor that is always right). Each line:
expert bytes moved per decode token, against fcfs's, and Belady's optimal cache of the same slots on the same
schedule (what the best eviction could add to that schedule). Moves no weights and runs no model.

`--evictions lru,pending` adds, beside LRU, eviction that keeps what the running sequences share: before each
step every expert's priority is the number of running sequences whose last route used it (LRU among equals),
the scheduler's own signatures turned into a cache order, under fcfs and under route-aware.

`--windows` adds grouping over more than one step (WindowPolicy, plain and told the true routes, at each
`--waits` bound): every ceil(N/M) steps the N running sequences are split into that many groups of at most M,
built greedily and then improved by swaps so that the groups' expected distinct experts sum as low as they go,
and the groups decode in turn, sequences at route-aware's wait bound first. Each sequence decodes about once a
window, as under fcfs; route-aware instead chooses each step alone, against what is resident.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from moeflow.assets import default_model_dir
from moeflow.engine.policies import FCFSPolicy, RouteAwarePolicy
from moeflow.engine.scheduler import SchedulerContext, StepPlan
from moeflow.experts.replay import belady, make_cache, pool_at, replay, step_of
from moeflow.routing.predictors.base import StepView
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.record import StepRoutes
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint


@dataclass
class _Seq:
    """What a scheduling policy reads of a running sequence."""

    request_id: str
    start: int  # the trace row of its first token
    done: int = 0  # decode steps taken
    last_step: int = -1
    last_token: int = 0
    last_routes: np.ndarray | None = None


def expected_union(log_miss: np.ndarray) -> np.ndarray:
    """[..., X] sums of log(1 - p) over a group's members -> [...] the group's expected distinct experts."""
    return (1.0 - np.exp(log_miss)).sum(-1)


def partition(sigs: np.ndarray, size: int, resident: np.ndarray | None, sweeps: int = 3) -> list[list[int]]:
    """Split the rows of sigs [N, X] (each row's chance of using each expert) into ceil(N/size) groups of at most
    `size`: the first built greedily against what is resident, each later one against nothing, every pick the
    row that adds fewest experts; then, `sweeps` times over the rows, a row swaps with the row of another group
    that lowers the two groups' summed expected distinct experts most."""
    n = len(sigs)
    left = np.ones(n, dtype=bool)
    groups = []
    for g in range(math.ceil(n / size)):
        free = resident.copy() if g == 0 and resident is not None else np.zeros(sigs.shape[1])
        members = []
        for _ in range(min(size, int(left.sum()))):
            cost = sigs @ (1.0 - free)
            cost[~left] = np.inf
            i = int(np.argmin(cost))
            members.append(i)
            left[i] = False
            free = np.maximum(free, sigs[i])
        groups.append(members)
    assign = np.empty(n, dtype=np.int64)
    for g, members in enumerate(groups):
        assign[members] = g
    log_miss = np.log(np.clip(1.0 - sigs, 1e-6, 1.0))
    sums = np.stack([log_miss[assign == g].sum(0) for g in range(len(groups))])
    for _ in range(sweeps):
        swapped = 0
        for a in range(n):
            ga = assign[a]
            now = expected_union(sums)
            without_a = sums[ga] - log_miss[a]
            best, pair = -1e-9, None
            for h in range(len(groups)):
                if h == ga:
                    continue
                rows = np.flatnonzero(assign == h)
                change = (expected_union(without_a[None] + log_miss[rows])
                          + expected_union(sums[h][None] - log_miss[rows] + log_miss[a][None]) - now[ga] - now[h])
                j = int(np.argmin(change))
                if change[j] < best:
                    best, pair = change[j], (h, rows[j])
            if pair is not None:
                h, b = pair
                sums[ga] += log_miss[b] - log_miss[a]
                sums[h] += log_miss[a] - log_miss[b]
                assign[a], assign[b] = h, ga
                swapped += 1
        if not swapped:
            break
    return [np.flatnonzero(assign == g).tolist() for g in range(len(groups))]


class WindowPolicy(RouteAwarePolicy):
    """Grouping over more than one step (the module docstring), on route-aware's signatures, admission and wait
    bound: a window's groups decode in turn, but a sequence at its bound decodes now whatever its group, and
    newcomers start a new window over themselves and the sequences the current one has not decoded yet."""

    name = "window"

    def __init__(self, max_decode_wait: int = 4, sweeps: int = 2):
        super().__init__(max_decode_wait=max_decode_wait)
        self.sweeps = sweeps
        self._groups: list[list[str]] = []  # the window's groups still to decode, by request id

    def plan(self, waiting, running, ctx: SchedulerContext) -> StepPlan:
        plan = self.unchosen(waiting, running, ctx)
        if plan is not None:
            return plan
        M = ctx.max_batch_size
        ids = {s.request_id for s in running}
        grouped = {r for g in self._groups for r in g}
        left, fresh = grouped & ids, ids - grouped
        if not left or fresh:
            pending = [s for s in running if s.request_id in left or s.request_id in fresh]
            resident = ctx.residency.reshape(-1).astype(np.float64) if ctx.residency is not None else None
            groups = partition(self._signatures(pending, ctx), M, resident, self.sweeps)
            self._groups = [[pending[i].request_id for i in g] for g in groups]
        else:
            self._groups = [g for g in ([r for r in g if r in ids] for g in self._groups) if g]
        bound = self.wait_bound(len(running), M)
        due = [s.request_id for s in running if ctx.step - s.last_step - 1 >= bound]
        take = set(list(dict.fromkeys(due + self._groups[0]))[:M])
        self._groups = [g for g in ([r for r in g if r not in take] for g in self._groups) if g]
        return StepPlan(decode=[s for s in running if s.request_id in take])


def simulate(data: RouteData, starts: list[int], policy, oracle: bool, spec, slots: int, expert_bytes: int,
             batch: int, prompt: int, tokens: int, eviction: str = "lru") -> tuple[float, float]:
    """(bytes per decode token, Belady's bytes per decode token on the same schedule). eviction "pending": the
    cache keeps longest the experts most running sequences used at their last step."""
    L, E = data.num_layers, data.num_experts
    seqs = [_Seq(f"s{i}", s) for i, s in enumerate(starts)]
    # the prompts, as one prefill step: the policy learns their routes
    rows = [np.arange(s, s + prompt) for s in starts]
    prefill = step_of(StepView(0, True, tuple(s.request_id for s in seqs),
                               tuple(tuple(data.token_ids[r].tolist()) for r in rows), (prompt,) * len(seqs)),
                      data.routes[np.concatenate(rows)], E)
    policy.update(prefill.view, StepRoutes(prefill.routes.ids, None, prefill.routes.used,
                                           [slice(i * prompt, (i + 1) * prompt) for i in range(len(seqs))]))
    for s in seqs:
        s.last_token = int(data.token_ids[s.start + prompt])
        s.last_routes = data.routes[s.start + prompt - 1]
    cache = make_cache(spec, slots, expert_bytes)
    steps, step = [], 1
    while True:
        running = [s for s in seqs if s.done < tokens]
        if not running:
            break
        predictions = {}
        if oracle:
            for s in running:
                hot = np.zeros((L, E))
                np.put_along_axis(hot, data.routes[s.start + prompt + s.done].astype(np.int64), 1.0, axis=1)
                predictions[s.request_id] = hot
        ctx = SchedulerContext(step, 0, 0, batch, cache.residency(), {}, predictions, None)
        chosen = policy.plan([], running, ctx).decode
        at = [s.start + prompt + s.done for s in chosen]
        view = StepView(step, False, tuple(s.request_id for s in chosen),
                        tuple((int(data.token_ids[r]),) for r in at), tuple(prompt + s.done + 1 for s in chosen))
        st = step_of(view, data.routes[at], E)
        if eviction == "pending":
            shared = np.zeros((L, E))
            for s in running:
                np.add.at(shared, (np.arange(L)[:, None], s.last_routes.astype(np.int64)), 1.0)
            cache.order.prioritize(shared)
        replay([st], cache)
        policy.update(view, st.routes)
        steps.append(st)
        for s, r in zip(chosen, at):
            s.done, s.last_step, s.last_routes = s.done + 1, step, data.routes[r]
            s.last_token = int(data.token_ids[r + 1])
        step += 1
    n = len(seqs) * tokens
    opt = belady(steps, slots, expert_bytes, spec.moe_layers)
    return cache.stats.total().bytes_moved / n, opt.stats.bytes_moved / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--budget", default="25%")
    p.add_argument("--running", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--waits", default="4", help="route-aware's max_decode_wait values to try (comma list)")
    p.add_argument("--evictions", default="lru", help="lru, and pending (the module docstring), comma list")
    p.add_argument("--windows", action="store_true", help="grouping over a window of steps too (the module docstring)")
    args = p.parse_args()
    ck = Checkpoint(args.model)
    spec = ck.spec
    slots, expert_bytes = pool_at(ck, args.budget)
    data = RouteData.from_traces([Trace.load(args.trace)])
    need = args.prompt + args.tokens + 1
    long_enough = [s.start for s in data.sequence_slices() if s.stop - s.start >= need]
    if len(long_enough) < args.running:
        raise SystemExit(f"the trace has {len(long_enough)} sequences of {need}+ tokens, fewer than --running")
    # spread over the trace, which takes its domains in turn
    starts = [long_enough[i] for i in np.linspace(0, len(long_enough) - 1, args.running).astype(int)]
    run = lambda policy, oracle=False: simulate(data, starts, policy, oracle, spec, slots, expert_bytes, args.batch,
                                                args.prompt, args.tokens)
    base, base_opt = run(FCFSPolicy())
    print(f"{args.running} sequences, {args.batch} a step, {args.tokens} tokens each, {args.budget} "
          f"({slots} slots); bytes per decode token / fcfs's, and Belady's on the same schedule / fcfs's LRU")
    print(f"fcfs: 1.000, Belady {base_opt / base:.3f}")
    for wait in (int(w) for w in args.waits.split(",")):
        for oracle in (False, True):
            moved, opt = run(RouteAwarePolicy(max_decode_wait=wait), oracle)
            name = f"route-aware{' oracle' if oracle else ''} wait {wait}"
            print(f"{name}: {moved / base:.3f}, Belady {opt / base:.3f}", flush=True)
    if args.windows:
        for wait in (int(w) for w in args.waits.split(",")):
            for oracle in (False, True):
                moved, opt = run(WindowPolicy(max_decode_wait=wait), oracle)
                print(f"window{' oracle' if oracle else ''} wait {wait}: {moved / base:.3f}, Belady {opt / base:.3f}",
                      flush=True)
    if "pending" in args.evictions.split(","):
        for name, policy in (("fcfs", FCFSPolicy()), ("route-aware wait 4", RouteAwarePolicy(max_decode_wait=4))):
            moved, opt = simulate(data, starts, policy, False, spec, slots, expert_bytes, args.batch, args.prompt,
                                  args.tokens, "pending")
            print(f"{name}, pending eviction: {moved / base:.3f}, Belady {opt / base:.3f}", flush=True)


if __name__ == "__main__":
    main()

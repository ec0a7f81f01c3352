"""Scoring routing predictors on a trace: recall of each token's experts, batch-union recall, and a replay of the
trace through the real expert cache (moeflow/experts/replay.py) for LRU, the predictive cache and Belady.

Shapes: N tokens scored, L MoE layers, E experts per layer, K top-k, B sequences per decode step.

Definitions (every predictor, learned or baseline, gives per-token probabilities [N, L, E]):
- recall: for each token and layer, |predicted top-K & actual top-K| / K; `recall` is the mean over tokens and
  layers, `recall_per_layer` the mean over tokens.
- recall_refined: the same with layer l scored after layers < l of the same token have routed (what offloaded
  decode's `refine` gives the cache for every layer after the first); a predictor that cannot use them scores the
  same as unrefined.
- recall_at_2k: |predicted top-2K & actual top-K| / K.
- union_recall[B]: decode-like steps of B sequences side by side (each lane decodes one sequence a token per step
  and takes the next sequence when its own ends, as in the replay); per step and layer, with U the union of the
  step's actual experts and u_e = 1 - prod_b (1 - p_b,e) the predicted chance that some sequence picks e,
  |top-|U| by u & U| / |U|, averaged over steps and layers. At B = 1 it equals recall.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeflow.routing.predictors.baselines import fit_baselines
from moeflow.routing.predictors.net import PredictorFiles, check_model, normalized_embedding
from moeflow.routing.predictors.route_data import RouteData
from moeflow.experts.replay import lanes

POLICIES = ("lru", "predictive", "belady")
ABLATIONS = ("no-quotas", "no-protect", "no-prefetch", "no-correct", "no-adapt")


@dataclass
class Scorer:
    name: str
    scores: Callable[[np.ndarray], np.ndarray]  # rows -> [n, L, E]
    refined: Callable[[np.ndarray], np.ndarray | None]


def learned_scorer(files: PredictorFiles, checkpoint, data: RouteData, device: str | torch.device = "cpu",
                   chunk: int = 8192) -> Scorer:
    """The network's probabilities for trace rows, from the features the runtime predictor would hold (no online
    adaptation: that needs steps in order, which the replay runs)."""
    device = torch.device(device)
    net = files.net.to(device).eval().attach_lens(checkpoint)
    emb = checkpoint.tensor("model.embed_tokens.weight").to(device)
    hist = data.history(net.cfg.hist_decay)

    @torch.inference_mode()
    def run(rows: np.ndarray, refined: bool) -> np.ndarray:
        out = []
        for a in range(0, len(rows), chunk):
            r = rows[a : a + chunk]
            t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)
            z = net(normalized_embedding(emb, t(data.token_ids[r])), normalized_embedding(emb, t(data.prev_ids[r])),
                    t(data.last_multi_hot(r).reshape(len(r), -1)), t(hist[r]).float())[:, 0]
            if refined:
                z = net.refined(z, t(data.multi_hot(r)))
            out.append(torch.sigmoid(z).float().cpu().numpy())
        return np.concatenate(out)

    return Scorer("learned", lambda rows: run(rows, False), lambda rows: run(rows, True))


def _topk_hits(p: np.ndarray, actual: np.ndarray, n: int) -> np.ndarray:
    """[..., L] number of the n best-scored experts that were picked."""
    top = np.argpartition(-p, n - 1, axis=-1)[..., :n]
    return np.take_along_axis(actual, top, axis=-1).sum(-1)


def union_recall(p: np.ndarray, actual: np.ndarray, steps: list[np.ndarray], chunk: int = 4096) -> float:
    """Mean over steps and layers of |top-|U| by u & U| / |U| (module docstring); p, actual [n, L, E] indexed by
    positions in `steps` (each an array of row positions, one per sequence of the step)."""
    B = max(len(s) for s in steps)
    idx = np.full((len(steps), B), -1, dtype=np.int64)
    for i, s in enumerate(steps):
        idx[i, : len(s)] = s
    total, count = 0.0, 0
    for a in range(0, len(idx), chunk):
        ix = idx[a : a + chunk]
        valid = (ix >= 0)[..., None, None]
        pp = np.where(valid, p[np.maximum(ix, 0)], 0.0)
        aa = np.where(valid, actual[np.maximum(ix, 0)], 0.0) > 0
        u = 1.0 - np.prod(1.0 - np.clip(pp, 0.0, 1.0), axis=1)  # [S, L, E]
        U = aa.any(axis=1)
        n = U.sum(-1)  # [S, L]
        rank = np.argsort(np.argsort(-u, axis=-1, kind="stable"), axis=-1)
        hits = (U & (rank < n[..., None])).sum(-1)
        ok = n > 0
        total += float((hits[ok] / n[ok]).sum())
        count += int(ok.sum())
    return total / max(count, 1)


def score(scorer: Scorer, data: RouteData, batch_sizes: Sequence[int]) -> dict:
    """Every figure of the module docstring for one predictor on all of `data`'s rows."""
    rows = np.arange(data.num_tokens)
    K = data.top_k
    actual = data.multi_hot(rows)
    p = scorer.scores(rows)
    pr = scorer.refined(rows)
    per_layer = _topk_hits(p, actual, K).mean(0) / K  # [L]
    refined = per_layer if pr is None else _topk_hits(pr, actual, K).mean(0) / K
    at_2k = _topk_hits(p, actual, min(2 * K, data.num_experts)).mean(0) / K
    tok = _topk_hits(p, actual, K).mean(1) / K  # [N]
    by_domain = {d: float(tok[data.domains == i].mean()) for i, d in enumerate(data.domain_names)
                 if (data.domains == i).any()}
    out = {"recall": float(per_layer.mean()), "recall_refined": float(refined.mean()),
           "recall_at_2k": float(at_2k.mean()), "recall_per_layer": per_layer.tolist(),
           "recall_refined_per_layer": refined.tolist(), "recall_per_domain": by_domain,
           "union_recall": {}, "union_recall_refined": {}}
    slices = data.sequence_slices()
    for B in batch_sizes:
        steps = lanes(slices, B)
        out["union_recall"][str(B)] = union_recall(p, actual, steps)
        out["union_recall_refined"][str(B)] = union_recall(p if pr is None else pr, actual, steps)
    return out


def score_baselines(fit: RouteData, data: RouteData, batch_sizes: Sequence[int]) -> dict:
    out = {}
    for name, b in fit_baselines(fit).items():
        out[name] = score(Scorer(name, lambda rows, b=b: b.scores(data, rows),
                                 lambda rows, b=b: b.refined(data, rows)), data, batch_sizes)
    return out


def best_baseline(baselines: dict, key: str = "recall") -> tuple[str, float]:
    name = max(baselines, key=lambda n: baselines[n][key])
    return name, baselines[name][key]


# -- the cache replay --------------------------------------------------------------------------------------


def planner_parts(policy: str) -> tuple[dict, bool]:
    """ExpertFlowPlanner switches and the predictor's adapt switch for a policy name (predictive, gate-ahead: the
    same planner hearing the trace's gate-ahead guesses, or an ablation)."""
    parts = {"quotas": True, "protect": True, "prefetch": True, "correct": True}
    adapt = True
    if policy.startswith("no-"):
        part = policy[3:]
        if part == "adapt":
            adapt = False
        else:
            parts[part] = False
    return parts, adapt


def replay_cache(pred_path, checkpoint, data: RouteData, budgets: Sequence[str], batch_sizes: Sequence[int],
                 policies: Sequence[str] = POLICIES, max_tokens: int | None = None, device: str = "cpu",
                 progress: bool = False) -> list[dict]:
    """Hit rate and bytes per token of each policy, budget and batch size, on `data`'s sequences (the first
    `max_tokens` tokens' worth)."""
    from moeflow.experts.predictive import ExpertFlowPlanner
    from moeflow.experts.replay import belady, decode_steps, make_cache, pool_at, replay
    from moeflow.routing.predictors.learned import load_predictor

    spec = checkpoint.spec
    E = spec.num_experts
    slices = data.first_sequences(max_tokens)
    rows: list[dict] = []
    for budget in budgets:
        slots, expert_bytes = pool_at(checkpoint, budget)
        for B in batch_sizes:
            steps = decode_steps(data.token_ids, data.routes, slices, B, E, data.ahead)
            results = {}
            for policy in policies:
                if policy == "belady":
                    r = belady(steps, slots, expert_bytes, spec.moe_layers)
                elif policy == "lru":
                    r = replay(steps, make_cache(spec, slots, expert_bytes))
                else:
                    parts, adapt = planner_parts(policy)
                    predictor = load_predictor(pred_path, checkpoint, device, adapt=adapt)
                    r = replay(steps, make_cache(spec, slots, expert_bytes), predictor, ExpertFlowPlanner(**parts),
                               gate_ahead=policy == "gate-ahead")
                results[policy] = r
                if progress:
                    print(f"  {budget} batch {B} {policy}: hit {r.hit_rate:.3f}, "
                          f"{r.bytes_per_token / expert_bytes:.2f} experts/token", flush=True)
            opt = results["belady"].bytes_per_token if "belady" in results else None
            for policy, r in results.items():
                s = r.stats
                rows.append({"budget": budget, "batch": B, "policy": policy, "slots": slots,
                             "hit_rate": r.hit_rate, "bytes_per_token": r.bytes_per_token,
                             "vs_belady": r.bytes_per_token / opt if opt else None, "tokens": r.tokens,
                             "misses": s.misses, "prefetches": s.prefetches, "prefetch_hits": s.prefetch_hits,
                             "wasted_prefetches": s.wasted_prefetches})
    return rows


def evaluate(pred_path, checkpoint, traces: Sequence, fit_traces: Sequence | None, budgets: Sequence[str],
             batch_sizes: Sequence[int], policies: Sequence[str] = POLICIES, replay_tokens: int | None = 20000,
             device: str = "cpu", progress: bool = False) -> dict:
    """`moeflow predictor eval`'s report: {recall, baselines, cache, ...}. Baselines are fitted on `fit_traces`
    (the predictor's own training traces, less its held-out domain); without them, on the first half of the
    scored trace's sequences, and every figure is then taken on the second half."""
    files = PredictorFiles.load(pred_path)
    check_model(files, checkpoint, pred_path)
    data = RouteData.from_traces(traces)
    note = None
    if fit_traces:
        fit = RouteData.from_traces(fit_traces)
        held = files.training.get("holdout_domain")
        if held in fit.domain_names:
            fit = fit.select(np.flatnonzero(fit.domains != fit.domain_names.index(held)))
    else:
        slices = data.sequence_slices()
        half = len(slices) // 2
        cut = slices[half].start if half < len(slices) else data.num_tokens
        fit, data = data.select(np.arange(cut)), data.select(np.arange(cut, data.num_tokens))
        note = ("no training traces given: baselines fitted on the first half of the trace's sequences, all scored "
                "on the second")
    learned = score(learned_scorer(files, checkpoint, data, device), data, batch_sizes)
    baselines = score_baselines(fit, data, batch_sizes)
    cache = replay_cache(pred_path, checkpoint, data, budgets, batch_sizes, policies, replay_tokens, device, progress)
    name, value = best_baseline(baselines)
    out = {"recall": learned, "baselines": baselines, "cache": cache,
           "best_baseline": {"name": name, "recall": value},
           "tokens": data.num_tokens, "predictor": str(pred_path),
           "domains": [d for i, d in enumerate(data.domain_names) if (data.domains == i).any()],
           "trained_on": {"domains": files.training.get("domains"),
                          "holdout_domain": files.training.get("holdout_domain")}}
    if note:
        out["note"] = note
    return out

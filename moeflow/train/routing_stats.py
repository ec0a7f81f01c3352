"""How a model routes: statistics that say whether routing was learned, from the router's top-k expert ids.

Shapes: N tokens, W windows, T tokens per window, L MoE layers, K top-k, E experts, D domains.
Routes are integer arrays [N, L, K] (or [W, T, L, K] where token order matters), column 0 the top-1 expert.

- load entropy: entropy (bits) of the share of top-k assignments each expert gets in a layer; log2(E) is
  perfect balance.
- layer-to-layer predictability, estimated on one split (validation) and measured on another (test):
    top-1 successor: the most frequent top-1 expert at layer l+1 given the top-1 expert at layer l;
    set predictor: scores layer l+1's experts by sum over e in S_l of P(e' in S_{l+1} | e in S_l) and takes the
    top K; reported as recall |prediction & S_{l+1}| / K.
  Each beside what ignoring layer l gives (always the most frequent experts of layer l+1) and uniform chance.
- consecutive-token overlap: mean |S_t & S_{t+1}| / K within windows, beside uniform chance K/E and the overlap
  two independent tokens would have given the layer's expert frequencies (sum_e q_e^2 / K, q_e = P(e in S)).
- domain divergence: Jensen-Shannon divergence (base 2, in [0, 1]) between each domain's expert-usage
  distribution and the usage of all domains pooled.
"""

from __future__ import annotations

import numpy as np


def multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., K] expert ids -> [..., E] float32 indicator of the set."""
    out = np.zeros(ids.shape[:-1] + (num_experts,), dtype=np.float32)
    np.put_along_axis(out, ids.astype(np.int64), 1.0, axis=-1)
    return out


def expert_counts(routes: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L, K] -> [L, E] top-k assignments per expert."""
    flat = routes.reshape(-1, routes.shape[-2], routes.shape[-1])
    return np.stack([np.bincount(flat[:, l].ravel().astype(np.int64), minlength=num_experts)
                     for l in range(flat.shape[1])]).astype(np.float64)


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits along the last axis of (possibly unnormalised) non-negative weights."""
    p = p / p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits along the last axis; 0 for identical distributions, at most 1."""
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = 0.5 * (p + q)
    return np.maximum(0.0, entropy_bits(m) - 0.5 * (entropy_bits(p) + entropy_bits(q)))


def successor_top1(fit: np.ndarray, test: np.ndarray, num_experts: int) -> list[dict[str, float]]:
    """Per layer pair (l, l+1): accuracy of the most-frequent-successor predictor of the top-1 expert, fitted on
    `fit` [N, L, K] and measured on `test`, beside always predicting layer l+1's most frequent top-1 expert."""
    out = []
    for l in range(fit.shape[1] - 1):
        table = np.zeros((num_experts, num_experts), dtype=np.int64)
        np.add.at(table, (fit[:, l, 0].astype(np.int64), fit[:, l + 1, 0].astype(np.int64)), 1)
        marginal = np.bincount(fit[:, l + 1, 0].astype(np.int64), minlength=num_experts)
        best = np.where(table.sum(1) > 0, table.argmax(1), marginal.argmax())
        pred = best[test[:, l, 0].astype(np.int64)]
        out.append({"layer": l, "accuracy": float((pred == test[:, l + 1, 0]).mean()),
                    "marginal": float((test[:, l + 1, 0] == marginal.argmax()).mean()),
                    "chance": 1.0 / num_experts})
    return out


def successor_sets(fit: np.ndarray, test: np.ndarray, num_experts: int) -> list[dict[str, float]]:
    """Per layer pair (l, l+1): top-K recall of the set predictor (see the module docstring), fitted on `fit`
    and measured on `test`, beside predicting layer l+1's K most frequent experts and uniform chance K/E."""
    k = fit.shape[2]
    out = []
    for l in range(fit.shape[1] - 1):
        src, dst = multi_hot(fit[:, l], num_experts), multi_hot(fit[:, l + 1], num_experts)
        joint = src.T @ dst  # [E, E] co-occurrence counts
        cond = joint / np.maximum(src.sum(0), 1.0)[:, None]  # P(e' in S_{l+1} | e in S_l)
        frequent = np.argsort(-dst.sum(0), kind="stable")[:k]
        t_src, t_dst = multi_hot(test[:, l], num_experts), multi_hot(test[:, l + 1], num_experts)
        scores = t_src @ cond
        pred = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        recall = np.take_along_axis(t_dst, pred, axis=1).sum(1).mean() / k
        out.append({"layer": l, "recall": float(recall), "marginal": float(t_dst[:, frequent].sum(1).mean() / k),
                    "chance": k / num_experts})
    return out


def consecutive_overlap(windows: list[np.ndarray], num_experts: int) -> list[dict[str, float]]:
    """Per layer: mean |S_t & S_{t+1}| / K over consecutive tokens of the same window ([W, T, L, K] arrays),
    beside uniform chance K/E and the independent-tokens overlap of the layer's expert frequencies."""
    num_layers, k = windows[0].shape[2], windows[0].shape[3]
    out = []
    for l in range(num_layers):
        shared, pairs = 0.0, 0
        q = np.zeros(num_experts)
        n = 0
        for w in windows:
            hot = multi_hot(w[:, :, l], num_experts)  # [W, T, E]
            shared += float((hot[:, 1:] * hot[:, :-1]).sum())
            pairs += hot.shape[0] * (hot.shape[1] - 1)
            q += hot.sum((0, 1))
            n += hot.shape[0] * hot.shape[1]
        q /= max(n, 1)
        out.append({"layer": l, "overlap": shared / max(pairs, 1) / k, "independent": float((q ** 2).sum() / k),
                    "chance": k / num_experts})
    return out


def routing_report(test: dict[str, np.ndarray], fit: dict[str, np.ndarray], num_experts: int) -> dict:
    """Every statistic of the module docstring. test, fit: domain -> [W, T, L, K] routes (test and validation
    split); predictors are fitted on `fit` pooled over domains and measured on `test` pooled over domains."""
    domains = sorted(test)
    first = test[domains[0]]
    num_layers, k = first.shape[2], first.shape[3]
    flat = {d: test[d].reshape(-1, num_layers, k) for d in domains}
    pooled_test = np.concatenate([flat[d] for d in domains])
    pooled_fit = np.concatenate([fit[d].reshape(-1, num_layers, k) for d in sorted(fit)])

    counts = {d: expert_counts(flat[d], num_experts) for d in domains}  # D x [L, E]
    all_counts = sum(counts.values())
    usage = {d: (c / c.sum(1, keepdims=True)) for d, c in counts.items()}
    js = {d: js_divergence(counts[d], all_counts) for d in domains}  # D x [L]
    entropy = entropy_bits(all_counts)
    return {
        "num_layers": num_layers, "num_experts": num_experts, "top_k": k,
        "tokens": {d: int(flat[d].shape[0]) for d in domains},
        "load_entropy_bits": entropy.tolist(),
        "load_entropy_max_bits": float(np.log2(num_experts)),
        "domain_load_entropy_bits": {d: entropy_bits(counts[d]).tolist() for d in domains},
        "top1_successor": successor_top1(pooled_fit, pooled_test, num_experts),
        "set_successor": successor_sets(pooled_fit, pooled_test, num_experts),
        "consecutive_overlap": consecutive_overlap([test[d] for d in domains], num_experts),
        "domain_js_bits": {d: js[d].tolist() for d in domains},
        "domain_js_mean_bits": float(np.mean([js[d] for d in domains])),
        "expert_usage": {d: usage[d].tolist() for d in domains},  # [L][E] share of a domain's assignments
    }

"""Held-out perplexity per domain with transformers, and the unigram baseline it is read against.

Both score the same tokens. A domain's documents (each prefixed with `<|endoftext|>`, as in training) are
concatenated and cut into windows of T tokens; the model predicts tokens 1..T-1 of each window from the tokens
before them in that window, and the unigram model scores those same tokens. Perplexity is exp(mean NLL per token);
"all" pools every scored token of every domain.

Shapes: W windows, T window length, L MoE layers, K top-k, V vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeflow.errors import CheckpointError
from moeflow.train import data as train_data

DEFAULT_SEQ_LEN = 256


def eval_windows(tokenizer, sep_id: int, documents, seq_len: int, max_tokens: int | None = None
                 ) -> dict[str, np.ndarray]:
    """domain -> [W, T] windows from the start of each domain's stream, at most max_tokens tokens per domain."""
    max_windows = None if max_tokens is None else max(1, max_tokens // seq_len)
    return train_data.pack_streams(train_data.token_streams(tokenizer, documents, sep_id), seq_len, max_windows)


def _perplexities(nll: dict[str, float], count: dict[str, int]) -> dict[str, float]:
    out = {d: math.exp(nll[d] / count[d]) for d in nll if count[d]}
    out["all"] = math.exp(sum(nll.values()) / max(1, sum(count.values())))
    return out


# ---- unigram baseline -------------------------------------------------------------------------------------------

def unigram_counts(streams: dict[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """[V] token counts over every stream."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in streams.values():
        counts += np.bincount(s, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_log_probs(counts: np.ndarray) -> np.ndarray:
    """[V] add-one smoothed log-probabilities."""
    return np.log(counts + 1.0) - math.log(counts.sum() + len(counts))


def unigram_perplexity(log_probs: np.ndarray, windows: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-domain perplexity of the unigram model on the windows' targets (tokens 1..T-1 of each window)."""
    nll = {d: float(-log_probs[w[:, 1:]].sum()) for d, w in windows.items()}
    count = {d: int(w[:, 1:].size) for d, w in windows.items()}
    return _perplexities(nll, count)


def unigram_baseline(tokenizer_dir: str | Path, train_documents, test_documents, max_tokens: int | None = None,
                     seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, float]:
    """Perplexity per domain of the add-one unigram model estimated on train_documents, on test_documents."""
    tokenizer, sep = train_data.load_tokenizer(tokenizer_dir)
    counts = unigram_counts(train_data.token_streams(tokenizer, train_documents, sep), tokenizer.get_vocab_size())
    windows = eval_windows(tokenizer, sep, test_documents, seq_len, max_tokens)
    return unigram_perplexity(unigram_log_probs(counts), windows)


# ---- the model --------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Scores:
    """NLL sums per domain, and (when asked for) each window's routes: domain -> [W, T, L, K] expert ids."""
    nll: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    routes: dict[str, np.ndarray] = field(default_factory=dict)

    def perplexity(self) -> dict[str, float]:
        return _perplexities(self.nll, self.count)


def load_model(model_dir: str | Path, device: str | None = None):
    """(model, device): float32 on CPU, bfloat16 on CUDA, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from moeflow.train.trainer import resolve_device

    if not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json; is it a model directory?")
    device = resolve_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), device


def score(model, windows: dict[str, np.ndarray], device: str, batch_size: int = 8,
          routes: bool = False) -> Scores:
    """Next-token NLL per domain and, with routes=True, the router's top-k experts of every token and layer
    (softmax over the router logits, then top-k, as the Qwen3-MoE family routes)."""
    import torch
    import torch.nn.functional as F

    out = Scores()
    top_k = model.config.num_experts_per_tok
    id_dtype = np.uint8 if model.config.num_experts <= 256 else np.int16
    with torch.no_grad():
        for domain, w in windows.items():
            nll, picked = 0.0, []
            for start in range(0, len(w), batch_size):
                ids = torch.from_numpy(w[start:start + batch_size]).long().to(device)
                res = model(input_ids=ids, output_router_logits=routes)
                logits = res.logits.float()
                nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                       reduction="sum").item()
                if routes:
                    per_layer = [torch.topk(torch.softmax(r.float(), dim=-1), top_k, dim=-1).indices
                                 for r in res.router_logits]  # L x [B*T, K]
                    picked.append(torch.stack(per_layer, dim=1).view(ids.shape[0], ids.shape[1], len(per_layer),
                                                                    top_k).cpu().numpy().astype(id_dtype))
            out.nll[domain] = nll
            out.count[domain] = int(w[:, 1:].size)
            if routes:
                out.routes[domain] = np.concatenate(picked)
    return out


def trained_seq_len(model_dir: str | Path) -> int:
    """The window length the model was trained on (from its training log), else DEFAULT_SEQ_LEN."""
    from moeflow.train.trainer import LOG_NAME

    path = Path(model_dir) / LOG_NAME
    if path.is_file():
        return int(json.loads(path.read_text())["preset"]["seq_len"])
    return DEFAULT_SEQ_LEN


def perplexity(model_dir: str | Path, documents, max_tokens: int | None = None, seq_len: int | None = None,
               device: str | None = None, batch_size: int = 8) -> dict[str, float]:
    """Perplexity per domain (and "all") of the checkpoint in model_dir on documents, at most max_tokens tokens
    per domain, using the tokenizer saved beside the model."""
    tokenizer, sep = train_data.load_tokenizer(model_dir)
    seq_len = seq_len or trained_seq_len(model_dir)
    model, device = load_model(model_dir, device)
    windows = eval_windows(tokenizer, sep, documents, seq_len, max_tokens)
    return score(model, windows, device, batch_size).perplexity()

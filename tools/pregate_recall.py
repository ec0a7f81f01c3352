"""How well a layer's experts can be told from what the model computes before that layer's router: two cheap,
model-intrinsic predictors, scored by domain on real text (CPU or GPU, no training).

    PYTHONPATH=. python3 tools/pregate_recall.py [MODEL_DIR] --data DOCS.jsonl [--docs-per-domain 6]
        [--max-tokens 200] [--device cpu] [--json OUT.json]

- "next-layer gate": layer l+1's router applied to layer l's MoE input (its RMSNorm weight swapped for layer
  l+1's), known on the device as soon as layer l routes, one layer before layer l+1's own router;
- "gate on embedding": each layer's router applied to the token's RMS-normalised input embedding, known before
  the step (a prior the learned predictor could take as an input).

Recall as `moeflow predictor eval` defines it: |predicted top-k & actual top-k| / k, mean over tokens, per layer.
Each document's first --max-tokens tokens are routed in one prefill (teacher forcing: the routes are those of
decode). Neither predictor reads a domain's statistics, so a domain held out of the learned predictor's
training is no harder for them; the learned predictor's figures on the same split are in its README.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def recall(scores: torch.Tensor, actual: torch.Tensor) -> float:
    """Mean over rows of |top-k(scores) & actual| / k; scores [n, E], actual [n, k]."""
    k = actual.shape[1]
    top = scores.topk(k, dim=-1).indices
    return float((top[:, :, None] == actual[:, None, :]).any(-1).float().sum(-1).mean() / k)


def main() -> None:
    from moeflow import LLM, SamplingParams
    from moeflow.assets import default_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(default_model_dir()))
    p.add_argument("--data", required=True, help="a .jsonl of documents (doc_id, domain, text)")
    p.add_argument("--docs-per-domain", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    llm = LLM(args.model, device=args.device, dtype="float32", max_model_len=args.max_tokens + 2)
    model, spec = llm.engine.model, llm.engine.spec
    caught: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    inner = model.experts

    def spy(layer, x, ids, weights):
        caught[layer] = (x.detach().float(), ids.detach())
        return inner(layer, x, ids, weights)

    model.experts = spy
    layers = spec.moe_layers
    gate = {m: model.w[f"{model.moe_prefix[m]}.gate.weight"].float() for m in layers}
    post_norm = {m: model.w[f"model.layers.{m}.post_attention_layernorm.weight"].float() for m in layers}
    emb = model.w["model.embed_tokens.weight"].float()
    docs: dict[str, list[str]] = {}
    with open(args.data) as f:
        for line in f:
            d = json.loads(line)
            docs.setdefault(d["domain"], []).append(d["text"])
    out = {}
    for domain, texts in sorted(docs.items()):
        sums = {"next_layer_gate": np.zeros(len(layers)), "gate_on_embedding": np.zeros(len(layers))}
        n = 0
        for text in texts[: args.docs_per_domain]:
            ids = llm.tokenizer.encode(text)[: args.max_tokens]
            if len(ids) < 2:
                continue
            caught.clear()
            llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
            x = emb[torch.tensor(ids, device=emb.device)]
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
            for i, m in enumerate(layers):
                actual = caught[m][1]
                sums["gate_on_embedding"][i] += len(ids) * recall((x * post_norm[m]) @ gate[m].T, actual)
                if i:
                    r = caught[layers[i - 1]][0]
                    swapped = r / post_norm[layers[i - 1]] * post_norm[m]
                    sums["next_layer_gate"][i] += len(ids) * recall(swapped @ gate[m].T, actual)
            n += len(ids)
        out[domain] = {name: [round(float(v) / n, 3) for v in s] for name, s in sums.items()}
        out[domain]["tokens"] = n
        nl = out[domain]["next_layer_gate"][1:]
        print(f"{domain:12s} tokens {n:5d}  next-layer gate {np.mean(nl):.3f} (layers 1..: {nl})  "
              f"gate on embedding {np.mean(out[domain]['gate_on_embedding']):.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": args.data, "max_tokens": args.max_tokens, "domains": out}, f,
                      indent=1)


if __name__ == "__main__":
    main()

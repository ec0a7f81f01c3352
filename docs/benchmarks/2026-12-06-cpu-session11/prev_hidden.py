"""An experiment, not part of moeflow: does the routing-path predictor gain from the previous token's hidden state?

The learned predictor reads, before a token routes, the token's and the previous token's embeddings, the previous
token's routes and the sequence's route history (moeflow/routing/predictors/learned.py). The previous token's
hidden state after decoder layer j is known then too (the step before computed it). This script swaps the
previous token's embedding for that hidden state (RMS-normalised, the same projection width) and trains the
predictor as `moeflow predictor train --holdout-domain python_docs --epochs 4 --max-minutes 3` would, on
moeflow-tiny's train-split trace; it prints the validation recall (five domains) and the held-out recall.

    PYTHONPATH=. python3 prev_hidden.py hidden TRACE.npz OUT.npy      # hidden states after layers 2, 4, 6, 8
    PYTHONPATH=. python3 prev_hidden.py train TRACE.npz OUT.npy VARIANT [WIDTH]   # VARIANT: base | h2 | h4 | ...

The hidden states come from Hugging Face transformers' own Qwen3-MoE on the same checkpoint (the script checks
that its top-k routes equal the trace's).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import torch

MODEL = "moeflow/assets/moeflow-tiny"
LAYERS = [2, 4, 6, 8]


def hidden(trace_path: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    from moeflow.routing.traces import Trace

    m = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    t = Trace.load(trace_path)
    states = np.zeros((len(LAYERS), t.num_tokens, m.config.hidden_size), dtype=np.float16)
    starts = np.flatnonzero(t.positions == 0)
    ends = np.append(starts[1:], t.num_tokens)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(starts, ends)):
            o = m(torch.from_numpy(t.token_ids[a:b].astype(np.int64))[None], output_hidden_states=True,
                  output_router_logits=True)
            for j, layer in enumerate(LAYERS):
                states[j, a:b] = o.hidden_states[layer][0].numpy().astype(np.float16)
            if i % 50 == 0:  # the same model: its routes are the trace's
                top = torch.stack([r.reshape(b - a, -1).topk(4, -1).indices.sort(-1).values for r in o.router_logits], 1)
                assert (top.numpy() == np.sort(t.topk_ids[a:b].astype(np.int64), -1)).all()
    np.save(out, states)


def train(trace_path: str, states_path: str, variant: str, width: int) -> None:
    import moeflow.routing.predictors.training as T
    from moeflow.routing.predictors.route_data import RouteData
    from moeflow.routing.traces import Trace
    from moeflow.weights.checkpoint import Checkpoint

    torch.set_num_threads(2)
    if variant != "base":
        h = np.load(states_path, mmap_mode="r")[LAYERS.index(int(variant[1:]))].astype(np.float32)
        H = torch.from_numpy(h)
        H = H * torch.rsqrt(H.pow(2).mean(-1, keepdim=True) + 1e-6)
        from_traces = RouteData.from_traces.__func__

        def with_rows(cls, traces):  # prev_ids carries the previous token's row instead of its id
            d = from_traces(cls, traces)
            d.prev_ids = np.arange(d.num_tokens) - 1
            d.prev_ids[d.starts] = -1
            return d

        RouteData.from_traces = classmethod(with_rows)
        batch = T._DeviceData.batch

        def with_hidden(self, rows):
            p, saved = self.prev[rows], self.prev
            self.prev = torch.full_like(saved, -1)
            out = list(batch(self, rows))
            self.prev = saved
            out[1] = H[p.clamp(min=0)] * (p >= 0).float()[:, None]
            return tuple(out)

        T._DeviceData.batch = with_hidden
    size_net = T.size_net
    T.size_net = lambda *a, **k: dataclasses.replace(size_net(*a, **k), prev_width=width)
    options = T.TrainOptions(epochs=4, max_minutes=3, holdout_domain="python_docs")
    _, log = T.train(Checkpoint(MODEL), [Trace.load(trace_path)], options, progress=False)
    last = log["epochs"][-1]
    print(json.dumps({"variant": variant, "width": width, "val_recall": round(last["val"]["recall"], 4),
                      "heldout_recall": round(last["heldout"]["recall"], 4)}))


if __name__ == "__main__":
    if sys.argv[1] == "hidden":
        hidden(sys.argv[2], sys.argv[3])
    else:
        train(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 32)

"""Routing traces: the format round-trips, and `moeflow trace` records the routes the engine takes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moeflow import LLM, SamplingParams
from moeflow.routing.traces import Trace, TraceBuilder

DOCS = [
    {"doc_id": "wiki_en/1", "domain": "wiki_en", "source": "fixture", "text": "the quick brown fox jumps over the lazy dog"},
    {"doc_id": "wiki_fr/1", "domain": "wiki_fr", "source": "fixture", "text": "bonjour le monde, hola mundo"},
    {"doc_id": "wiki_en/2", "domain": "wiki_en", "source": "fixture", "text": "a mixture of experts routes every token"},
]


def test_trace_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    b = TraceBuilder((0, 2), {"model": "m"})
    for i, n in enumerate((5, 3)):
        b.add(f"d{i}", ["a", "b"][i], list(range(n)), rng.integers(0, 8, (n, 2, 2)), rng.random((n, 2, 2)),
              rng.standard_normal((n, 2, 8)))
    trace = b.build()
    trace.save(tmp_path / "t.npz")
    back = Trace.load(tmp_path / "t.npz")
    for name in ("token_ids", "positions", "seq_ids", "topk_ids", "topk_weights", "router_logits", "seq_domains"):
        assert np.array_equal(getattr(back, name), getattr(trace, name)), name
    assert back.meta == {"model": "m"} and back.num_experts == 8 and back.top_k == 2
    assert [(d, dom, s.stop - s.start) for d, dom, s in back.sequences()] == [("d0", "a", 5), ("d1", "b", 3)]
    assert back.expert_load().sum() == 8 * 2 * 2 and back.expert_load("b").sum() == 3 * 2 * 2
    assert back.ahead_ids is None, "a trace made without the gate ahead's guesses has none"
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a moeflow routing trace"):
        Trace.load(tmp_path / "bad.npz")
    guessed = TraceBuilder((0, 2), {"model": "m"})
    for i, n in enumerate((5, 3)):
        guessed.add(f"d{i}", "a", list(range(n)), rng.integers(0, 8, (n, 2, 2)), rng.random((n, 2, 2)),
                    rng.standard_normal((n, 2, 8)), ahead_ids=rng.integers(0, 8, (n, 2, 2)))
    guessed.build().save(tmp_path / "g.npz")
    assert Trace.load(tmp_path / "g.npz").ahead_ids.shape == (8, 2, 2)


def test_trace_command_records_the_engine_routes(checkpoint, tmp_path):
    model = checkpoint("olmoe", "fused")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out = tmp_path / "trace.npz"
    proc = subprocess.run([sys.executable, "-m", "moeflow.cli", "trace", str(model), "--data", str(corpus),
                           "--out", str(out), "--device", "cpu", "--batch-size", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    trace = Trace.load(out)
    assert [d for d, _, _ in trace.sequences()] == [d["doc_id"] for d in DOCS]
    assert sorted(trace.domain_names.tolist()) == ["wiki_en", "wiki_fr"]
    assert trace.topk_ids.shape[1:] == (4, 2) and trace.router_logits.shape[1:] == (4, 8)
    # the routes of one document, taken alone through the engine, are the trace's
    llm = LLM(str(model), device="cpu", max_model_len=128)
    seen = []
    llm.engine.add_route_listener(lambda step, routes: seen.append(routes.ids.copy()))
    doc_id, _, rows = list(trace.sequences())[1]
    llm.generate([trace.token_ids[rows].tolist()], SamplingParams(max_tokens=1, temperature=0))
    assert len(seen) == 1, "one prefill step"
    for li in range(len(trace.moe_layers)):
        assert np.array_equal(seen[0][li], trace.topk_ids[rows, li])
    # every trace row's experts are its router logits' top k (up to float16 rounding of the stored logits)
    logits = trace.router_logits.astype(np.float32)
    chosen = np.take_along_axis(logits, trace.topk_ids.astype(np.int64), axis=-1)
    others = logits.copy()
    np.put_along_axis(others, trace.topk_ids.astype(np.int64), -np.inf, axis=-1)
    assert np.all(chosen.min(-1) >= others.max(-1) - 1e-2)
    assert np.all(trace.topk_weights > 0) and np.all(np.diff(trace.topk_weights.astype(np.float32), axis=-1) <= 1e-3)
    # the gate ahead's guesses: none at the first MoE layer, an expert id at every other
    assert trace.ahead_ids.shape == trace.topk_ids.shape and (trace.ahead_ids[:, 0] == -1).all()
    assert 0 <= trace.ahead_ids[:, 1:].min() and trace.ahead_ids[:, 1:].max() < 8


def test_trace_is_the_same_with_outputs_built_a_step_later(checkpoint, tmp_path, monkeypatch):
    """trace pairs each step's routes with its requests through the route listener, not through the step's
    outputs, so outputs built a step later (overlap_output, the CUDA default) trace the same. With CUDA's defaults
    emulated, async scheduling too, the command still settles each step before launching the next: it reads
    each step's weights and logits from the device (RouteRecord.keep_full refuses a step read after the next
    was launched)."""
    import moeflow.engine.engine as engine_module
    from moeflow.cli import main as cli_main

    model = checkpoint("olmoe", "fused")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    traces = []
    for overlap in (False, True):
        # both switches' CUDA default (on), unless the command asks otherwise
        monkeypatch.setattr(engine_module, "resolve_overlap",
                            lambda asked, device, on=overlap: on if asked is None else asked)
        out = tmp_path / f"trace{int(overlap)}.npz"
        assert cli_main(["trace", str(model), "--data", str(corpus), "--out", str(out), "--device", "cpu",
                         "--batch-size", "2"]) == 0
        traces.append(Trace.load(out))
    a, b = traces
    assert a.num_tokens == b.num_tokens > 0
    for name in ("token_ids", "seq_ids", "topk_ids", "topk_weights", "router_logits", "ahead_ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name

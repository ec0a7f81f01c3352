"""`moeflow bench serve` against a live server on a tiny checkpoint: every figure is there and sane."""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime
from pathlib import Path

import pytest
from server.live_server import MODEL_NAME, LiveServer

from moeflow.bench.serve import sample_requests
from moeflow.bench.serve_stats import METRICS, STATS
from moeflow.cli import main as moeflow_main

HELDOUT = Path(__file__).parents[1] / "data" / "heldout"


@pytest.fixture(scope="module")
def live_server(checkpoint):
    server = LiveServer(checkpoint("qwen3_moe", "per_expert"), expert_budget="25%", max_model_len=256,
                        max_batch_size=8, device="cpu").start()
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_random_dataset_report(live_server, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = moeflow_main(["bench", "serve", "--base-url", live_server.base_url, "--num-prompts", "20",
                       "--request-rate", "40", "--max-concurrency", "4", "--input-len", "16", "--output-len", "8",
                       "--seed", "3", "--result-file", str(out), "--disable-tqdm"])
    assert rc == 0
    table = capsys.readouterr().out
    for heading in ("Serving Benchmark Result", "Request throughput (req/s):", "Output token throughput (tok/s):",
                    "Total token throughput (tok/s):", "Median TTFT (ms):", "P99 ITL (ms):", "Mean TPOT (ms):",
                    "P90 E2EL (ms):"):
        assert heading in table
    r = json.loads(out.read_text())
    assert r["completed"] == 20 and r["failed"] == 0
    assert r["total_input_tokens"] == 20 * 16 and r["total_output_tokens"] == 20 * 8
    assert r["server_model"]["id"] == MODEL_NAME and r["config"]["request_rate"] == 40.0
    datetime.fromisoformat(r["date"])
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s"):
        assert r[key] > 0
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx(3 * r["output_throughput"])
    for key in METRICS:
        s = r["metrics"][f"{key}_ms"]
        assert set(s) == set(STATS) and all(math.isfinite(v) and v > 0 for v in s.values())
        assert s["median"] <= s["p90"] <= s["p99"]
        assert r[f"p99_{key}_ms"] == s["p99"]
    m = r["metrics"]
    assert m["ttft_ms"]["mean"] < m["e2el_ms"]["mean"]
    assert m["e2el_ms"]["p99"] < r["duration_s"] * 1000
    assert len(r["requests"]) == 20
    for req in r["requests"]:
        assert req["success"] and req["output_tokens"] == 8 and len(req["itl_s"]) == 7
        assert req["ttft_s"] < req["latency_s"]
    cache = r["server_expert_cache"]  # a 25% budget misses
    assert cache["misses"] > 0 and 0 <= cache["hit_rate"] < 1 and cache["bytes_moved"] > 0
    steps = r["server_steps"]  # the run's own steps: 20 prefills at most, 7 decode steps a request at least
    assert 1 <= steps["prefill"]["steps"] <= 20 and steps["decode"]["steps"] >= 7
    assert steps["decode"]["seconds"] > 0 and 0 <= steps["decode"]["over_250ms"] <= steps["decode"]["steps"]
    assert "server decode steps:" in table
    pauses = r["server_gc"]  # the live server times its collections; a run allocates enough for some
    assert pauses["collections"] > 0 and pauses["seconds"] > 0 and 0 <= pauses["full"] <= pauses["collections"]
    assert "server garbage collections:" in table
    assert live_server.wait_idle()


@pytest.mark.timeout(60)
def test_jsonl_dataset(live_server, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "the quick brown fox", "output_len": 3}\n{"prompt": "hello world"}\n')
    out = tmp_path / "result.json"
    rc = moeflow_main(["bench", "serve", "--base-url", live_server.base_url, "--model", MODEL_NAME,
                       "--dataset", "jsonl", "--jsonl", str(data), "--num-prompts", "4", "--output-len", "5",
                       "--result-file", str(out), "--disable-tqdm"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [q["output_tokens"] for q in r["requests"]] == [3, 5, 3, 5]
    assert all(q["prompt_len"] > 0 for q in r["requests"])  # counted by the server


def test_random_prompts_are_seeded():
    args = argparse.Namespace(dataset="random", num_prompts=3, input_len=5, output_len=2, seed=11, temperature=None,
                              top_p=None)
    assert sample_requests(args, 300) == sample_requests(args, 300)
    reqs = sample_requests(args, 300)
    assert all(len(r.prompt) == 5 and all(0 <= t < 300 for t in r.prompt) for r in reqs)
    body = reqs[0].body("m")
    assert body["temperature"] == 0.0 and "seed" not in body and "top_p" not in body, "greedy unless asked"


def test_text_dataset_requests_sample_with_a_seed_each():
    from moeflow.assets import default_model_dir
    from moeflow.data.corpus import DOMAINS
    from moeflow.tokenizer import Tokenizer

    args = argparse.Namespace(dataset="text", num_prompts=12, output_len=64, seed=5, temperature=None, top_p=None,
                              data=HELDOUT, min_input_len=64, max_input_len=256)
    tokenize = Tokenizer(default_model_dir()).encode
    reqs = sample_requests(args, None, tokenize)
    assert reqs == sample_requests(args, None, tokenize)
    lengths = [len(r.prompt) for r in reqs]
    assert all(64 <= n <= 256 for n in lengths) and len(set(lengths)) == 12
    assert [r.prompt_len for r in reqs] == lengths
    assert len({r.seed for r in reqs}) == 12 and all(r.temperature == 0.8 and r.top_p == 0.95 for r in reqs)
    body = reqs[0].body("m")
    assert (body["temperature"], body["top_p"], body["seed"], body["ignore_eos"]) == (0.8, 0.95, reqs[0].seed, True)
    assert body["prompt"] == reqs[0].prompt and body["max_tokens"] == 64
    # the same prompts as `bench offline`'s text workload on the same documents and seed
    from moeflow.bench.workload import TextWorkload, load_documents

    offline = TextWorkload(load_documents(HELDOUT), tokenize, seed=5).requests(0, 12)
    assert [r.prompt for r in offline] == [r.prompt for r in reqs]
    assert [r.domain for r in offline[:6]] == list(DOMAINS)


@pytest.mark.timeout(60)
def test_text_dataset_against_the_server(live_server, tmp_path):
    out = tmp_path / "result.json"
    rc = moeflow_main(["bench", "serve", "--base-url", live_server.base_url, "--dataset", "text", "--data",
                       str(HELDOUT), "--num-prompts", "4", "--min-input-len", "8", "--max-input-len", "24",
                       "--output-len", "4", "--max-concurrency", "2", "--result-file", str(out), "--disable-tqdm"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["completed"] == 4 and r["config"]["dataset"] == "text" and r["config"]["temperature"] is None
    assert all(8 <= q["prompt_len"] <= 24 and q["output_tokens"] == 4 for q in r["requests"])
    assert live_server.wait_idle()


def test_unreachable_server_is_a_clear_error(capsys):
    rc = moeflow_main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--disable-tqdm"])
    assert rc == 2 and "cannot reach the server" in capsys.readouterr().err


def test_server_histograms_are_read_per_label_with_their_quick_share():
    from prometheus_client.parser import text_string_to_metric_families

    from moeflow.bench.serve import _histogram
    from moeflow.server.metrics import ServerMetrics

    m = ServerMetrics("m")
    for kind, seconds in (("prefill", 0.1), ("prefill", 0.3), ("decode", 0.01), ("decode", 0.02), ("decode", 0.5)):
        m.step_time.labels("m", kind).observe(seconds)
    m.gc_pause.labels("m", "2").observe(0.08)
    m.gc_pause.labels("m", "0").observe(0.001)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    steps = _histogram(families["moeflow:step_duration_seconds"], "kind", within=0.25)
    assert steps["prefill"] == pytest.approx((2, 0.4, 1)) and steps["decode"] == pytest.approx((3, 0.53, 2))
    pauses = _histogram(families["moeflow:gc_pause_seconds"], "generation", within=0.05)
    assert pauses["2"] == pytest.approx((1, 0.08, 0)) and pauses["0"] == pytest.approx((1, 0.001, 1))

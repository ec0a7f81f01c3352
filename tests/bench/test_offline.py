"""The offline benchmark's parts that need no GPU: runs on the CPU engine, floors, the report."""

from __future__ import annotations

import random

import pytest

from moeflow.bench.floors import belady_misses, expert_load_bandwidth, flatten, lru_misses
from moeflow.bench.report import derive, markdown, plots, speedups
from moeflow.bench.runs import RunResult, random_prompts, run_moeflow
from moeflow.config import EngineConfig
from moeflow.engine.engine import LLMEngine


def test_belady_on_a_known_sequence():
    a, b, c, d = (0, 1), (0, 2), (0, 3), (0, 4)
    uses = [a, b, c, a, b, d, a, b, c, d]
    # 3 slots: a b c miss; a b hit; d misses and evicts c (used last); a b hit; c misses, evicts a or b; d hits
    assert belady_misses(uses, 3) == 5
    assert belady_misses(uses, 4) == 4
    assert belady_misses(uses, 3, count_from=6) == 1


def test_belady_never_misses_more_than_lru():
    rng = random.Random(0)
    for _ in range(20):
        uses = [(rng.randrange(2), min(int(rng.expovariate(0.3)), 15)) for _ in range(400)]
        assert belady_misses(uses, 8) <= lru_misses(uses, {0: 4, 1: 4})


@pytest.fixture(scope="module")
def engine(checkpoint):
    cfg = EngineConfig(model=str(checkpoint("qwen3_moe", "fused")), device="cpu", dtype="float32", max_model_len=64,
                       max_num_seqs=4)
    return LLMEngine(cfg, skip_tokenizer_init=True)


def test_runs_floors_and_report(engine, tmp_path):
    prompts = random_prompts(4, 8, engine.spec.vocab_size, seed=0)
    resident = run_moeflow(engine, "100%", prompts, 6)
    offloaded = run_moeflow(engine, "25%", prompts, 6)
    assert resident.misses == 0 and resident.hits > 0 and resident.decode_tokens_per_s > 0
    assert offloaded.misses > 0 and offloaded.bytes_moved == offloaded.misses * engine.cache.expert_bytes
    assert resident.hits == offloaded.hits + offloaded.misses, "same prompts, same routes, whatever the budget"
    assert 0 < offloaded.extra["belady_decode_misses"] <= offloaded.misses
    baseline = RunResult("transformers", "all on GPU", 4, 8, 6, ttft_s=0.1, decode_s=1.0, peak_device_bytes=1)
    meta = {"title": "t", "date": "d", "machine": "m", "model": "x", "architecture": "a", "shape": {}, "command": "c",
            "dtype": "float32", "pinned_h2d_bytes_per_s": 1e9, "device_memory_bytes_per_s": 1e11,
            "expert_bytes": engine.cache.expert_bytes, "dense_bytes": engine.model.dense_bytes(),
            "embedding_bytes": 0, "expert_load_bytes_per_s": 0.9e9, "plain_copy_same_bytes_per_s": 1e9}
    rows = derive(meta, [resident, offloaded, baseline])
    floor = offloaded.bytes_moved / 1e9 + resident.decode_s
    assert rows[1]["floor_s"] == pytest.approx(floor)
    assert rows[1]["measured_over_belady_floor"] >= rows[1]["measured_over_floor"]
    assert 0 < rows[0]["fraction_of_weight_read_floor"]
    speed = speedups(rows, "25%")
    assert speed[0]["speedup"] == pytest.approx(resident.decode_tokens_per_s / baseline.decode_tokens_per_s)
    text = markdown(meta, rows, speed)
    assert "| moeflow | 25% | 4 |" in text and "speed-up" in text
    assert "90.0% of one plain pinned copy" in text
    assert sorted(plots(tmp_path, rows)) == ["hit_rate.png", "tokens_per_s.png"]
    assert (tmp_path / "tokens_per_s.png").stat().st_size > 1000
    assert engine._listeners == [], "the run's route listener is gone"
    assert flatten([(0, [1, 2]), (1, [3])]) == [(0, 1), (0, 2), (1, 3)]


def test_expert_load_bandwidth_drives_the_cache_demand_path(engine):
    assert expert_load_bandwidth(engine, reps=2) > 0
    cache = engine.cache
    assert cache.num_slots == engine.spec.num_experts and not cache.fully_resident
    assert cache.stats.total().misses == engine.spec.num_experts, "the last rep loaded one layer from empty"

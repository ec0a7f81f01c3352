"""The offline benchmark's parts that need no GPU: cells on the CPU engine, Belady, the axes, the report, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from moeflow.assets import default_model_dir
from moeflow.bench import axes
from moeflow.bench.floors import expert_load_bandwidth, flatten, lru_misses
from moeflow.experts.belady import belady_misses
from moeflow.bench.offline import measure_grid
from moeflow.bench.report import derive, markdown, plots, speedups
from moeflow.bench.runs import RunResult
from moeflow.bench.workload import DEGENERATE_NOTE, SyntheticWorkload
from moeflow.cli import main as moeflow_main
from moeflow.config import EngineConfig
from moeflow.engine.engine import LLMEngine
from moeflow.errors import ConfigError

HELDOUT = Path(__file__).parents[1] / "data" / "heldout"


def test_belady_on_a_known_sequence():
    a, b, c, d = (0, 1), (0, 2), (0, 3), (0, 4)
    uses = [a, b, c, a, b, d, a, b, c, d]
    # 3 slots: a b c miss; a b hit; d misses and evicts c (used last); a b hit; c misses, evicts a or b; d hits
    assert belady_misses(uses, 3) == 5
    assert belady_misses(uses, 4) == 4
    assert belady_misses(uses, 3, count_from=6) == 1
    assert flatten([(0, [1, 2]), (1, [3])]) == [(0, 1), (0, 2), (1, 3)]


def test_belady_from_what_a_cache_held_and_over_chosen_uses():
    a, b, c = (0, 1), (0, 2), (1, 1)
    uses = [a, b, c, a]
    assert belady_misses(uses, 2) == 3  # a, b, c miss (c evicts b, never used again); a hits
    assert belady_misses(uses, 2, initial=[a, c]) == 2  # b misses and evicts one of them, which misses later
    assert belady_misses(uses, 3, initial=[a, c]) == 1
    assert belady_misses(uses, 2, counted=[False, False, True, True]) == 1  # only c's miss is counted
    with pytest.raises(ValueError):
        belady_misses(uses, 1, initial=[a, c])


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


def _meta(engine, workload, configurations) -> dict:
    return {"title": "t", "date": "d", "machine": "m", "model": "x", "architecture": "a", "shape": {}, "command": "c",
            "dtype": "float32", "pinned_h2d_bytes_per_s": 1e9, "device_memory_bytes_per_s": 1e11,
            "expert_bytes": engine.cache.expert_bytes, "dense_bytes": engine.model.dense_bytes(),
            "embedding_bytes": 0, "expert_load_bytes_per_s": 0.9e9, "plain_copy_same_bytes_per_s": 1e9,
            "workload": workload.describe(), "workload_note": workload.note, "batches_per_cell": 2,
            "configurations": [c.as_dict() for c in configurations]}


def test_synthetic_cells_their_traffic_and_the_report(engine, tmp_path):
    workload = SyntheticWorkload(engine.spec.vocab_size, prompt_len=8, output_len=6, seed=0)
    configurations = axes.grid(["none"], ["exact"], ["fcfs"])
    lines = []
    results = measure_grid(engine, workload, ["25%", "100%"], [4], configurations, 2, log=lines.append)
    resident, offloaded = results
    assert resident.budget == "100%" and resident.fully_resident, "the resident run goes first"
    assert len(lines) == 2 and "distinct tokens/request" in lines[1]
    for r in results:
        assert r.batches == 2 and r.decode_tokens == 2 * 4 * 5 and r.decode_steps == 2 * 5
        assert len(r.distinct_tokens) == 8 and all(1 <= n <= 6 for n in r.distinct_tokens)
        assert r.graph_captures == 0 and r.ttft_s > 0 and r.tpot_s > 0 and r.decode_tokens_per_s > 0
        assert r.layer_steps == 2 * 5 * engine.spec.num_moe_layers
        assert 1 <= r.distinct_experts_per_layer_step <= engine.spec.num_experts
    assert resident.misses == 0 and resident.hits > 0 and resident.belady_misses is None
    assert offloaded.misses > 0 and offloaded.demand_bytes == offloaded.misses * engine.cache.expert_bytes
    assert offloaded.prefetch_bytes == 0 and offloaded.bytes_moved == offloaded.demand_bytes
    assert resident.hits == offloaded.hits + offloaded.misses, "same prompts, same routes, whatever the budget"
    assert offloaded.outputs == resident.outputs
    assert 0 < offloaded.belady_misses <= offloaded.misses
    assert offloaded.belady_bytes_per_token <= offloaded.bytes_per_token
    assert engine._listeners == [], "the runs' route listeners are gone"

    baseline = RunResult("transformers", "all on GPU", 4, 6, decode_tokens=20, decode_s=1.0, ttft_s=0.1,
                         peak_device_bytes=1, distinct_tokens=[2, 3, 2, 2])
    meta = _meta(engine, workload, configurations)
    rows = derive(meta, [*results, baseline])
    floor = offloaded.bytes_moved / 1e9 + resident.decode_s
    assert rows[1]["floor_s"] == pytest.approx(floor)
    assert rows[1]["measured_over_belady_floor"] >= rows[1]["measured_over_floor"]
    assert rows[1]["moved_over_belady"] >= 1 and 0 < rows[0]["fraction_of_weight_read_floor"]
    speed = speedups(rows, "25%")
    assert speed[0]["speedup"] == pytest.approx(resident.decode_tokens_per_s / baseline.decode_tokens_per_s)
    text = markdown(meta, rows, speed)
    assert DEGENERATE_NOTE in text and "synthetic: random token ids, 8-token prompts, greedy" in text
    for column in ("MB/tok", "Belady MB/tok", "moved/Belady", "stall share", "experts/layer-step",
                   "distinct tok/req (min)", "graphs"):
        assert f"| {column} |" in text
    assert "| moeflow | none/exact/fcfs | 25% | 4 |" in text and "speed-up" in text and "vs base" not in text
    assert "| transformers |  | all on GPU | 20.0 |" in text, "the summary: one column per batch size"
    assert "90.0% of one plain pinned copy" in text and "2.2 (2)" in text
    # the copy engine's busy share: the decode bytes at the loads' measured rate (0.9 GB/s here) over the decode time
    assert text.count("| copy busy |") == 1 and "schedule share" not in text, "no decode waited: fcfs, all running"
    cells = {}
    for line in text.splitlines():
        row = [c.strip() for c in line.strip()[1:-1].split("|")]
        if row[:2] == ["moeflow", "none/exact/fcfs"] and row[3] == "4":
            cells[row[2]] = row[-1]
    assert cells["25%"] == f"{100 * offloaded.bytes_moved / 0.9e9 / offloaded.decode_s:.1f}%"
    assert cells["100%"] == "", "nothing to copy with every expert resident"
    assert sorted(plots(tmp_path, rows)) == ["bytes_per_token.png", "hit_rate.png", "tokens_per_s.png"]
    assert (tmp_path / "bytes_per_token.png").stat().st_size > 1000


def test_text_workload_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "r"
    rc = moeflow_main(["bench", "offline", "--model", str(default_model_dir()), "--device", "cpu", "--dtype",
                       "float32", "--data", str(HELDOUT), "--min-prompt-len", "8", "--max-prompt-len", "16",
                       "--budgets", "100%,25%", "--batch-sizes", "2", "--batches-per-cell", "2", "--output-len", "3",
                       "--predictors", "none,previous", "--baselines", "transformers", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| transformers |"), "the short summary comes last"
    report = json.loads((out / "results.json").read_text())
    meta, runs = report["meta"], report["runs"]
    assert meta["workload"]["workload"] == "text" and meta["workload"]["prompt_len"] == [8, 16]
    assert meta["workload_note"] is None and meta["model_validation_loss"] is not None
    assert [c["predictor"] for c in meta["configurations"]] == ["none", "previous"]
    moeflow = {(r["config"], r["budget"]): r for r in runs if r["system"] == "moeflow"}
    assert sorted(moeflow) == [("none/exact/fcfs", "100%"), ("none/exact/fcfs", "25%"),
                               ("previous/exact/fcfs", "100%"), ("previous/exact/fcfs", "25%")]
    for r in moeflow.values():
        assert r["decode_tokens"] == 2 * 2 * 2 and r["graph_captures"] == 0
        assert r["distinct_tokens_mean"] > 1 and len(r["distinct_tokens"]) == 4
        assert r["configuration"]["routing"] == "exact"
    for conf in ("none/exact/fcfs", "previous/exact/fcfs"):
        low, full = moeflow[conf, "25%"], moeflow[conf, "100%"]
        assert 0 < low["belady_bytes_per_token"] <= low["bytes_per_token"] and low["moved_over_belady"] >= 1
        assert full["hits"] == low["hits"] + low["misses"], "sampled with the same seeds: the same routes"
    for r in moeflow.values():  # two batches a cell: each one's own rate, and the pooled one between them
        per = r["batch_tokens_per_s"]
        assert len(per) == 2 and min(per) <= r["decode_tokens_per_s"] <= max(per)
    prev = moeflow["previous/exact/fcfs", "25%"]
    assert prev["vs_base_tokens_per_s"] > 0 and prev["vs_base_same_tokens"] == 1.0, "a predictor changes no token"
    base = moeflow["none/exact/fcfs", "25%"]
    assert prev["vs_base_tokens_per_s_batches"] == pytest.approx(
        [x / y for x, y in zip(prev["batch_tokens_per_s"], base["batch_tokens_per_s"])])
    hf = next(r for r in runs if r["system"] == "transformers")
    assert hf["prompt_tokens"] == moeflow["none/exact/fcfs", "100%"]["prompt_tokens"], "the same prompts"
    assert hf["decode_tokens"] == 8 and len(hf["distinct_tokens"]) == 4
    text = (out / "results.md").read_text()
    assert "- workload: text: documents of" in text and "temperature 0.8, top_p 0.95" in text
    assert "| tokens as base |" in text and "validation loss" in text and "--predictors none,previous" in text
    lo, hi = sorted(prev["vs_base_tokens_per_s_batches"])
    assert f"| {prev['vs_base_tokens_per_s']:.2f} ({lo:.2f}-{hi:.2f}) |" in text, "the ratio with its range"
    assert "- engine: 2 sequences at once, at most 2 per decode step, lru eviction" in text
    assert (out / "summary.md").is_file() and (out / "bytes_per_token.png").is_file()


def test_offline_refuses_what_it_cannot_measure(tmp_path, capsys):
    rc = moeflow_main(["bench", "offline", "--model", str(default_model_dir()), "--out", "/nonexistent"])
    assert rc == 2 and "--workload text needs --data" in capsys.readouterr().err
    rc = moeflow_main(["bench", "offline", "--synthetic", "qwen3-30b-a3b-8l", "--workload", "text", "--out", "x"])
    assert rc == 2 and "needs a trained --model" in capsys.readouterr().err
    # an axis value that cannot run fails before any expert is read or any cell runs
    rc = moeflow_main(["bench", "offline", "--model", str(default_model_dir()), "--device", "cpu", "--dtype",
                       "float32", "--data", str(HELDOUT), "--routing", "exact,oracle", "--out", str(tmp_path)])
    assert rc == 2 and "--routing 'oracle' unknown" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_axes_grid_and_hooks(tmp_path):
    grid = axes.grid(["none", "frequency"], ["exact"], ["fcfs"])
    assert [c.label for c in grid] == ["none/exact/fcfs", "frequency/exact/fcfs"], "the baseline first"
    with pytest.raises(ConfigError, match="twice"):
        axes.grid(["none", "none"], ["exact"], ["fcfs"])
    engine = SimpleNamespace(spec=SimpleNamespace(num_moe_layers=2, num_experts=8),
                             scheduler=SimpleNamespace(policy=SimpleNamespace(name="fcfs")))
    assert axes.load_predictor_arg("none", engine) is None
    assert axes.load_predictor_arg("frequency", engine).name == "frequency"
    with pytest.raises(ConfigError, match="not a built-in predictor"):
        axes.load_predictor_arg("oracle", engine)
    with pytest.raises(ConfigError, match="name one part to switch off"):
        axes.load_predictor_arg(f"{tmp_path}:no-brakes", engine)
    assert axes.load_selector_arg("exact", engine) is None
    assert axes.load_scheduling_arg("fcfs", engine.spec).name == "fcfs"
    assert axes.load_scheduling_arg("route-aware", engine.spec).name == "route-aware"
    with pytest.raises(ConfigError, match="unknown"):
        axes.load_scheduling_arg("shortest-first", engine.spec)
    # overlap=0|1 on either policy: outputs built between steps or while the next one runs
    assert axes.load_scheduling_arg("route-aware:wait=2:overlap=0", engine.spec).max_decode_wait == 2
    assert [axes.scheduling_switch(t, "overlap")
            for t in ("fcfs", "fcfs:overlap=0", "route-aware:overlap=1:wait=3")] == [None, False, True]
    for bad in ("fcfs:overlap=2", "fcfs:overlap=1:overlap=1", "fcfs:overlap"):
        with pytest.raises(ConfigError, match="overlap=0|1"):
            axes.load_scheduling_arg(bad, engine.spec)
    axes.check(grid, engine)
    axes.check(axes.grid(["none"], ["exact"], ["fcfs", "route-aware"]), engine)


def test_axes_trained_predictor_ablations_and_lynx_variants():
    """A trained predictor's directory, with each part of the predictive cache switched off in turn, and LYNX at
    its defaults, at given (alpha, beta) and cache-aware: each value becomes the engine object it names."""
    from moeflow.experts.predictive import ExpertFlowPlanner
    from moeflow.routing.predictors import LearnedPredictor

    model = default_model_dir()
    pred = str(model / "predictor")
    engine = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="float32", max_model_len=64,
                                    max_num_seqs=2), skip_tokenizer_init=True)
    names = axes.with_ablations(["none", pred])
    assert names == ["none", pred] + [f"{pred}:no-{p}" for p in ("quotas", "protect", "prefetch", "correct",
                                                                     "adapt")]
    assert axes.Configuration(f"{pred}:no-quotas").label == "predictor:no-quotas/exact/fcfs"
    for text in names[1:]:
        predictor, planner = axes.load_predictor_arg(text, engine), axes.load_planner_arg(text)
        assert isinstance(predictor, LearnedPredictor)
        assert predictor.adapt == (text != f"{pred}:no-adapt")
        if text.endswith(("quotas", "protect", "prefetch", "correct")):
            part = text.rsplit("-", 1)[1]
            assert isinstance(planner, ExpertFlowPlanner) and planner.parts == {
                p: p != part for p in ("quotas", "protect", "prefetch", "correct")}
        else:
            assert planner is None  # the engine's default for a learned predictor: every part on
    axes.apply(axes.Configuration(f"{pred}:no-protect"), engine)
    assert isinstance(engine.planner, ExpertFlowPlanner) and not engine.planner.protect
    tuned = axes.load_planner_arg(f"{pred}:prefetch_at=0.6:lookahead=3")
    assert (tuned.prefetch_at, tuned.lookahead) == (0.6, 3) and all(tuned.parts.values())
    assert axes.load_planner_arg(f"{pred}:by_value=0").by_value is False
    assert axes.load_planner_arg(f"{pred}:cross_step=1").cross_step is True
    both = axes.load_planner_arg(f"{pred}:no-correct:issue_now=4")
    assert both.issue_now == 4 and not both.correct and both.prefetch
    assert axes.load_predictor_arg(f"{pred}:no-adapt:prefetch_at=0.5", engine).adapt is False
    for bad, match in ((f"{pred}:lookahead=two", "lookahead must be a number"),
                       (f"{pred}:brakes=1", "set one of the predictive cache's settings"),
                       (f"{pred}:by_value=yes", "by_value: 0 or 1"),
                       (f"{pred}:no-quotas:no-correct", "got 'no-correct'")):
        with pytest.raises(ConfigError, match=match):
            axes.load_planner_arg(bad)
    axes.apply(axes.Configuration(pred), engine)
    assert all(engine.planner.parts.values())

    plain = axes.load_selector_arg("lynx", engine)
    assert (plain.alpha, plain.beta, plain.resident_weight) == (2.5, 2, 0), "moeflow-tiny's measured defaults"
    cache_aware = axes.load_selector_arg("lynx:w=4", engine)
    assert (cache_aware.alpha, cache_aware.beta, cache_aware.resident_weight) == (2.5, 2, 4)
    swept = axes.load_selector_arg("lynx:alpha=1.5:beta=3", engine)
    assert (swept.alpha, swept.beta, swept.resident_weight) == (1.5, 3, 0)
    assert axes.Configuration(routing="lynx:w=4").request_routing == "lynx"
    assert plain.kernel == "auto" and axes.load_selector_arg("lynx:kernel=auto", engine) == plain
    assert axes.load_selector_arg("lynx:kernel=torch", engine).kernel == "torch"
    assert plain.rows_per_program == "auto" and axes.load_selector_arg("lynx:rows=4", engine).rows_per_program == 4
    assert axes.load_selector_arg("lynx:rows=0", engine).rows_per_program is None, "rows=0: one program"
    assert axes.load_selector_arg("lynx:rows=auto", engine) == plain
    for bad, match in (("lynx:gamma=1", "takes alpha=A"), ("lynx:beta=two", "must be a number"),
                       ("lynx:alpha=-1", "alpha must be"), ("lynx:kernel=cuda", "kernel must be"),
                       ("lynx:rows=-1", "rows_per_program must be"), ("lynx:rows=many", "must be a number")):
        with pytest.raises(ConfigError, match=match):
            axes.load_selector_arg(bad, engine)
    axes.apply(axes.Configuration(routing="lynx:w=4"), engine)
    assert engine.selector == cache_aware
    captures = engine.graph_captures
    axes.apply(axes.Configuration(routing="lynx:w=4"), engine)
    assert engine.graph_captures == captures, "the same selector again captures nothing"


def test_expert_load_bandwidth_drives_the_cache_demand_path(engine):
    assert expert_load_bandwidth(engine, reps=2) > 0
    cache = engine.cache
    assert cache.num_slots == engine.spec.num_experts and not cache.fully_resident
    assert cache.stats.total().misses == engine.spec.num_experts, "the last rep loaded one layer from empty"


def test_a_cell_larger_than_a_decode_step_and_than_the_kv_rows(checkpoint):
    """The scheduling axis' shape: 6 requests on 4 KV rows, 2 per decode step; a prefill comes mid-decode."""
    cfg = EngineConfig(model=str(checkpoint("qwen3_moe", "fused")), device="cpu", dtype="float32", max_model_len=32,
                       max_num_seqs=4, max_batch_size=2)
    engine = LLMEngine(cfg, skip_tokenizer_init=True)
    workload = SyntheticWorkload(engine.spec.vocab_size, prompt_len=6, output_len=4, seed=2)
    [r] = measure_grid(engine, workload, ["25%"], [6], axes.grid(["none"], ["exact"], ["fcfs"]), 1, log=print)
    assert r.decode_tokens == 6 * 3 and len(r.distinct_tokens) == 6 and r.prompt_tokens == 6 * 6
    assert r.decode_steps >= 9, "two sequences per decode step at most"
    assert 0 < r.belady_misses <= r.misses and r.graph_captures == 0
    # four running and two a step: fcfs's round robin has each sit out one decode step between its tokens
    assert len(r.max_decode_waits) == 6 and max(r.max_decode_waits) == 1, r.max_decode_waits


def test_whole_configurations_in_place_of_the_product(tmp_path, capsys):
    confs = axes.listed(["none/exact/fcfs", f"{tmp_path}/pred:no-quotas/lynx:w=4/route-aware"])
    assert [(c.predictor, c.routing, c.scheduling) for c in confs] == [
        ("none", "exact", "fcfs"), (f"{tmp_path}/pred:no-quotas", "lynx:w=4", "route-aware")]
    for bad, why in ((["none/exact"], "PREDICTOR/ROUTING/SCHEDULING"), (["none//fcfs"], "PREDICTOR/ROUTING"),
                     ([], "at least one"), (["none/exact/fcfs", "none/exact/fcfs"], "twice")):
        with pytest.raises(ConfigError, match=why):
            axes.listed(bad)
    common = ["bench", "offline", "--model", str(default_model_dir()), "--device", "cpu", "--dtype", "float32",
              "--data", str(HELDOUT), "--min-prompt-len", "8", "--max-prompt-len", "16", "--budgets", "25%",
              "--batch-sizes", "4", "--max-batch-size", "2", "--batches-per-cell", "1", "--output-len", "3",
              "--baselines", ""]
    rc = moeflow_main([*common, "--configurations", "none/exact/fcfs", "--scheduling", "route-aware",
                       "--out", str(tmp_path / "x")])
    assert rc == 2 and "leave out --predictors, --routing, --scheduling" in capsys.readouterr().err
    out = tmp_path / "r"
    rc = moeflow_main([*common, "--configurations", "none/exact/fcfs,previous/exact/route-aware", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert [(c["predictor"], c["scheduling"]) for c in report["meta"]["configurations"]] == [
        ("none", "fcfs"), ("previous", "route-aware")], "as listed, not their product"
    runs = {r["config"]: r for r in report["runs"] if r["system"] == "moeflow"}
    assert sorted(runs) == ["none/exact/fcfs", "previous/exact/route-aware"]
    assert runs["previous/exact/route-aware"]["vs_base_same_tokens"] == 1.0
    assert all(r["max_decode_wait"] >= 1 for r in runs.values()), "four running, two a step"
    assert all(0 < r["schedule_s"] < r["decode_s"] for r in runs.values()), "choosing each step takes host time"
    assert runs["previous/exact/route-aware"]["schedule_share"] == pytest.approx(
        runs["previous/exact/route-aware"]["schedule_s"] / runs["previous/exact/route-aware"]["decode_s"])
    assert "decode wait max (p99) |" in (out / "results.md").read_text()
    assert "| schedule share |" in (out / "results.md").read_text()
    command = report["meta"]["command"]  # runs again as written
    assert "--configurations none/exact/fcfs,previous/exact/route-aware" in command and "--routing" not in command

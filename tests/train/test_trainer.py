import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MICRO, run_training
from moeflow.train.presets import PRESETS, get_preset
from moeflow.train.trainer import lr_at


def test_training_writes_a_loadable_hf_checkpoint(micro_model):
    config = json.loads((micro_model / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["bos_token_id"] == config["eos_token_id"] == 0
    assert config["max_position_embeddings"] == MICRO.max_position_embeddings
    assert config["norm_topk_prob"] is True and config["dtype"] == "bfloat16"
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_log.json"):
        assert (micro_model / name).is_file(), name

    model = AutoModelForCausalLM.from_pretrained(micro_model)
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    ids = tokenizer("thou hath sweet love", return_tensors="pt").input_ids
    assert ids[0, 0].item() == config["bos_token_id"]
    out = model(input_ids=ids, output_router_logits=True)
    assert out.logits.shape[-1] == config["vocab_size"]
    assert len(out.router_logits) == MICRO.num_layers
    assert out.router_logits[0].shape == (ids.shape[1], MICRO.num_experts)


def test_training_log_records_the_run(micro_model):
    log = json.loads((micro_model / "training_log.json").read_text())
    assert log["steps_done"] == MICRO.steps and not log["stopped_early"]
    assert log["tokens_seen"] == MICRO.steps * MICRO.tokens_per_step
    assert [h["step"] for h in log["history"]] == list(range(1, MICRO.steps + 1))
    assert all(h["aux_loss"] > 0 for h in log["history"])  # load-balancing loss is on
    assert [v["step"] for v in log["validation"]] == [0, 2, 4]
    assert log["device"] == "cpu" and log["experts_implementation"] == "grouped_mm"
    assert set(log["train_tokens"]) == set(log["domain_probabilities"])


def test_same_seed_same_bits_on_cpu(tmp_path, corpus, tokenizer_dir, micro_model):
    again = run_training(corpus, tokenizer_dir, tmp_path / "again")
    first = json.loads((micro_model / "training_log.json").read_text())
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]
    a, b = load_file(micro_model / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = run_training(corpus, tokenizer_dir, tmp_path / "other", seed=1)
    assert [h["loss"] for h in other["history"]] != [h["loss"] for h in first["history"]]


def test_bf16_master_weight_path_and_sharded_save(tmp_path, corpus, tokenizer_dir):
    preset = dataclasses.replace(PRESETS["bench-smoke"], seq_len=32, steps=3, max_shard_size="60KB")
    log = run_training(corpus, tokenizer_dir, tmp_path, preset=preset)
    losses = [h["lm_loss"] for h in log["history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in index["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16


def test_time_bound_run_sizes_its_schedule(tmp_path, corpus, tokenizer_dir):
    preset = dataclasses.replace(MICRO, steps=10_000)
    log = run_training(corpus, tokenizer_dir, tmp_path, preset=preset, max_minutes=0.15)
    assert 2 < log["steps_done"] < 10_000
    assert log["steps_planned"] < 10_000  # the schedule was sized from the measured step time
    assert log["wall_time_s"] < 0.15 * 60 + 3


def test_lr_schedule_warms_up_then_decays():
    p = get_preset("tiny")
    lrs = [lr_at(s, 100, p) for s in range(100)]
    assert lrs[0] == pytest.approx(p.lr / p.warmup_steps)
    assert max(lrs) == pytest.approx(p.lr)
    assert lrs[-1] == pytest.approx(p.lr * p.min_lr_ratio, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[p.warmup_steps:], lrs[p.warmup_steps + 1:]))


@pytest.mark.gpu
def test_bench_code_path_on_cuda(tmp_path, corpus, tokenizer_dir):
    """bench's path on the GPU (bf16 parameters and grouped_mm, autocast, master weights, sharded save) in
    seconds: run before the real bench training."""
    preset = dataclasses.replace(PRESETS["bench-smoke"], seq_len=64, micro_batch=4, steps=6, max_shard_size="200KB")
    log = run_training(corpus, tokenizer_dir, tmp_path, preset=preset, device="cuda")
    assert log["device"] == "cuda" and log["experts_implementation"] == "grouped_mm"
    losses = [h["lm_loss"] for h in log["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] + 0.5
    assert 0 < log["peak_gpu_memory_gib"] < 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda()
    out = model(input_ids=torch.tensor([[0, 5, 6, 7]], device="cuda"), output_router_logits=True)
    assert torch.isfinite(out.logits).all() and len(out.router_logits) == preset.num_layers

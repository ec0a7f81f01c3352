"""lm-evaluation-harness's `local-completions` backend scores a small multiple-choice task
(tests/server/lm_eval_task) through the live server: echo + logprobs, several prompts per call.
Run as the `lm_eval` command, offline, as a user would."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import MODEL_NAME

TASK_DIR = Path(__file__).parent / "lm_eval_task"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_local_completions_scores_a_multiple_choice_task(live_server, model_dir, tmp_path):
    model_args = ",".join([
        f"base_url={live_server.base_url}/v1/completions", f"model={MODEL_NAME}", f"tokenizer={model_dir}",
        "tokenizer_backend=huggingface", "tokenized_requests=True", "max_length=512", "num_concurrent=2",
        "max_retries=1",
    ])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": "unused"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "moeflow_facts", "--include_path", str(TASK_DIR), "--output_path", str(tmp_path / "out"),
           "--batch_size", "4", "--log_samples"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=170,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    acc = results["results"]["moeflow_facts"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_moeflow_facts_*.jsonl")).open()]
    assert len(samples) == 10
    for sample in samples:
        logliks = [resp[0][0] for resp in sample["resps"]]  # one (loglikelihood, is_greedy) per choice
        assert len(logliks) == 3 and all(math.isfinite(x) and x < 0 for x in map(float, logliks))
    assert live_server.wait_idle()

"""The moeflow command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def moeflow(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "moeflow.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_generate_streams_text_to_stdout_and_stats_to_stderr(checkpoint):
    model = checkpoint("mixtral", "fused")
    proc = moeflow("generate", model, "--prompt", "the quick brown", "--max-tokens", "12", "--ignore-eos",
                   "--expert-budget", "25%", "--device", "cpu")
    assert proc.stdout.strip()
    assert "[length] 12 tokens" in proc.stderr and "misses" in proc.stderr and "tok/s" in proc.stderr


def test_generate_reports_a_bad_budget_as_an_error(checkpoint):
    proc = moeflow("generate", checkpoint("mixtral"), "--prompt", "hi", "--expert-budget", "1KiB", check=False)
    assert proc.returncode == 2
    assert "smallest budget that works" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_describes_the_checkpoint_and_budgets(checkpoint):
    out = moeflow("inspect", checkpoint("qwen2_moe"), "--expert-budget", "50%", "--expert-budget", "1/layer").stdout
    assert "Qwen2MoeForCausalLM (qwen2_moe)" in out
    assert "4 (3 MoE)" in out and "8 / 2 + shared expert (48 wide)" in out
    assert "bytes per expert" in out and "24.00 KiB" in out  # 3 x 32 x 64 float32
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit()}
    assert lines["50%"][1] == "12" and lines["1/layer"][1] == "3"


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["inspect", "--help"]])
def test_help(argv):
    assert "usage" in moeflow(*argv).stdout

"""`moeflow generate` given a prompt that is not UTF-8 (issue 15, finding 1): a clear error, no traceback."""

from __future__ import annotations

import subprocess
import sys


def test_a_prompt_that_is_not_utf8_is_an_error_not_a_traceback(checkpoint):
    # argv arrives as bytes; Python decodes the invalid one into a lone surrogate
    proc = subprocess.run([sys.executable, "-m", "moeflow.cli", "generate", str(checkpoint("qwen3_moe")),
                           "--prompt", b"caf\xe9 au lait", "--max-tokens", "2", "--device", "cpu"],
                          capture_output=True, timeout=300)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, stderr
    assert "--prompt" in stderr and "UTF-8" in stderr and "0xe9" in stderr and "Traceback" not in stderr

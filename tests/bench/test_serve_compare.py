"""`moeflow bench serve-compare`: result files side by side, as a table and a plot; bad files named."""

from __future__ import annotations

import json

from moeflow.bench.serve_stats import RequestRecord, summarize
from moeflow.cli import main as moeflow_main


def result_file(path, ttft_s: float, n: int, cache: dict | None = None):
    records = [RequestRecord(prompt_len=10, max_tokens=4, success=True, output_tokens=4, ttft_s=ttft_s,
                             latency_s=ttft_s + 0.3, itl_s=[0.1] * 3, start_s=0.05 * i) for i in range(n)]
    result = {**summarize(records, duration_s=2.0), "requests": [r.to_json() for r in records]}
    if cache:
        result["server_expert_cache"] = cache
    path.write_text(json.dumps(result))
    return path


def test_table_and_plot(tmp_path, capsys):
    a = result_file(tmp_path / "a.json", 0.2, 8, {"hits": 30, "misses": 10, "bytes_moved": 5e9, "stall_s": 1.0,
                                                   "hit_rate": 0.75})
    b = result_file(tmp_path / "serve-100.json", 0.05, 6)
    png, md = tmp_path / "cmp.png", tmp_path / "cmp.md"
    assert moeflow_main(["bench", "serve-compare", f"25% text={a}", str(b), "--plot", str(png),
                         "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith("| 25% text | 8/8 | 4.00 | 16.0 | 200 / 200 | 100.0 / 100.0 | 500 | 75.0% | 5 |")
    assert rows[1].startswith("| serve-100 | 6/6 | 3.00 | 12.0 | 50 / 50 |") and rows[1].endswith("| - | - |")
    assert md.read_text() in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_files_are_named(tmp_path, capsys):
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"completed": 1}))
    assert moeflow_main(["bench", "serve-compare", str(tmp_path / "junk.json")]) == 2
    assert "junk.json is not JSON" in capsys.readouterr().err
    assert moeflow_main(["bench", "serve-compare", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "other.json is not a `moeflow bench serve` result file" in err and "output_throughput" in err
    assert moeflow_main(["bench", "serve-compare", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err

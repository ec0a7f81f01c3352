"""`moeflow bench serve`'s figures: the first wave's TTFT apart from the running server's."""

from __future__ import annotations

from moeflow.bench.serve_stats import RequestRecord, format_table, summarize


def _record(start_s: float, ttft_s: float, success: bool = True) -> RequestRecord:
    return RequestRecord(prompt_len=10, max_tokens=4, success=success, output_tokens=4 if success else 0,
                         ttft_s=ttft_s, latency_s=ttft_s + 0.3, itl_s=[0.1] * 3, start_s=start_s)


def test_the_first_wave_is_set_apart_by_send_order():
    # four requests arrive at once and wait 0.4 s; later ones, sent as earlier ones finish, wait 0.1 s
    burst = [_record(0.001 * i, 0.4) for i in range(4)]
    later = [_record(1.0 + 0.1 * i, 0.1) for i in range(12)] + [_record(3.0, 0.2, success=False)]
    s = summarize(later[::-1] + burst, duration_s=4.0, first_wave=4)  # in any order
    assert s["metrics"]["ttft_ms"]["p99"] > 390, "every request counts in the whole run's figures"
    assert s["first_wave"] == 4
    assert s["steady_ttft_ms"]["median"] == s["steady_ttft_ms"]["p99"] == 100.0, "failed requests do not count"
    table = format_table(s, request_rate=float("inf"), max_concurrency=4)
    assert "after the first wave of 4 requests" in table


def test_no_wave_without_a_concurrency_bound_or_when_the_wave_is_everything():
    records = [_record(0.0, 0.2) for _ in range(4)]
    assert "steady_ttft_ms" not in summarize(records, duration_s=1.0)
    assert "steady_ttft_ms" not in summarize(records, duration_s=1.0, first_wave=4)

"""Figures for `moeflow bench serve`: per-request records in, vLLM-style serving statistics out.

TTFT: send to first streamed token. TPOT: (latency - TTFT) / (output tokens - 1), per request.
ITL: every gap between two streamed tokens, over all requests. E2EL: send to last byte.
Each is reported as mean, median, p90 and p99 in milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

METRICS = {  # key -> table heading
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
STATS = ("mean", "median", "p90", "p99")


@dataclass
class RequestRecord:
    prompt_len: int  # tokens, as the server counted them (usage), else as sent
    max_tokens: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    start_s: float = 0.0  # send time, from the start of the run

    @property
    def tpot_s(self) -> float | None:
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    def to_json(self) -> dict:
        return {**asdict(self), "tpot_s": self.tpot_s}


def _stats_ms(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {s: 0.0 for s in STATS}
    a = np.asarray(values_s, dtype=np.float64) * 1000
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(records: list[RequestRecord], duration_s: float, first_wave: int = 0) -> dict:
    """vLLM's serving figures; with `first_wave` (the concurrency bound), the TTFT of the requests sent after
    the first wave apart as `steady_ttft_ms`. The first wave arrives at a server with nothing running, all at
    once, and its prompts share the first prefill steps: its TTFT is the burst's, not the running server's."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    samples = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.latency_s for r in ok],
    }
    summary = {
        "duration_s": duration_s, "completed": len(ok), "failed": len(records) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": total_out / duration_s if duration_s else 0.0,
        "total_token_throughput": (total_in + total_out) / duration_s if duration_s else 0.0,
        "metrics": {f"{key}_ms": _stats_ms(values) for key, values in samples.items()},
    }
    if 0 < first_wave < len(records):
        later = sorted(records, key=lambda r: r.start_s)[first_wave:]
        summary["first_wave"] = first_wave
        summary["steady_ttft_ms"] = _stats_ms([r.ttft_s for r in later if r.success])
    for key in METRICS:  # vLLM's flat names too, so tools written for its result files read these
        for stat, value in summary["metrics"][f"{key}_ms"].items():
            summary[f"{stat}_{key}_ms"] = value
    return summary


def format_table(summary: dict, *, request_rate: float, max_concurrency: int | None) -> str:
    w = 40
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w + 10, c="=")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<{w}}{value:<10.2f}" if isinstance(value, float) else f"{label:<{w}}{value:<10}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Maximum request concurrency:", max_concurrency if max_concurrency else "unlimited")
    row("Request rate configured (RPS):", request_rate)
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    for key, heading in METRICS.items():
        lines.append("{s:{c}^{n}}".format(s=heading, n=w + 10, c="-"))
        for stat in STATS:
            name = "Median" if stat == "median" else stat.capitalize() if stat == "mean" else stat.upper()
            row(f"{name} {key.upper()} (ms):", summary["metrics"][f"{key}_ms"][stat])
        if key == "ttft" and "steady_ttft_ms" in summary:
            lines.append(f"  after the first wave of {summary['first_wave']} requests:")
            for stat in ("median", "p99"):
                row(f"  {'Median' if stat == 'median' else 'P99'} TTFT (ms):", summary["steady_ttft_ms"][stat])
    lines.append("=" * (w + 10))
    return "\n".join(lines)

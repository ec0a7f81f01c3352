"""Markdown tables for the reports moeflow writes (model cards, corpus summaries, benchmark comparisons)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]], right_from: int | None = None) -> str:
    """One markdown table, without a trailing newline; columns from index `right_from` on are right-aligned."""
    n = len(header)
    align = ["---:" if right_from is not None and i >= right_from else "---" for i in range(n)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

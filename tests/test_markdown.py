"""moeflow.markdown.table: the one markdown-table writer behind cards, summaries and comparisons."""

from moeflow.markdown import table


def test_table_aligns_numeric_columns_right_and_stringifies_cells():
    text = table(["run", "tok/s", "hits"], [["a", 1.5, "90%"], ["b", 2, "-"]], right_from=1)
    assert text.splitlines() == ["| run | tok/s | hits |", "|---|---:|---:|", "| a | 1.5 | 90% |", "| b | 2 | - |"]
    assert table(["x"], []) == "| x |\n|---|"

"""Loads facts.jsonl from beside this file, so the task needs no download, cache or working directory."""

import json
from pathlib import Path


def load(**kwargs):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / "facts.jsonl").read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

"""Held-out recall (python_docs, never trained on) by epoch: width 1024 here against width 512 in the fourteenth
session, each from its training log's per-epoch figure on the train split's python_docs sequences.

    .venv/bin/python docs/benchmarks/2026-12-06-h100-session16/recall_by_epoch.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
runs = [("width 1024, this session (16 epochs)", here / "predictor/training_log_no-python_docs.json"),
        ("width 512, session 14 (8 epochs)",
         here.parent / "2026-12-06-h100-session14/predictor/training_log_no-python_docs.json")]
fig, ax = plt.subplots(figsize=(7, 4))
for label, path in runs:
    epochs = json.loads(path.read_text())["epochs"]
    ax.plot([e["epoch"] for e in epochs], [e["heldout"]["recall"] for e in epochs], "o-", label=label)
ax.axhline(0.70, color="grey", linestyle="--", label="issue 12's target (0.70)")
ax.set_xlabel("epoch")
ax.set_ylabel("held-out recall (python_docs)")
ax.set_title("learned predictor, bench model, 4M-token trace, trained on five domains")
ax.legend()
fig.tight_layout()
fig.savefig(here / "recall_by_epoch.png", dpi=100)

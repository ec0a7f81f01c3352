"""Documents of one corpus split, spread evenly over each domain and interleaved by domain, as JSON lines.

    python3 tools/corpus_sample.py CORPUS_DIR SPLIT PER_DOMAIN > sample.jsonl

Each domain gives PER_DOMAIN documents taken at even steps through its doc_ids; the output takes the domains
in turn, so that `moeflow trace --max-tokens N` stops with every domain in equal measure (the predictor
traces are made this way).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 4:
        sys.stderr.write(__doc__)
        return 2
    corpus, split, per_domain = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    by = collections.defaultdict(list)
    with open(corpus / f"{split}.jsonl") as f:
        for line in f:
            by[json.loads(line)["domain"]].append(line)
    picked = {d: docs[:: max(1, len(docs) // per_domain)][:per_domain] for d, docs in sorted(by.items())}
    for i in range(per_domain):
        for d in sorted(picked):
            if i < len(picked[d]):
                sys.stdout.write(picked[d][i])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokens in each domain of a corpus split when every document is cut at N tokens (what `moeflow trace
--max-seq-len N` keeps of it), with the corpus's own tokenizer.

    python3 corpus_tokens.py CORPUS_DIR TOKENIZER_DIR [--split train] [--caps 256,512,1024,4096]
"""

import argparse
import collections
import json
from pathlib import Path

from tokenizers import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("corpus", type=Path)
    p.add_argument("tokenizer", type=Path)
    p.add_argument("--split", default="train")
    p.add_argument("--caps", default="256,512,1024,4096")
    args = p.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    docs = collections.defaultdict(list)
    with open(args.corpus / f"{args.split}.jsonl") as f:
        for line in f:
            d = json.loads(line)
            docs[d["domain"]].append(d["text"])
    totals = collections.Counter()
    for domain, texts in sorted(docs.items()):
        lengths = [len(e.ids) for e in tok.encode_batch(texts)]
        row = {cap: sum(min(n, cap) for n in lengths) for cap in caps}
        totals.update({(cap, domain == "python_docs"): n for cap, n in row.items()})
        print(json.dumps({"domain": domain, "documents": len(texts), "tokens_at_cap": row}))
    for cap in caps:
        rest = totals[cap, False]
        print(json.dumps({"cap": cap, "tokens": rest + totals[cap, True], "without_python_docs": rest}))


if __name__ == "__main__":
    main()

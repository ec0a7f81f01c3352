"""Accuracy measures every approximate routing mode is reported with, against exact routing.

    forcing.py      teacher forcing through the engine in real decode batches (the shared driver)
    documents.py    documents from .jsonl files or a corpus split, the domains in turn
    perplexity.py   perplexity, top-1 agreement and distinct experts per layer-step
    choice.py       a multiple-choice task built from the corpus: the true continuation among four
"""

"""The server's collector: the start-up heap frozen, and each collection timed into /metrics."""

import gc
import weakref

from moeflow.server.gc_pauses import GCPauses, freeze_start_up_heap
from moeflow.server.metrics import ServerMetrics


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


def test_pauses_are_timed_while_installed_and_only_then():
    pauses = GCPauses()
    gc.collect()
    pauses.install()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        pauses.remove()
    got = pauses.take()  # an automatic collection may come in between: at least the two asked for
    generations = [g for g, _ in got]
    assert 2 in generations and 0 in generations and all(s > 0 for _, s in got)
    assert pauses.take() == []  # taken once
    gc.collect()
    assert pauses.take() == [] and pauses._callback not in gc.callbacks


def test_a_frozen_heap_is_not_walked_again_and_later_garbage_still_is():
    before = _Node()
    kept = weakref.ref(before)
    try:
        frozen = freeze_start_up_heap()
        del before
        # objects frozen and later freed by their reference count leave the frozen set (other threads of the
        # test session free some), so the count after the freeze is only bounded, not equal
        assert frozen > 1000 and 0 < gc.get_freeze_count() <= frozen
        after = _Node()
        gone = weakref.ref(after)
        del after
        gc.collect()
        assert kept() is not None  # frozen: out of every later collection's reach
        assert gone() is None  # made after the freeze: collected as before
    finally:
        gc.unfreeze()  # the rest of the test session keeps a normal collector
    gc.collect()
    assert kept() is None


def test_metrics_export_the_pauses_by_generation():
    metrics = ServerMetrics("m")
    metrics.gc.install()
    try:
        gc.collect()
        gc.collect(1)
    finally:
        metrics.gc.remove()
    text = metrics.render().decode()
    sample = metrics.registry.get_sample_value
    assert sample("moeflow:gc_pause_seconds_count", {"model_name": "m", "generation": "2"}) >= 1
    assert sample("moeflow:gc_pause_seconds_count", {"model_name": "m", "generation": "1"}) >= 1
    assert sample("moeflow:gc_pause_seconds_sum", {"model_name": "m", "generation": "2"}) > 0
    assert "moeflow:gc_pause_seconds_bucket" in text

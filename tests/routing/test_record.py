"""RouteRecord: what the step writes is what the host reads, padding rows never counted or diverging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.architectures.spec import RouterSpec
from moeflow.routing.record import RouteRecord
from moeflow.routing.router import route

L, K, E, N = 3, 2, 8, 16


def record():
    return RouteRecord(L, K, E, N, torch.float32, torch.device("cpu"))


def fill(rec, T, real, seed=0):
    """Route random logits for T rows (the last T - real copying row real - 1) into every layer."""
    g = torch.Generator().manual_seed(seed)
    rec.set_rows(real, T, None)
    logits = torch.randn(L, T, E, generator=g)
    logits[:, real:] = logits[:, real - 1 : real]
    for li in range(L):
        route(logits[li], RouterSpec(K, True, False), out=rec.router_out(li, T))
    return logits


def test_a_padded_step_reads_back_its_real_rows_and_counts_only_them():
    rec = record()
    logits = fill(rec, T=8, real=5)
    rec.ids[:, 5:8] = torch.tensor([6, 7])  # padding rows that went their own way must not be counted
    rec.stage(8, selected=False)
    routes = rec.read(8, selected=False, rows=[slice(i, i + 1) for i in range(5)], real=5)
    want = torch.topk(logits[:, :5], K, dim=-1).indices.numpy()
    assert routes.ids.shape == (L, 5, K) and np.array_equal(routes.ids, want)
    used = np.zeros((L, E), dtype=bool)
    np.put_along_axis(used, want.reshape(L, -1), True, axis=1)
    assert np.array_equal(routes.used, used)
    assert routes.num_remapped == 0 and routes.router_ids is routes.ids


def test_selected_padding_rows_take_their_source_row_and_both_choices_are_read():
    rec = record()
    fill(rec, T=4, real=3)
    for li in range(L):
        chosen = torch.arange(4 * K).view(4, K) % E  # row 3 (padding) differs from row 2
        ids, _ = rec.write_selected(li, chosen, torch.ones(4, K))
        assert torch.equal(ids[3], ids[2]), "padding computes exactly what the row it copies computes"
    rec.stage(4, selected=True)
    routes = rec.read(4, selected=True, rows=[slice(0, 1), slice(1, 2), slice(2, 3)], real=3)
    assert np.array_equal(routes.ids[0], (np.arange(3 * K).reshape(3, K) % E))
    assert routes.router_ids is not routes.ids and routes.router_ids.shape == (L, 3, K)
    assert routes.num_remapped > 0


def test_gate_ahead_counts_real_rows_and_is_published_with_the_layer_before():
    """keep_ahead(li, scores): per expert, how many real rows have it in their top-k; publish_layer(li - 1) copies
    those counts beside layer li - 1's experts, and the host reads the same from either place."""
    rec = record()
    rec.ahead_on = True
    fill(rec, T=6, real=4)
    scores = torch.zeros(6, E)
    scores[:, 3] = 2.0  # every row's best; rows 0-1 next pick 5, rows 2-3 pick 6, padding rows 7
    scores[:2, 5] = scores[2:4, 6] = scores[4:, 7] = 1.0
    rec.keep_ahead(1, scores)
    want = np.zeros(E, dtype=np.int64)
    want[3], want[5], want[6] = 4, 2, 2
    assert np.array_equal(rec.layer_ahead(0, published=False), want), "padding rows are never counted"
    rec.ahead_on = False  # a model without the gate ahead: nothing more is copied
    rec.publish_layer(0, rec.ids[0, :6])
    assert not rec.layer_ahead(0, published=True).any()
    rec.ahead_on = True
    rec.publish_layer(0, rec.ids[0, :6])
    rec.layer_published()
    rec.layer_experts(0)
    assert np.array_equal(rec.layer_ahead(0, published=True), want)
    rec.publish_layer(L - 1, rec.ids[L - 1, :6])  # the last layer has no next one: nothing to copy, no error


def test_a_snapshot_reads_as_the_record_did_but_not_with_the_full_routes():
    """A step read after the next was launched reads its packed routes from its snapshot (the same arrays as
    the record's own host buffer); the full routes (keep_full: weights and logits) live on the device only, where
    the next step overwrites them, so reading them so is refused."""
    rec = record()
    fill(rec, T=4, real=4)
    rec.stage(4, selected=False)
    rows = [slice(i, i + 1) for i in range(4)]
    snap = rec.snapshot(4, selected=False)
    a, b = rec.read(4, False, rows), rec.read(4, False, rows, host=snap)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.used, b.used)
    rec.keep_full = True
    with pytest.raises(RuntimeError, match="keep_full"):
        rec.read(4, False, rows, host=snap)

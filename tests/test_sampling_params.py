"""SamplingParams' validation: each field takes its valid values and refuses the rest with an error that names the
field and the value."""

from __future__ import annotations

import pytest

from moeflow.errors import ConfigError
from moeflow.sampling import SamplingParams


@pytest.mark.parametrize("name, good", [
    ("min_p", [0, 0.0, 0.5, 1, 1.0]),
    ("repetition_penalty", [1e-3, 1.0, 2, 10.0]),
    ("presence_penalty", [-2, -2.0, 0.0, 1.5, 2.0]),
    ("frequency_penalty", [-2.0, 0, 0.3, 2]),
    ("ttft_slo_ms", [None, 0.5, 200, 1e6]),
    ("tpot_slo_ms", [None, 1e-3, 50.0]),
    ("priority", [0, -5, 3, 10**6]),
    ("task", [None, "chat", "code"]),
    ("routing", ["exact", "lynx"]),
])
def test_new_fields_accept_good_values(name, good):
    for value in good:
        assert getattr(SamplingParams(**{name: value}), name) == value


@pytest.mark.parametrize("name, bad", [
    ("min_p", [-0.1, 1.01, float("nan"), float("inf"), True, "0.1", None]),
    ("repetition_penalty", [0, 0.0, -1.0, float("inf"), float("nan"), True, False]),
    ("presence_penalty", [-2.01, 2.5, float("-inf"), float("nan"), True]),
    ("frequency_penalty", [3, -3.0, float("inf"), False, "1"]),
    ("ttft_slo_ms", [0, -1.0, float("inf"), float("nan"), True, "5"]),
    ("tpot_slo_ms", [0.0, -3, float("inf"), False]),
    ("priority", [1.5, True, "1", None]),
    ("task", ["", 3, True]),
    ("routing", ["EXACT", "approximate", "", None, 1]),
])
def test_new_fields_refuse_bad_values_naming_field_and_value(name, bad):
    for value in bad:
        with pytest.raises(ConfigError, match=name) as err:
            SamplingParams(**{name: value})
        assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_routing_error_lists_the_choices_and_booleans_are_not_numbers():
    with pytest.raises(ConfigError, match="'exact', 'lynx'"):
        SamplingParams(routing="fast")
    for name in ("temperature", "top_p"):
        with pytest.raises(ConfigError, match=name):
            SamplingParams(**{name: True})


def test_penalty_flag_and_greedy():
    assert not SamplingParams().uses_penalties
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=-0.1).uses_penalties
    assert SamplingParams(frequency_penalty=0.1).uses_penalties
    assert SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=1e-5).greedy

"""Property-based checks of the request schemas: they accept exactly what the documentation says."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.schemas import ForecastParameters, SeriesInput

values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


@given(st.lists(values, max_size=40))
def test_a_series_is_accepted_iff_it_has_an_observation_and_nothing_infinite(target):
    expected = (
        bool(target)
        and any(v is not None and math.isfinite(v) for v in target)
        and not any(v is not None and math.isinf(v) for v in target)
    )
    try:
        SeriesInput(target=target)
        accepted = True
    except ValidationError:
        accepted = False

    assert accepted == expected


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-2, max_value=2), max_size=8))
def test_quantile_levels_are_accepted_iff_non_empty_unique_and_strictly_inside_0_1(levels):
    expected = bool(levels) and len(set(levels)) == len(levels) and all(0 < q < 1 for q in levels)
    try:
        ForecastParameters(prediction_length=3, quantile_levels=levels)
        accepted = True
    except ValidationError:
        accepted = False

    assert accepted == expected

"""Shortcuts of session 10's per-fit small costs (helper small10) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``overheads._chain`` of plain numbers without an allocator model (``_scalar_chain``, Python floats) equals the
  array chain (``_array_chain``, numpy on 0-d arrays) term by term, bit for bit and type for type: factors of 1
  and not, paged states in or outside the allocator, a load's reserve above and below, ties at zero, non-finite
  inputs.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from vramplan import overheads


def _figures(factor=1.0, paged_outside=True, workspace=8 << 20, context=500 << 20):
    return overheads._Figures(context, workspace, factor, None, None, paged_outside, {})


def _same(a, b) -> bool:
    """Equal bit for bit (NaN equals NaN, -0.0 differs from 0.0) and of one type and shape."""
    if type(a) is not type(b) or np.shape(a) != np.shape(b):
        return False
    fa, fb = float(a), float(b)
    return (math.isnan(fa) and math.isnan(fb)) or (fa == fb and math.copysign(1, fa) == math.copysign(1, fb))


def _check(fig, *args):
    with np.errstate(all="ignore"):
        fast = overheads._chain(fig, *args)
        slow = overheads._array_chain(fig, *args)
    assert list(fast) == list(slow)
    for k in slow:
        assert _same(fast[k], slow[k]), (k, args, fast[k], slow[k])


def _values():
    rng = random.Random(10)
    plain = [0, 1, 3, 7 << 20, 13 << 30, 2**53 + 1, 0.5, 2.5, 1e9 + 0.5, np.float64(123456789.75)]
    return plain + [rng.randrange(1 << 40) for _ in range(6)] + [rng.uniform(0, 1e12) for _ in range(4)]


@pytest.mark.parametrize("factor", [1.0, 1.07, 0.93, 1.5])
@pytest.mark.parametrize("paged_outside", [True, False])
def test_the_scalar_chain_equals_the_array_chain(factor, paged_outside):
    fig = _figures(factor, paged_outside)
    vals = _values()
    rng = random.Random(int(factor * 100) + paged_outside)
    for t, act in itertools.product(vals[:8], vals[:6]):
        _check(fig, t, act, 0, 0, 0)
    for _ in range(400):
        t, act, paged, loaded, floor = (rng.choice(vals) for _ in range(5))
        _check(fig, t, act, paged, loaded, floor)


def test_ties_and_non_finite_inputs_match_the_array_chain():
    fig = _figures(1.0)
    for args in [(0, 0, 0, 0, 0), (5, 0, 5, 0, 0), (5, 0, 9, 0, 0), (100, 0, 0, 100, 0), (100, 0, 0, 0, 10**9),
                 (0.0, 0.0, 0.0, 0.0, -0.0), (-0.0, 0, 0, 0, 0), (float("inf"), 0, 0, 0, 0),
                 (float("inf"), 0, float("inf"), 0, 0), (float("nan"), 0, 0, 0, 0), (10, 0, 0, 0, float("nan")),
                 (10, 0, 0, 0, float("inf"))]:
        _check(fig, *args)
        _check(_figures(1.25), *args)


def test_arrays_and_allocator_models_take_the_array_chain(monkeypatch):
    calls = []
    monkeypatch.setattr(overheads, "_scalar_chain", lambda *a: calls.append(a))
    overheads._chain(_figures(), np.array([1.0, 2.0]), 0, 0)
    overheads._chain(_figures(), np.float32(3.0), 0, 0)
    assert not calls
    overheads._chain(_figures(), 3, 0, 0)
    assert len(calls) == 1


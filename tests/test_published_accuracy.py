"""The published-accuracy benchmark's core on the shipped corpus: its accounting, not its targets.

The accuracy figures (median error, bands, OOM verdicts) are printed by
``benchmarks/published_accuracy.py``; here: every row is accounted for exactly once, each scored
row is compared on its own quantity, bands are leave-one-source-out, estimates never enter a band,
and the shipped bands file is the one the corpus gives.
"""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

from vramplan.measurements.accuracy import LIKE_FOR_LIKE, fit_bands, summarize

bench = load_benchmark("published_accuracy")


@pytest.fixture(scope="module")
def scored():
    return bench.run()


def test_every_row_is_accounted_for_once(scored):
    s = summarize(scored)
    assert s.rows == len(scored) >= 149
    assert s.scored + s.oom + s.fit_only + s.estimated + s.inconsistent + s.skipped == s.rows
    assert sum(s.skip_reasons.values()) == s.skipped
    assert all(x.reason for x in scored if x.status in ("skipped", "inconsistent"))
    assert s.estimated == sum(x.record.estimated for x in scored) == 12
    assert s.scored >= 50 and s.oom >= 5 and s.fit_only >= 3


def test_scored_rows_use_the_quantity_their_source_printed(scored):
    for x in scored:
        if x.status != "scored":
            continue
        if x.quantity == "unknown_peak":
            assert x.allocated <= x.predicted <= x.reserved
            assert x.predicted == x.measured or x.predicted in (x.allocated, x.reserved)
        else:
            want = {"allocated": x.allocated, "reserved": x.reserved, "device": x.device}[LIKE_FOR_LIKE[x.quantity]]
            assert x.predicted == want
        assert x.allocated <= x.reserved <= x.device


def test_bands_leave_the_row_source_out(scored):
    from vramplan.measurements.accuracy import _band_of, _key

    for x in scored:
        if x.band is None:
            continue
        level = x.band_from.split(" ")[0]
        others = [o.ratio for o in scored if o.status == "scored" and o.ratio is not None and o.source != x.source
                  and _key(level, o) == _key(level, x)]
        assert x.band == _band_of(others)


def test_estimates_are_compared_but_never_fitted(scored):
    est = [x for x in scored if x.record.estimated]
    assert est and all(x.status == "estimated" for x in est)
    fitted = fit_bands([x for x in scored if not x.record.estimated])
    assert fit_bands(scored) == fitted


def test_shipped_bands_are_the_corpus_bands(scored):
    shipped = json.loads(bench.BANDS.read_text())["bands"]
    assert shipped == json.loads(json.dumps(fit_bands(scored)))


def test_report_names_every_stack_and_its_rows(scored):
    text = bench.report(scored)
    for stack in {x.stack for x in scored if x.status == "scored"}:
        assert f"| {stack} |" in text
    assert "Headline (leave-one-source-out)" in text and "Mechanisms" in text


def test_allocator_reserve_is_fitted_leave_one_source_out(scored):
    """The shipped default reserve is the fraction the corpus fits; each source was scored with the fraction
    fitted on the others (vramplan.measurements.accuracy.score_reserve_loso)."""
    from vramplan.measurements.accuracy import RESERVE_GRID, reserve_evidence
    from vramplan.overheads import DEFAULT_RESERVE_FRACTION

    fit = bench.RESERVE_FIT
    assert fit["all"] == DEFAULT_RESERVE_FRACTION
    assert set(fit["fits"]) == {s.source for s in scored}
    assert set(fit["fits"].values()) <= set(RESERVE_GRID)
    # the evidence: reserved / device-total rows and the published context capacities, nothing allocated
    ev = reserve_evidence(scored)
    n = sum(s.status == "scored" and s.quantity in ("max_reserved", "device_total") for s in scored)
    assert len(ev) == n + sum(s.capacity_error is not None for s in scored) and n > 0

"""The two-sided verdict (vramplan.verdict) and everything that shows it: fit, matrix, estimate, the benchmark.

"comfortable" needs the band's upper end under the card (and the 15% headroom); "no" needs even the
band's lower end over it; in between a plan is "tight" -- it may fit, and it is shown as such, never
as "does not fit". What ``fit`` recommends is comfortable whenever any plan is.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

import vramplan
from vramplan.bands import band_for_config
from vramplan.verdict import (COMFORTABLE_FRACTION, LIKELY_OVER, SYMBOLS, Verdict, advice, classify, classify_array,
                              comfortable_limit, pick, verdict_of, label)

GIB = 2**30


# -- the rule ------------------------------------------------------------------------------

def test_no_needs_the_band_lower_end_over_the_card():
    cap = 100.0
    assert classify(104, cap, 0.27, -0.25) is Verdict.TIGHT        # 104 x 0.75 = 78 <= 100: may fit
    assert classify(133, cap, 0.27, -0.25) is Verdict.TIGHT        # 133 x 0.75 = 99.75 <= 100
    assert classify(134, cap, 0.27, -0.25) is Verdict.NO           # 134 x 0.75 = 100.5 > 100
    assert classify(134, cap, 0.27, -0.26) is Verdict.TIGHT        # 134 x 0.74 = 99.2
    assert classify(101, cap) is Verdict.NO                        # no band: the central prediction decides


def test_comfortable_needs_the_band_upper_end_under_the_card():
    cap = 100.0
    assert classify(78, cap, 0.27, -0.25) is Verdict.COMFORTABLE   # 78 x 1.27 = 99.1
    assert classify(79, cap, 0.27, -0.25) is Verdict.TIGHT         # 79 x 1.27 = 100.3
    assert classify(COMFORTABLE_FRACTION * cap, cap, 0.05, -0.05) is Verdict.COMFORTABLE
    assert classify(COMFORTABLE_FRACTION * cap + 1, cap, 0.05, -0.05) is Verdict.TIGHT   # the headroom still holds


def test_classify_array_broadcasts_like_classify():
    peaks = np.array([50, 79, 104, 140], dtype=float)
    codes = classify_array(peaks, 100.0, 0.27, -0.25)
    assert [int(c) for c in codes] == [classify(p, 100.0, 0.27, -0.25).code for p in peaks] == [0, 1, 1, 2]


def test_comfortable_limit_is_the_largest_comfortable_peak():
    for cap, hi in ((24 * GIB, 0.27), (24 * GIB, 0.05), (80 * GIB, 0.3)):
        lim = comfortable_limit(cap, hi)
        assert classify(lim, cap, hi, -0.2) is Verdict.COMFORTABLE
        assert classify(lim + 2, cap, hi, -0.2) is Verdict.TIGHT
    assert comfortable_limit(100 * GIB, 0.0, margin=0.0) == 100 * GIB


def test_pick_prefers_comfortable_then_a_central_fit_then_the_least_memory():
    cap, hi, lo = 100.0, 0.27, -0.25
    assert pick([120, 90, 70, 60], cap, hi, lo) == 2        # the first comfortable
    assert pick([120, 95, 98], cap, hi, lo) == 1            # none comfortable: the first whose peak fits the card
    assert pick([130, 110, 104], cap, hi, lo) == 2          # all over the card: the least memory (tight, likely over)
    assert classify(104, cap, hi, lo) is Verdict.TIGHT


def test_advice_says_by_how_much_and_what_to_do():
    text = advice(95 * GIB, 100 * GIB, 0.27, -0.25)
    assert text.startswith("tight, may fit") and "5.0% under" in text and "expandable_segments" in text
    over = advice(105 * GIB, 100 * GIB, 0.27, -0.25)  # the central prediction over the card, the band's lower end under
    assert over.startswith("likely over (tight)") and "5.0% over" in over and "probably does not fit" in over
    assert advice(50 * GIB, 100 * GIB, 0.27, -0.25).startswith("comfortable")
    assert advice(200 * GIB, 100 * GIB, 0.27, -0.25).startswith("does not fit")
    assert set(SYMBOLS) == set(Verdict)


# -- what the user sees ----------------------------------------------------------------------

def test_estimate_json_states_the_verdict_with_its_band():
    est = vramplan.estimate("llama-3.1-8b", "qlora", gpu_mem="16GiB", seq=3200, batch=1, grad_ckpt=True,
                            optimizer="adamw_8bit", attn="flash")
    b = band_for_config(est.config)
    assert est.peak_bytes > est.capacity_bytes and est.peak_bytes * (1 + b.lo) <= est.capacity_bytes
    assert est.fits is False                                  # the central prediction
    assert verdict_of(est) is est.verdict is Verdict.TIGHT    # what the user is told
    j = est.to_json()
    assert j["fits"] is False and j["verdict"] == "tight"


@pytest.fixture(scope="module")
def over_card():
    """Llama-3.1-8B QLoRA at 3,200 tokens on a 16 GiB card: every setting a few percent over, inside the band."""
    return vramplan.fit("llama-3.1-8b", gpu_mem="16GiB", seq=3200, methods=["qlora"], batch=1, grad_ckpt=True,
                        optimizer="adamw_8bit", attn="flash", advise=False)


def test_fit_shows_a_tight_plan_over_the_card_as_likely_over(over_card):
    """Central prediction over the card, the band's lower end under it: the verdict stays "tight" (may fit, never
    "no"), but the words say it probably does not fit as planned (not "try it")."""
    from vramplan.render import render_fit

    row = over_card.rows[0]
    assert row.best is None and row.verdict is Verdict.TIGHT and not row.fits
    assert any(n.startswith("likely over") and "probably does not fit" in n for n in row.notes)
    assert label(row.verdict, row.estimate.peak_bytes, row.estimate.capacity_bytes) == LIKELY_OVER
    j = row.to_json()
    assert j["verdict"] == "tight" and j["verdict_text"].startswith("likely over (tight)")
    buf = io.StringIO()
    render_fit(over_card, Console(file=buf, width=200, color_system=None))
    line = next(ln for ln in buf.getvalue().splitlines() if ln.strip().startswith("qlora"))
    assert LIKELY_OVER in line and "b1" in line and "try it" not in line and "does not fit" not in line


def test_label_splits_tight_by_the_central_prediction():
    cap, hi, lo = 100.0, 0.27, -0.25
    assert label(classify(95, cap, hi, lo), 95, cap) == "tight"          # central fits: may fit
    assert label(classify(104, cap, hi, lo), 104, cap) == LIKELY_OVER    # central over, lower end under
    assert label(classify(60, cap, hi, lo), 60, cap) == "comfortable"
    assert label(classify(200, cap, hi, lo), 200, cap) == "no"


def test_fit_recommends_only_comfortable_plans():
    rep = vramplan.fit("llama-2-7b", "rtx4090", seq=2048, methods=["qlora", "dora"], advise=False)
    for row in rep.rows:
        assert row.best is not None
        assert row.best.verdict is Verdict.COMFORTABLE is row.verdict
        b = band_for_config(row.estimate.config)
        assert row.estimate.peak_bytes * (1 + b.hi) <= row.estimate.capacity_bytes
        # a faster plan it passed over is not comfortable
        for p in row.plans:
            if p.tokens_per_s > row.best.tokens_per_s and p.fallback is None:
                assert p.verdict is not Verdict.COMFORTABLE


def test_fit_limits_are_the_verdicts_comfortable_and_tight_limits():
    """fit's max_batch / max_seq are the largest the verdict calls comfortable; *_tight the largest it does not call
    "no"; one grid step beyond each is not (vramplan.planner.limits.band_limits)."""
    from vramplan.config import make_config
    from vramplan.gpus import get_gpu
    from vramplan.models import get_model
    from vramplan.planner.limits import band_limits, device_totals

    rep = vramplan.fit("llama-3.1-8b", "rtx4090", seq=2048, methods=["lora", "qlora"], advise=False)
    spec, card = get_model("llama-3.1-8b"), get_gpu("rtx4090")
    for row in rep.rows:
        cfg = row.estimate.config
        lim = band_limits(spec, cfg, card)
        assert (lim.max_batch, lim.max_seq, lim.max_batch_tight, lim.max_seq_tight) == (
            row.max_batch, row.max_seq, row.max_batch_tight, row.max_seq_tight)
        assert 0 < row.max_seq <= row.max_seq_tight and row.max_batch <= row.max_batch_tight
        b = band_for_config(cfg)
        one = make_config(spec, cfg.method, **{**{k: getattr(cfg, k) for k in ("precision", "grad_ckpt", "optimizer",
                                                                                "attn", "rank", "targets")}, "batch": 1})
        seqs = np.array([row.max_seq, row.max_seq + 128, row.max_seq_tight, row.max_seq_tight + 128])
        codes = classify_array(device_totals(spec, one, card, batch=1, seq=seqs), card.memory_bytes, b.hi, b.lo)
        assert list(codes[:2]) == [0, 1] and codes[2] <= 1 and codes[3] == 2
        # a comfortable plan at the asked sequence has a comfortable batch
        if row.verdict is Verdict.COMFORTABLE:
            assert row.max_batch >= cfg.batch and row.max_seq >= 2048
    j = rep.to_json()["rows"][0]
    assert {"max_batch", "max_seq", "max_batch_tight", "max_seq_tight"} <= set(j)


def test_benchmark_capacities_compare_the_comfortable_limit():
    from conftest import load_benchmark

    from vramplan.measurements.accuracy import summarize

    scored = load_benchmark("published_accuracy").run()
    cap = [x for x in scored if x.capacity_error is not None]
    assert cap and all(x.comfortable_seq <= x.longest_seq for x in cap)
    s = summarize(scored)
    assert s.capacity_over == sum(x.comfortable_seq > x.record.config.seq for x in cap)
    assert s.capacity_raw_over == sum(x.longest_seq > x.record.config.seq for x in cap)


def test_matrix_cell_over_the_card_is_tight_with_a_symbol():
    from vramplan.matrix import cell_text, feasibility_matrix

    c = feasibility_matrix("13b", "qlora", "rtx3080", 2048).cells[0]
    assert c.peak_bytes > c.capacity_bytes and c.verdict is Verdict.TIGHT and c.max_batch == 0
    text = cell_text(c)
    assert text.startswith(f"{SYMBOLS[Verdict.TIGHT]} {LIKELY_OVER}") and "over, the band's lower end under" in text
    ok = feasibility_matrix("1b", "qlora", "rtx4000ada", 512).cells[0]
    assert cell_text(ok).startswith(SYMBOLS[ok.verdict])


# -- the benchmark counts the verdict -----------------------------------------------------------

def test_benchmark_counts_the_verdict_the_user_sees():
    from conftest import load_benchmark

    from vramplan.measurements.accuracy import summarize

    scored = load_benchmark("published_accuracy").run()
    s = summarize(scored)
    oom = [x for x in scored if x.status == "oom"]
    fo = [x for x in scored if x.status == "fit_only"]
    assert s.oom_predicted_fit == sum(x.verdict == "comfortable" for x in oom)
    assert s.fit_only_predicted_no == sum(x.verdict == "no" for x in fo)
    assert s.oom_raw_fit == sum(bool(x.fits) for x in oom) and s.fit_only_raw_no == sum(x.fits is False for x in fo)
    assert s.oom_tight + s.oom_predicted_fit + sum(x.verdict == "no" for x in oom) == s.oom
    # a fit-only row is "no" only when even its band's lower end exceeds the card
    for x in fo:
        if x.verdict == "no":
            assert x.device * (1 + x.band[0]) > x.capacity


def test_constraints_beside_the_peak_decide_with_it():
    """A hard requirement beside the step (a second engine's weights in its share) unmet makes any verdict
    "no"; a soft one (its batch) unmet makes "comfortable" "tight" and leaves "no" and "tight" as they are;
    met ones change nothing. The estimate's verdict, --json and the render read the same field."""
    import dataclasses

    from vramplan.results import Constraint
    from vramplan.verdict import constrained, unmet_text

    hard_off = Constraint("engine weights", 10, 5, True, "engine needs 10 of 5")
    soft_off = Constraint("engine batch", 10, 5, False, "batch needs 10 of 5")
    met = Constraint("engine weights", 4, 5, True, "fine")
    assert [constrained(v, (hard_off,)) for v in Verdict] == [Verdict.NO] * 3
    assert [constrained(v, (soft_off,)) for v in Verdict] == [Verdict.TIGHT, Verdict.TIGHT, Verdict.NO]
    assert [constrained(v, (met,)) for v in Verdict] == list(Verdict)
    assert unmet_text((met, soft_off, hard_off)) == "batch needs 10 of 5; engine needs 10 of 5"
    est = vramplan.estimate("llama-2-7b", "lora", gpu="a100-80gb")
    assert est.verdict is Verdict.COMFORTABLE and "constraints" not in est.to_json()
    soft = dataclasses.replace(est, constraints=(soft_off,))
    assert soft.verdict is Verdict.TIGHT and soft.to_json()["verdict"] == "tight"
    assert soft.to_json()["constraints"][0] == {"name": "engine batch", "needed_bytes": 10, "available_bytes": 5,
                                               "hard": False, "met": False, "text": "batch needs 10 of 5"}
    hard = dataclasses.replace(est, constraints=(hard_off, met))
    assert hard.verdict is Verdict.NO
    from vramplan.render import render_estimate

    buf = io.StringIO()
    render_estimate(hard, Console(file=buf, width=200))
    out = buf.getvalue()
    assert "does not fit" in out and "engine needs 10 of 5" in out and "fine" not in out

"""The one definition of the feasibility verdicts: comfortable, tight, no.

Every place that says whether a configuration fits -- ``vramplan estimate``, ``vramplan fit``,
``vramplan matrix``, the trainer callback, the reports -- classifies a predicted device-total peak
(``Estimate.peak_bytes``: tensors + CUDA context + cuBLAS workspace + allocator reserve)
against a card's capacity with :func:`classify`, so the words mean the same everywhere. The
prediction carries an uncertainty band ``(lo, hi)`` (:mod:`vramplan.bands`: the 5th-95th
percentile of measured/predicted - 1 over published runs of its stack and method): the truth is
expected within ``[peak x (1 + lo), peak x (1 + hi)]``. The verdict is two-sided:

=============  ====================================================  =========================
verdict        rule (peak = predicted device total, bytes)           meaning
=============  ====================================================  =========================
comfortable    peak <= 0.85 x capacity and peak x (1 + hi) <= cap.   fits, even at the band's
                                                                     upper end, with >= 15 %
                                                                     headroom
tight          neither: the capacity lies inside                     may fit or may not: the
               [peak x (1 + lo), peak x (1 + hi)] (or the 15 %       card's limit is inside
               headroom is not there)                                the prediction's error
no             peak x (1 + lo) > capacity                            does not fit, even at the
                                                                     band's lower end
=============  ====================================================  =========================

Why two-sided: a plan called "fits" must fit (the band's upper end is under the card), and one
that really fits must not be called "does not fit" -- a published capacity ("the longest sequence
that fit") sits right at the card's limit, so an unbiased model predicts about half of them a few
percent over it: they are "tight", not "no". Without a band (``lo = hi = 0``) the rule is the old
one: "no" exactly when the central prediction exceeds the card.

Why 15 %: room for what the planner does not see on a desktop card (display server, browser, a
second process: 0.3-1 GiB, i.e. 3-10 % of a 10 GB card) besides the model's own error. A "tight"
configuration may run or may OOM after a long sequence or allocator fragmentation: try it with a
safety margin (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, a smaller micro-batch or
sequence); :func:`advice` says by how much. ``Estimate.fits`` stays the central prediction
(``peak <= capacity``); ``Verdict.fits`` is "not no" (may fit).

A "tight" plan is said in one of two ways (:func:`label`): "tight" while its central prediction fits the
card, "likely over" when the central prediction exceeds the card and only the band's lower end reaches
under it -- it probably does not fit as planned (run it only to find out; the advice names what would
fit). Both are the verdict "tight" (``fits``: may fit), so a plan that really fits is never called "no";
reports/published_accuracy.md counts how the corpus's fit-only and OOM rows read (``benchmarks/published_accuracy.py``).

When several settings are tried (gradient checkpointing, 8-bit optimisers), :func:`pick`
chooses the first setting, in the caller's order (cheapest in throughput first), that is
comfortable; failing that, the first tight one whose central prediction fits the card; failing
that, the one with the smallest peak (a tight one when any is: "tight, try it"; else how far off).
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

import numpy as np

from .units import GIB

#: A configuration is comfortable when its predicted device-total peak is at most this
#: fraction of the card's capacity.
COMFORTABLE_FRACTION = 0.85
#: The planner's one default margin: the fraction of a card's capacity a recommended plan leaves free
#: (``fit``, ``search``, ``what_would_fit``, ``recommend_techniques``), so that what the planner
#: recommends is what the matrix calls "comfortable". ``1 - COMFORTABLE_FRACTION`` = 0.15.
DEFAULT_MARGIN = 1.0 - COMFORTABLE_FRACTION


class Verdict(str, Enum):
    """Feasibility of one configuration on one card (values are the words shown to users)."""

    COMFORTABLE = "comfortable"
    TIGHT = "tight"
    NO = "no"

    @property
    def fits(self) -> bool:
        return self is not Verdict.NO

    @property
    def code(self) -> int:
        """0 comfortable, 1 tight, 2 no (the order of :data:`VERDICTS`; used by heat maps)."""
        return VERDICTS.index(self)


VERDICTS: tuple[Verdict, ...] = (Verdict.COMFORTABLE, Verdict.TIGHT, Verdict.NO)

#: How a "tight" plan whose central prediction exceeds the card reads (the band's lower end under the card)
LIKELY_OVER = "likely over"


def over_card(peak_bytes, capacity_bytes) -> bool:
    """Whether the central prediction exceeds the card (bytes, both)."""
    return float(peak_bytes) > float(capacity_bytes)


def label(v: Verdict, peak_bytes, capacity_bytes) -> str:
    """The words for verdict ``v`` of a plan of ``peak_bytes`` on a card of ``capacity_bytes``: the verdict's
    value, but :data:`LIKELY_OVER` for a tight plan whose central prediction exceeds the card."""
    if v is Verdict.TIGHT and over_card(peak_bytes, capacity_bytes):
        return LIKELY_OVER
    return v.value

#: One symbol per verdict, for dense tables (``vramplan matrix``'s cells).
SYMBOLS = {Verdict.COMFORTABLE: "✓", Verdict.TIGHT: "~", Verdict.NO: "✗"}

#: One line stating the thresholds, for report headers and ``--help``.
THRESHOLDS_TEXT = (f"comfortable: predicted peak <= {COMFORTABLE_FRACTION:.0%} of the card's memory and the upper end "
                   "of its uncertainty band under it; no: even the band's lower end above it; tight (~): in between, "
                   "the card's limit inside the band (may fit: try it with a safety margin) "
                   "(peak = device total: tensors + CUDA context + cuBLAS workspace + allocator reserve)")


def classify(peak_bytes: int | float, capacity_bytes: int | float, band_hi: float = 0.0,
             band_lo: float = 0.0) -> Verdict:
    """The verdict for one predicted device-total peak on a card of ``capacity_bytes`` (both bytes).

    ``band_hi`` / ``band_lo``: the ends of the prediction's uncertainty band as fractions of the
    peak (:func:`vramplan.bands.band_for`; ``lo <= 0 <= hi``): "comfortable" needs
    ``peak x (1 + hi) <= capacity`` (and the 15 % headroom), "no" needs ``peak x (1 + lo) > capacity``.
    """
    tp, tc, th, tl = type(peak_bytes), type(capacity_bytes), type(band_hi), type(band_lo)
    if ((tp is int or tp is float) and (tc is int or tc is float) and (th is int or th is float)
            and (tl is int or tl is float) and band_lo == band_lo and band_hi == band_hi):
        # plain numbers (a search classifies thousands of plans): :func:`classify_array`'s arithmetic in
        # Python floats -- the same IEEE double operations, the same answer, without numpy's per-call cost
        peak, cap = float(peak_bytes), float(capacity_bytes)
        hi, lo = max(float(band_hi), 0.0), min(max(float(band_lo), -0.99), 0.0)
        if peak * (1.0 + lo) > cap:
            return Verdict.NO
        return Verdict.COMFORTABLE if peak <= COMFORTABLE_FRACTION * cap and peak * (1.0 + hi) <= cap \
            else Verdict.TIGHT
    return VERDICTS[int(classify_array(peak_bytes, capacity_bytes, band_hi, band_lo))]


def classify_array(peak_bytes, capacity_bytes, band_hi=0.0, band_lo=0.0) -> np.ndarray:
    """Vectorised :func:`classify`: verdict codes (0 comfortable, 1 tight, 2 no), arrays broadcast."""
    peak = np.asarray(peak_bytes, dtype=np.float64)
    cap = np.asarray(capacity_bytes, dtype=np.float64)
    hi = np.maximum(np.asarray(band_hi, dtype=np.float64), 0.0)
    lo = np.clip(np.asarray(band_lo, dtype=np.float64), -0.99, 0.0)
    comfortable = (peak <= COMFORTABLE_FRACTION * cap) & (peak * (1.0 + hi) <= cap)
    no = peak * (1.0 + lo) > cap
    return np.where(no, 2, np.where(comfortable, 0, 1)).astype(np.int8)


def comfortable_limit(capacity_bytes: int, band_hi: float = 0.0, margin: float | None = None) -> int:
    """The largest device total (bytes) that is "comfortable" on a card of ``capacity_bytes``:
    ``min(capacity x (1 - margin), capacity / (1 + hi))`` (``margin`` default ``1 - 0.85``).
    The settings search ranks plans under it, so what ``fit`` recommends is what the verdict calls comfortable."""
    m = DEFAULT_MARGIN if margin is None else float(margin)
    hi = max(0.0, float(band_hi))
    return int(min(int(capacity_bytes * (1.0 - m)), np.floor(capacity_bytes / (1.0 + hi))))


def verdict_of(est) -> Verdict | None:
    """The verdict of an :class:`~vramplan.results.Estimate` on its card with its own band (None without a card)."""
    if est.capacity_bytes is None:
        return None
    extra = est.extra or {}
    b = extra.get("band") or {}
    v = classify(est.peak_bytes, est.capacity_bytes, b.get("hi", 0.0), b.get("lo", 0.0))
    return constrained(v, getattr(est, "constraints", ()))


def constrained(v: Verdict, constraints) -> Verdict:
    """The verdict ``v`` of a step's peak, with the requirements beside it
    (:class:`~vramplan.results.Constraint`): an unmet hard one makes it "no" (the run cannot start), an
    unmet soft one makes "comfortable" "tight" (it runs degraded)."""
    for c in constraints:
        if c.met:
            continue
        if c.hard:
            return Verdict.NO
        if v is Verdict.COMFORTABLE:
            v = Verdict.TIGHT
    return v


def unmet_text(constraints) -> str:
    """The texts of the unmet requirements, ``"; "``-joined (empty when all are met)."""
    return "; ".join(c.text for c in constraints if not c.met)


def advice(peak_bytes: int | float, capacity_bytes: int | float, band_hi: float = 0.0, band_lo: float = 0.0) -> str:
    """One line saying where a plan stands against the card, with the band (for "tight": by how much and what to do)."""
    v = classify(peak_bytes, capacity_bytes, band_hi, band_lo)
    pct = 100.0 * (peak_bytes / capacity_bytes - 1.0)
    where = (f"{peak_bytes / GIB:.2f} GiB predicted, {abs(pct):.1f}% {'over' if pct > 0 else 'under'} the "
             f"{capacity_bytes / GIB:.2f} GiB card (band {100 * band_lo:+.0f}%/{100 * band_hi:+.0f}%: "
             f"{peak_bytes * (1 + band_lo) / GIB:.2f}-{peak_bytes * (1 + band_hi) / GIB:.2f} GiB)")
    if v is Verdict.COMFORTABLE:
        return f"comfortable: {where}"
    if v is Verdict.NO:
        return f"does not fit: {where}; even the band's lower end exceeds the card"
    need = peak_bytes * (1.0 + max(0.0, band_hi)) - capacity_bytes  # what the upper end needs freed
    if over_card(peak_bytes, capacity_bytes):
        return (f"{LIKELY_OVER} (tight): {where}; only the band's lower end is under the card: it probably does not "
                f"fit as planned; taking off about {max(0.0, need) / GIB:.1f} GiB (a smaller micro-batch or sequence, "
                "a memory-saving technique, more GPUs or offload) makes it comfortable")
    return (f"tight, may fit: {where}; try it with a safety margin (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
            f"nothing else on the card); taking off about {max(0.0, need) / GIB:.1f} GiB (a smaller micro-batch or "
            "sequence, a memory-saving technique) makes it comfortable")


def pick(peaks: Sequence[float] | np.ndarray, capacity_bytes, band_hi=0.0, band_lo=0.0) -> np.ndarray | int:
    """Index of the setting to recommend among ``peaks`` (settings along axis 0, in preference order).

    The first comfortable one, else the first tight one whose central prediction fits the card, else the
    one with the smallest peak (tight when any setting is). ``capacity_bytes`` broadcasts against
    ``peaks[0]``, so one call picks for many cards at once.
    """
    p = np.asarray(peaks, dtype=np.float64)
    codes = classify_array(p, capacity_bytes, band_hi, band_lo)
    comfortable = codes == 0
    fits = (codes <= 1) & (p <= np.asarray(capacity_bytes, dtype=np.float64))
    first_comf = np.argmax(comfortable, axis=0)
    first_fit = np.argmax(fits, axis=0)
    smallest = np.argmin(p, axis=0)
    out = np.where(comfortable.any(axis=0), first_comf, np.where(fits.any(axis=0), first_fit, smallest))
    return int(out) if out.ndim == 0 else out

"""The one definition of the feasibility verdicts: comfortable, tight, no.

Every place that says whether a configuration fits -- ``vramplan matrix``, ``vramplan
fit``, the trainer callback, the reports -- classifies a predicted device-total peak
(``Estimate.peak_bytes``: tensors + CUDA context + cuBLAS workspace + allocator reserve)
against a card's capacity with :func:`classify`, so the words mean the same everywhere:

=============  ===============================================  ==========================
verdict        rule (peak = predicted device total, bytes)      meaning
=============  ===============================================  ==========================
comfortable    peak <= 0.85 x capacity                           fits with >= 15 % headroom
tight          0.85 x capacity < peak <= capacity                fits by the model, but the
                                                                 margin is inside its error
no             peak > capacity                                   does not fit (OOM)
=============  ===============================================  ==========================

Why 15 %: the analytic model's default uncertainty is +/-10 % of the tensor peak
(``vramplan.overheads.DEFAULT_UNCERTAINTY_FRACTION``), about +/-9 % of the device total;
the other ~6 % is room for what the planner does not see on a desktop card (display
server, browser, a second process: 0.3-1 GiB, i.e. 3-10 % of a 10 GB card). A "tight"
configuration may run or may OOM after a long sequence or allocator fragmentation; a
"comfortable" one should run as predicted. "no" coincides with ``Estimate.fits is False``.

The uncertainty band: a plan is also "tight" when the upper end of its band -- the published
residuals of its stack and method, :mod:`vramplan.bands` -- reaches the capacity
(``peak x (1 + band_hi) > capacity``), even below 85%. "no" stays ``peak > capacity``: the
central prediction does not fit.

When several settings are tried (gradient checkpointing, 8-bit optimisers),
:func:`pick` chooses the first setting, in the caller's order (cheapest in throughput
first), that is comfortable; failing that, the first that fits; failing that, the one with
the smallest peak (to show how far off it is).
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

import numpy as np

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

#: One line stating the thresholds, for report headers and ``--help``.
THRESHOLDS_TEXT = (f"comfortable: predicted peak <= {COMFORTABLE_FRACTION:.0%} of the card's memory; "
                   f"tight: above {COMFORTABLE_FRACTION:.0%} and up to 100%; no: above 100% "
                   "(peak = device total: tensors + CUDA context + cuBLAS workspace + allocator reserve)")


def classify(peak_bytes: int | float, capacity_bytes: int | float, band_hi: float = 0.0) -> Verdict:
    """The verdict for one predicted device-total peak on a card of ``capacity_bytes`` (both bytes).

    ``band_hi``: the upper end of the prediction's uncertainty band as a fraction
    (:func:`vramplan.bands.band_for`); a plan whose band reaches the capacity is "tight".
    """
    return VERDICTS[int(classify_array(peak_bytes, capacity_bytes, band_hi))]


def classify_array(peak_bytes, capacity_bytes, band_hi=0.0) -> np.ndarray:
    """Vectorised :func:`classify`: verdict codes (0 comfortable, 1 tight, 2 no), arrays broadcast."""
    peak = np.asarray(peak_bytes, dtype=np.float64)
    cap = np.asarray(capacity_bytes, dtype=np.float64)
    hi = np.maximum(np.asarray(band_hi, dtype=np.float64), 0.0)
    tight = (peak > COMFORTABLE_FRACTION * cap) | (peak * (1.0 + hi) > cap)
    return np.where(peak > cap, 2, np.where(tight, 1, 0)).astype(np.int8)


def pick(peaks: Sequence[float] | np.ndarray, capacity_bytes, band_hi=0.0) -> np.ndarray | int:
    """Index of the setting to recommend among ``peaks`` (settings along axis 0, in preference order).

    The first comfortable one, else the first that fits, else the one with the smallest peak.
    ``capacity_bytes`` broadcasts against ``peaks[0]``, so one call picks for many cards at once.
    """
    p = np.asarray(peaks, dtype=np.float64)
    codes = classify_array(p, capacity_bytes, band_hi)
    comfortable = codes == 0
    fits = codes <= 1
    first_comf = np.argmax(comfortable, axis=0)
    first_fit = np.argmax(fits, axis=0)
    smallest = np.argmin(p, axis=0)
    out = np.where(comfortable.any(axis=0), first_comf, np.where(fits.any(axis=0), first_fit, smallest))
    return int(out) if out.ndim == 0 else out

"""Search of the largest batch or sequence that fits: doubling, then bisection.

The search is a pure function of the probes made so far (:func:`next_size`), so a resumed
run replays the logged probes and carries on where it stopped.

1. Probe ``start``. While it fits, double (capped at ``max``).
2. If ``start`` does not fit, halve until something fits (or nothing above ``granularity`` does).
3. Bisect between the largest size that fits and the smallest that does not, to ``granularity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

MAX_PROBES = 14


def _down(x: int, g: int) -> int:
    return max(g, (x // g) * g)


@dataclass(frozen=True)
class SearchOutcome:
    largest_fit: int | None  # None: not even the smallest size fits
    smallest_oom: int | None  # None: the maximum fits
    probes: int
    done: bool
    reason: str = ""


def outcome(results: Mapping[int, bool], *, start: int, max_size: int, granularity: int = 1) -> SearchOutcome:
    """Summarise probes (``size -> fits``) and say whether the search is finished."""
    nxt = next_size(results, start=start, max_size=max_size, granularity=granularity)
    fits = [s for s, ok in results.items() if ok]
    ooms = [s for s, ok in results.items() if not ok]
    lo = max(fits) if fits else None
    hi = min((s for s in ooms if lo is None or s > lo), default=None)
    if nxt is not None:
        return SearchOutcome(lo, hi, len(results), False)
    if lo is None:
        reason = "nothing fits"
    elif hi is None:
        reason = "the maximum fits"
    elif len(results) >= MAX_PROBES:
        reason = "probe limit"
    else:
        reason = f"bracketed to {granularity}"
    return SearchOutcome(lo, hi, len(results), True, reason)


def next_size(results: Mapping[int, bool], *, start: int, max_size: int, granularity: int = 1) -> int | None:
    """The next size to probe, or None when the search is finished."""
    g = max(1, int(granularity))
    max_size = _down(max_size, g)  # every size probed is a multiple of the granularity
    start = min(_down(start, g), max_size)
    if not results:
        return start
    if len(results) >= MAX_PROBES:
        return None
    fits = [s for s, ok in results.items() if ok]
    ooms = [s for s, ok in results.items() if not ok]
    lo = max(fits) if fits else None
    hi_candidates = [s for s in ooms if lo is None or s > lo]
    hi = min(hi_candidates) if hi_candidates else None
    if lo is None:  # nothing fits yet: halve below the smallest failure
        nxt = _down(hi // 2, g) if hi // 2 >= g else None
        if nxt is None or nxt >= hi or nxt in results:
            return None
        return nxt
    if hi is None:  # no failure above the best fit yet: double
        if lo >= max_size:
            return None
        nxt = min(max_size, _down(lo * 2, g))
        return None if nxt <= lo or nxt in results else nxt
    if hi - lo <= g:
        return None
    mid = _down((lo + hi) // 2, g)
    if mid <= lo or mid >= hi or mid in results:
        return None
    return mid

"""The planner's uncertainty band, from the residuals of published measurements (numpy-free data read).

``vramplan/data/bands.json`` is written by ``benchmarks/published_accuracy.py --write-bands``
from the shipped corpus (``measurements/``): for each stack and method (else stack, else all
rows), the 5th and 95th percentiles of ``measured / predicted - 1`` over the rows measured on
the like-for-like quantity, widened to at least +/-5% (:mod:`vramplan.measurements.accuracy`).
``estimated`` rows never enter it. The benchmark scores the same rule leave-one-source-out.

A band is a pair of fractions ``(lo, hi)``: the truth is expected within
``[peak x (1 + lo), peak x (1 + hi)]``. :mod:`vramplan.verdict` calls a plan "tight" when its
upper end reaches the card's capacity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import VramplanError
from .methods import takes_adapter_choice

BANDS_PATH = Path(__file__).parent / "data" / "bands.json"
#: Used where no published row backs a stack (and for the model's own default): +/-10%.
DEFAULT_BAND = (-0.10, 0.10)


@dataclass(frozen=True)
class Band:
    """The published spread of measured/predicted device totals behind a stack and method (:func:`band_for_config`):
    ``lo``/``hi`` as fractions of the prediction, from ``rows`` rows of ``sources`` sources, at ``level``."""

    lo: float
    hi: float
    rows: int          # published rows behind it (0: the default)
    sources: int
    level: str         # "stack+method" | "stack" | "all" | "default"
    key: str

    def describe(self) -> str:
        if not self.rows:
            return f"{100 * self.lo:+.0f}% / {100 * self.hi:+.0f}% (default: no published row backs {self.key})"
        return (f"{100 * self.lo:+.1f}% / {100 * self.hi:+.1f}% of the prediction (5th-95th percentile of "
                f"measured/predicted over {self.rows} published rows from {self.sources} sources, {self.level} {self.key})")

    def to_json(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "rows": self.rows, "sources": self.sources, "level": self.level,
                "key": self.key}


@lru_cache(maxsize=1)
def _table() -> dict:
    if not BANDS_PATH.exists():
        return {}
    try:
        raw = json.loads(BANDS_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VramplanError(f"{BANDS_PATH} is unreadable ({exc})", "regenerate it: benchmarks/published_accuracy.py --write-bands") from None
    bands = raw.get("bands", {}) if isinstance(raw, dict) else {}
    for k, v in bands.items():
        if not (isinstance(v, dict) and isinstance(v.get("lo"), (int, float)) and isinstance(v.get("hi"), (int, float))
                and v["lo"] <= 0 <= v["hi"]):
            raise VramplanError(f"{BANDS_PATH}: band {k!r} is malformed", "regenerate it: benchmarks/published_accuracy.py --write-bands")
    return bands


def method_key(method: str, adapter: str | None) -> str:
    """``lora``, ``qlora``, ``full`` ...; ``dpo+lora`` for the preference and RL methods."""
    return f"{method}+{adapter}" if takes_adapter_choice(method) else method


def band_for(stack: str, method: str, multi: bool = False) -> Band:
    """The band of ``stack`` and ``method`` (``method_key``): its own, else its stack's, else all rows', else the
    default. A sharded or offloaded plan (``multi``) first reads the bands of the published sharded/offloaded
    runs (``multi:<stack>/<method>``, ``multi:<stack>``, ``multi``), whose errors come from the engines'
    mechanisms, then the single-device chain; a single-device plan reads only single-device runs' bands."""
    t = _table()
    chain = [("stack+method", f"{stack}/{method}"), ("stack", stack), ("all", "all")]
    if multi:
        chain = [(level, f"multi:{key}" if key != "all" else "multi") for level, key in chain] + chain
    for level, key in chain:
        b = t.get(key)
        if b:
            return Band(float(b["lo"]), float(b["hi"]), int(b.get("n", 0)), int(b.get("sources", 0)), level, key)
    return Band(DEFAULT_BAND[0], DEFAULT_BAND[1], 0, 0, "default", f"{stack}/{method}")


def band_for_config(cfg, multi: bool = False) -> Band:
    """:func:`band_for` of a config; ``multi``: the plan is sharded or offloaded (``Parallel.distributed``)."""
    return band_for(cfg.framework, method_key(cfg.method, cfg.adapter), multi)


def band_for_estimate(est) -> Band:
    """:func:`band_for` of an :class:`~vramplan.results.Estimate` (sharded when it names a strategy)."""
    return band_for_config(est.config, multi=getattr(est, "strategy", None) is not None)

"""Calibration: real training steps on a card, fitted into that card's profile.

``run_calibration`` measures a suite (``calibrate/*.toml``) point by point into an
append-only JSONL log, ``fit_profile`` turns the log into ``profiles/<gpu>.json``
(:class:`vramplan.profiles.Profile`), and ``write_report`` writes
``reports/calibration/<gpu>.md`` with a plot. Importing this package does not import
torch; the runner does when it starts.
"""

from __future__ import annotations

import importlib

# names are imported on first use, so that ``vramplan calibrate``'s argument parser (built for
# every CLI call) does not load the runner, the fit and the report
_LAZY = {
    "fit_profile": "fit", "JsonlLog": "log", "LogState": "log", "read_log": "log", "write_report": "report",
    "Builder": "runner", "CalibrationResult": "runner", "Workload": "runner", "measure_point": "runner",
    "run_calibration": "runner", "Point": "suite", "SearchSpec": "suite", "Suite": "suite", "load_suite": "suite",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Builder", "CalibrationResult", "JsonlLog", "LogState", "Point", "SearchSpec", "Suite", "Workload",
    "fit_profile", "load_suite", "measure_point", "read_log", "run_calibration", "write_report",
]

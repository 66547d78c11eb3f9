"""Calibration: real training steps on a card, fitted into that card's profile.

``run_calibration`` measures a suite (``calibrate/*.toml``) point by point into an
append-only JSONL log, ``fit_profile`` turns the log into ``profiles/<gpu>.json``
(:class:`vramplan.profiles.Profile`), and ``write_report`` writes
``reports/calibration/<gpu>.md`` with a plot. Importing this package does not import
torch; the runner does when it starts.
"""

from __future__ import annotations

from .fit import fit_profile
from .log import JsonlLog, LogState, read_log
from .report import write_report
from .runner import Builder, CalibrationResult, Workload, measure_point, run_calibration
from .suite import Point, SearchSpec, Suite, load_suite

__all__ = [
    "Builder", "CalibrationResult", "JsonlLog", "LogState", "Point", "SearchSpec", "Suite", "Workload",
    "fit_profile", "load_suite", "measure_point", "read_log", "run_calibration", "write_report",
]

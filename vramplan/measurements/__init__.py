"""Measurements of real training runs: one record format, importers, and the shipped corpus.

* :mod:`.record`: :class:`MeasurementRecord`, the one versioned record every measuring path
  writes or is converted to (calibration runner, ``VramplanCallback``, published tables).
* :mod:`.importers`: ``vramplan calibrate --import FILE`` (published CSV tables with a column
  mapping; callback and runner JSONL logs).
* :mod:`.accuracy`: predicted vs measured on the like-for-like quantity, with
  leave-one-source-out bands (``benchmarks/published_accuracy.py``).

numpy only; never imports torch.
"""

from .record import (MeasurementRecord, RunConfig, Device, Measurement, Source, QUANTITIES, OUTCOMES,  # noqa: F401
                     SCHEMA, load_records, dump_records)

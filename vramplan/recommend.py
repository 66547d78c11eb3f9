"""The settings search behind ``vramplan fit`` and the technique advice: public entry point.

The code lives in :mod:`vramplan.planner.search` (the fastest configuration that fits with a
margin, what would fit when nothing does, other stacks and precisions),
:mod:`vramplan.planner.limits` (largest micro-batch, longest sequence) and
:mod:`vramplan.planner.techniques` (memory-saving techniques); this module re-exports their names.
"""

from __future__ import annotations

from .planner.limits import DeviceTotals, largest_micro_batch, longest_sequence
from .planner.search import (GPU_COUNTS, MICRO_BATCHES, OPTIMIZERS, RANKS, MethodPlans, Plan, Suggestion, fallback_note,
                             other_setups, search, what_would_fit)
from .planner.techniques import (MIN_SAVING_BYTES, MIN_SAVING_FRACTION, TechniqueAdvice, TechniqueSaving,
                                 recommend_techniques)
from .verdict import DEFAULT_MARGIN

__all__ = ["DEFAULT_MARGIN", "DeviceTotals", "GPU_COUNTS", "MICRO_BATCHES", "MIN_SAVING_BYTES", "MIN_SAVING_FRACTION",
           "MethodPlans", "OPTIMIZERS", "Plan", "RANKS", "Suggestion", "TechniqueAdvice", "TechniqueSaving",
           "fallback_note", "largest_micro_batch", "longest_sequence", "other_setups", "recommend_techniques", "search",
           "what_would_fit"]

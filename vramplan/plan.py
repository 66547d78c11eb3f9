"""The planner's library functions: ``estimate`` one configuration, ``fit`` every method on a card.

The CLI is a thin layer over these; they return dataclasses (``Estimate``, ``FitReport``)
that ``--json`` serialises unchanged. The code lives in :mod:`vramplan.planner` (card checks,
estimate, limits, search, techniques, fit: each layer imports only the ones below it); this
module is the public entry point and re-exports its names.
"""

from __future__ import annotations

from .planner.checks import MOE_QLORA_SOURCES, STACK, check_card, moe_qlora_note, resolve_gpu
from .planner.estimating import estimate, estimate_config
from .planner.fitting import CardRow, CardsReport, FitReport, FitRow, fit, fit_cards
from .planner.limits import BATCH_GRID, SEQ_GRID, device_totals, largest_batch

__all__ = ["BATCH_GRID", "CardRow", "CardsReport", "FitReport", "FitRow", "MOE_QLORA_SOURCES", "SEQ_GRID", "STACK",
           "check_card", "device_totals", "estimate", "estimate_config", "fit", "fit_cards", "largest_batch",
           "moe_qlora_note", "resolve_gpu"]

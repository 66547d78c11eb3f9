"""The planner inside other trainers.

* :func:`from_model` -- plan a run from a live ``transformers`` model, its PEFT config and
  its training arguments (any trainer).
* :class:`VramplanCallback` (``vramplan.integrations.hf``) -- a ``transformers``
  ``TrainerCallback`` (TRL's trainers too): plans at the start of training, warns when the
  run will not fit, and compares predicted with measured peak memory after the first steps.
* :func:`estimate_file` (``vramplan.integrations.config_files``) -- plan an Axolotl YAML or
  a HF/TRL training-arguments JSON/YAML (``vramplan estimate --config FILE``).

Nothing here imports transformers, peft or torch at import time; the callback module
imports transformers when it is first used.
"""

from __future__ import annotations

from .config_files import estimate_file, read_training_file
from .from_model import from_model, request_from_model
from .request import PlanRequest

__all__ = ["PlanRequest", "VramplanCallback", "estimate_file", "from_model", "read_training_file",
           "request_from_model"]


def __getattr__(name: str):
    if name == "VramplanCallback":
        from .hf import VramplanCallback

        return VramplanCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

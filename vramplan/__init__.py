"""vramplan: will it fit on this GPU, how fast will it run, which configuration should I use?

The public API. Importing vramplan never imports torch, transformers or peft: the
planning path is numpy only; ``dryrun`` and the calibration runner import them lazily.
"""

from __future__ import annotations

from .config import TrainConfig, make_config
from .errors import MissingDependencyError, ProfileError, UnknownNameError, VramplanError
from .gpus import GPUSpec, get_gpu
from .methods import Adapter, get_method, resolve
from .models import ModelSpec, get_model
from .plan import FitReport, FitRow, estimate, fit
from .results import Estimate
from .taxonomy import Component, Group, Phase, Quantity

__version__ = "0.1.0"


def dryrun(model, method: str = "lora", **kwargs):
    """Trace one real training step on the meta device (needs the ``dryrun`` extra). See ``vramplan.dryrun``."""
    from .dryrun import dryrun as _dryrun

    return _dryrun(model, method, **kwargs)


__all__ = [
    "Adapter", "Component", "Estimate", "FitReport", "FitRow", "GPUSpec", "Group", "MissingDependencyError",
    "ModelSpec", "Phase", "ProfileError", "Quantity", "TrainConfig", "UnknownNameError", "VramplanError",
    "dryrun", "estimate", "fit", "get_gpu", "get_method", "get_model", "make_config", "resolve",
]

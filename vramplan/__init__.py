"""vramplan: will it fit on this GPU, how fast will it run, which configuration should I use?

The public API. Importing vramplan never imports torch, transformers or peft: the
planning path is numpy only; the dry run (``vramplan.dry_run``, the package
``vramplan.dryrun``) and the calibration runner import them lazily.
"""

from __future__ import annotations

from .config import TrainConfig, make_config
from .errors import MissingDependencyError, ProfileError, UnknownNameError, VramplanError
from .gpus import GPUSpec, get_gpu
from .methods import Adapter, get_method, resolve
from .models import ModelSpec, get_model
from .plan import FitReport, FitRow, estimate, fit
from .request import ConfigRequest, EstimateRequest, FitRequest, GridRequest, MatrixRequest
from .results import Estimate
from .taxonomy import Component, Group, Phase, Quantity

__version__ = "0.1.0"


# Lazy attributes: the trainer integrations and the matrix load on first use, so that
# `import vramplan` imports neither transformers (VramplanCallback) nor anything unneeded.
_LAZY = {
    "from_model": ("vramplan.integrations.from_model", "from_model"),
    "VramplanCallback": ("vramplan.integrations.hf", "VramplanCallback"),  # needs transformers
    "feasibility_matrix": ("vramplan.matrix", "feasibility_matrix"),
    "recommend_techniques": ("vramplan.recommend", "recommend_techniques"),
    "TechniqueAdvice": ("vramplan.recommend", "TechniqueAdvice"),
    "TechniqueSaving": ("vramplan.recommend", "TechniqueSaving"),
    "fit_cards": ("vramplan.plan", "fit_cards"),
    # the dry run: the function (importing its package imports no torch; calling it does)
    "dry_run": ("vramplan.dryrun", "dryrun"),
    "DryRunResult": ("vramplan.dryrun", "DryRunResult"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "dryrun":  # the package (``vramplan.dryrun.dryrun`` is its function; ``vramplan.dry_run`` too)
        import importlib

        return importlib.import_module("vramplan.dryrun")
    raise AttributeError(f"module 'vramplan' has no attribute {name!r}")


# VramplanCallback is public but left out of __all__: a star import must not need transformers.
__all__ = [
    "Adapter", "Component", "ConfigRequest", "Estimate", "EstimateRequest", "FitReport", "FitRequest", "FitRow",
    "GPUSpec", "GridRequest", "Group", "MatrixRequest", "MissingDependencyError", "ModelSpec", "Phase", "ProfileError",
    "Quantity", "TechniqueAdvice", "TechniqueSaving", "TrainConfig", "UnknownNameError", "VramplanError", "dry_run",
    "estimate", "feasibility_matrix", "fit", "from_model", "get_gpu", "get_method", "get_model",
    "make_config", "recommend_techniques", "resolve",
]

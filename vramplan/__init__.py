"""vramplan: will it fit on this GPU, how fast will it run, which configuration should I use?

The public API. Importing vramplan never imports torch, transformers or peft: the
planning path is numpy only; the dry run (``vramplan.dry_run``, the package
``vramplan.dryrun``) and the calibration runner import them lazily.

Every public name loads on first use (PEP 562 ``__getattr__``): ``import vramplan`` itself imports
nothing else (not even numpy), ``vramplan.fit`` or ``from vramplan import fit`` imports the planner
then. The names and the objects they give are the same as an eager import's; a submodule
(``vramplan.config``) is an attribute as before. The command line relies on it: its entry point
(:mod:`vramplan.__main__`) runs before numpy loads, so it can size numpy's BLAS thread pool first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .config import TrainConfig, make_config
    from .dryrun import DryRunResult
    from .dryrun import dryrun as dry_run
    from .errors import MissingDependencyError, ProfileError, UnknownNameError, VramplanError
    from .gpus import GPUSpec, get_gpu
    from .integrations.from_model import from_model
    from .integrations.hf import VramplanCallback
    from .matrix import feasibility_matrix
    from .methods import Adapter, get_method, resolve
    from .models import ModelSpec, get_model
    from .plan import FitReport, FitRow, estimate, fit, fit_cards
    from .recommend import TechniqueAdvice, TechniqueSaving, recommend_techniques
    from .request import ConfigRequest, EstimateRequest, FitRequest, GridRequest, MatrixRequest
    from .results import Estimate
    from .taxonomy import Component, Group, Phase, Quantity

# Public name -> (module, attribute). Each loads on first use: the planner's names import numpy and
# the catalogues; the trainer integrations, the matrix and the dry run load only when asked for, so
# that using vramplan imports neither transformers (VramplanCallback) nor anything unneeded.
_LAZY = {
    "TrainConfig": ("vramplan.config", "TrainConfig"),
    "make_config": ("vramplan.config", "make_config"),
    "MissingDependencyError": ("vramplan.errors", "MissingDependencyError"),
    "ProfileError": ("vramplan.errors", "ProfileError"),
    "UnknownNameError": ("vramplan.errors", "UnknownNameError"),
    "VramplanError": ("vramplan.errors", "VramplanError"),
    "GPUSpec": ("vramplan.gpus", "GPUSpec"),
    "get_gpu": ("vramplan.gpus", "get_gpu"),
    "Adapter": ("vramplan.methods", "Adapter"),
    "get_method": ("vramplan.methods", "get_method"),
    "resolve": ("vramplan.methods", "resolve"),
    "ModelSpec": ("vramplan.models", "ModelSpec"),
    "get_model": ("vramplan.models", "get_model"),
    "FitReport": ("vramplan.plan", "FitReport"),
    "FitRow": ("vramplan.plan", "FitRow"),
    "estimate": ("vramplan.plan", "estimate"),
    "fit": ("vramplan.plan", "fit"),
    "ConfigRequest": ("vramplan.request", "ConfigRequest"),
    "EstimateRequest": ("vramplan.request", "EstimateRequest"),
    "FitRequest": ("vramplan.request", "FitRequest"),
    "GridRequest": ("vramplan.request", "GridRequest"),
    "MatrixRequest": ("vramplan.request", "MatrixRequest"),
    "Estimate": ("vramplan.results", "Estimate"),
    "Component": ("vramplan.taxonomy", "Component"),
    "Group": ("vramplan.taxonomy", "Group"),
    "Phase": ("vramplan.taxonomy", "Phase"),
    "Quantity": ("vramplan.taxonomy", "Quantity"),
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
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # looked up once: later uses are plain attribute reads
        return value
    if name.startswith("__"):  # dunders (__path__, __file__ ...) are the module's own or absent
        raise AttributeError(f"module 'vramplan' has no attribute {name!r}")
    try:  # a submodule (``vramplan.config``, ``vramplan.dryrun``: the package): an attribute once imported
        return importlib.import_module(f"vramplan.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"vramplan.{name}":
            raise
    raise AttributeError(f"module 'vramplan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# VramplanCallback is public but left out of __all__: a star import must not need transformers.
__all__ = [
    "Adapter", "Component", "ConfigRequest", "Estimate", "EstimateRequest", "FitReport", "FitRequest", "FitRow",
    "GPUSpec", "GridRequest", "Group", "MatrixRequest", "MissingDependencyError", "ModelSpec", "Phase", "ProfileError",
    "Quantity", "TechniqueAdvice", "TechniqueSaving", "TrainConfig", "UnknownNameError", "VramplanError", "dry_run",
    "estimate", "feasibility_matrix", "fit", "from_model", "get_gpu", "get_method", "get_model",
    "make_config", "recommend_techniques", "resolve",
]

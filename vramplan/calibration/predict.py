"""Predictions that calibration compares with its measurements.

* The analytic model's tensor prediction (``vramplan.plan.estimate_config`` without a card,
  so no profile is applied): tensor peak, components at the peak, the activation part.
* The dry run's tensor accounting (``vramplan.dryrun``) when that extra is importable.
* A calibrated prediction: the analytic tensors corrected and completed with a
  :class:`~vramplan.profiles.Profile` (:func:`calibrated`).

Chain of a calibrated prediction (every term named in the report; the memory part is
:func:`vramplan.overheads.runtime_overheads`, the planner's one implementation):

    allocated = tensor_peak + (activation_factor - 1) * activations + workspace  [- paged states]
    reserved  = profile.reserved_bytes(allocated, method)
    device    = reserved + context [+ paged optimiser states, in managed memory outside the allocator]
    step_s    = profile.step_seconds(method, step_features) (+ QLoRA dequantisation)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from ..models import ModelSpec
from ..overheads import peak_terms
from ..profiles import Profile
from ..taxonomy import Component
from .flops import step_shape


@dataclass(frozen=True)
class TensorPrediction:
    """The analytic model's (uncalibrated) tensor prediction of one configuration."""

    tensor_peak_bytes: int
    activation_bytes: int       # activations + logits + KV cache at the peak
    paged_state_bytes: int      # optimiser states in managed memory (paged 8-bit optimisers)
    default_peak_bytes: int     # the planner's device total with its default overheads
    peak_phase: str
    components: dict

    def to_json(self) -> dict:
        return {"tensor_peak_bytes": self.tensor_peak_bytes, "activation_bytes": self.activation_bytes,
                "paged_state_bytes": self.paged_state_bytes, "default_peak_bytes": self.default_peak_bytes,
                "peak_phase": self.peak_phase, "components": self.components}


def analytic(spec: ModelSpec, cfg: TrainConfig) -> TensorPrediction | None:
    """The analytic prediction, or None if the planner is not available in this build."""
    try:
        from ..plan import estimate_config
    except ImportError:  # pragma: no cover - the planner is part of the package
        return None
    est = estimate_config(spec, cfg, None)
    comps = {Component(c) if not isinstance(c, Component) else c: int(v) for c, v in est.components.items()}
    act, paged = peak_terms(comps, cfg.optimizer)
    return TensorPrediction(int(est.tensor_peak_bytes), int(act), int(paged), int(est.peak_bytes),
                            getattr(est.peak_phase, "value", str(est.peak_phase)), {c.value: v for c, v in comps.items()})


def dryrun_accounting(spec: ModelSpec, cfg: TrainConfig) -> dict | None:
    """The dry run's tensor peak and components (meta device), or None where the extra is missing."""
    try:
        from ..dryrun import dryrun as run_dry
    except ImportError:
        return None
    res = run_dry(spec, cfg.method, config=cfg)
    comps = res.components or {}
    return {"tensor_peak_bytes": int(res.tensor_peak_bytes),
            "components": {getattr(c, "value", str(c)): int(v) for c, v in comps.items()},
            "peak_phase": getattr(res.peak_phase, "value", None)}


@dataclass(frozen=True)
class Calibrated:
    """A calibrated prediction; a field is None where the profile lacks the quantity."""

    allocated_bytes: int
    reserved_bytes: int | None
    device_bytes: int | None
    step_s: float | None
    tokens_per_s: float | None


def calibrated(pred: TensorPrediction, spec: ModelSpec, cfg: TrainConfig, profile: Profile) -> Calibrated:
    """Apply ``profile`` to an analytic prediction (see the module docstring for the chain).

    The memory chain is :func:`vramplan.overheads.runtime_overheads`, the planner's own, so
    what the fit and the report evaluate is exactly what ``vramplan estimate`` predicts;
    here a figure the profile lacks is None instead of the planner's default.
    """
    from ..overheads import runtime_overheads

    method = cfg.recipe.name
    o = runtime_overheads(pred.tensor_peak_bytes, None, method=method, activation_bytes=pred.activation_bytes,
                          paged_bytes=pred.paged_state_bytes, profile=profile)
    reserved = o.reserved_bytes if o.is_calibrated("allocator") else None
    device = o.device_bytes if reserved is not None and o.is_calibrated("context") else None
    shape = step_shape(spec, cfg)
    step_s = profile.step_seconds(method, shape.features(), dequant_gparams=shape.dequant_gparams)
    tps = shape.tokens / step_s if step_s else None
    return Calibrated(o.allocated_bytes, reserved, device, step_s, tps)

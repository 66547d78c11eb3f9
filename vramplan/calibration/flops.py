"""The regressors of the step-time model: one training step's FLOPs, passes and dequantised weights.

The profile's achieved TFLOP/s and step-time model are defined against these counts, and the
planner predicts step time from a profile with the same counts, so there is one counter:
:func:`vramplan.throughput.step_work` (numpy only, in the planning path). This module only
repackages its scalar result as a :class:`StepShape` (:func:`step_shape`); the conventions and
their sources (6 N + 12 L H Q T per token, PaLM appendix B; frozen weights skip the weight
gradient; checkpointing recomputes a forward; DPO's two sequences and reference; PPO's rollout)
are stated in :mod:`vramplan.throughput`. No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from ..models import ModelSpec
from ..profiles import step_features
from ..throughput import step_work


@dataclass(frozen=True)
class StepShape:
    """What one optimiser step does, in the units of the step-time model."""

    flops: float           # total FLOPs of the step
    tokens: int            # tokens through the trained policy: batch x seq x sequences per example
    layer_passes: int      # sequential passes over the layers (forwards, backwards, recomputes)
    gen_tokens: int        # tokens generated one at a time (PPO)
    layers: int
    hidden: int
    dequant_gparams: float  # NF4 weights dequantised per step, in 1e9 (QLoRA bases)

    def features(self) -> dict[str, float]:
        """The regressors of :class:`vramplan.profiles.Throughput` (passes counted per layer)."""
        return step_features(flops=self.flops, layers=self.layers, hidden=self.hidden, passes=self.layer_passes,
                             gen_tokens=self.gen_tokens)


def step_shape(spec: ModelSpec, cfg: TrainConfig) -> StepShape:
    """FLOPs, passes and dequantised weights of one step of ``cfg`` on ``spec`` (``step_work``'s counts)."""
    w = step_work(spec, cfg)
    return StepShape(flops=float(w.model_flops), tokens=int(w.tokens), layer_passes=int(w.layer_passes),
                     gen_tokens=int(w.gen_tokens), layers=int(w.layers), hidden=int(w.hidden),
                     dequant_gparams=float(w.dequant_gparams))


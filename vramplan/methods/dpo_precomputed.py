"""DPO with ``precompute_ref_log_probs=True`` (TRL ``DPOTrainer``): no reference in the step.

TRL computes the reference log-probs in a pass over the dataset before training (the reference =
the policy's base with the adapter disabled under PEFT, else the model itself, as
``ref_model=None``) and reads them from the batch; the step holds no reference copy and runs no
reference forward. The copies (the policy alone) are data in methods.toml; the loss buffers are
DPO's ``sequence_logps``.
"""

from __future__ import annotations

from typing import Any

from .base import Variant
from .dpo import DPO
from .preference import precompute_pass_bytes


class DPOPrecomputed(Variant, DPO):
    step = "vramplan.runtime.preference:dpo_precomputed_step"

    def precompute_pass(self, model: Any, cfg: Any) -> float:
        return precompute_pass_bytes(model, cfg)

    def assumptions(self, cfg: Any) -> list[str]:
        return ["DPO with precompute_ref_log_probs=True: chosen + rejected concatenated (2 x batch sequences); "
                "reference log-probs computed before training and read from the batch: no reference model or "
                "forward in the step; the precompute pass before training is planned on its own (its peak beside the step's)"]

    def dryrun_assumptions(self, cfg: Any) -> list[str]:
        return ["DPO as TRL with precomputed reference log-probs: the policy's forward and the mean-logits "
                "metric's copy of the whole sequence's logits; no reference forward"]


BEHAVIOUR = DPOPrecomputed()

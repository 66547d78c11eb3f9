"""KTO with ``precompute_ref_log_probs=True`` (TRL ``KTOTrainer``): no reference in the step.

The KL estimate's policy forward (no_grad) stays; the reference's KL and batch forwards move to a
pass before training. The copies (the policy alone) are data in methods.toml; the loss buffers
are :func:`vramplan.methods.preference.kto_logits_bytes` without the reference's output.
"""

from __future__ import annotations

from typing import Any

from .base import Variant
from .kto import KTO
from .preference import TRL, precompute_pass_bytes


class KTOPrecomputed(Variant, KTO):
    step = "vramplan.runtime.preference:kto_precomputed_step"
    reference = False
    extra_forwards = (("policy", 1),)  # the KL estimate's forwards over mismatched sequences

    def precompute_pass(self, model: Any, cfg: Any) -> float:
        return precompute_pass_bytes(model, cfg)

    def assumptions(self, cfg: Any) -> list[str]:
        return [f"KTO ({TRL}, loss_type='kto') with precompute_ref_log_probs=True: batch unpaired sequences, half "
                "desirable; the KL estimate runs the policy (no_grad) on batch mismatched sequences; no reference "
                "model or forward in the step; the precompute pass before training is planned on its own (its peak beside the step's)"] \
            + self._batch_note(cfg)


BEHAVIOUR = KTOPrecomputed()

"""KTO (TRL ``KTOTrainer``, stable ``trl`` API): unpaired examples, a reference, the KL estimate's forwards.

Copies (policy + reference sharing the base under PEFT) are data in methods.toml; the loss
buffers are :func:`vramplan.methods.preference.kto_logits_bytes`.
"""

from __future__ import annotations

from typing import Any

from .preference import TRL, Preference


class KTO(Preference):
    step = "vramplan.runtime.preference:kto_step"
    loss_kind = "kto"
    reference = True
    extra_forwards = (("policy", 1), ("reference", 1))  # the KL estimate's forwards over mismatched sequences
    trainer_names = ("KTOConfig", "KTOTrainer")
    axolotl_rl = ("kto",)
    report_names = ("kto",)
    config_keys = frozenset({"desirable_weight", "undesirable_weight", "loss_type", "precompute_ref_log_probs"})
    variants = (("precompute_ref_log_probs", True, "kto-precomputed"),)

    def assumptions(self, cfg: Any) -> list[str]:
        ref = "adapter disabled on the policy" if cfg.recipe.adapter.is_peft else "a frozen copy"
        return [f"KTO ({TRL}, loss_type='kto'): batch unpaired sequences, half desirable; the KL estimate runs "
                f"the policy (no_grad) and the reference on batch mismatched sequences; reference = {ref}"] \
            + self._batch_note(cfg)

    def min_batch(self) -> int:
        return 2  # KTOTrainer: "Actual (not effective) batch size must be > 1" with loss_type="kto"

    @staticmethod
    def _batch_note(cfg: Any) -> list[str]:
        if cfg.batch >= 2:
            return []
        return ["WARNING: TRL's KTOTrainer refuses per_device_train_batch_size 1 with loss_type='kto' (the KL "
                "term needs mismatched pairs within the micro-batch): plan --batch 2 or more"]


BEHAVIOUR = KTO()

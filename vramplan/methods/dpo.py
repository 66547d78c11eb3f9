"""Direct Preference Optimisation (TRL ``DPOTrainer``): chosen + rejected through policy and reference.

The copies (policy + reference sharing the base under PEFT), two sequences per example and the
``sequence_logps`` loss buffers are data in methods.toml; this module holds the rest.
"""

from __future__ import annotations

from typing import Any

from .base import Behaviour


class DPO(Behaviour):
    step = "vramplan.runtime.steps:dpo_step"
    takes_adapter_choice = True
    trainer_names = ("DPOConfig", "DPOTrainer")
    axolotl_rl = ("dpo", "ipo")
    report_names = ("dpo",)
    variants = (("precompute_ref_log_probs", True, "dpo-precomputed"),)
    config_keys = frozenset({"loss_type", "ref_model_init_kwargs", "precompute_ref_log_probs", "rpo_alpha",
                             "reference_free", "max_prompt_length"})

    def assumptions(self, cfg: Any) -> list[str]:
        return ["DPO: chosen + rejected concatenated (2 x batch sequences); reference = "
                + ("adapter disabled on the policy" if cfg.recipe.adapter.is_peft else "a frozen copy")]

    def dryrun_assumptions(self, cfg: Any) -> list[str]:
        return ["DPO as TRL: policy forward first, then reference log-probs under no_grad while the "
                "policy's activations are alive; the mean-logits metric copies the whole sequence's logits"]


BEHAVIOUR = DPO()

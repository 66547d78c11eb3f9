"""Reward-model training (TRL ``RewardTrainer``): a sequence classifier scores chosen and rejected.

The copy (``head = "scalar"``: ``AutoModelForSequenceClassification`` with ``num_labels=1``, the base
without its LM head plus a ``score`` linear) is data in methods.toml; the loss buffers are
:func:`vramplan.methods.preference.scalar_head_backward_bytes`.
"""

from __future__ import annotations

from typing import Any

from .preference import TRL, Preference


class Reward(Preference):
    step = "vramplan.runtime.preference:reward_step"
    loss_kind = "scalar"
    trainer_names = ("RewardConfig", "RewardTrainer")
    report_names = ("reward model", "reward modeling", "reward modelling")
    config_keys = frozenset({"center_rewards_coefficient"})
    axolotl_flags = ("reward_model",)

    def assumptions(self, cfg: Any) -> list[str]:
        peft = "" if not cfg.recipe.adapter.is_peft else "; PEFT task SEQ_CLS: the score head trains beside the adapter"
        return [f"reward model ({TRL} RewardTrainer): AutoModelForSequenceClassification (num_labels=1, no LM "
                f"head), chosen + rejected concatenated (2 x batch sequences){peft}"]


BEHAVIOUR = Reward()

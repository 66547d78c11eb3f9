"""CPO (TRL ``CPOTrainer`` defaults, ``trl.experimental.cpo``): sigmoid preference loss + NLL on chosen.

Copies and sequences per example are data in methods.toml; the loss buffers are
:func:`vramplan.methods.preference.paired_logits_bytes` with the chosen half's NLL (``cpo_alpha=1``).
"""

from __future__ import annotations

from typing import Any

from .preference import TRL, Preference


class CPO(Preference):
    step = "vramplan.runtime.preference:cpo_step"
    nll = True
    trainer_names = ("CPOConfig", "CPOTrainer")
    report_names = ("cpo",)
    config_keys = frozenset({"cpo_alpha", "simpo_gamma", "loss_type"})
    variants = (("cpo_alpha", 0, "simpo"),)  # no NLL term: SimPO's buffers (loss_type='simpo' or not)

    def assumptions(self, cfg: Any) -> list[str]:
        return [f"CPO ({TRL}, trl.experimental.cpo defaults: loss_type='sigmoid', cpo_alpha=1.0): chosen + rejected "
                "concatenated (2 x batch sequences); no reference model; cross-entropy of the chosen half; "
                "SimPO (cpo_alpha=0) is --method simpo"]


BEHAVIOUR = CPO()

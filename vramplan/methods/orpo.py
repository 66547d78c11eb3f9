"""ORPO (TRL ``ORPOTrainer``, ``trl.experimental.orpo``): NLL on chosen + the odds-ratio term, no reference.

Copies and sequences per example are data in methods.toml; the loss buffers are
:func:`vramplan.methods.preference.paired_logits_bytes` with the chosen half's NLL.
"""

from __future__ import annotations

from typing import Any

from .preference import TRL, Preference


class ORPO(Preference):
    step = "vramplan.runtime.preference:orpo_step"
    nll = True
    trainer_names = ("ORPOConfig", "ORPOTrainer")
    axolotl_rl = ("orpo",)
    report_names = ("orpo",)

    def assumptions(self, cfg: Any) -> list[str]:
        return [f"ORPO ({TRL}, trl.experimental.orpo): chosen + rejected concatenated (2 x batch sequences); "
                "no reference model; cross-entropy of the chosen half plus the odds-ratio term"]


BEHAVIOUR = ORPO()

"""SimPO (TRL ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``): length-normalised, no reference.

Copies and sequences per example are data in methods.toml; the loss buffers are
:func:`vramplan.methods.preference.paired_logits_bytes` without the NLL term.
"""

from __future__ import annotations

from typing import Any

from .preference import TRL, Preference


class SimPO(Preference):
    step = "vramplan.runtime.preference:simpo_step"
    axolotl_rl = ("simpo",)
    report_names = ("simpo",)

    def assumptions(self, cfg: Any) -> list[str]:
        return [f"SimPO ({TRL}: CPOTrainer with loss_type='simpo', cpo_alpha=0): chosen + rejected concatenated "
                "(2 x batch sequences); no reference model, no NLL term; length-averaged log-probs"]


BEHAVIOUR = SimPO()

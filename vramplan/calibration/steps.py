"""The real step: ``vramplan.runtime.build`` wrapped as the runner's :class:`Workload`.

The runtime builds every model copy (random weights from the config, nothing downloaded),
the PEFT adapter (bitsandbytes NF4 for QLoRA) and the optimiser (bitsandbytes for the
8-bit ones), and its ``step()`` runs one optimiser step of the method: SFT for
full/LoRA/QLoRA/DoRA/IA3, DPO and PPO written in plain torch.
"""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..models import ModelSpec


class RuntimeWorkload:
    """A built :class:`vramplan.runtime.Trainee`; :meth:`close` drops every reference to it."""

    def __init__(self, trainee: Any):
        self.trainee = trainee
        self.notes = list(getattr(trainee, "notes", []) or [])

    def step(self) -> Any:
        return self.trainee.step()

    def close(self) -> None:
        t, self.trainee = self.trainee, None
        if t is None:
            return
        opt = getattr(t, "optimizer", None)
        if opt is not None and hasattr(opt, "state"):
            opt.state.clear()
        t.optimizer = None
        copies = getattr(t, "copies", None)
        if isinstance(copies, dict):
            copies.clear()


def runtime_builder():
    """``builder(spec, cfg, device) -> RuntimeWorkload`` over ``vramplan.runtime.build``.

    Raises:
        MissingDependencyError: torch, transformers or peft is missing (the runtime's import).
    """
    from ..runtime import build

    def builder(spec: ModelSpec, cfg: TrainConfig, device: str) -> RuntimeWorkload:
        return RuntimeWorkload(build(spec, cfg, device))

    return builder

"""The callbacks a training step reports through, so that a tracker can attribute bytes.

The runtime never imports the dry run: it calls these methods at the boundaries it
knows about (phases, the logits section, the autocast cache, the KV cache, gradient
checkpointing recomputation), and the default :class:`StepHooks` does nothing, so a real
GPU step (the calibration runner) pays nothing for them. ``vramplan.dryrun``'s tracker
implements them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from ..taxonomy import Component, Phase


class StepHooks:
    """No-op callbacks; subclass and override what you need."""

    def phase(self, phase: Phase) -> None:
        """A new phase of the step begins (load, rollout, forward, backward, optimizer_step)."""

    def tag(self, tensor: Any, component: Component) -> None:
        """``tensor``'s storage belongs to ``component`` for its whole life (params, grads, states, caches)."""

    def enter(self, component: Component) -> None:
        """Storages allocated from now until the matching :meth:`exit` belong to ``component``."""

    def exit(self, component: Component) -> None:
        """End of the section opened by :meth:`enter`."""

    @contextmanager
    def section(self, component: Component) -> Iterator[None]:
        self.enter(component)
        try:
            yield
        finally:
            self.exit(component)

    @contextmanager
    def recompute(self, layer: Any) -> Iterator[None]:
        """Gradient checkpointing recomputes ``layer`` (a decoder layer module) inside backward."""
        yield

    def event(self, name: str, trainee: Any) -> None:
        """A named point of the step: ``built``, ``after_backward``, ``after_optimizer_step``, ``step_end``."""


NULL_HOOKS = StepHooks()

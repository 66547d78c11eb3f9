"""The training stacks the dry run and the calibration runner build and step: one module each.

A stack of ``vramplan/data/stacks.toml`` that the dry run can run (``dryrun = "traced"`` or
``"emulated"``) has its own code in one module -- ``hf``, ``torchtune``, ``litgpt`` in this
package, or the dotted module its entry names in ``runtime`` -- ending with
``RUNTIME = <StackRuntime subclass>()``. :func:`vramplan.runtime.build` and the dry run reach a
stack only through :func:`get_runtime` (``cfg.framework`` picks it; nothing compares its name).

The interface (:class:`StackRuntime`; ``cfg`` is a TrainConfig, ``t`` a
:class:`~vramplan.runtime.build.Trainee`):

* ``regime(cfg)`` -- the precision regime the stack builds with (HF: the regime as named; the
  others: as the stack runs it, ``cfg.regime``).
* ``check(spec, cfg)`` -- reject what the stack does not run (methods, model families,
  precisions, targets), and import its package, before anything is built or traced.
* ``build(t)`` -- build ``t``'s model copies, adapters and optimiser; set ``t.run`` to the stack's
  own step (``None``: the method's step, :func:`vramplan.runtime.steps.run_step`).
* ``package_version()`` -- the version of the stack's own package (None for HF).

What the stack is (its packages, the techniques the dry run runs on it, the text of its
assumptions, why a documented stack cannot run) is data: its stacks.toml entry.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import import_module

from ...errors import VramplanError


class StackRuntime:
    """One training stack's own code as the dry run and the calibration runner build and step it."""

    #: the stack's name (its stacks.toml entry)
    name: str = ""

    def regime(self, cfg):
        """The precision regime (:class:`~vramplan.precision.Regime`) the stack builds ``cfg`` with."""
        return cfg.regime

    def check(self, spec, cfg) -> None:
        """Reject, in one line, what this stack does not run (raises VramplanError / MissingDependencyError)."""

    def build(self, trainee) -> None:
        """Build the trainee's copies, adapters, optimiser and (for its own loop) ``trainee.run``."""
        raise NotImplementedError

    def package_version(self) -> str | None:
        return None


@lru_cache(maxsize=None)
def get_runtime(framework: str) -> StackRuntime:
    """The runtime of stack ``framework`` (its stacks.toml entry's ``runtime`` module, default its name).

    Raises:
        VramplanError: the stack is documented only (no runtime), or its module has no ``RUNTIME``.
    """
    from ...stacks import get_stack

    st = get_stack(framework)
    if st.dryrun == "documented":
        raise VramplanError(f"the {st.name} stack cannot run here: {st.dryrun_refusal}",
                            f"`vramplan estimate --framework {st.name}` gives its accounting, documented with sources")
    path = st.runtime if "." in st.runtime else f"{__name__}.{st.runtime}"
    try:
        rt = import_module(path).RUNTIME
    except (ImportError, AttributeError) as exc:
        raise VramplanError(f"stacks.toml: stack {st.name!r} names runtime {st.runtime!r}, which does not load "
                            f"({exc})") from None
    if not isinstance(rt, StackRuntime):
        raise VramplanError(f"stacks.toml: stack {st.name!r}: {path}.RUNTIME is not a StackRuntime")
    return rt

"""Device-agnostic construction and real training steps (transformers + PEFT + TRL-style loops).

Shared by the dry run (``fake=True``: ``meta`` tensors emulating CUDA) and the GPU
calibration runner (real tensors on ``cuda`` or ``cpu``)::

    from vramplan.runtime import build
    trainee = build(spec, cfg, "cuda")      # or build(spec, cfg, "cuda", fake=True)
    trainee.step()                          # one optimiser step (cfg.grad_accum micro-batches)

``cfg.framework`` other than ``hf`` builds that stack's own model, loss and step instead
(:mod:`vramplan.runtime.stacks`: one module per stack, torchtune and litgpt need their extras). The ``liger_ce``
technique runs :mod:`vramplan.runtime.liger`, a plain-torch emulation of Liger's fused
linear cross-entropy (its Triton kernels need a GPU).

Importing this package needs torch, transformers and peft (the ``dryrun`` extra); a
missing one raises :class:`vramplan.errors.MissingDependencyError`. ``import vramplan``
never imports it.
"""

from __future__ import annotations

from ..errors import require

for _mod in ("torch", "transformers", "peft"):
    require(_mod, "dryrun")

from .build import Copy, Trainee, build, hf_config, make_optimizer  # noqa: E402
from .hooks import NULL_HOOKS, StepHooks  # noqa: E402

__all__ = ["Copy", "NULL_HOOKS", "StepHooks", "Trainee", "build", "hf_config", "make_optimizer"]

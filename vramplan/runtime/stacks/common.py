"""What the stacks with their own training loop (torchtune, litgpt) share: their package, the
recipes they run, HF-name mapping of LoRA targets, quiet imports, a default-dtype context.

:class:`OwnLoopStack` is their base: ``check`` rejects what a stack's single-device fine-tuning
recipes do not train (methods other than one trained LM copy with the causal-LM loss, adapters
outside ``adapters``, eager attention) before the stack's own checks (``check_stack``), then
imports the package (:func:`require_package`); ``build`` runs the stack's ``build_stack`` with
the package's import-time notices kept off stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import warnings

import torch

from ...attention import KERNELS
from ...errors import MissingDependencyError, VramplanError
from . import StackRuntime

#: the HF MLP projections (a stack adapts them as a whole or not at all)
MLP = ("gate_proj", "up_proj", "down_proj")
_LOGGERS = ("torchao", "torchtune", "lightning", "lightning.fabric", "lightning_fabric", "litgpt",
            "torch.utils._pytree")


@contextlib.contextmanager
def quiet():
    """The stacks log at import (torchao's skipped C++ extensions) and warn on meta: keep stderr to one line."""
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def require_package(stack: "OwnLoopStack"):
    """Import the stack's package, or raise :class:`MissingDependencyError` with the pip hint.

    Raises:
        MissingDependencyError: the package is not installed, or is installed but does not
            import (torchtune 0.6.1 with a torchao it does not know).
    """
    from ...errors import install_hint

    module = stack.package
    hint = install_hint(stack.extra)
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the {stack.name} dry run needs the {module} package, which is not installed",
                                     hint)
    try:
        with quiet():
            mod = importlib.import_module(module)
            for sub in stack.submodules:
                importlib.import_module(sub)
    except ImportError as exc:
        from ..build import first_sentence

        raise MissingDependencyError(f"{module} is installed but does not import ({first_sentence(exc, 120)})",
                                     (stack.needs + "; " if stack.needs else "") + hint) from None
    return mod


def rope_theta(spec) -> float:
    hc = spec.hf_config or {}
    rp = hc.get("rope_parameters") or {}
    return float(hc.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def rope_scaling(spec) -> dict:
    hc = spec.hf_config or {}
    rs = hc.get("rope_scaling") or hc.get("rope_parameters") or {}
    return rs if isinstance(rs, dict) else {}


def norm_eps(spec) -> float:
    hc = spec.hf_config or {}
    return float(hc.get("rms_norm_eps") or hc.get("layer_norm_eps") or 1e-5)


def split_targets(cfg, names: dict, stack: str) -> tuple[list[str], bool]:
    """HF target names -> (the stack's attention module names, adapt the whole MLP)."""
    targets = set(cfg.targets)
    mlp = targets & set(MLP)
    if mlp and mlp != set(MLP):
        raise VramplanError(f"{stack} adapts the MLP as a whole (gate, up and down projections) or not at all, "
                            f"not {', '.join(sorted(mlp))} alone", "add the other MLP projections or drop them")
    other = targets - set(MLP) - set(names)
    if other:
        raise VramplanError(f"{stack} cannot put an adapter on {sorted(other)[0]}",
                            f"its LoRA targets are {', '.join(list(names) + list(MLP))}")
    return [names[t] for t in names if t in targets], bool(mlp)


def wrap_head(t, fn):
    """Open the logits section around the output projection ``fn(hidden) -> logits`` (attribution only)."""

    def wrapped(h, *a, **k):
        t._head_pre_hook(None, (h,))
        out = fn(h, *a, **k)
        t._head_post_hook(None, (h,), out)
        return out

    return wrapped


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def token_ids(t, batch: int, seq: int) -> torch.Tensor:
    """Random token ids ``[batch, seq]`` on the trainee's tensor device (as the method steps' inputs)."""
    return torch.randint(0, int(t.spec.vocab_size), (batch, seq), device=t.tensor_device)


class OwnLoopStack(StackRuntime):
    """A stack with its own model builders, adapters, loss and single-device training loop."""

    #: the stack's package, the pip extra that installs it, what it needs beyond itself (the hint)
    package: str = ""
    extra: str = ""
    needs: str | None = None
    #: submodules imported with the package (an incompatible dependency fails here, not mid-build)
    submodules: tuple[str, ...] = ()
    #: the adapters its single-device recipes train
    adapters: tuple = ()

    def check(self, spec, cfg) -> None:
        fw = self.name
        hint = f"`vramplan estimate --framework {fw}` gives its documented accounting"
        recipe = cfg.recipe
        method = recipe.method
        sft = (len(recipe.copies) == 1 and recipe.copies[0].head == "lm" and not method.loss_kind.per_token_logps
               and not method.rollout and method.sequences_per_example == 1)
        if not sft or recipe.adapter not in self.adapters:
            runs = ", ".join(a.value for a in self.adapters)
            raise VramplanError(f"the {fw} dry run traces its single-device fine-tuning recipes ({runs}), "
                                f"not {recipe.name}", hint)
        self.check_stack(spec, cfg, hint)
        if cfg.attention.materialises_scores:
            fused = " or ".join(k.name for k in KERNELS.values() if not k.materialises_scores)
            raise VramplanError(f"{fw} always runs SDPA attention", f"use --attn {fused}")
        require_package(self)

    def check_stack(self, spec, cfg, hint: str) -> None:
        """The stack's own refusals (model families, precisions, targets)."""

    def build(self, t) -> None:
        with quiet():
            self.build_stack(t)

    def build_stack(self, t) -> None:
        raise NotImplementedError

    def package_version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(self.package)
        except PackageNotFoundError:
            return None

"""What a trainer's configuration asks the planner: one :class:`PlanRequest`, and the name maps.

Readers of live models (:mod:`.from_model`) and of configuration files
(:mod:`.config_files`) translate their inputs into a ``PlanRequest`` -- a model, a method
and the keyword arguments of :func:`vramplan.estimate` -- and say in ``notes`` how each
setting was read and what was left out. Translation tables from trainer vocabularies
(HF ``optim`` names, ``attn_implementation``) to vramplan's live here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..attention import KERNELS
from ..errors import VramplanError
from ..models import ModelSpec
from ..optimizers import optimizers as _catalogue
from ..request import DEFAULT_ATTENTION
from ..results import Estimate

#: HF ``TrainingArguments.optim`` / Axolotl ``optimizer`` names -> vramplan optimizers: each optimizer's
#: ``trainer_names`` in ``vramplan/data/optimizers.toml`` (sources: transformers ``OptimizerNames``; Axolotl's
#: ``optimizer`` option takes the same names).
OPTIMIZERS: dict[str, str] = {tn: opt.name for opt in _catalogue().values() for tn in opt.trainer_names}

#: ``attn_implementation`` / ``_attn_implementation`` -> vramplan ``--attn``: each kernel's transformers name
#: (``AttentionKernel.hf_name``) and its own; FlashAttention-3 (Hopper) is planned as flash-attn 2's kernels.
ATTENTION: dict[str, str] = {**{k.name: k.name for k in KERNELS.values()}, **{k.hf_name: k.name for k in KERNELS.values()},
                             "flash_attention_3": "flash"}

def map_optimizer(name: Any, notes: list[str]) -> str:
    """A trainer's optimizer name (string or ``OptimizerNames`` enum) as a vramplan optimizer."""
    text = str(getattr(name, "value", name)).lower()
    if text not in OPTIMIZERS:
        raise VramplanError(f"optimizer {text!r} is not modelled",
                            "plan with optimizer= one of " + ", ".join(_catalogue()))
    name = OPTIMIZERS[text]
    note = _catalogue()[name].trainer_notes.get(text)
    if note:
        notes.append(note)
    return name


def map_attention(name: Any, notes: list[str]) -> str:
    """A trainer's ``attn_implementation`` as a vramplan attention (unset or not modelled: the default, noted)."""
    text = str(name or DEFAULT_ATTENTION).lower()
    if text not in ATTENTION:
        notes.append(f"attention {text!r} is not modelled; planned as {DEFAULT_ATTENTION}")
        return DEFAULT_ATTENTION
    return ATTENTION[text]


def normalise_targets(targets: Any, linear_names: list[str], notes: list[str]):
    """PEFT ``target_modules`` (None, ``"all-linear"``, a regex string, or names/paths) -> vramplan targets.

    Full module paths keep their last name (``model.layers.0.self_attn.q_proj`` -> ``q_proj``);
    names vramplan does not model (``lm_head``, ``embed_tokens``) are dropped with a note.
    """
    import re

    if targets is None or targets == [] or targets == ():
        return None
    if isinstance(targets, str):
        if targets.lower() in ("all-linear", "all_linear", "all"):
            return "all-linear"
        from ..validate import target_regex

        # PEFT: a string target_modules is matched with re.fullmatch against each module's full name
        pat = target_regex(targets)
        hits = [n for n in linear_names if any(pat.fullmatch(f"{pre}{n}") for pre in
                                               ("", "model.layers.0.self_attn.", "model.layers.0.mlp.",
                                                "model.model.layers.0.self_attn.", "model.model.layers.0.mlp.",
                                                "base_model.model.model.layers.0.self_attn.",
                                                "base_model.model.model.layers.0.mlp."))]
        if not hits:
            raise VramplanError(f"target_modules regex {targets!r} matches none of {', '.join(linear_names)}")
        notes.append(f"target_modules regex {targets!r} read as {','.join(hits)}")
        return ",".join(hits)
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise VramplanError(f"target_modules must be a list of names, a regex or all-linear, got {type(targets).__name__}")
    names = []
    for t in targets:
        last = str(t).split(".")[-1]
        if last in linear_names:
            if last not in names:
                names.append(last)
        else:
            notes.append(f"target module {t!r} is not a decoder-layer linear vramplan models; ignored")
    if not names:
        raise VramplanError(f"none of target_modules {sorted(map(str, targets))[:8]} is a decoder linear layer",
                            f"vramplan models {', '.join(linear_names)}")
    return ",".join(names)


def precision_from_flags(bf16: Any, fp16: Any, notes: list[str], *, model_dtype: str | None = None) -> str | None:
    """``bf16`` / ``fp16`` training flags (and the load dtype of a live model) -> a precision regime.

    ``bf16=True`` -> bf16-mixed; ``fp16=True`` -> fp16-mixed; neither: the live model's dtype
    decides (bf16 weights -> bf16, fp32 -> fp32); with no model, None (the planner's default).
    """
    if bf16 and fp16:
        raise VramplanError("bf16 and fp16 are both set", "set one of them")
    if bf16 and str(bf16).lower() not in ("false", "0"):
        return "bf16-mixed"
    if fp16 and str(fp16).lower() not in ("false", "0"):
        return "fp16-mixed"
    if model_dtype is None:
        return None
    if model_dtype in ("bfloat16", "float16"):
        if model_dtype == "float16":
            notes.append("fp16 weights without fp16=True planned as bf16 (same sizes)")
        return "bf16"
    return "fp32"


def _estimate_options() -> tuple[str, ...]:
    """The :class:`~vramplan.request.EstimateRequest` fields a request may carry as options (the model, method and
    card are its own fields): the configuration, the GPU layout and run size, the stack and its techniques."""
    from ..request import EstimateRequest

    return tuple(n for n in EstimateRequest.field_names() if n not in ("model", "method", "gpu", "gpu_mem"))


@dataclass
class PlanRequest:
    """A model, a method and :func:`vramplan.estimate` options, read from a trainer's configuration.

    ``notes`` say where each setting came from and what was not modelled; they are
    appended to the estimate's assumptions.
    """

    model: ModelSpec
    method: str = "full"
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: str = ""

    def with_overrides(self, **overrides) -> "PlanRequest":
        """Explicit settings win over what was read (``model``, ``method`` and any estimate option)."""
        from ..models import get_model

        allowed = _estimate_options()
        bad = [k for k in overrides if k not in allowed + ("model", "method")]
        if bad:
            raise VramplanError(f"unknown planning option {bad[0]!r}", f"choose from {', '.join(allowed)}")
        opts = dict(self.options)
        model, method, notes = self.model, self.method, list(self.notes)
        for k, v in overrides.items():
            if v is None:
                continue
            if k == "model":
                model = get_model(v)
            elif k == "method":
                method = str(v)
            else:
                opts[k] = v
        if overrides:
            given = ", ".join(f"{k}={v}" for k, v in overrides.items() if v is not None and k != "model")
            if given:
                notes.append(f"overridden: {given}")
        return replace(self, model=model, method=method, options=opts, notes=notes)

    def estimate(self, gpu=None, gpu_mem=None) -> Estimate:
        """Run :func:`vramplan.estimate` on this request; the notes join the assumptions."""
        from ..plan import estimate

        est = estimate(self.model, self.method, gpu=gpu, gpu_mem=gpu_mem, **self.options)
        if self.source:
            est.assumptions.append(f"read from {self.source}")
        est.assumptions.extend(self.notes)
        return est

"""Plan a run from live objects: a ``transformers`` model, its PEFT config, its training arguments.

Works with any trainer: the inputs are read by attribute (or key, for dicts), so HF
``TrainingArguments``, TRL's ``SFTConfig`` / ``DPOConfig`` and plain dicts all do, and
neither transformers nor peft is imported here.

What is read:

* model: ``model.config.to_dict()`` -> :func:`vramplan.models.from_hf_config` (the live
  architecture, exactly); a ``PeftModel`` is unwrapped with ``get_base_model()`` and its
  active adapter's config used when ``peft_config`` is not given; 4-bit loading from
  ``is_loaded_in_4bit`` or ``config.quantization_config`` (``load_in_4bit``,
  ``bnb_4bit_use_double_quant``); the load dtype from ``model.dtype``; attention from
  ``config._attn_implementation``; gradient checkpointing from ``is_activation_checkpointing`` (``is_gradient_checkpointing`` before transformers 5.x).
* PEFT config: LoRA (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
  ``use_dora``) -> lora / qlora (4-bit base) / dora; IA3 (``target_modules``) -> ia3.
* training arguments: ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
  ``bf16`` / ``fp16``, ``gradient_checkpointing`` / ``activation_checkpointing``, ``optim`` (see
  :data:`vramplan.integrations.request.OPTIMIZERS`), ``max_length`` / ``max_seq_length``
  (TRL configs); the class name (``DPOConfig``, ``PPOConfig``...: a method's ``trainer_names``) selects the method.
"""

from __future__ import annotations

from typing import Any

from ..errors import VramplanError
from ..methods import (Adapter, get_method, method_named_by, names_its_adapter, supervised_word, takes_adapter_choice,
                       trainer_variant)
from ..models import from_hf_config
from ..precision import FP32, get_regime
from ..results import Estimate
from .request import PlanRequest, map_attention, map_optimizer, normalise_targets, precision_from_flags

DEFAULT_SEQ = 2048
SEQ_NOTE = "sequence length not in the training arguments"

#: TRL config classes of methods vramplan does not model (sources: TRL's ``trl/trainer/*_config.py``). A modelled
#: method's behaviour names its own config classes (``trainer_names``, vramplan.methods: SFTConfig and HF's
#: TrainingArguments are SFT's), so this table holds no method names.
UNMODELLED_TRAINER_CONFIGS = frozenset({"RLOOConfig", "OnlineDPOConfig", "GKDConfig", "BCOConfig"})


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _dtype_name(model: Any) -> str | None:
    dt = getattr(model, "dtype", None)
    return None if dt is None else str(dt).replace("torch.", "")


def _unwrap(model: Any):
    """(base transformers model, PEFT config of the active adapter or None)."""
    peft_cfg = None
    base = model
    if hasattr(model, "get_base_model") and isinstance(getattr(model, "peft_config", None), dict):
        confs = model.peft_config
        active = getattr(model, "active_adapter", None)
        if isinstance(active, (list, tuple)):
            active = active[0] if active else None
        peft_cfg = confs.get(active) if active in confs else next(iter(confs.values()), None)
        base = model.get_base_model()
    return base, peft_cfg


def _quantisation(base: Any) -> tuple[bool, bool, bool]:
    """(4-bit, 8-bit, double quant) from a loaded model."""
    qc = _get(getattr(base, "config", None), "quantization_config")
    four = bool(getattr(base, "is_loaded_in_4bit", False)) or bool(_get(qc, "load_in_4bit", False))
    eight = bool(getattr(base, "is_loaded_in_8bit", False)) or bool(_get(qc, "load_in_8bit", False))
    dq = _get(qc, "bnb_4bit_use_double_quant", None)
    return four, eight, True if dq is None else bool(dq)


def _live_checkpointing(base: Any) -> bool | None:
    """Whether checkpointing is enabled on the live model (``is_activation_checkpointing`` in
    transformers >= 5.x, ``is_gradient_checkpointing`` before), read without touching deprecated names."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name) or name in getattr(base, "__dict__", {}):
            return bool(getattr(base, name))
    return None


def _method_from_args(training_args: Any, notes: list[str]) -> str | None:
    if training_args is None:
        return None
    if isinstance(training_args, dict):
        m = training_args.get("method") or training_args.get("trainer")
        return str(m).lower() if m else None
    for cls in type(training_args).__mro__:
        m = method_named_by("trainer_names", cls.__name__)
        if m is None and cls.__name__ in UNMODELLED_TRAINER_CONFIGS:
            raise VramplanError(f"{cls.__name__} ({cls.__name__[:-6]}) is not modelled by vramplan",
                                "pass method='dpo' (policy + reference) or 'lora' as an approximation")
        if m is None:
            continue
        variant = trainer_variant(m, lambda k: getattr(training_args, k, None))
        if variant != m:
            notes.append(f"{cls.__name__} settings plan it as {variant}")
            m = variant
        if names_its_adapter(m):  # supervised (SFTConfig, TrainingArguments): the PEFT config's adapter decides
            return None
        notes.append(f"method {m} from {cls.__name__}")
        return m
    return None


def _mixed_16bit_base(precision: str | None) -> bool:
    """Whether regime ``precision`` autocasts over a frozen base it holds in 16 bits (bf16-mixed, fp16-mixed)."""
    if precision is None:
        return False
    regime = get_regime(precision)
    return regime.autocast is not None and regime.frozen_dtype != FP32


def request_from_model(model: Any, peft_config: Any = None, training_args: Any = None, *,
                       method: str | None = None) -> PlanRequest:
    """Read a live model (+ PEFT config, + training arguments) into a :class:`PlanRequest`.

    Raises:
        VramplanError: the model has no usable config, an 8-bit base, a PEFT type or an
            optimizer vramplan does not model.
    """
    notes: list[str] = []
    base, live_peft = _unwrap(model)
    peft_config = peft_config if peft_config is not None else live_peft
    cfg = getattr(base, "config", None)
    if cfg is None:
        raise VramplanError(f"{type(model).__name__} has no .config", "pass a transformers PreTrainedModel")
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    name = str(d.get("_name_or_path") or "") or type(base).__name__
    spec = from_hf_config(d, name=name, source="live model config")
    linear = [l.name for l in spec.layer_linears() if l.is_linear]

    four, eight, double_quant = _quantisation(base)
    if eight:
        raise VramplanError("8-bit (LLM.int8) bases are not modelled", "plan it as qlora (4-bit) or a 16-bit lora")
    opts: dict[str, Any] = {}
    # -- adapter ---------------------------------------------------------------------
    ptype = _get(peft_config, "peft_type")
    ptype = str(getattr(ptype, "value", ptype) or "").upper() if peft_config is not None else ""
    kind = Adapter.of(ptype, dora=bool(_get(peft_config, "use_dora", False)), four_bit=four)
    if kind is None and not ptype:
        raise VramplanError("a 4-bit base without a PEFT adapter cannot be fully fine-tuned",
                            "pass the LoRA config (peft_config=...)")
    if kind is None:
        raise VramplanError(f"PEFT type {ptype} is not modelled", "vramplan models LoRA, QLoRA, DoRA and IA3")
    adapter = kind.value
    if kind.low_rank:
        opts["rank"] = int(_get(peft_config, "r", 8))
        opts["alpha"] = float(_get(peft_config, "lora_alpha", opts["rank"]))
        opts["dropout"] = float(_get(peft_config, "lora_dropout", 0.0) or 0.0)
    if kind.is_peft:
        opts["targets"] = normalise_targets(_get(peft_config, "target_modules"), linear, notes)
    if kind.low_rank and four:
        opts["double_quant"] = double_quant

    # -- method ----------------------------------------------------------------------
    m = method or _method_from_args(training_args, notes)
    if takes_adapter_choice(m):
        opts["adapter"] = adapter
        method_name = m
        if training_args is not None:
            opts.update(get_method(m).behaviour.request_from_config(training_args, notes))
    elif m is None or m == adapter or supervised_word(m):  # "sft": whatever adapter the PEFT config loads
        method_name = adapter
    else:
        method_name = m

    # -- training arguments ------------------------------------------------------------
    live_gc = _live_checkpointing(base)
    if training_args is not None:
        opts["batch"] = int(_get(training_args, "per_device_train_batch_size", 1) or 1)
        opts["grad_accum"] = int(_get(training_args, "gradient_accumulation_steps", 1) or 1)
        # transformers >= 5.x renames gradient_checkpointing to activation_checkpointing; read both
        gc = (bool(_get(training_args, "activation_checkpointing", False))
              or bool(_get(training_args, "gradient_checkpointing", False)) or bool(live_gc))
        opts["grad_ckpt"] = gc
        optim = _get(training_args, "optim")
        if optim is not None:
            opts["optimizer"] = map_optimizer(optim, notes)
        prec = precision_from_flags(_get(training_args, "bf16"), _get(training_args, "fp16"), notes,
                                    model_dtype=_dtype_name(base))
        if prec is not None:
            opts["precision"] = prec
        seq = _get(training_args, "max_length") or _get(training_args, "max_seq_length") or opts.get("seq")
        if seq:
            opts["seq"] = int(seq)
    elif live_gc is not None:
        opts["grad_ckpt"] = bool(live_gc)
    if "seq" not in opts:
        opts["seq"] = DEFAULT_SEQ
        notes.append(f"{SEQ_NOTE}: planned at {DEFAULT_SEQ} tokens (pass seq=...)")
    dt = _dtype_name(base)
    if kind.is_peft and not kind.quantized_base and dt == "float32" and _mixed_16bit_base(opts.get("precision")):
        notes.append("the frozen base is fp32 but a mixed regime plans it in 16 bits: weights are under-counted")
    attn = getattr(cfg, "_attn_implementation", None)
    if attn is not None:
        opts["attn"] = map_attention(attn, notes)
    return PlanRequest(spec, method_name, opts, notes, source=f"live {type(model).__name__}")


def from_model(model: Any, peft_config: Any = None, training_args: Any = None, gpu: Any = None, *,
               gpu_mem: Any = None, **overrides) -> Estimate:
    """Predict the peak memory of training ``model`` as configured, with any trainer.

    Args:
        model: a ``transformers`` model or ``peft.PeftModel`` (on any device, ``meta`` too).
        peft_config: a PEFT ``LoraConfig`` / ``IA3Config`` (or dict); default: the PeftModel's own.
        training_args: HF ``TrainingArguments``, a TRL config, or a dict of the same keys.
        gpu: catalogue name, ``"auto"`` (NVML) or a :class:`~vramplan.gpus.GPUSpec`; ``gpu_mem`` a capacity.
        **overrides: any :func:`vramplan.estimate` option (``seq=4096``, ``batch=2``), or
            ``method=`` -- they win over what was read.

    Returns:
        :class:`vramplan.results.Estimate`; its ``assumptions`` say how each setting was read.

    Raises:
        VramplanError: see :func:`request_from_model`; bad overrides.
    """
    req = request_from_model(model, peft_config, training_args, method=overrides.get("method"))
    if overrides.get("seq") is not None:
        req.notes = [n for n in req.notes if not n.startswith(SEQ_NOTE)]
    return req.with_overrides(**overrides).estimate(gpu=gpu, gpu_mem=gpu_mem)

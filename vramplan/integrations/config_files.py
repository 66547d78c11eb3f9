"""Plan from a trainer's configuration file: an Axolotl YAML, or HF/TRL training arguments.

``vramplan estimate --config FILE`` reads the file into a :class:`PlanRequest`; flags given
on the command line win over the file. Nothing is downloaded: the base model must be a
catalogue model (matched by name, alias or Hugging Face repo id) or a local directory /
``config.json``; otherwise pass ``--model``.

Axolotl keys read (https://axolotl-ai-cloud.github.io/axolotl/docs/config-reference.html):
``base_model`` / ``base_model_config``, ``adapter`` (lora | qlora), ``load_in_4bit``,
``load_in_8bit`` (not modelled: an error), ``peft_use_dora``, ``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules``, ``lora_target_linear``, ``sequence_len``,
``micro_batch_size``, ``gradient_accumulation_steps``, ``gradient_checkpointing``,
``optimizer``, ``bf16`` / ``fp16`` (``auto`` = bf16 where the card has it),
``flash_attention`` / ``sdp_attention`` / ``eager_attention``, ``rl`` (dpo, ipo).

HF / TRL keys read: ``model_name_or_path`` (TRL ``ModelConfig``), ``per_device_train_batch_size``,
``gradient_accumulation_steps``, ``gradient_checkpointing``, ``optim``, ``bf16`` / ``fp16``,
``max_length`` / ``max_seq_length``, ``attn_implementation``; TRL's PEFT keys ``use_peft``,
``lora_r`` (TRL default 16), ``lora_alpha`` (32), ``lora_dropout`` (0.05),
``lora_target_modules``, ``use_dora``, ``load_in_4bit``, ``load_in_8bit``,
``use_bnb_nested_quant``; ``method`` / ``trainer`` (dpo, ppo) or DPO-only keys
(``beta`` with ``max_prompt_length``, ``loss_type``, ``ref_model_init_kwargs``,
``precompute_ref_log_probs``) select DPO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._data import read_config_file
from ..errors import UnknownNameError, VramplanError
from ..methods import (Adapter, get_method, method_flagged, method_named_by, registry, supervised_word,
                       takes_adapter_choice, trainer_variant)
from ..models import ModelSpec, get_model
from ..results import Estimate
from .request import PlanRequest, map_attention, map_optimizer, normalise_targets

AXOLOTL_KEYS = frozenset({"base_model", "base_model_config", "micro_batch_size", "sequence_len", "adapter",
                          "lora_target_linear", "datasets", "load_in_4bit", "num_epochs"})
HF_KEYS = frozenset({"per_device_train_batch_size", "output_dir", "optim", "max_length", "max_seq_length",
                     "model_name_or_path", "gradient_accumulation_steps", "use_peft"})
#: Axolotl ``adapter:`` values -> the adapter they load before ``load_in_4bit`` / ``peft_use_dora`` refine it
#: (Axolotl config reference: ``adapter: lora | qlora``, absent or ``none`` for full fine-tuning).
AXOLOTL_ADAPTERS = {"": Adapter.FULL, "none": Adapter.FULL, "lora": Adapter.LORA, "qlora": Adapter.QLORA}
#: TRL ModelConfig LoRA defaults (lora_r 16, lora_alpha 32, lora_dropout 0.05).
TRL_LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("", "false", "0", "no", "none", "off")
    return bool(v)


def _int(data: dict, key: str, path: Path) -> int | None:
    """A positive integer setting (bounded as the matching flag is), or None when absent/null."""
    from ..validate import LIMITS, integer

    v = data.get(key)
    if v is None:
        return None
    bound = {"sequence_len": "seq", "max_length": "seq", "max_seq_length": "seq", "micro_batch_size": "batch",
             "per_device_train_batch_size": "batch", "gradient_accumulation_steps": "grad-accum",
             "lora_r": "rank"}.get(key)
    return integer(v, f"{path.name}: {key}", hi=LIMITS.get(bound or "", 1 << 30))


def _real(data: dict, key: str, path: Path, default=None, **bounds) -> float | None:
    """A finite number setting (``lora_alpha``, ``lora_dropout``), or ``default`` when absent/null."""
    from ..validate import real

    v = data.get(key, default)
    if v is None:
        return None
    return real(v, f"{path.name}: {key}", **bounds)


def _resolve_model(ref: Any, path: Path, key: str) -> ModelSpec:
    """A catalogue name / alias / HF id, or a local directory or config.json (relative to the file)."""
    if not isinstance(ref, str):
        raise VramplanError(f"{path.name}: {key} must be a model name or path, got {type(ref).__name__}")
    text = ref
    local = Path(text).expanduser()
    if not local.is_absolute():
        rel = (path.parent / local)
        if rel.exists():
            local = rel
    try:
        return get_model(str(local) if local.exists() else text)
    except UnknownNameError:
        raise VramplanError(f"{path.name}: {key} {text!r} is not in the catalogue and is not a local config",
                            "pass --model NAME, or --model path/to/config.json (vramplan never downloads)") from None


def _model_ref(data: dict, model: Any, path: Path, keys: tuple[str, ...]) -> ModelSpec:
    if model is not None:
        return get_model(model)
    for k in keys:
        if data.get(k):
            return _resolve_model(data[k], path, k)
    raise VramplanError(f"{path.name} names no model ({' / '.join(keys)})", "pass --model NAME or a config.json path")


def read_axolotl(data: dict, path: Path, model: Any = None) -> PlanRequest:
    """An Axolotl config dict -> :class:`PlanRequest` (see the module docstring for the keys)."""
    notes: list[str] = []
    spec = _model_ref(data, model, path, ("base_model_config", "base_model"))
    linear = [l.name for l in spec.layer_linears() if l.is_linear]
    if _truthy(data.get("load_in_8bit")) and not _truthy(data.get("load_in_4bit")):
        raise VramplanError(f"{path.name}: load_in_8bit (LLM.int8 base) is not modelled",
                            "use adapter: qlora with load_in_4bit, or a 16-bit lora base")
    ad = str(data.get("adapter") or "").lower()
    opts: dict[str, Any] = {}
    named = AXOLOTL_ADAPTERS.get(ad)
    if named is Adapter.FULL:
        adapter = "full"
    elif named is not None:
        four = named.quantized_base or _truthy(data.get("load_in_4bit"))
        adapter = Adapter.of(named.peft_type, dora=_truthy(data.get("peft_use_dora")), four_bit=four).value
        opts["rank"] = _int(data, "lora_r", path) or 8
        if data.get("lora_alpha") is not None:
            opts["alpha"] = _real(data, "lora_alpha", path, lo=-1e6, hi=1e6)
        if data.get("lora_dropout") is not None:
            opts["dropout"] = _real(data, "lora_dropout", path, lo=0.0, hi=1.0, hi_open=True)
        if _truthy(data.get("lora_target_linear")):
            opts["targets"] = "all-linear"
        else:
            opts["targets"] = normalise_targets(data.get("lora_target_modules"), linear, notes)
    else:
        raise VramplanError(f"{path.name}: adapter {ad!r} is not modelled", "vramplan reads adapter: lora or qlora")
    rl = str(data.get("rl") or "").lower()
    method = adapter
    rl_method = method_named_by("axolotl_rl", rl) if rl else method_flagged("axolotl_flags", data)
    if rl_method is not None:
        method = rl_method
        opts["adapter"] = adapter
        variant = trainer_variant(rl_method, data.get)
        if variant != rl_method:
            notes.append(f"{rl_method.upper()} settings plan it as {variant}")
            method = variant
        what = f"rl: {rl}" if rl else ", ".join(f"{k}: true" for k in get_method(rl_method).behaviour.axolotl_flags)
        notes.append(f"{what} planned as {method.upper()} ({get_method(method).summary})")
        trl = data.get("trl") if isinstance(data.get("trl"), dict) else {}  # Axolotl's TRL arguments
        opts.update(get_method(rl_method).behaviour.request_from_config(trl, notes))
    elif rl:
        known = sorted({v for md in registry().values() for v in md.behaviour.axolotl_rl})
        raise VramplanError(f"{path.name}: rl: {rl} is not modelled", f"vramplan models rl: {', '.join(known)}")
    for key, opt in (("sequence_len", "seq"), ("micro_batch_size", "batch"), ("gradient_accumulation_steps", "grad_accum")):
        v = _int(data, key, path)
        if v is not None:
            opts[opt] = v
    if "gradient_checkpointing" in data and data["gradient_checkpointing"] is not None:
        gc = data["gradient_checkpointing"]
        opts["grad_ckpt"] = _truthy(gc)
        if isinstance(gc, str) and gc.lower() in ("offload", "unsloth"):
            notes.append(f"gradient_checkpointing: {gc} (activation offload) planned as plain checkpointing")
    if data.get("optimizer"):
        opts["optimizer"] = map_optimizer(data["optimizer"], notes)
    bf16, fp16 = data.get("bf16"), data.get("fp16")
    if isinstance(bf16, str) and bf16.lower() == "auto":
        notes.append("bf16: auto -> bf16-mixed (fp16-mixed on cards without bf16)")
    elif _truthy(bf16) and _truthy(fp16):
        raise VramplanError(f"{path.name}: bf16 and fp16 are both set")
    elif _truthy(bf16):
        opts["precision"] = "bf16-mixed"
    elif _truthy(fp16):
        opts["precision"] = "fp16-mixed"
    if _truthy(data.get("flash_attention")):
        opts["attn"] = "flash"
    elif _truthy(data.get("eager_attention")):
        opts["attn"] = "eager"
    elif _truthy(data.get("xformers_attention")):
        notes.append("xformers attention planned as sdpa (both memory-efficient)")
    if _truthy(data.get("sample_packing")):
        notes.append("sample_packing: sequences packed to sequence_len (as planned)")
    if _truthy(data.get("deepspeed")) or _truthy(data.get("fsdp")):
        notes.append("deepspeed / fsdp sharding is not modelled: planned as one GPU holding everything")
    return PlanRequest(spec, method, opts, notes, source=f"Axolotl config {path.name}")


def read_training_arguments(data: dict, path: Path, model: Any = None) -> PlanRequest:
    """HF ``TrainingArguments`` / TRL config keys (JSON or YAML) -> :class:`PlanRequest`."""
    notes: list[str] = []
    spec = _model_ref(data, model, path, ("model_name_or_path", "model", "base_model"))
    linear = [l.name for l in spec.layer_linears() if l.is_linear]
    opts: dict[str, Any] = {}
    four = _truthy(data.get("load_in_4bit"))
    if _truthy(data.get("load_in_8bit")):
        raise VramplanError(f"{path.name}: load_in_8bit (LLM.int8 base) is not modelled",
                            "use load_in_4bit with use_peft (QLoRA), or a 16-bit base")
    if _truthy(data.get("use_peft")) or four:
        if not _truthy(data.get("use_peft")):
            raise VramplanError(f"{path.name}: load_in_4bit without use_peft cannot train", "set use_peft: true")
        vals = {k: d if data.get(k) is None else data[k] for k, d in TRL_LORA_DEFAULTS.items()}
        missing = [k for k in TRL_LORA_DEFAULTS if data.get(k) is None]
        if missing:
            notes.append("TRL ModelConfig defaults used for " + ", ".join(f"{k}={TRL_LORA_DEFAULTS[k]}" for k in missing))
        # TRL ModelConfig's use_peft builds a LoraConfig (use_dora: DoRA)
        adapter = Adapter.of(Adapter.LORA.peft_type, dora=_truthy(data.get("use_dora")), four_bit=four).value
        opts["rank"] = _int(vals, "lora_r", path)
        opts["alpha"] = _real(vals, "lora_alpha", path, lo=-1e6, hi=1e6)
        opts["dropout"] = _real(vals, "lora_dropout", path, lo=0.0, hi=1.0, hi_open=True)
        opts["targets"] = normalise_targets(data.get("lora_target_modules"), linear, notes)
        if four:
            opts["double_quant"] = _truthy(data.get("use_bnb_nested_quant", False))
            notes.append(f"4-bit base, double quantisation {'on' if opts['double_quant'] else 'off'} "
                         "(use_bnb_nested_quant)")
    else:
        adapter = "full"
    method = str(data.get("method") or data.get("trainer") or "").lower() or None
    if method is None:  # a method recognised from keys only its trainer config has (its behaviour's recognised_by):
        # the one matching the most keys (TRL configs share some: loss_type, beta), the first on a tie
        hits = [(md.behaviour.recognised_by(set(data)), name) for name, md in registry().items()]
        hit, name = max(hits, key=lambda h: len(h[0]))
        if hit:
            method = name
            notes.append(f"{name.upper()} recognised from its keys ({', '.join(hit)})")
    variant = trainer_variant(method, data.get)
    if variant != method:
        notes.append(f"{str(method).upper()} settings plan it as {variant}")
        method = variant
    if takes_adapter_choice(method):
        opts["adapter"] = adapter
    elif method is not None and not supervised_word(method):
        others = [n for n in registry() if takes_adapter_choice(n)]
        raise VramplanError(f"{path.name}: method {method!r} is not modelled", f"use sft, {', '.join(others)}")
    if method in registry():
        opts.update(get_method(method).behaviour.request_from_config(data, notes))
    for key, opt in (("per_device_train_batch_size", "batch"), ("gradient_accumulation_steps", "grad_accum")):
        v = _int(data, key, path)
        if v is not None:
            opts[opt] = v
    seq = _int(data, "max_length", path) or _int(data, "max_seq_length", path)
    if seq:
        opts["seq"] = seq
    elif "seq" not in opts:
        notes.append("no max_length / max_seq_length: planned at --seq (default 2048)")
    if data.get("gradient_checkpointing") is not None:
        opts["grad_ckpt"] = _truthy(data["gradient_checkpointing"])
    if data.get("optim"):
        opts["optimizer"] = map_optimizer(data["optim"], notes)
    if _truthy(data.get("bf16")) and _truthy(data.get("fp16")):
        raise VramplanError(f"{path.name}: bf16 and fp16 are both set")
    if _truthy(data.get("bf16")):
        opts["precision"] = "bf16-mixed"
    elif _truthy(data.get("fp16")):
        opts["precision"] = "fp16-mixed"
    if data.get("attn_implementation"):
        opts["attn"] = map_attention(data["attn_implementation"], notes)
    return PlanRequest(spec, method if takes_adapter_choice(method) else adapter, opts, notes,
                       source=f"training arguments {path.name}")


def read_training_file(path: str | Path, model: Any = None) -> PlanRequest:
    """Read an Axolotl YAML or a HF/TRL training-arguments JSON/YAML into a :class:`PlanRequest`.

    The kind is recognised from the keys (Axolotl: ``base_model``, ``micro_batch_size``,
    ``sequence_len``, ``adapter``...; HF/TRL: ``per_device_train_batch_size``, ``optim``...).
    ``model`` (a name or config path) replaces the file's model reference.

    Raises:
        VramplanError: unreadable or malformed file (YAML needs PyYAML), an unknown kind,
            a model that is neither in the catalogue nor local, settings not modelled.
    """
    p = Path(path).expanduser()
    data = read_config_file(p, "training config")
    keys = set(data)
    if keys & AXOLOTL_KEYS and not (keys & {"per_device_train_batch_size", "optim"}):
        return read_axolotl(data, p, model)
    if keys & HF_KEYS:
        return read_training_arguments(data, p, model)
    raise VramplanError(f"{p.name} is neither an Axolotl config nor training arguments",
                        "expected keys such as base_model / micro_batch_size / sequence_len (Axolotl) or "
                        "per_device_train_batch_size / optim / max_length (HF, TRL)")


def estimate_file(path: str | Path, gpu=None, gpu_mem=None, model: Any = None, **overrides) -> Estimate:
    """:func:`vramplan.estimate` for a configuration file; ``overrides`` (estimate options, ``method``) win."""
    return read_training_file(path, model).with_overrides(**overrides).estimate(gpu=gpu, gpu_mem=gpu_mem)

"""Card checks and assumption text: the bottom layer of the planner (:mod:`vramplan.planner`).

What a configuration needs from a card (bf16, FlashAttention-2, 4-bit kernels) and how an
estimate states its assumptions (stack, precision, techniques, package behaviours, MoE QLoRA).
Public functions, used by every layer above (estimate, search, fit, the matrix, the dry run);
numpy only.
"""

from __future__ import annotations

import numpy as np

from ..attention import attention_kernel, default_kernel
from ..config import TrainConfig
from ..errors import CardUnsupportedError, VramplanError
from ..gpus import GPUSpec, custom_gpu, get_gpu
from ..methods import Adapter, resolve
from ..models import ModelSpec
from ..precision import DEFAULT_REGIME, FALLBACK_REGIME, get_regime
from ..units import parse_size

STACK = "transformers + PEFT (HF Trainer / TRL semantics)"


def resolve_gpu(gpu: str | GPUSpec | None = None, gpu_mem: str | int | None = None) -> GPUSpec | None:
    """``--gpu`` and/or ``--gpu-mem``: a catalogue card, its capacity overridden, or a generic card."""
    spec = get_gpu(gpu) if gpu is not None else None
    if gpu_mem is not None:
        return custom_gpu(parse_size(gpu_mem, label="--gpu-mem"), like=spec)
    return spec


def check_card(cfg_precision: str | None, method: str, adapter: str | None, attn: str, gpu: GPUSpec | None,
                framework: str = "hf") -> str | None:
    """Validate features against the card; return the precision to use.

    Without a requested precision: the stack's ``default_precision`` (``stacks.toml``: hf
    bf16-mixed, torchtune and litgpt bf16), or fp16-mixed on a card without bf16.
    """
    if gpu is None:
        return cfg_precision
    regime_name = cfg_precision
    if regime_name is None:
        from ..stacks import get_stack

        default = get_stack(framework).default_precision if framework else DEFAULT_REGIME
        regime_name = default if (gpu.bf16 or not get_regime(default).needs_bf16) else FALLBACK_REGIME
    if get_regime(regime_name).needs_bf16 and not gpu.bf16:
        raise CardUnsupportedError(f"{gpu.display_name} (compute capability {gpu.compute_capability}) has no bf16",
                            "use --precision fp16-mixed or fp32")
    kernel = attention_kernel(attn)
    if not kernel.runs_on(gpu):
        raise CardUnsupportedError(f"{gpu.display_name} does not run {kernel.title}",
                            f"use --attn {kernel.same_as or default_kernel().name}")
    if resolve(method, adapter).adapter.quantized_base and not getattr(gpu, "bf16", True) and gpu.cc < (7, 0):
        raise CardUnsupportedError(f"bitsandbytes 4-bit kernels need compute capability >= 7.0; {gpu.display_name} has {gpu.compute_capability}")
    return regime_name


def stack_text(framework: str) -> str:
    """``stack: ...`` as the assumptions say it (hf keeps its historical wording)."""
    from ..stacks import get_stack

    return STACK if framework == "hf" else f"{framework}: {get_stack(framework).summary}"


def techniques_text(cfg: TrainConfig) -> str | None:
    """The memory-saving techniques on (requested or the stack's) with their step-time cost, or None."""
    from ..stacks import techniques

    on = [t for name, t in techniques().items() if cfg.uses(name)]
    if not on:
        return None
    return "techniques: " + "; ".join(f"{t.label} ({t.name}, +{t.cost_for(cfg):.0%} step time)" for t in on)


#: Where the fused-expert finding is documented (MoE QLoRA under transformers >= 5).
MOE_QLORA_SOURCES = ("bitsandbytes issue #1849 'Failed to quant MoE models with fused expert weights in transformers v5' "
                     "(open; root cause confirmed 2026-07-02), bitsandbytes PR #1965 Experts4bit (open, held for after "
                     "v0.50.0), unslothai/unsloth-zoo PR #527 (merged 2026-03: Params4bit for fused MoE experts)")


def _subclass_qlora_note(spec: ModelSpec, cfg: TrainConfig, short: bool) -> str:
    """QLoRA of an architecture whose decoder linears subclass nn.Linear (Falcon's FalconLinear): transformers
    >= 5's bitsandbytes conversion replaces exact nn.Linear only (stacks.toml bnb_exact_linear), so nothing in
    the decoder layers is quantised."""
    lin = spec.linear_params / 1e9
    upcast = " and upcast to fp32" if cfg.stack.kbit_upcast else ""
    if short:
        return (f"{spec.architecture} QLoRA: transformers >= 5 leaves its {spec.linear_subclass} layers ({lin:.1f}B "
                f"params) unquantised{upcast}; instead: LoRA over bf16, litgpt, or transformers < 5")
    return (f"{spec.architecture} QLoRA: transformers >= 5 (integrations/bitsandbytes.py replace_with_bnb_linear: "
            f"`type(module) is nn.Linear`) does not quantise {spec.linear_subclass}, an nn.Linear subclass: the "
            f"decoder layers ({lin:.1f}B parameters) stay 16-bit{upcast}, so QLoRA needs more memory than LoRA. "
            "Instead: LoRA over the bf16 base; or litgpt (--framework litgpt: Lightning's bitsandbytes precision "
            "replaces every torch.nn.Linear); or transformers < 5, whose conversion tested isinstance")


def sdpa_math_note(spec: ModelSpec, cfg: TrainConfig) -> str | None:
    """Why a model's SDPA is planned as eager attention (:func:`vramplan.memory.attention_as_run`), or None."""
    kernel = cfg.attention
    if kernel.materialises_scores:
        return None
    if spec.eager_only and cfg.stack.transformers_modules:
        return (f"attention: {spec.architecture} runs its own attention (ALiBi scores by baddbmm, fp32 softmax, bmm), "
                f"whatever attn_implementation asks ({cfg.attn}): the scores are materialised; planned as eager "
                "attention (transformers models/bloom/modeling_bloom.py BloomAttention.forward)")
    from ..memory import sdpa_refused

    if spec.attn_logit_softcapping and cfg.stack.softcap_by_hand:
        return (f"attention: {cfg.stack.name}'s own attention computes {spec.architecture}'s soft-capped scores by "
                f"hand (matmul, tanh, fp32 softmax), whatever kernel is asked ({cfg.attn}): planned as eager "
                "attention (stacks.toml softcap_by_hand)")
    if sdpa_refused(spec, cfg):
        return (f"attention: transformers >= 5.21 refuses SDPA for {spec.architecture} (_supports_sdpa = False: SDPA "
                "cannot apply the attention softcap); an explicit attn_implementation='sdpa' raises and the default "
                "falls back to eager, so it is planned as eager attention (scores materialised). Flash attention "
                "(flash-attn >= 2.6 applies the softcap) avoids the scores; transformers < 5.21 ran SDPA with the "
                "softcap dropped (transformers models/gemma2/modeling_gemma2.py Gemma2PreTrainedModel)")
    if not (kernel.torch_sdpa and spec.sdpa_math and cfg.stack.transformers_modules):
        return None
    return (f"attention: {spec.architecture} calls SDPA with {spec.num_heads} query heads and {spec.num_kv_heads} "
            "kv head (no enable_gqa, no repeat): only the math backend takes unequal head counts, so the scores "
            "are materialised; planned as eager attention (transformers models/falcon/modeling_falcon.py "
            "FalconAttention.forward)")


def moe_qlora_note(spec: ModelSpec, cfg: TrainConfig, short: bool = False) -> str | None:
    """What a QLoRA user of a fused-expert MoE (Mixtral, Qwen-MoE) must know, or None.

    transformers >= 5 stores the experts of these models as 3-D ``nn.Parameter`` banks, not
    ``nn.Linear``; bitsandbytes' 4-bit conversion replaces ``nn.Linear`` only, so the banks --
    most of the model -- stay 16-bit, and PEFT's ``prepare_model_for_kbit_training`` (the hf
    stack: ``kbit_upcast``) casts every non-quantised 16-bit parameter to fp32. The analytic
    model counts exactly that (:mod:`vramplan.memory`); this says it, with the sources and what
    to do instead.
    """
    from ..models import layout_of

    if cfg.recipe.adapter.quantized_base and spec.linear_subclass and cfg.stack.bnb_exact_linear:
        return _subclass_qlora_note(spec, cfg, short)
    if not cfg.recipe.adapter.quantized_base or not spec.is_moe or layout_of(spec.model_type).get("moe") != "fused":
        return None
    banks = sum(l.params for l in spec.layer_linears() if not l.is_linear) * spec.num_layers
    share = banks / spec.params
    upcast = cfg.stack.kbit_upcast
    if short:
        return (f"MoE QLoRA: transformers >= 5 leaves the fused expert banks ({banks / 1e9:.1f}B params, {share:.0%}) "
                "unquantised" + (" and upcast to fp32" if upcast else "") + " (bitsandbytes issue #1849); instead: "
                "LoRA over bf16, Unsloth (unsloth-zoo >= 2026.3) or transformers < 5 (sources: vramplan estimate)")
    return (f"MoE QLoRA: with transformers >= 5 bitsandbytes does not quantise the fused expert banks "
            f"({banks / 1e9:.1f}B parameters, {share:.0%} of the model): they stay 16-bit"
            + (" and prepare_model_for_kbit_training upcasts them to fp32, so QLoRA needs more memory than LoRA"
               if upcast else "")
            + f" ({MOE_QLORA_SOURCES}). Instead: LoRA over the bf16 base; or Unsloth with unsloth-zoo >= 2026.3, "
            "which quantises the banks (vramplan's unsloth stack still counts them 16-bit: an upper bound); or "
            "transformers < 5, where experts are nn.Linear and bitsandbytes quantises them")


def assumptions(cfg: TrainConfig, overhead_source: str) -> list[str]:
    regime = get_regime(cfg.precision)
    out = [
        f"stack: {stack_text(cfg.framework)}",
        f"precision {regime.name}: {regime.summary}",
        "quantity: peak_bytes is the device total nvidia-smi shows for the process (tensors + CUDA context + "
        "cuBLAS workspace + allocator reserve); tensor_peak_bytes is live tensors (max_memory_allocated)",
        f"runtime overheads: {overhead_source}",
        f"attention: {cfg.attn}; gradient checkpointing {'on' if cfg.grad_ckpt else 'off'}; optimizer {cfg.optimizer}",
        "steady state (step >= 2): optimizer states exist; gradients freed between steps (set_to_none)",
        ("sequences padded to the longest of the batch (padding mask materialised; SDPA repeats k/v for GQA)"
         if cfg.uses("padding") else "sequences packed or equal length (no padding mask materialised)"),
    ]
    tech = techniques_text(cfg)
    if tech:
        out.append(tech)
    from ..stacks import behaviours, package_version

    for b in behaviours().values():
        if cfg.framework in b.stacks:
            v, how = package_version(b.package, cfg.versions)
            state = "applies" if cfg.behaves(b.name) else "does not apply"
            out.append(f"{b.package} {v or 'latest'} ({how}): {b.name} {state} (before {b.before}: {b.summary})")
    if cfg.recipe.adapter.quantized_base:
        out.append(f"{cfg.recipe.adapter.label}: NF4 decoder linears (bitsandbytes, blocksize 64, double quant "
                   f"{'on' if cfg.double_quant else 'off'}); "
                   + ("prepare_model_for_kbit_training upcasts the rest to fp32" if cfg.stack.kbit_upcast
                      else "the other weights stay in the model dtype"))
    out += cfg.recipe.behaviour.assumptions(cfg)
    return out


def accum_for(global_batch: int, gpus: int, batch: int) -> int:
    """Accumulation steps for ``global_batch`` examples per optimiser step, or a VramplanError."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or global_batch <= 0:
        raise VramplanError(f"--global-batch must be a positive integer, got {global_batch!r}")
    if global_batch % (gpus * batch):
        raise VramplanError(f"--global-batch {global_batch} is not a multiple of --gpus x --batch ({gpus} x {batch})",
                            f"use a multiple of {gpus * batch}")
    return int(global_batch // (gpus * batch))

"""The planner's library functions: ``estimate`` one configuration, ``fit`` every method on a card.

The CLI is a thin layer over these; they return dataclasses (``Estimate``, ``FitReport``)
that ``--json`` serialises unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import TrainConfig, make_config
from .errors import VramplanError
from .gpus import GPUSpec, custom_gpu, get_gpu
from .memory import PHASE_ORDER, step_memory
from .methods import Adapter, method_names, resolve
from .models import ModelSpec, get_model
from .overheads import runtime_overheads
from .precision import DEFAULT_REGIME, FALLBACK_REGIME, get_regime
from .results import Estimate
from .taxonomy import Component, Quantity
from .units import parse_size

STACK = "transformers + PEFT (HF Trainer / TRL semantics)"


def resolve_gpu(gpu: str | GPUSpec | None = None, gpu_mem: str | int | None = None) -> GPUSpec | None:
    """``--gpu`` and/or ``--gpu-mem``: a catalogue card, its capacity overridden, or a generic card."""
    spec = get_gpu(gpu) if gpu is not None else None
    if gpu_mem is not None:
        return custom_gpu(parse_size(gpu_mem), like=spec)
    return spec


def _check_card(cfg_precision: str | None, method: str, adapter: str | None, attn: str, gpu: GPUSpec | None) -> str | None:
    """Validate features against the card; return the precision to use (bf16 fallback to fp16)."""
    if gpu is None:
        return cfg_precision
    regime_name = cfg_precision
    if regime_name is None:
        regime_name = DEFAULT_REGIME if gpu.bf16 else FALLBACK_REGIME
    if get_regime(regime_name).needs_bf16 and not gpu.bf16:
        raise VramplanError(f"{gpu.display_name} (compute capability {gpu.compute_capability}) has no bf16",
                            "use --precision fp16-mixed or fp32")
    if attn == "flash" and not gpu.flash_attention:
        raise VramplanError(f"{gpu.display_name} does not run FlashAttention-2", "use --attn sdpa")
    if resolve(method, adapter).adapter is Adapter.QLORA and not getattr(gpu, "bf16", True) and gpu.compute_capability < "7.0":
        raise VramplanError(f"bitsandbytes 4-bit kernels need compute capability >= 7.0; {gpu.display_name} has {gpu.compute_capability}")
    return regime_name


def _assumptions(cfg: TrainConfig, overhead_source: str) -> list[str]:
    regime = get_regime(cfg.precision)
    out = [
        f"stack: {STACK}",
        f"precision {regime.name}: {regime.summary}",
        f"quantity: peak_bytes is the device total nvidia-smi shows for the process (tensors + CUDA context + "
        f"cuBLAS workspace + allocator reserve); tensor_peak_bytes is live tensors (max_memory_allocated)",
        f"runtime overheads: {overhead_source}",
        f"attention: {cfg.attn}; gradient checkpointing {'on' if cfg.grad_ckpt else 'off'}; optimizer {cfg.optimizer}",
        "steady state (step >= 2): optimizer states exist; gradients freed between steps (set_to_none)",
        "sequences packed or equal length (no padding mask materialised)",
    ]
    if cfg.adapter == "qlora":
        out.append("QLoRA: NF4 decoder linears (bitsandbytes, blocksize 64, double quant "
                   f"{'on' if cfg.double_quant else 'off'}); prepare_model_for_kbit_training upcasts the rest to fp32")
    if cfg.method == "dpo":
        out.append("DPO: chosen + rejected concatenated (2 x batch sequences); reference = "
                   + ("adapter disabled on the policy" if cfg.adapter != "full" else "a frozen copy"))
    if cfg.method == "ppo":
        out.append(f"PPO: prompt {cfg.seq - cfg.ppo_response} + response {cfg.ppo_response} tokens; reward and value "
                   "models share the policy's architecture")
    return out


def estimate(model: str | ModelSpec, method: str = "lora", *, adapter: str | None = None,
             gpu: str | GPUSpec | None = None, gpu_mem: str | int | None = None, batch: int = 1, seq: int = 2048,
             grad_accum: int = 1, rank: int = 8, alpha: float | None = None, dropout: float = 0.0, targets=None,
             grad_ckpt: bool | None = None, optimizer: str = "adamw", precision: str | None = None,
             attn: str = "sdpa", framework: str = "hf", double_quant: bool = True,
             ppo_response: int | None = None) -> Estimate:
    """Predict the peak GPU memory of one training configuration (analytic model, numpy only).

    Args mirror the CLI (``vramplan estimate``); sizes are tokens and examples, memory in bytes.
    ``gpu`` is a catalogue name/alias or ``"auto"`` (NVML); ``gpu_mem`` a capacity such as ``"24GiB"``.

    Returns:
        :class:`vramplan.results.Estimate` with ``components`` (bytes), ``tensor_peak_bytes``,
        ``peak_bytes`` (device total) and, with a GPU, ``capacity_bytes`` and ``fits``.

    Raises:
        VramplanError: bad input (unknown names, non-positive shapes, unsupported features).
    """
    spec = get_model(model)
    card = resolve_gpu(gpu, gpu_mem)
    precision = _check_card(precision, method, adapter, attn, card)
    cfg = make_config(spec, method, adapter=adapter, batch=batch, seq=seq, grad_accum=grad_accum, rank=rank,
                      alpha=alpha, dropout=dropout, targets=targets, grad_ckpt=grad_ckpt, optimizer=optimizer,
                      precision=precision, attn=attn, framework=framework, double_quant=double_quant,
                      ppo_response=ppo_response)
    return estimate_config(spec, cfg, card, model_query=str(model) if not isinstance(model, ModelSpec) else None)


def estimate_config(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec | None = None,
                    model_query: str | None = None) -> Estimate:
    """:func:`estimate` for an already validated :class:`TrainConfig`."""
    mem = step_memory(spec, cfg)
    tensor_peak = int(np.ceil(float(mem.peak)))
    over = runtime_overheads(tensor_peak, card)
    comps = {c: int(np.ceil(float(v))) for c, v in mem.components.items()}
    comps.update(over.components)
    peak = tensor_peak + sum(over.components.values())
    phases = {p: int(np.ceil(float(mem.phases[p]))) for p in PHASE_ORDER if float(mem.phases[p]) > 0}
    resolved = None
    if model_query is not None and model_query.lower() != spec.name.lower():
        resolved = f"{model_query} -> {spec.name}"
    est = Estimate(
        model=spec.name, method=cfg.method, adapter=cfg.adapter, config=cfg, params=spec.params,
        trainable_params=mem.state.trainable_params, components=comps, phases=phases,
        peak_phase=PHASE_ORDER[int(mem.peak_phase)], tensor_peak_bytes=tensor_peak, peak_bytes=peak,
        quantity=Quantity.DEVICE_TOTAL, uncertainty_bytes=over.uncertainty_bytes, calibrated=over.calibrated,
        assumptions=_assumptions(cfg, over.source), model_resolved_from=resolved,
    )
    if card is not None:
        est.gpu = card.name
        est.capacity_bytes = card.memory_bytes
        est.fits = peak <= card.memory_bytes
    return est


# -- fit ---------------------------------------------------------------------------------

BATCH_GRID = np.arange(1, 1025)
SEQ_GRID = np.arange(128, 131072 + 1, 128)


def _total(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec | None, batch=None, seq=None) -> np.ndarray:
    """Vectorised device-total peak (tensors + default or calibrated overheads) over batch/seq arrays."""
    mem = step_memory(spec, cfg, batch, seq)
    tensor = mem.peak
    # overheads are affine in the tensor peak: evaluate the two coefficients once
    o0 = runtime_overheads(0, card)
    o1 = runtime_overheads(1 << 30, card)
    base = sum(o0.components.values())
    slope = (sum(o1.components.values()) - base) / float(1 << 30)
    return tensor * (1.0 + slope) + base


def largest_batch(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec) -> int:
    """Largest micro-batch (<= 1024) that fits ``card`` at ``cfg.seq``; 0 if none."""
    ok = _total(spec, cfg, card, batch=BATCH_GRID) <= card.memory_bytes
    return int(BATCH_GRID[ok].max()) if ok.any() else 0


def longest_seq(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, limit: int | None = None) -> int:
    """Longest sequence (multiple of 128, <= the model's context) that fits at micro-batch 1; 0 if none."""
    limit = limit or spec.max_position_embeddings
    grid = SEQ_GRID[SEQ_GRID <= max(128, limit)]
    if cfg.method == "ppo":
        grid = grid[grid >= 256]
    ok = _total(spec, cfg.with_(batch=1, ppo_response=None), card, batch=1, seq=grid) <= card.memory_bytes
    return int(grid[ok].max()) if ok.any() else 0


@dataclass
class FitRow:
    """One method's verdict on a card, with the settings that made it fit."""

    method: str
    adapter: str
    fits: bool
    estimate: Estimate
    max_batch: int
    max_seq: int
    settings: dict
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"method": self.method, "adapter": self.adapter, "fits": self.fits, "peak_bytes": self.estimate.peak_bytes,
                "peak_gib": round(self.estimate.peak_gib, 3), "capacity_bytes": self.estimate.capacity_bytes,
                "max_batch": self.max_batch, "max_seq": self.max_seq, "settings": self.settings, "notes": self.notes,
                "estimate": self.estimate.to_json()}


@dataclass
class FitReport:
    model: str
    model_resolved_from: str | None
    gpu: str
    capacity_bytes: int
    seq: int
    rows: list[FitRow]
    assumptions: list[str]

    def to_json(self) -> dict:
        return {"model": self.model, "model_resolved_from": self.model_resolved_from, "gpu": self.gpu,
                "capacity_bytes": self.capacity_bytes, "seq": self.seq, "rows": [r.to_json() for r in self.rows],
                "assumptions": self.assumptions}


def _candidates(method: str, adapter: str | None):
    """Settings to try, cheapest in throughput first: no GC before GC, AdamW before 8-bit/paged."""
    for gc in (False, True):
        for opt in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
            yield {"grad_ckpt": gc, "optimizer": opt}


def fit(model: str | ModelSpec, gpu: str | GPUSpec | None = None, *, gpu_mem: str | int | None = None,
        seq: int = 2048, batch: int = 1, methods: list[str] | None = None, precision: str | None = None,
        attn: str = "sdpa", rank: int = 8, targets=None) -> FitReport:
    """Every method on one card: fits or not, peak/capacity, largest micro-batch, longest sequence.

    For each method the first setting that fits at ``batch`` is recommended, trying gradient
    checkpointing and 8-bit optimisers only when needed (they cost throughput).
    """
    spec = get_model(model)
    card = resolve_gpu(gpu, gpu_mem)
    if card is None:
        raise VramplanError("fit needs a GPU", "pass --gpu NAME, --gpu auto or --gpu-mem 24GiB")
    rows: list[FitRow] = []
    for name in methods or method_names():
        prec = _check_card(precision, name, None, attn, card)
        chosen = None
        first = None
        for settings in _candidates(name, None):
            cfg = make_config(spec, name, batch=batch, seq=seq, rank=rank, targets=targets, precision=prec, attn=attn,
                              **settings)
            est = estimate_config(spec, cfg, card)
            first = first or (cfg, est, settings)
            if est.fits:
                chosen = (cfg, est, settings)
                break
        cfg, est, settings = chosen or first
        notes = []
        if chosen is None:
            notes.append("does not fit even with gradient checkpointing and a paged 8-bit optimizer")
        rows.append(FitRow(method=name, adapter=cfg.adapter, fits=chosen is not None, estimate=est,
                           max_batch=largest_batch(spec, cfg, card), max_seq=longest_seq(spec, cfg, card),
                           settings={"grad_ckpt": cfg.grad_ckpt, "optimizer": cfg.optimizer, "precision": cfg.precision,
                                     "attn": cfg.attn, "batch": cfg.batch}, notes=notes))
    resolved = None if isinstance(model, ModelSpec) or str(model).lower() == spec.name else f"{model} -> {spec.name}"
    assumptions = rows[0].estimate.assumptions[:4] if rows else []
    return FitReport(model=spec.name, model_resolved_from=resolved, gpu=card.name, capacity_bytes=card.memory_bytes,
                     seq=seq, rows=rows, assumptions=assumptions)

"""The planner's library functions: ``estimate`` one configuration, ``fit`` every method on a card.

The CLI is a thin layer over these; they return dataclasses (``Estimate``, ``FitReport``)
that ``--json`` serialises unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
from .verdict import COMFORTABLE_FRACTION, Verdict, classify

STACK = "transformers + PEFT (HF Trainer / TRL semantics)"


def resolve_gpu(gpu: str | GPUSpec | None = None, gpu_mem: str | int | None = None) -> GPUSpec | None:
    """``--gpu`` and/or ``--gpu-mem``: a catalogue card, its capacity overridden, or a generic card."""
    spec = get_gpu(gpu) if gpu is not None else None
    if gpu_mem is not None:
        return custom_gpu(parse_size(gpu_mem, label="--gpu-mem"), like=spec)
    return spec


def _check_card(cfg_precision: str | None, method: str, adapter: str | None, attn: str, gpu: GPUSpec | None,
                framework: str = "hf") -> str | None:
    """Validate features against the card; return the precision to use.

    Without a requested precision: the stack's ``default_precision`` (``stacks.toml``: hf
    bf16-mixed, torchtune and litgpt bf16), or fp16-mixed on a card without bf16.
    """
    if gpu is None:
        return cfg_precision
    regime_name = cfg_precision
    if regime_name is None:
        from .stacks import get_stack

        default = get_stack(framework).default_precision if framework else DEFAULT_REGIME
        regime_name = default if (gpu.bf16 or not get_regime(default).needs_bf16) else FALLBACK_REGIME
    if get_regime(regime_name).needs_bf16 and not gpu.bf16:
        raise VramplanError(f"{gpu.display_name} (compute capability {gpu.compute_capability}) has no bf16",
                            "use --precision fp16-mixed or fp32")
    if attn == "flash" and not gpu.flash_attention:
        raise VramplanError(f"{gpu.display_name} does not run FlashAttention-2", "use --attn sdpa")
    if resolve(method, adapter).adapter is Adapter.QLORA and not getattr(gpu, "bf16", True) and gpu.cc < (7, 0):
        raise VramplanError(f"bitsandbytes 4-bit kernels need compute capability >= 7.0; {gpu.display_name} has {gpu.compute_capability}")
    return regime_name


def _stack_text(framework: str) -> str:
    """``stack: ...`` as the assumptions say it (hf keeps its historical wording)."""
    from .stacks import get_stack

    return STACK if framework == "hf" else f"{framework}: {get_stack(framework).summary}"


def _techniques_text(cfg: TrainConfig) -> str | None:
    """The memory-saving techniques on (requested or the stack's) with their step-time cost, or None."""
    from .stacks import techniques

    on = [t for name, t in techniques().items() if cfg.uses(name)]
    if not on:
        return None
    return "techniques: " + "; ".join(f"{t.label} ({t.name}, +{t.cost_for(cfg):.0%} step time)" for t in on)


#: Where the fused-expert finding is documented (MoE QLoRA under transformers >= 5).
MOE_QLORA_SOURCES = ("bitsandbytes issue #1849 'Failed to quant MoE models with fused expert weights in transformers v5' "
                     "(open; root cause confirmed 2026-07-02), bitsandbytes PR #1965 Experts4bit (open, held for after "
                     "v0.50.0), unslothai/unsloth-zoo PR #527 (merged 2026-03: Params4bit for fused MoE experts)")


def moe_qlora_note(spec: ModelSpec, cfg: TrainConfig, short: bool = False) -> str | None:
    """What a QLoRA user of a fused-expert MoE (Mixtral, Qwen-MoE) must know, or None.

    transformers >= 5 stores the experts of these models as 3-D ``nn.Parameter`` banks, not
    ``nn.Linear``; bitsandbytes' 4-bit conversion replaces ``nn.Linear`` only, so the banks --
    most of the model -- stay 16-bit, and PEFT's ``prepare_model_for_kbit_training`` (the hf
    stack: ``kbit_upcast``) casts every non-quantised 16-bit parameter to fp32. The analytic
    model counts exactly that (:mod:`vramplan.memory`); this says it, with the sources and what
    to do instead.
    """
    from .models import _layout

    if cfg.adapter != "qlora" or not spec.is_moe or _layout(spec.model_type).get("moe") != "fused":
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


def _assumptions(cfg: TrainConfig, overhead_source: str) -> list[str]:
    regime = get_regime(cfg.precision)
    out = [
        f"stack: {_stack_text(cfg.framework)}",
        f"precision {regime.name}: {regime.summary}",
        "quantity: peak_bytes is the device total nvidia-smi shows for the process (tensors + CUDA context + "
        "cuBLAS workspace + allocator reserve); tensor_peak_bytes is live tensors (max_memory_allocated)",
        f"runtime overheads: {overhead_source}",
        f"attention: {cfg.attn}; gradient checkpointing {'on' if cfg.grad_ckpt else 'off'}; optimizer {cfg.optimizer}",
        "steady state (step >= 2): optimizer states exist; gradients freed between steps (set_to_none)",
        ("sequences padded to the longest of the batch (padding mask materialised; SDPA repeats k/v for GQA)"
         if cfg.uses("padding") else "sequences packed or equal length (no padding mask materialised)"),
    ]
    tech = _techniques_text(cfg)
    if tech:
        out.append(tech)
    from .stacks import behaviours, package_version

    for b in behaviours().values():
        if cfg.framework in b.stacks:
            v, how = package_version(b.package, cfg.versions)
            state = "applies" if cfg.behaves(b.name) else "does not apply"
            out.append(f"{b.package} {v or 'latest'} ({how}): {b.name} {state} (before {b.before}: {b.summary})")
    if cfg.adapter == "qlora":
        out.append("QLoRA: NF4 decoder linears (bitsandbytes, blocksize 64, double quant "
                   f"{'on' if cfg.double_quant else 'off'}); "
                   + ("prepare_model_for_kbit_training upcasts the rest to fp32" if cfg.stack.kbit_upcast
                      else "the other weights stay in the model dtype"))
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
             attn: str = "sdpa", framework: str = "hf", techniques=None, double_quant: bool = True,
             ppo_response: int | None = None, gpus: int = 1, strategy: str | None = None,
             offload: str | None = None, global_batch: int | None = None, tokens=None,
             epochs: float = 1.0, versions=None) -> Estimate:
    """Predict the peak GPU memory of one training configuration (analytic model, numpy only), and its speed.

    Args mirror the CLI (``vramplan estimate``); sizes are tokens and examples, memory in bytes.
    ``gpu`` is a catalogue name/alias or ``"auto"`` (NVML); ``gpu_mem`` a capacity such as ``"24GiB"``.
    ``gpus``/``strategy``/``offload`` plan N GPUs (``vramplan.distributed``; ``gpus > 1`` alone
    means DDP); ``batch`` is then per GPU. ``global_batch`` (examples per optimiser step over all
    GPUs) sets ``grad_accum = global_batch / (gpus x batch)``. ``tokens`` (dataset tokens, e.g.
    ``"500M"``) and ``epochs`` give the time to train. ``versions`` (``--stack-version``,
    ``"bitsandbytes=0.42.0"`` or a dict) plans the package versions the run uses where a
    behaviour changed between versions (``stacks.toml`` [behaviours]); unnamed packages take
    their installed version, else the latest.

    Returns:
        :class:`vramplan.results.Estimate` with ``components`` (bytes, per GPU), ``tensor_peak_bytes``,
        ``peak_bytes`` (device total per GPU) and, with a GPU, ``capacity_bytes``, ``fits``,
        ``step_time_s`` and ``tokens_per_s`` (all GPUs; :mod:`vramplan.throughput`).

    Raises:
        VramplanError: bad input (unknown names, non-positive shapes, unsupported features,
            ``gpus < 1``, an unknown strategy, a global batch that the GPUs and micro-batch do not divide).
    """
    from . import validate as v
    from .distributed import make_parallel
    from .throughput import parse_count

    v.scale(gpus=gpus, epochs=epochs, global_batch=global_batch, strategy=strategy, offload=offload)
    v.integer(batch, "batch")
    v.name_text(method, "method")
    v.name_text(attn, "attention implementation")
    v.name_text(framework, "framework")
    v.name_text(precision, "precision", none_ok=True)
    spec = get_model(model)
    card = resolve_gpu(gpu, gpu_mem)
    par = make_parallel(gpus, strategy, offload)
    precision = _check_card(precision, method, adapter, attn, card, framework)
    if global_batch is not None:
        grad_accum = _accum_for(global_batch, par.gpus, batch)
    cfg = make_config(spec, method, adapter=adapter, batch=batch, seq=seq, grad_accum=grad_accum, rank=rank,
                      alpha=alpha, dropout=dropout, targets=targets, grad_ckpt=grad_ckpt, optimizer=optimizer,
                      precision=precision, attn=attn, framework=framework, techniques=techniques, double_quant=double_quant,
                      ppo_response=ppo_response, versions=versions)
    est = estimate_config(spec, cfg, card, model_query=str(model) if not isinstance(model, ModelSpec) else None,
                          parallel=par, tokens=parse_count(tokens, "--tokens"), epochs=epochs)
    note = v.context_note(spec, cfg.seq)
    if note:
        est.assumptions.insert(0, note)
    return est


def _accum_for(global_batch: int, gpus: int, batch: int) -> int:
    """Accumulation steps for ``global_batch`` examples per optimiser step, or a VramplanError."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or global_batch <= 0:
        raise VramplanError(f"--global-batch must be a positive integer, got {global_batch!r}")
    if global_batch % (gpus * batch):
        raise VramplanError(f"--global-batch {global_batch} is not a multiple of --gpus x --batch ({gpus} x {batch})",
                            f"use a multiple of {gpus * batch}")
    return int(global_batch // (gpus * batch))


def estimate_config(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec | None = None,
                    model_query: str | None = None, parallel=None, tokens: float | None = None,
                    epochs: float = 1.0, with_time: bool = True) -> Estimate:
    """:func:`estimate` for an already validated :class:`TrainConfig` (and a :class:`~vramplan.distributed.Parallel`).

    ``with_time=False`` skips the throughput model (memory only: what a search comparing peaks needs).
    """
    from .distributed import SINGLE, parallel_step_memory

    par = parallel or SINGLE
    mem = parallel_step_memory(spec, cfg, par) if par.distributed else step_memory(spec, cfg)
    from .overheads import apply_activation_factor, peak_terms

    tensor_peak = int(np.ceil(float(mem.peak)))
    comps = {c: int(np.ceil(float(v))) for c, v in mem.components.items()}
    act, paged = peak_terms(comps, cfg.optimizer)
    from .overheads import loaded_terms

    over = runtime_overheads(tensor_peak, card, method=cfg.recipe.name, activation_bytes=act, paged_bytes=paged,
                             stack=cfg.framework, loaded_bytes=loaded_terms(mem))
    comps = apply_activation_factor(comps, over)  # a calibrated activation factor (none by default)
    tensor_peak += over.activation_correction_bytes
    comps.update(over.components)
    if par.distributed:
        from .distributed import NCCL_BYTES

        comps[Component.CUDA_CONTEXT] = comps.get(Component.CUDA_CONTEXT, 0) + NCCL_BYTES  # NCCL communicator buffers
    peak = tensor_peak + sum(v for c, v in comps.items() if not c.is_tensor)
    phases = {p: int(np.ceil(float(mem.phases[p]))) for p in PHASE_ORDER if float(mem.phases[p]) > 0}
    resolved = None
    if model_query is not None and model_query.lower() != spec.name.lower():
        resolved = f"{model_query} -> {spec.name}"
    est = Estimate(
        model=spec.name, method=cfg.method, adapter=cfg.adapter, config=cfg, params=spec.params,
        trainable_params=mem.state.trainable_params, components=comps, phases=phases,
        peak_phase=PHASE_ORDER[int(mem.peak_phase)], tensor_peak_bytes=tensor_peak, peak_bytes=peak,
        quantity=Quantity.DEVICE_TOTAL, uncertainty_bytes=over.uncertainty_bytes, calibrated=over.calibrated,
        assumptions=_assumptions(cfg, over.source) + [n for n in (moe_qlora_note(spec, cfg),) if n],
        model_resolved_from=resolved, overheads=over,
    )
    est.gpus, est.strategy, est.offload = par.gpus, par.strategy, par.offload
    if par.distributed:
        from .distributed import shard_state

        sh = shard_state(spec, cfg, par)
        est.assumptions.append(f"{par.label}: {sh.layout}; peak_bytes and components are per GPU; cuda_context includes "
                               "NCCL's buffers (256 MiB)" + "".join(f"; {n}" for n in sh.notes))
        if sh.cpu_bytes:
            est.extra["cpu_offload_bytes_per_gpu"] = int(sh.cpu_bytes)
    from .bands import band_for_config

    band = band_for_config(cfg)
    # the band as the device totals it spans (bytes): peak x (1 + lo) .. peak x (1 + hi)
    est.extra["band"] = {**band.to_json(), "low_bytes": max(0, int(np.floor((1.0 + band.lo) * peak))),
                         "high_bytes": int(np.ceil((1.0 + band.hi) * peak))}
    est.assumptions.append(f"uncertainty band: {band.describe()}")
    if card is not None:
        from .throughput import step_time, time_to_train

        est.gpu = card.name
        est.capacity_bytes = card.memory_bytes
        est.fits = peak <= card.memory_bytes
    if card is not None and with_time:
        t = step_time(spec, cfg, card, parallel=par).at()
        est.throughput, est.step_time_s, est.tokens_per_s = t, t.step_s, t.tokens_per_s
        est.time_to_train_s, est.gpu_hours = time_to_train(tokens, epochs, t.tokens_per_s, par.gpus)
        est.assumptions.append(f"throughput: {t.source}")
    return est


# -- fit ---------------------------------------------------------------------------------

BATCH_GRID = np.arange(1, 1025)
SEQ_GRID = np.arange(128, 131072 + 1, 128)


def _total(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec | None, batch=None, seq=None) -> np.ndarray:
    """Vectorised device-total peak (tensors + default or calibrated overheads) over batch/seq arrays.

    The same chain as :func:`estimate_config` (:func:`vramplan.overheads.device_total`):
    activation factor, paged optimiser states outside the reserve, the profile's allocator.
    """
    from .overheads import step_device_total

    return step_device_total(step_memory(spec, cfg, batch, seq), cfg, card)


def largest_batch(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec) -> int:
    """Largest micro-batch (<= 1024) that fits ``card`` at ``cfg.seq``; 0 if none."""
    ok = _total(spec, cfg, card, batch=BATCH_GRID) <= card.memory_bytes
    return int(BATCH_GRID[ok].max()) if ok.any() else 0


@dataclass
class FitRow:
    """One method's verdict on a card: the best plan (fastest that fits with the margin) and its alternatives.

    ``estimate`` is the chosen plan's full estimate: the best plan, else the fastest that fits
    without the margin ("tight"), else the least-memory one (to show how far off it is).
    ``plans`` ranks every settings combination tried (:class:`vramplan.recommend.Plan`);
    ``suggestions`` say what would fit when nothing does; ``techniques``
    (:class:`vramplan.recommend.TechniqueAdvice`) what each memory-saving technique saves on the
    chosen plan and, when it is not comfortable, the cheapest set that makes it fit.
    """

    method: str                                        # the chosen plan's method (qlora for LoRA's fallback)
    adapter: str
    fits: bool
    estimate: Estimate
    max_batch: int
    max_seq: int
    settings: dict
    notes: list[str] = field(default_factory=list)
    plans: list = field(default_factory=list)          # ranked vramplan.recommend.Plan
    best: Any = None                                   # the recommended Plan, or None
    chosen: Any = None                                 # the Plan shown (best, tight or smallest)
    suggestions: list = field(default_factory=list)    # vramplan.recommend.Suggestion
    techniques: Any = None                             # vramplan.recommend.TechniqueAdvice
    alternatives: list = field(default_factory=list)   # other stacks/precisions that fit (recommend.other_setups)
    requested: str = ""                                # the method asked for (fit's methods=); "" = method

    def __post_init__(self):
        self.requested = self.requested or self.method

    @property
    def recipe(self) -> str:
        """The chosen plan's recipe: ``lora``, ``qlora``, ``dpo+qlora`` (a fallback says what it became)."""
        return self.estimate.config.recipe.name

    @property
    def label(self) -> str:
        """``lora``, or ``lora → qlora`` when the requested method fell back to another recipe."""
        fell_back = self.chosen is not None and getattr(self.chosen, "fallback", None)
        return f"{self.requested} → {self.recipe}" if fell_back else self.requested

    @property
    def verdict(self) -> Verdict:
        """comfortable / tight / no (:mod:`vramplan.verdict`, the same thresholds as ``vramplan matrix``)."""
        from .bands import band_for_config

        return classify(self.estimate.peak_bytes, self.estimate.capacity_bytes,
                        band_for_config(self.estimate.config).hi)

    @property
    def tokens_per_s(self) -> float | None:
        return self.estimate.tokens_per_s

    @property
    def step_time_s(self) -> float | None:
        return self.estimate.step_time_s

    @property
    def time_to_train_s(self) -> float | None:
        return self.estimate.time_to_train_s

    @property
    def gpu_hours(self) -> float | None:
        return self.estimate.gpu_hours

    def to_json(self, top: int | None = None) -> dict:
        plans = self.plans if top is None else self.plans[:top]
        return {"method": self.method, "requested": self.requested, "recipe": self.recipe, "adapter": self.adapter,
                "fits": self.fits, "verdict": self.verdict.value,
                "peak_bytes": self.estimate.peak_bytes,
                "peak_gib": round(self.estimate.peak_gib, 3), "capacity_bytes": self.estimate.capacity_bytes,
                "max_batch": self.max_batch, "max_seq": self.max_seq, "settings": self.settings, "notes": self.notes,
                "tokens_per_s": None if self.tokens_per_s is None else round(float(self.tokens_per_s), 1),
                "step_time_s": None if self.step_time_s is None else round(float(self.step_time_s), 6),
                "time_to_train_s": None if self.time_to_train_s is None else round(float(self.time_to_train_s), 1),
                "gpu_hours": None if self.gpu_hours is None else round(float(self.gpu_hours), 3),
                "recommended": None if self.best is None else self.best.to_json(),
                "plans": [p.to_json() for p in plans], "plans_considered": len(self.plans),
                "suggestions": [x.to_json() for x in self.suggestions],
                "techniques": None if self.techniques is None else self.techniques.to_json(),
                "alternatives": [x.to_json() for x in self.alternatives],
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
    gpus: int = 1
    strategy: str | None = None
    offload: str = "none"
    margin: float = 0.15
    global_batch: int | None = None
    tokens: float | None = None
    epochs: float = 1.0
    top: int = 20  # ranked plans per method in to_json()
    framework: str = "hf"
    techniques: tuple[str, ...] = ()  # requested on every plan (the stack's own are in stacks.toml)

    def to_json(self) -> dict:
        return {"model": self.model, "model_resolved_from": self.model_resolved_from, "gpu": self.gpu,
                "framework": self.framework, "techniques": list(self.techniques),
                "capacity_bytes": self.capacity_bytes, "seq": self.seq, "gpus": self.gpus, "strategy": self.strategy,
                "offload": self.offload, "margin": self.margin, "global_batch": self.global_batch,
                "tokens": self.tokens, "epochs": self.epochs,
                "rows": [r.to_json(self.top) for r in self.rows], "assumptions": self.assumptions}


def fit(model: str | ModelSpec, gpu: str | GPUSpec | None = None, *, gpu_mem: str | int | None = None,
        seq: int = 2048, batch: int | None = None, methods: list[str] | None = None, precision: str | None = None,
        attn: str | None = None, rank: int | None = None, targets=None, grad_ckpt: bool | None = None,
        optimizer: str | None = None, gpus: int = 1, strategy: str | None = None, offload: str | None = None,
        global_batch: int | None = None, tokens=None, epochs: float = 1.0, margin: float | None = None,
        top: int = 20, framework: str = "hf", techniques=None, advise: bool = True) -> FitReport:
    """Every method on one card (or ``gpus`` cards): the fastest configuration that fits with a margin.

    For each method :func:`vramplan.recommend.search` tries every combination of gradient
    checkpointing, optimiser (AdamW, 8-bit, paged 8-bit), attention implementation, LoRA rank
    and targets, the LoRA-to-QLoRA fallback and, on several GPUs without ``strategy``, every
    sharding strategy, each over all micro-batches (with accumulation to ``global_batch`` when
    given), and ranks those that fit below ``capacity x (1 - margin)`` by tokens/s. A setting
    passed here (``attn``, ``rank``, ``targets``, ``grad_ckpt``, ``optimizer``, ``batch``) is
    fixed instead of searched. When nothing fits, the row says what would
    (:func:`vramplan.recommend.what_would_fit`). Each row also says what every memory-saving
    technique (``vramplan/data/stacks.toml``) not already on would save on the chosen plan and,
    when that plan is not comfortable, the cheapest set that makes it so, with the fastest plan
    under that set (:func:`vramplan.recommend.recommend_techniques`).

    Args:
        margin: fraction of the capacity kept free (default ``1 - COMFORTABLE_FRACTION`` = 0.15:
            the recommended plan is always "comfortable", as ``vramplan matrix`` says it).
        tokens, epochs: dataset tokens (``"500M"``) and epochs for time to train and GPU-hours.
        top: ranked plans per method kept in ``to_json()`` (the API keeps them all).
        framework: training stack (hf, torchtune, unsloth, litgpt); its default precision applies
            when ``precision`` is None. techniques: memory-saving techniques every plan uses
            (``"chunked_ce,act_offload"`` or a list).
        advise: False skips the technique advice and the other stacks/precisions (rows'
            ``techniques`` None, ``alternatives`` empty): :func:`fit_cards` ranks cards only.

    Returns:
        :class:`FitReport`; each row's ``estimate`` is the chosen plan's, ``plans`` the ranking.

    Raises:
        VramplanError: no GPU, bad ``gpus``/``strategy``/``offload``/``global_batch``/``margin``,
            an unknown framework or technique.
    """
    from .distributed import STRATEGIES, make_parallel
    from .recommend import _Totals, fallback_note, largest_micro_batch, other_setups, longest_sequence, recommend_techniques, search, what_would_fit
    from .stacks import get_stack, parse_techniques
    from .throughput import parse_count

    from . import validate as v
    from .config import ATTENTION
    from .optimizers import get_optimizer

    v.scale(gpus=gpus, epochs=epochs, global_batch=global_batch, strategy=strategy, offload=offload)
    v.integer(seq, "seq")
    v.integer(batch, "batch", none_ok=True)
    v.integer(rank, "rank", none_ok=True)
    v.integer(top, "top")
    v.flag(grad_ckpt, "grad_ckpt")
    v.real(margin, "margin", lo=0.0, hi=1.0, hi_open=True, none_ok=True)
    v.choice(attn, "attention implementation", ATTENTION, none_ok=True)
    if optimizer is not None:
        get_optimizer(v.name_text(optimizer, "optimizer"))
    if precision is not None:
        from .precision import get_regime

        get_regime(v.name_text(precision, "precision"))
    v.name_text(framework, "framework")
    framework = get_stack(framework).name
    techs = parse_techniques(techniques)
    spec = get_model(model)
    card = resolve_gpu(gpu, gpu_mem)
    if card is None:
        raise VramplanError("fit needs a GPU", "pass --gpu NAME, --gpu auto or --gpu-mem 24GiB")
    base = make_parallel(gpus, strategy, offload)
    if base.gpus > 1 and strategy is None:
        parallels = [make_parallel(base.gpus, s) for s in STRATEGIES]  # search the strategy too
    else:
        parallels = [base]
    if global_batch is not None and (isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer))
                                     or global_batch <= 0):
        raise VramplanError(f"--global-batch must be a positive integer, got {global_batch!r}")
    if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
        raise VramplanError(f"--top must be a positive integer, got {top!r}")
    margin = 1.0 - COMFORTABLE_FRACTION if margin is None else float(margin)
    n_tokens = parse_count(tokens, "--tokens")
    if batch is not None:
        if global_batch is not None:
            _accum_for(global_batch, base.gpus, batch)
        make_config(spec, "lora", batch=batch, seq=seq)  # validates batch/seq
    if techs:
        make_config(spec, "lora", seq=seq, framework=framework, techniques=techs)  # technique rules
    totals = _Totals()
    rows: list[FitRow] = []
    for name in methods or method_names():
        prec = _check_card(precision, name, None, attn or "sdpa", card, framework)
        search_kw = dict(seq=seq, precision=prec, global_batch=global_batch, parallels=parallels, grad_ckpt=grad_ckpt,
                         optimizer=optimizer, attn=attn, rank=rank, targets=targets, margin=margin, tokens=n_tokens,
                         epochs=epochs, totals=totals, batch=batch, framework=framework)
        mp = search(spec, name, card, techniques=techs, **search_kw)
        tight = [p for p in mp.plans if p.peak_bytes <= p.capacity_bytes]
        chosen = mp.best or (max(tight, key=lambda p: (p.fallback is None, p.tokens_per_s)) if tight else mp.smallest)
        cfg, par = chosen.config, chosen.parallel
        est = estimate_config(spec, cfg, card, parallel=par, tokens=n_tokens, epochs=epochs)
        notes: list[str] = []
        suggestions = []
        if mp.best is None:
            suggestions = what_would_fit(spec, name, card, seq=seq, precision=prec, margin=margin, gpus=base.gpus,
                                         rank=rank, targets=targets, totals=totals, framework=framework,
                                         techniques=techs)
            if not est.fits:
                notes.append("no setting fits (tried GC, 8-bit/paged AdamW"
                             + (", QLoRA" if any(p.fallback for p in mp.plans) else "") + ")")
            else:
                notes.append(f"tight: no setting leaves the {margin:.0%} margin; shown: the fastest that fits")
            if suggestions:
                notes.append("with GC and 8-bit AdamW it would fit on " + "; ".join(x.text for x in suggestions))
        elif chosen.fallback:
            notes.append(fallback_note(mp) or chosen.fallback)
        moe_note = moe_qlora_note(spec, cfg, short=True)
        if moe_note:
            notes.append(moe_note)
        settings = {"grad_ckpt": cfg.grad_ckpt, "optimizer": cfg.optimizer, "precision": cfg.precision,
                    "attn": cfg.attn, "batch": cfg.batch, "grad_accum": cfg.grad_accum, **chosen.settings}
        advice = recommend_techniques(spec, cfg, card, parallel=par, margin=margin, base=est) if advise else None
        if advise and mp.best is None and advice.recommended and advice.fits:
            # the fastest plan of the method with the recommended techniques on (it may drop GC, say)
            with_t = search(spec, name, card, techniques=techs + advice.techniques, **search_kw)
            fitting = [p for p in with_t.plans if p.peak_bytes <= p.capacity_bytes]
            advice.plan = with_t.best or (max(fitting, key=lambda p: p.tokens_per_s) if fitting else None)
        alternatives = []
        if advise and mp.best is None and gpus == 1:
            alternatives = other_setups(spec, name, card, framework=framework, precision=prec, current=chosen,
                                        techniques=techs, **{k: v for k, v in search_kw.items()
                                                             if k not in ("precision", "framework")})
        rows.append(FitRow(method=cfg.method, requested=name, adapter=cfg.adapter, alternatives=alternatives, fits=bool(est.fits), estimate=est,
                           max_batch=largest_micro_batch(spec, cfg, card, par, totals=totals),
                           max_seq=longest_sequence(spec, cfg, card, par, totals=totals),
                           settings=settings, notes=notes, plans=mp.plans, best=mp.best, chosen=chosen,
                           suggestions=suggestions, techniques=advice))
    # DoRA / IA3 have no 4-bit variant in the model (PEFT runs both over bitsandbytes Linear4bit): when one
    # does not fit and QLoRA does, say so on its row rather than leave a bare "no"
    qlora_row = next((r for r in rows if r.requested == "qlora" and r.best is not None), None)
    for r in rows:
        if r.best is None and qlora_row is not None and r.adapter in ("dora", "ia3"):
            r.notes.append(f"4-bit: qlora fits ({qlora_row.estimate.peak_gib:.2f} GiB, "
                           f"{qlora_row.tokens_per_s or 0:,.0f} tok/s); a 4-bit {r.adapter} base (PEFT over "
                           "bitsandbytes Linear4bit) is not modelled yet")
    resolved = None if isinstance(model, ModelSpec) or str(model).lower() == spec.name else f"{model} -> {spec.name}"
    assumptions = rows[0].estimate.assumptions[:4] if rows else []
    note = v.context_note(spec, seq)
    if note:
        assumptions.insert(0, note)
    tech_text = _techniques_text(rows[0].estimate.config) if rows else None
    if tech_text:
        assumptions.append(tech_text)
    if rows:
        assumptions.append(f"ranking: tokens/s of plans whose per-GPU peak stays below {1 - margin:.0%} of the "
                           f"capacity; {next(a for a in rows[0].estimate.assumptions if a.startswith('throughput'))}")
    return FitReport(model=spec.name, model_resolved_from=resolved, gpu=card.name, capacity_bytes=card.memory_bytes,
                     seq=seq, rows=rows, assumptions=assumptions, gpus=base.gpus,
                     strategy=base.strategy if len(parallels) == 1 else None, offload=base.offload, margin=margin,
                     global_batch=global_batch, tokens=n_tokens, epochs=epochs, top=int(top), framework=framework,
                     techniques=techs)


# -- which card? -------------------------------------------------------------------------------

@dataclass
class CardRow:
    """One method on one catalogue card where it fits with the margin, with what it costs there.

    ``cost_per_mtok_usd``: the cloud price per hour over the tokens it trains in an hour (x 1e6);
    ``cost_usd``: GPU-hours x the price per hour when the dataset size (``tokens``) is known.
    """

    gpu: str
    capacity_bytes: int
    row: FitRow
    price: Any

    @property
    def tokens_per_s(self) -> float:
        return float(self.row.tokens_per_s or 0.0)

    @property
    def cost_per_mtok_usd(self) -> float | None:
        h = self.price.cloud_usd_per_hour
        return None if h is None or not self.tokens_per_s else h / (self.tokens_per_s * 3600.0) * 1e6

    @property
    def cost_usd(self) -> float | None:
        h = self.price.cloud_usd_per_hour
        return None if h is None or self.row.gpu_hours is None else h * float(self.row.gpu_hours)

    def to_json(self) -> dict:
        r = self.row
        return {"gpu": self.gpu, "capacity_bytes": self.capacity_bytes, "method": r.label, "recipe": r.recipe,
                "verdict": r.verdict.value, "peak_bytes": int(r.estimate.peak_bytes),
                "tokens_per_s": round(self.tokens_per_s, 1),
                "time_to_train_s": None if r.time_to_train_s is None else round(float(r.time_to_train_s), 1),
                "gpu_hours": None if r.gpu_hours is None else round(float(r.gpu_hours), 3),
                "settings": r.settings, "price": self.price.to_json(),
                "cost_per_mtok_usd": None if self.cost_per_mtok_usd is None else round(self.cost_per_mtok_usd, 4),
                "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 2)}


@dataclass
class CardsReport:
    """Every catalogue card on which a method fits: ``rows`` fastest first, ``by_cost`` cheapest first."""

    model: str
    seq: int
    methods: list[str]
    tokens: float | None
    epochs: float
    rows: list[CardRow]
    by_cost: list[CardRow]
    no_fit: list[str]              # cards on which no requested method fits with the margin
    assumptions: list[str]
    framework: str = "hf"

    def to_json(self) -> dict:
        from .prices import sources

        return {"model": self.model, "seq": self.seq, "methods": self.methods, "tokens": self.tokens,
                "epochs": self.epochs, "framework": self.framework,
                "rows": [r.to_json() for r in self.rows], "by_cost": [f"{r.gpu}:{r.row.requested}" for r in self.by_cost],
                "no_fit": self.no_fit, "price_sources": sources(), "assumptions": self.assumptions}


def fit_cards(model: str | ModelSpec, *, cards=None, methods: list[str] | None = None, progress=None,
              **fit_kw) -> CardsReport:
    """"Which card?": :func:`fit` on every catalogue card, the plans that fit ranked by speed and by cost.

    For each card (``cards``: a list of names, default the whole catalogue) and each method, the
    fastest plan that fits with the margin (:func:`fit`'s search, without its technique advice).
    ``rows`` ranks them by time to train (tokens/s when no ``tokens``), ``by_cost`` by the cloud
    cost to train (``vramplan/data/prices.json``: typical on-demand $/GPU-hour, each with its
    source and date; per million tokens when no ``tokens``); cards without a price come last.

    Args:
        progress: ``(done, total, card)`` callback after each card (the CLI's progress bar).
        fit_kw: :func:`fit`'s keyword arguments (seq, tokens, epochs, framework, precision, ...).

    Returns:
        :class:`CardsReport`.
    """
    from .gpus import catalogue
    from .prices import price_of

    if fit_kw.get("gpus", 1) != 1 or fit_kw.get("gpu_mem") is not None:
        raise VramplanError("--gpu all ranks single catalogue cards", "drop --gpus/--gpu-mem, or name one card")
    names = list(cards) if cards else [g.name for g in sorted(catalogue().values(), key=lambda g: (g.memory_bytes, g.name))]
    spec = get_model(model)
    rows: list[CardRow] = []
    no_fit: list[str] = []
    first = None
    for i, name in enumerate(names, 1):
        card = get_gpu(name)
        try:
            rep = fit(spec, card, methods=methods, advise=False, **fit_kw)
        except VramplanError as exc:
            if "has no bf16" not in str(exc) and "compute capability" not in str(exc):
                raise
            rep = None  # the card cannot run the stack's precision or kernels
        first = first or rep
        fitting = [r for r in (rep.rows if rep else []) if r.best is not None]
        if not fitting:
            no_fit.append(card.name)
        for r in fitting:
            rows.append(CardRow(gpu=card.name, capacity_bytes=card.memory_bytes, row=r, price=price_of(card.name)))
        if progress is not None:
            progress(i, len(names), card.name)
    rows.sort(key=lambda c: (-c.tokens_per_s, c.gpu))
    by_cost = sorted(rows, key=lambda c: (c.cost_per_mtok_usd is None, c.cost_per_mtok_usd or 0.0, -c.tokens_per_s))
    assumptions = list(first.assumptions) if first else []
    assumptions.append("cost: typical on-demand cloud price per GPU-hour x the predicted GPU-hours "
                       "(vramplan/data/prices.json, each price with its source and date); list prices are shown, "
                       "not used to rank")
    return CardsReport(model=spec.name, seq=int(fit_kw.get("seq", 2048)), methods=list(methods or method_names()),
                       tokens=first.tokens if first else None, epochs=float(fit_kw.get("epochs", 1.0)), rows=rows,
                       by_cost=by_cost, no_fit=no_fit, assumptions=assumptions,
                       framework=first.framework if first else fit_kw.get("framework", "hf"))

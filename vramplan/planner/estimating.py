"""Estimate one configuration: the planner's first layer above the card checks (:mod:`vramplan.planner`).

:func:`estimate` (the API's and ``vramplan estimate``'s entry point), :func:`estimate_config` for
a validated :class:`~vramplan.config.TrainConfig`, and :func:`per_gpu_peak`, the per-GPU question
of a multi-GPU plan. Numpy only; the throughput model and the sharded layouts load on use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import TrainConfig, make_config
from ..gpus import GPUSpec, capacity_note
from ..memory import PHASE_ORDER, step_memory
from ..models import ModelSpec, get_model
from ..overheads import ACTIVATION_COMPONENTS, runtime_overheads
from ..request import EstimateRequest, call_request
from ..results import Estimate
from ..taxonomy import Component, Phase, Quantity
from ..units import GIB
from .checks import accum_for, assumptions, check_card, moe_qlora_note, resolve_gpu, sdpa_math_note

if TYPE_CHECKING:
    from ..distributed import Parallel

def estimate(model: "str | ModelSpec | EstimateRequest | None" = None, method: str | None = None,
             **settings: Any) -> Estimate:
    """Predict the peak GPU memory of one training configuration (analytic model, numpy only), and its speed.

    Takes an :class:`~vramplan.request.EstimateRequest` (``estimate(EstimateRequest(model="7b",
    gpu="rtx4090"))``), or its fields as keywords (``estimate("7b", "qlora", gpu="rtx4090")``),
    or a request with some fields changed (``estimate(req, batch=4)``). The fields mirror the
    CLI (``vramplan estimate``); sizes are tokens and examples, memory in bytes. ``gpu`` is a
    catalogue name/alias or ``"auto"`` (NVML); ``gpu_mem`` a capacity such as ``"24GiB"``.
    ``gpus``/``strategy``/``offload`` plan N GPUs (``vramplan.distributed``; ``gpus > 1`` alone
    means DDP); ``batch`` is then per GPU. ``global_batch`` (examples per optimiser step over all
    GPUs) sets ``grad_accum = global_batch / (gpus x batch)``. ``tokens`` (dataset tokens, e.g.
    ``"500M"``) and ``epochs`` give the time to train. ``versions`` (``--stack-version``,
    ``"bitsandbytes=0.42.0"`` or a dict) plans the package versions the run uses where a
    behaviour changed between versions (``stacks.toml`` [behaviours]); unnamed packages take
    their installed version, else the latest. ``method_options`` are the method's own options
    (``{"ppo_response": 512}``; vramplan.methods.base.Option), validated by the method.

    Returns:
        :class:`vramplan.results.Estimate` with ``components`` (bytes, per GPU), ``tensor_peak_bytes``,
        ``peak_bytes`` (device total per GPU) and, with a GPU, ``capacity_bytes``, ``fits``,
        ``step_time_s`` and ``tokens_per_s`` (all GPUs; :mod:`vramplan.throughput`).

    Raises:
        VramplanError: bad input (a keyword that is not an EstimateRequest field, unknown names, non-positive
            shapes, unsupported features, ``gpus < 1``, an unknown strategy, a global batch that the GPUs and
            micro-batch do not divide).
    """
    from .. import validate as v
    from ..distributed import make_parallel
    from ..throughput import parse_count

    req = call_request(EstimateRequest, model, "model", _with_method(method, settings))
    spec = get_model(req.model)
    card = resolve_gpu(req.gpu, req.gpu_mem)
    par = make_parallel(req.gpus, req.strategy, req.offload)
    cfg = _request_config(spec, req, card, par)
    est = estimate_config(spec, cfg, card, model_query=_query(req.model), parallel=par,
                          tokens=parse_count(req.tokens, "--tokens"), epochs=req.epochs)
    note = v.context_note(spec, cfg.seq)
    if note:
        est.assumptions.insert(0, note)
    return est


def _with_method(method: str | None, settings: dict) -> dict:
    """``settings`` with ``method`` when the caller named one (None leaves a request's own, else lora)."""
    return settings if method is None else {"method": method, **settings}


def _query(model) -> str | None:
    """The name the caller asked for (to say ``13b -> llama-2-13b``), None for a ModelSpec."""
    return None if isinstance(model, ModelSpec) else str(model)


def _request_config(spec: ModelSpec, req: EstimateRequest, card: GPUSpec | None, par) -> TrainConfig:
    """The validated configuration of ``req`` on ``card``: the card's precision check, accumulation from
    ``global_batch``, then :func:`~vramplan.config.make_config`."""
    precision = check_card(req.precision, req.method, req.adapter, req.attn, card, req.framework)
    grad_accum = req.grad_accum if req.global_batch is None else accum_for(req.global_batch, par.gpus, req.batch)
    return make_config(spec, req.config_request(precision=precision, grad_accum=grad_accum))


def estimate_config(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec | None = None,
                    model_query: str | None = None, parallel=None, tokens: float | None = None,
                    epochs: float = 1.0, with_time: bool = True) -> Estimate:
    """:func:`estimate` for an already validated :class:`TrainConfig` (and a :class:`~vramplan.distributed.Parallel`).

    ``with_time=False`` skips the throughput model (memory only: what a search comparing peaks needs).
    """
    from ..distributed import SINGLE, parallel_step_memory

    par = parallel or SINGLE
    mem = parallel_step_memory(spec, cfg, par) if par.distributed else step_memory(spec, cfg)
    from ..overheads import apply_activation_factor, load_reserved_terms, loaded_terms, peak_terms

    tensor_peak = int(np.ceil(float(mem.peak)))
    comps = {c: int(np.ceil(float(v))) for c, v in mem.components.items()}
    act, paged = peak_terms(comps, cfg.optimizer)
    over = runtime_overheads(tensor_peak, card, method=cfg.recipe.name, activation_bytes=act, paged_bytes=paged,
                             stack=cfg.framework,
                             loaded_bytes=(loaded_terms(mem), load_reserved_terms(mem)))
    comps = apply_activation_factor(comps, over)  # a calibrated activation factor (none by default)
    tensor_peak += over.activation_correction_bytes
    comps.update(over.components)
    if par.distributed:
        from ..distributed import NCCL_BYTES

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
        assumptions=assumptions(cfg, over.source) + [n for n in (moe_qlora_note(spec, cfg), sdpa_math_note(spec, cfg))
                                                     if n],
        model_resolved_from=resolved, overheads=over,
    )
    est.gpus, est.strategy, est.offload = par.gpus, par.strategy, par.offload
    if par.distributed:
        from ..distributed import shard_state

        sh = shard_state(spec, cfg, par)
        est.assumptions.append(f"{par.label}: {sh.layout}; peak_bytes and components are per GPU; cuda_context includes "
                               "NCCL's buffers (256 MiB)" + "".join(f"; {n}" for n in sh.notes))
        if sh.cpu_bytes:
            est.extra["cpu_offload_bytes_per_gpu"] = int(sh.cpu_bytes)
    from ..bands import band_for_config

    band = band_for_config(cfg, multi=par.distributed)
    # the band as the device totals it spans (bytes): peak x (1 + lo) .. peak x (1 + hi)
    est.extra["band"] = {**band.to_json(), "low_bytes": max(0, int(np.floor((1.0 + band.lo) * peak))),
                         "high_bytes": int(np.ceil((1.0 + band.hi) * peak))}
    est.assumptions.append(f"uncertainty band: {band.describe()}")
    if card is not None:
        est.assumptions.append(capacity_note(card))
        from ..throughput import step_time, time_to_train

        est.gpu = card.name
        share = cfg.recipe.behaviour.card_share(cfg)
        est.capacity_bytes = step_capacity(card, cfg)
        est.fits = peak <= est.capacity_bytes
        if share:
            _colocated_engine(est, spec, cfg, card, share)
    _precompute_pass(est, spec, cfg)
    if card is not None and with_time:
        t = step_time(spec, cfg, card, parallel=par).at()
        est.throughput, est.step_time_s, est.tokens_per_s = t, t.step_s, t.tokens_per_s
        est.time_to_train_s, est.gpu_hours = time_to_train(tokens, epochs, t.tokens_per_s, par.gpus)
        est.assumptions.append(f"throughput: {t.source}")
    return est



def step_capacity(card: GPUSpec, cfg: TrainConfig) -> int:
    """The bytes of ``card`` that a training step of ``cfg`` has: all of it, or the rest when another engine
    colocated in the process (GRPO's vLLM, :meth:`~vramplan.methods.base.Behaviour.card_share`) holds a share."""
    share = cfg.recipe.behaviour.card_share(cfg)
    return int(card.memory_bytes * (1.0 - share)) if share else card.memory_bytes


def engine_share(card: GPUSpec, cfg: TrainConfig) -> int:
    """The bytes of ``card`` a colocated engine (GRPO's vLLM, :meth:`~vramplan.methods.base.Behaviour.card_share`)
    holds beside the step: ``int(capacity x share)``; 0 when none is colocated."""
    share = cfg.recipe.behaviour.card_share(cfg)
    return int(card.memory_bytes * share) if share else 0


def engine_starts(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec) -> bool:
    """Whether a colocated engine's weights (:meth:`~vramplan.methods.base.Behaviour.card_share_need`'s fixed part:
    vLLM's copy of the model, 4-bit for QLoRA) load into its share of ``card`` -- the hard constraint
    ``estimate`` holds; True when no engine is colocated. Batch-independent: a configuration failing it does not
    fit at any micro-batch."""
    if not cfg.recipe.behaviour.card_share(cfg):
        return True
    return cfg.recipe.behaviour.card_share_need(spec, cfg)[0] <= engine_share(card, cfg)


def _colocated_engine(est: Estimate, spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, share: float) -> None:
    """Another engine colocated in the process (GRPO's vLLM) in its ``share`` of the card: its needs
    (:meth:`~vramplan.methods.base.Behaviour.card_share_need`) as ``extra["colocated_engine"]``, an assumption
    and two constraints the verdict reads: its weights (hard) and the generation batch's cache (soft)."""
    from ..results import Constraint

    fixed, wanted = cfg.recipe.behaviour.card_share_need(spec, cfg)
    room = engine_share(card, cfg)
    est.extra["colocated_engine"] = {"share": share, "share_bytes": room, "fixed_bytes": int(fixed),
                                     "wanted_bytes": int(wanted)}
    est.assumptions.append(
        f"colocated engine: {share:.0%} of the card ({room / GIB:.2f} GiB) held outside the step; it needs "
        f"{fixed / GIB:.2f} GiB to start and {wanted / GIB:.2f} GiB for this generation batch"
        + (": its weights do not fit its share" if fixed > room else
           ": the batch's cache does not fit its share (it would generate in smaller batches)" if wanted > room
           else ""))
    est.constraints = (
        Constraint("colocated engine weights", int(fixed), room, True,
                   f"the colocated engine needs {fixed / GIB:.2f} GiB to start, its share is {room / GIB:.2f} GiB"),
        Constraint("colocated engine generation batch", int(wanted), room, False,
                   f"the colocated engine needs {wanted / GIB:.2f} GiB for this generation batch, its share is "
                   f"{room / GIB:.2f} GiB"))
    est.fits = est.fits and all(c.met for c in est.constraints)


def _precompute_pass(est: Estimate, spec: ModelSpec, cfg: TrainConfig) -> None:
    """A pass before the first step (TRL's ``precompute_ref_log_probs``,
    :meth:`~vramplan.methods.base.Behaviour.precompute_pass`): its device total as ``extra["precompute_pass"]``
    (the loaded model plus the pass's tensors, with the step's runtime allowance), an assumption, and with a
    card a hard constraint the verdict reads."""
    pre = cfg.recipe.behaviour.precompute_pass(spec, cfg)
    if pre is None:
        return
    from ..results import Constraint
    from ..taxonomy import Phase

    pre_tensors = int(est.phases.get(Phase.LOAD, 0) + np.ceil(pre))
    pre_peak = pre_tensors + (est.peak_bytes - est.tensor_peak_bytes)  # the step's runtime allowance
    est.extra["precompute_pass"] = {"tensor_bytes": pre_tensors, "peak_bytes": pre_peak, "batch": cfg.batch}
    est.assumptions.append(
        f"precompute pass before training (reference log-probs, no grad, batch {cfg.batch}): {pre_peak / GIB:.2f} "
        f"GiB device total, {'above' if pre_peak > est.peak_bytes else 'below'} the step's {est.peak_bytes / GIB:.2f}"
        " GiB; the verdict holds both")
    if est.capacity_bytes is not None:
        est.constraints = est.constraints + (Constraint(
            "precompute pass", pre_peak, est.capacity_bytes, True,
            f"the precompute pass needs {pre_peak / GIB:.2f} GiB of the {est.capacity_bytes / GIB:.2f} GiB card"),)
        est.fits = est.fits and pre_peak <= est.capacity_bytes


@dataclass(frozen=True)
class Peaks:
    """The two peaks of an estimate (bytes): ``peak_bytes`` (device total per GPU) and ``tensor_peak_bytes``."""

    peak_bytes: int
    tensor_peak_bytes: int


#: ``profile`` of :func:`estimate_peaks` when the caller has not looked the card's profile up
LOOK_UP = object()

#: The components at the peak that the device chain reads (:func:`vramplan.overheads.rounded_terms` under
#: :func:`~vramplan.overheads.step_device_total`, :func:`estimate_peaks` and ``limits.DeviceTotals.rows``: the
#: activation group the activation factor scales, and the optimiser states a paged optimiser keeps outside the
#: reserve); a step memory worked out only for its device total needs no other
#: (:func:`vramplan.phases.combine_phases`' ``components``)
DEVICE_CHAIN_READS = frozenset(ACTIVATION_COMPONENTS) | {Component.OPTIMIZER_STATES}


def estimate_peaks(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec | None, parallel=None,
                   profile: Any = LOOK_UP) -> Peaks:
    """:func:`estimate_config`'s ``peak_bytes`` and ``tensor_peak_bytes`` alone, equal to them to the byte.

    The same step memory and device chain (:func:`vramplan.overheads.device_terms`, NCCL's buffers
    on several GPUs) without the components, assumption text or throughput: what a search that
    compares peaks needs. ``profile``: the card's calibration profile when the caller has looked it up
    (:func:`vramplan.overheads.card_profile`; None: the card has none); by default it is looked up here.
    """
    from ..distributed import NCCL_BYTES, SINGLE, parallel_step_memory

    par = parallel or SINGLE
    if par.distributed:
        return _peaks(parallel_step_memory(spec, cfg, par), cfg, card, profile, NCCL_BYTES, True)
    return _peaks(step_memory(spec, cfg, components=DEVICE_CHAIN_READS), cfg, card, profile, 0, True)


def _peaks(mem, cfg: TrainConfig, card: GPUSpec | None, profile, extra: int, load_reserve: bool) -> Peaks:
    """:class:`Peaks` of one step memory: the device chain of :func:`estimate_peaks` (``extra``: NCCL's buffers;
    ``load_reserve``: what the model's load left reserved counts, one GPU)."""
    from ..overheads import card_profile, device_terms, load_reserved_terms, rounded_terms

    peak, act, paged, loaded = rounded_terms(mem, cfg.optimizer)
    terms = device_terms(peak, card, method=cfg.recipe.name, activation_bytes=act, paged_bytes=paged,
                         profile=card_profile(card) if profile is LOOK_UP else profile, stack=cfg.framework,
                         loaded_bytes=(loaded, load_reserved_terms(mem) if load_reserve else 0))
    return Peaks(int(terms["device"]) + extra, int(terms["tensors"]))


def estimate_peaks_rows(spec: ModelSpec, cfgs: list[TrainConfig], card: GPUSpec | None,
                        profile: Any = LOOK_UP, terms: dict | None = None) -> list[Peaks]:
    """:func:`estimate_peaks` of several one-GPU configurations at their own batch and sequence, equal to it
    config by config: one :func:`vramplan.memory.step_memory_rows` call (the phase arithmetic once for all;
    the configurations must agree on batch, sequence and accumulation, and on whether they generate), then
    each row's device chain. ``profile``: as :func:`estimate_peaks`'. ``terms``: a dict the caller keeps between
    calls over configurations of one shape (:func:`~vramplan.memory.step_memory_rows_shared`'s)."""
    from ..memory import StepMemory, step_memory_rows_shared

    if len({(c.batch, c.seq, c.grad_accum) for c in cfgs}) > 1:
        raise ValueError("estimate_peaks_rows: configurations of different shapes")
    # step_memory_rows, with only the components the device chain reads
    mem, states = step_memory_rows_shared(spec, cfgs, terms=terms, components=DEVICE_CHAIN_READS)
    out = []
    for i, (cfg, st) in enumerate(zip(cfgs, states)):
        row = StepMemory(components={c: v[i] for c, v in mem.components.items()}, phases={},
                         peak=mem.peak[i], peak_phase=mem.peak_phase[i], state=st)
        out.append(_peaks(row, cfg, card, profile, 0, True))
    return out


# -- the public per-GPU question (moved here from vramplan.distributed: it is an estimate) -----------

@dataclass
class PerGpuPeak:
    """The per-GPU memory of one multi-GPU plan (every rank holds the same share; the largest rank's).

    ``tensor_peak_bytes``: live tensor storages per GPU (what ``torch.cuda.max_memory_allocated``
    measures on the busiest rank); ``peak_bytes``: the device total per GPU (plus the caching
    allocator's reserve, the CUDA context and NCCL's buffers: what ``nvidia-smi`` shows);
    ``reserved_bytes``: ``tensor_peak_bytes`` plus the allocator's reserve (``max_memory_reserved``).
    ``components`` are per GPU, in bytes. ``estimate`` is the full :class:`~vramplan.results.Estimate`.
    """

    parallel: Parallel
    tensor_peak_bytes: int
    reserved_bytes: int
    peak_bytes: int
    peak_phase: Phase
    components: dict
    layout: str
    estimate: Estimate | None = None

    def to_json(self) -> dict:
        return {"parallel": self.parallel.to_json(), "tensor_peak_bytes": self.tensor_peak_bytes,
                "reserved_bytes": self.reserved_bytes, "peak_bytes": self.peak_bytes,
                "peak_phase": self.peak_phase.value, "layout": self.layout,
                "components": {c.value: int(v) for c, v in self.components.items() if v}}


def per_gpu_peak(model: "str | ModelSpec | EstimateRequest", method: str | None = None, *, gpus: int,
                 engine: str | None = None, engine_options: dict | None = None, **settings: Any) -> PerGpuPeak:
    """Per-GPU peak memory of ``method`` on ``model`` over ``gpus`` GPUs.

    The one call for "what does each GPU need for this plan" (the published-accuracy scorer
    uses it for multi-GPU rows). ``model`` is a model or an
    :class:`~vramplan.request.EstimateRequest`; ``settings`` are EstimateRequest's fields
    (``strategy``, ``offload``, ``gpu``, ``gpu_mem``, ``batch`` per GPU, ``seq``, ``rank``, ``targets``,
    ``grad_ckpt``, ``optimizer``, ``precision``, ``attn``, ``framework``, ``techniques``, ...).
    ``engine`` (``auto``, ``torch``, ``deepspeed``) and ``engine_options``
    (:data:`vramplan.distributed.ENGINE_OPTIONS`) pick the engine whose buffers are modelled:
    ``auto`` plans zero1/2/3 as DeepSpeed and ddp/fsdp as PyTorch (DDP, FSDP2).

    Returns:
        :class:`PerGpuPeak` (bytes are ints; quantities as its docstring says).

    Raises:
        VramplanError: bad input, as :func:`vramplan.estimate` and :func:`make_parallel`.
    """
    from ..distributed import make_parallel, shard_state

    req = call_request(EstimateRequest, model, "model", _with_method(method, {"gpus": gpus, **settings}))
    spec = get_model(req.model)
    card = resolve_gpu(req.gpu, req.gpu_mem)
    par = make_parallel(req.gpus, req.strategy, req.offload, engine=engine, **(engine_options or {}))
    cfg = _request_config(spec, req, card, par)
    est = estimate_config(spec, cfg, card, model_query=_query(req.model), parallel=par, with_time=False)
    reserve = int(est.components.get(Component.ALLOCATOR_RESERVE, 0))
    sh = shard_state(spec, cfg, par)
    return PerGpuPeak(parallel=par, tensor_peak_bytes=int(est.tensor_peak_bytes),
                      reserved_bytes=int(est.tensor_peak_bytes) + reserve, peak_bytes=int(est.peak_bytes),
                      peak_phase=est.peak_phase, components=dict(est.components), layout=sh.layout, estimate=est)

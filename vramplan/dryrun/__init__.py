"""Dry run: exact tensor accounting of real training steps on the ``meta`` device.

``dryrun(model, method, ...)`` builds the real Hugging Face model and PEFT adapter from the
model's config on ``meta`` (no weights, no download, no GPU) through ``vramplan.runtime``,
runs a warm-up step (so optimiser states exist) and then one measured steady-state step
under a tensor-accounting ``TorchDispatchMode`` (:mod:`vramplan.dryrun.tracker`), and
reports the peak of live tensor storages, its breakdown by component and group, the peak
of every phase, and the saved activations of one decoder layer op by op.

What is exact and what is emulated
----------------------------------
Exact (the real code runs): the model's module tree and dtypes, PEFT's adapters, casts and
dropout copies, DoRA's weight norm, bitsandbytes' NF4 storage and its ``matmul_4bit`` /
``dequantize_4bit`` autograd code, HF's losses, gradient checkpointing boundaries, every
optimiser's states and step temporaries (fused AdamW's kernel is in place; foreach's
``sqrt`` buffer is allocated), gradient accumulation, the DPO/PPO step structure.

Emulated for CUDA (``vramplan.runtime.emulation``): autocast (CUDA's op lists and weight
cast cache), SDPA's backend choice (flash / memory-efficient / math), and the kernel
workspaces that CUDA kernels allocate internally (``vramplan.dryrun.tracker``).

Known gaps: autocast acts on Python-level calls (an op CUDA autocast would catch inside a
C++ composite that is not itself listed is not cast); cuDNN attention is never chosen;
the memory-efficient attention backward's workspace is counted as its ``delta`` only;
paged 8-bit optimiser states are counted as device tensors; ``tensor_peak_bytes`` sums
exact storage sizes (``max_memory_allocated`` rounds each block to 512 B:
``extra.tensor_peak_bytes_rounded``); the allocator's reserve, CUDA context and cuBLAS
workspaces come from ``vramplan.overheads``.

Importing this package does not import torch; :func:`dryrun` raises
:class:`~vramplan.errors.MissingDependencyError` when torch, transformers or peft is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import TrainConfig, make_config
from ..errors import VramplanError, require
from ..models import ModelSpec, get_model
from ..results import Estimate, jsonable
from ..taxonomy import TENSOR_COMPONENTS, Component, Group, Phase, Quantity

PHASE_ORDER = (Phase.LOAD, Phase.ROLLOUT, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP)

__all__ = ["DryRunResult", "dryrun", "dryrun_config"]


@dataclass
class DryRunResult(Estimate):
    """An :class:`~vramplan.results.Estimate` measured by the dry run, with its evidence.

    Extra fields: ``groups`` (bytes per :class:`~vramplan.taxonomy.Group` at the peak),
    ``phase_components`` (the breakdown at each phase's own peak), ``layer`` (one decoder
    layer's saved activations: ``{"index", "tokens", "saved": {"ops", "components"},
    "recomputed": {...}}`` -- bytes by ``submodule:aten_op``), ``seconds`` (wall time).
    """

    groups: dict[Group, int] = field(default_factory=dict)
    phase_components: dict[Phase, dict[Component, int]] = field(default_factory=dict)
    layer: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        out = super().to_json()
        out["groups"] = {g.value: int(v) for g, v in self.groups.items()}
        out["phase_components"] = {p.value: {c.value: int(v) for c, v in comps.items()}
                                   for p, comps in self.phase_components.items()}
        out["layer"] = jsonable(self.layer)
        out["seconds"] = round(self.seconds, 3)
        out["source"] = "dryrun"
        return out


def _require() -> None:
    for mod in ("torch", "transformers", "peft"):
        require(mod, "dryrun")


def dryrun(model: str | ModelSpec, method: str = "lora", *, adapter: str | None = None, batch: int = 1,
           seq: int = 2048, grad_accum: int = 1, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
           targets=None, grad_ckpt: bool | None = None, optimizer: str = "adamw", precision: str | None = None,
           attn: str = "sdpa", double_quant: bool = True, ppo_response: int | None = None, gpu=None,
           gpu_mem=None, framework: str = "hf", config: TrainConfig | None = None,
           sample_layer: int | None = None) -> DryRunResult:
    """Trace one steady-state training step on ``meta`` and account for every tensor byte.

    Args mirror :func:`vramplan.estimate` (and ``vramplan dryrun`` the CLI's flags); ``config``
    passes an already validated :class:`~vramplan.config.TrainConfig` instead.
    ``sample_layer`` picks the decoder layer whose saved activations are broken down op by
    op (default: the middle one).

    Returns:
        :class:`DryRunResult`: ``tensor_peak_bytes`` (live storages, exact), ``peak_bytes``
        (plus runtime overheads), ``components``, ``groups``, ``phases``.

    Raises:
        MissingDependencyError: torch, transformers or peft (or bitsandbytes for QLoRA and
            8-bit optimisers) is not installed.
        VramplanError: bad input, or transformers cannot build the model.
    """
    _require()
    from ..plan import _check_card, resolve_gpu

    spec = get_model(model)
    card = resolve_gpu(gpu, gpu_mem)
    if config is None:
        precision = _check_card(precision, method, adapter, attn, card)
        config = make_config(spec, method, adapter=adapter, batch=batch, seq=seq, grad_accum=grad_accum, rank=rank,
                             alpha=alpha, dropout=dropout, targets=targets, grad_ckpt=grad_ckpt, optimizer=optimizer,
                             precision=precision, attn=attn, framework=framework, double_quant=double_quant,
                             ppo_response=ppo_response)
    query = None if isinstance(model, ModelSpec) else str(model)
    return dryrun_config(spec, config, card, model_query=query, sample_layer=sample_layer)


def decoder_layers(model) -> list:
    """The decoder layer modules of a transformers model (the longest ``nn.ModuleList`` of layers)."""
    from torch import nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best) and (n is None or len(mod) == n):
            best = list(mod)
    return best


def _overheads(tensor_peak: int, card) -> tuple[dict[Component, int], int, bool, str]:
    try:
        from ..overheads import runtime_overheads
    except ImportError:  # pragma: no cover - the overheads module ships with vramplan
        return {}, 0, False, "none (vramplan.overheads unavailable)"
    over = runtime_overheads(tensor_peak, card)
    if isinstance(over, dict):
        return {Component(k): int(v) for k, v in over.items()}, 0, False, "vramplan.overheads"
    return ({Component(k): int(v) for k, v in over.components.items()}, int(getattr(over, "uncertainty_bytes", 0)),
            bool(getattr(over, "calibrated", False)), str(getattr(over, "source", "vramplan.overheads")))


def dryrun_config(spec: ModelSpec, cfg: TrainConfig, card=None, *, model_query: str | None = None,
                  sample_layer: int | None = None) -> DryRunResult:
    """:func:`dryrun` for a validated :class:`TrainConfig` (and a resolved GPU or None)."""
    _require()
    import gc
    import logging
    import time
    import warnings

    from ..methods import Role
    from ..runtime import build
    from .tracker import Tracker

    if cfg.framework != "hf":
        raise VramplanError(f"the dry run builds the HF stack only, not framework {cfg.framework!r}")
    t0 = time.perf_counter()
    tracker = Tracker("meta")
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    from ..runtime.build import first_sentence

    try:
        with warnings.catch_warnings(), tracker.mode:
            warnings.simplefilter("ignore")
            trainee = build(spec, cfg, "cuda", fake=True, hooks=tracker)
            layers = decoder_layers(trainee.copies[Role.POLICY].inner)
            sample = sample_layer if sample_layer is not None else (len(layers) // 2 if layers else None)
            tracker.watch_layers(layers, sample)
            tracker.phase(None)
            load_bytes = tracker.live_bytes
            load_peak = tracker.phase_peaks.get(Phase.LOAD)
            trainee.step()  # warm-up: optimiser states come to exist
            gc.collect()
            tracker.start_measure()
            trainee.step()
            tracker.stop()
    except (ValueError, NotImplementedError) as exc:  # transformers/PEFT rejecting the configuration
        raise VramplanError(f"the dry run's training step failed: {first_sentence(exc)}") from exc
    finally:
        tf_logger.setLevel(level)

    peak_at, tensor_peak = tracker.peak.at, int(tracker.peak.bytes)
    at_peak = tracker.breakdown(peak_at)
    comps = {c: int(at_peak.get(c, 0)) for c in TENSOR_COMPONENTS}
    phases: dict[Phase, int] = {Phase.LOAD: int(load_bytes)}
    phase_components: dict[Phase, dict[Component, int]] = {}
    peak_phase = Phase.LOAD
    best = -1
    for p in PHASE_ORDER[1:]:
        pk = tracker.phase_peaks.get(p)
        if pk is None or pk.bytes < 0:
            continue
        phases[p] = int(pk.bytes)
        phase_components[p] = {c: v for c, v in tracker.breakdown(pk.at).items() if v}
        if pk.bytes > best:
            best, peak_phase = pk.bytes, p
    groups: dict[Group, int] = {}
    for c, v in comps.items():
        groups[c.group] = groups.get(c.group, 0) + v
    runtime, unc, calibrated, source = _overheads(tensor_peak, card)
    comps.update(runtime)
    for c, v in runtime.items():
        groups[c.group] = groups.get(c.group, 0) + v
    peak = tensor_peak + sum(runtime.values())

    params, trainable = trainee.counts()
    pol = trainee.copies[Role.POLICY]
    peft_policy = pol.trains and trainee.recipe.adapter.is_peft
    policy_params = sum(  # the base model's parameters (an NF4 weight counts its elements), adapters apart
        int(p.quant_state.shape.numel()) if getattr(p, "quant_state", None) is not None else p.numel()
        for p in pol.module.parameters() if not (peft_policy and p.requires_grad))
    tokens = cfg.batch * cfg.seq * cfg.recipe.sequences_per_example
    layer = {
        "index": sample,
        "tokens": tokens,
        "saved": tracker.layer_saved(),
        "recomputed": tracker.layer_saved(recompute=True) if cfg.grad_ckpt else None,
    }
    emu = trainee.emulation
    assumptions = [
        "dry run: the real transformers/PEFT model on meta, one measured steady-state step after a warm-up step "
        "(optimizer states exist; gradients set to None between steps)",
        "emulated CUDA: autocast op lists and weight-cast cache, SDPA backend choice "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(emu.sdpa_calls.items())) or 'no SDPA calls'}), kernel workspaces "
        f"({', '.join(sorted(tracker.transients)) or 'none'})",
        f"precision {trainee.regime.name} ({trainee.regime.runner}): {trainee.regime.summary}",
        f"runtime overheads: {source}",
        "inputs: full-length sequences, no padding mask; training forwards use_cache=False",
    ]
    if cfg.method == "dpo":
        assumptions.append("DPO as TRL: policy forward first, then reference log-probs under no_grad while the "
                           "policy's activations are alive; the mean-logits metric copies the whole sequence's logits")
    if cfg.method == "ppo":
        assumptions.append("PPO as TRL (rollout without autocast, eval mode; decode loop shortcut to its last two "
                           "steps with the cache pre-grown); the value copy trains with the policy's adapter choice")
    assumptions += trainee.notes
    extra: dict[str, Any] = {
        "tensor_peak_bytes_rounded": int(tracker.peak_rounded),
        "load_transient_peak_bytes": int(load_peak.bytes) if load_peak else int(load_bytes),
        "policy_params": int(policy_params),
        "params_all_copies": int(params),
        "workspaces": {k: int(v) for k, v in tracker.transients.items()},
        "sdpa_backends": dict(emu.sdpa_calls),
    }
    resolved = None
    if model_query is not None and model_query.lower() != spec.name.lower():
        resolved = f"{model_query} -> {spec.name}"
    res = DryRunResult(
        model=spec.name, method=cfg.method, adapter=cfg.adapter, config=cfg, params=int(policy_params),
        trainable_params=int(trainable), components=comps, phases=phases, peak_phase=peak_phase,
        tensor_peak_bytes=tensor_peak, peak_bytes=int(peak), quantity=Quantity.DEVICE_TOTAL,
        uncertainty_bytes=unc, calibrated=calibrated, assumptions=assumptions, model_resolved_from=resolved,
        extra=extra, groups=groups, phase_components=phase_components, layer=layer,
        seconds=time.perf_counter() - t0)
    if card is not None:
        res.gpu = card.name
        res.capacity_bytes = int(card.memory_bytes)
        res.fits = peak <= card.memory_bytes
    return res


class _CallableModule(__import__("types").ModuleType):
    """``vramplan.dryrun`` is both this package and the API function: importing the package
    rebinds the attribute on ``vramplan``, so the package itself is made callable."""

    def __call__(self, *args, **kwargs):
        return dryrun(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule

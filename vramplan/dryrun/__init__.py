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
paged 8-bit optimiser states are counted as device tensors (and passed to the overheads as
paged, outside the allocator's reserve); ``tensor_peak_bytes`` sums exact storage sizes
(``max_memory_allocated`` rounds each block to 512 B: ``extra.tensor_peak_bytes_rounded``);
the allocator's reserve, CUDA context and cuBLAS workspaces come from ``vramplan.overheads``
(the card's profile for the method, or the defaults; no activation factor: it corrects the
analytic model, not this measurement).

Stacks (``framework``)
----------------------
Every result says which stack ran and how (``DryRunResult.stack`` / ``run``; JSON ``stack``):

* ``traced``: the stack's own code ran -- ``hf`` (transformers + PEFT), ``torchtune`` and
  ``litgpt`` (their own model builders, adapters, losses and training steps:
  :mod:`vramplan.runtime.stacks`, one module each; the ``torchtune`` / ``litgpt`` extras).
* ``emulated``: part of the step is vramplan's reimplementation of code that cannot run here,
  with its sources -- the ``liger_ce`` technique (Liger's fused linear cross-entropy is Triton
  only: :mod:`vramplan.runtime.liger`).
* ``documented``: the stack cannot run here at all (Unsloth needs a CUDA GPU); the dry run
  refuses it with one line pointing at ``vramplan estimate --framework NAME``, whose
  accounting cites its sources (``vramplan/data/stacks.toml``).

Importing this package does not import torch; :func:`dryrun` raises
:class:`~vramplan.errors.MissingDependencyError` when torch, transformers or peft (or the
stack's own package) is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import TrainConfig, make_config
from ..errors import install_hint, MissingDependencyError, VramplanError, require
from ..models import ModelSpec, get_model
from ..request import EstimateRequest, call_request
from ..results import Estimate, jsonable
from ..taxonomy import TENSOR_COMPONENTS, Component, Group, Phase, Quantity

PHASE_ORDER = (Phase.LOAD, Phase.ROLLOUT, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP)
RUNS = ("traced", "emulated", "documented")
# What each stack's dry run needs, builds and runs is its stacks.toml entry (``dryrun_*`` fields: the
# refusal of a documented stack, the techniques it runs, its package, the versions reported); its own
# code is its module of :mod:`vramplan.runtime.stacks`.

__all__ = ["DryRunResult", "dryrun", "dryrun_config", "stack_run"]


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
    #: the stack that ran (``hf``, ``torchtune``, ``litgpt``) and how: ``traced`` (its own code)
    #: or ``emulated`` (part of it reimplemented here: ``emulated`` lists what, with sources)
    stack: str = "hf"
    run: str = "traced"
    packages: dict[str, str] = field(default_factory=dict)
    stack_sources: list[str] = field(default_factory=list)
    emulated: list[str] = field(default_factory=list)

    @property
    def stack_line(self) -> str:
        """One line: which stack ran, and how."""
        pk = ", ".join(f"{k} {v}" for k, v in self.packages.items())
        what = f"{self.stack} stack {self.run}"
        if self.run == "traced":
            return f"{what}: its own code ran on meta ({pk})"
        return f"{what}: its own code ({pk}) with vramplan's reimplementation of {'; '.join(self.emulated)}"

    def to_json(self) -> dict:
        out = super().to_json()
        out["groups"] = {g.value: int(v) for g, v in self.groups.items()}
        out["phase_components"] = {p.value: {c.value: int(v) for c, v in comps.items()}
                                   for p, comps in self.phase_components.items()}
        out["layer"] = jsonable(self.layer)
        out["seconds"] = round(self.seconds, 3)
        out["source"] = "dryrun"
        out["stack"] = {"name": self.stack, "run": self.run, "packages": dict(self.packages),
                        "sources": list(self.stack_sources), "emulated": list(self.emulated)}
        return out

    def render(self, console) -> None:
        """The stack line, then the estimate's table (``vramplan.render``)."""
        from ..render import render_estimate

        colour = "green" if self.run == "traced" else "yellow"
        console.print(f"[{colour}]dry run: {self.stack_line}[/{colour}]", highlight=False)
        render_estimate(self, console)


def stack_run(framework: str, techniques=()) -> str:
    """How the dry run covers ``framework`` with ``techniques``: ``traced`` or ``emulated``.

    Raises:
        VramplanError: the stack is ``documented`` (it cannot run here: the message points at
            ``vramplan estimate``), or a technique the dry run does not run.
    """
    from ..stacks import get_stack

    st = get_stack(framework)
    if st.dryrun not in RUNS:
        raise VramplanError(f"stacks.toml: stack {st.name!r} has dryrun {st.dryrun!r}, not one of {', '.join(RUNS)}")
    estimate_hint = f"`vramplan estimate --framework {st.name}` gives its accounting, documented with sources"
    if st.dryrun == "documented":
        raise VramplanError(f"the dry run cannot trace the {st.name} stack: {st.dryrun_refusal}", estimate_hint)
    run = st.dryrun
    runs = dict(st.dryrun_techniques)
    for t in techniques:
        how = runs.get(t)
        if how is None:
            raise VramplanError(f"the dry run does not run technique {t} on the {st.name} stack",
                                f"`vramplan estimate --framework {st.name} --techniques {t}` accounts for it")
        if how == "emulated":
            run = "emulated"
    return run


def require_stack_packages(framework: str = "hf") -> None:
    """Import the dry run's dependencies, keeping their import-time notices off stderr.

    (bitsandbytes, which PEFT imports, logs that it found no CPU kernel package; torchao logs
    the C++ extensions it skips on CPU.) A stack's own package is checked first, so that a
    missing one is the only line printed.
    """
    import importlib.util
    import logging

    from ..stacks import get_stack

    pkg = get_stack(framework).dryrun_package
    if pkg and importlib.util.find_spec(pkg) is None:
        raise MissingDependencyError(f"the {framework} dry run needs the {pkg} package, which is not installed",
                                     install_hint(framework))
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        for mod in ("torch", "transformers", "peft"):
            require(mod, "dryrun")
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def dryrun(model: "str | ModelSpec | EstimateRequest | None" = None, method: str | None = None, *,
           config: TrainConfig | None = None, sample_layer: int | None = None, **settings: Any) -> DryRunResult:
    """Trace one steady-state training step on ``meta`` and account for every tensor byte.

    Takes an :class:`~vramplan.request.EstimateRequest` or its fields as keywords, as
    :func:`vramplan.estimate` (and ``vramplan dryrun`` the CLI's flags): the configuration's
    fields and ``gpu``/``gpu_mem`` (the scale fields are the multi-GPU dry run's,
    ``vramplan.dryrun.distributed``). ``config`` passes an already validated
    :class:`~vramplan.config.TrainConfig` instead. ``sample_layer`` picks the decoder layer whose
    saved activations are broken down op by op (default: the middle one). ``framework`` picks the
    stack (``hf``; ``torchtune`` and ``litgpt`` need their extras); ``techniques`` may be
    ``liger_ce`` (emulated, hf stack). ``method_options`` are the method's own options
    (vramplan.methods.base.Option).

    Returns:
        :class:`DryRunResult`: ``tensor_peak_bytes`` (live storages, exact), ``peak_bytes``
        (plus runtime overheads), ``components``, ``groups``, ``phases``.

    Raises:
        MissingDependencyError: torch, transformers or peft (or bitsandbytes for QLoRA and
            8-bit optimisers, or the stack's package) is not installed.
        VramplanError: a keyword that is not an EstimateRequest field; bad input; transformers (or the
            stack) cannot build the model; a ``documented`` stack (Unsloth), which cannot run here.
    """
    from ..stacks import parse_techniques

    req = call_request(EstimateRequest, model, "model", settings if method is None else {"method": method, **settings})
    stack_run(req.framework, parse_techniques(req.techniques))  # a documented stack stops here, torch or not
    require_stack_packages(req.framework)
    from ..planner.checks import check_card, resolve_gpu

    model = req.model
    spec = get_model(model)
    card = resolve_gpu(req.gpu, req.gpu_mem)
    if config is None:
        precision = check_card(req.precision, req.method, req.adapter, req.attn, card, req.framework)
        config = make_config(spec, req.config_request(precision=precision))
    query = None if isinstance(model, ModelSpec) else str(model)
    return dryrun_config(spec, config, card, model_query=query, sample_layer=sample_layer)


def _package_versions(framework: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from ..stacks import get_stack

    out = {}
    for name in get_stack(framework).dryrun_versions + ("torch",):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def decoder_layers(model) -> list:
    """The decoder layer modules of a transformers model (the longest ``nn.ModuleList`` of layers)."""
    from torch import nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best) and (n is None or len(mod) == n):
            best = list(mod)
    return best


def _overheads(tensor_peak: int, components: dict[Component, int], cfg: TrainConfig, card):
    """Runtime overheads of the measured tensor peak: :mod:`vramplan.overheads`' chain, as the planner's.

    ``method`` selects the card's profile figures (its allocator correction); the paged
    optimiser states, which the dry run counts as device tensors, are passed as
    ``paged_bytes``, so they get no allocator reserve (bitsandbytes keeps them in managed
    memory outside PyTorch's allocator). No activations are passed: the activation factor
    corrects the analytic model's activations, which the dry run measures, so it adds nothing.

    Returns:
        ``(overheads, calibrated, source)``: the :class:`~vramplan.overheads.Overheads`;
        whether a figure that applies here came from the profile; the assumptions' line.
    """
    from ..overheads import CALIBRATED, peak_terms, runtime_overheads

    _activations, paged = peak_terms(components, cfg.optimizer)
    over = runtime_overheads(tensor_peak, card, method=cfg.recipe.name, paged_bytes=int(paged))
    applied = {k: v for k, v in over.figures.items() if k != "activation_factor"}
    source = over.source
    if over.is_calibrated("activation_factor"):
        source += (f"; the activation factor ({over.activation_factor:.3g}) is not applied: it corrects the analytic "
                   "model's activations, which the dry run measures")
    return over, any(v == CALIBRATED for v in applied.values()), source


def dryrun_config(spec: ModelSpec, cfg: TrainConfig, card=None, *, model_query: str | None = None,
                  sample_layer: int | None = None) -> DryRunResult:
    """:func:`dryrun` for a validated :class:`TrainConfig` (and a resolved GPU or None)."""
    require_stack_packages(cfg.framework)
    import gc
    import logging
    import time
    import warnings

    from ..methods import Role
    from ..runtime import build
    from .tracker import Tracker

    run = stack_run(cfg.framework, cfg.techniques)
    from ..runtime.stacks import get_runtime

    get_runtime(cfg.framework).check(spec, cfg)  # import the stack's package and reject what it cannot run, untraced
    # micro-batches 2..N of an accumulation step hold the same tensors (the gradients of the first stay
    # allocated): tracing two of them gives the step's peak, so --grad-accum 2048 costs what 2 does
    traced = cfg if cfg.grad_accum <= 2 else cfg.with_(grad_accum=2)
    t0 = time.perf_counter()
    tracker = Tracker("meta")
    # transformers' and torchao's import-time notices (torchao: C++ extensions skipped on CPU) are not results
    loggers = [logging.getLogger(name) for name in ("transformers", "torchao")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    from ..runtime.build import first_sentence

    try:
        with warnings.catch_warnings(), tracker.mode:
            warnings.simplefilter("ignore")
            trainee = build(spec, traced, "cuda", fake=True, hooks=tracker)
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
    except (ValueError, NotImplementedError) as exc:  # transformers/PEFT/the stack rejecting the configuration
        raise VramplanError(f"the dry run's training step failed: {first_sentence(exc)}") from exc
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

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
    over, calibrated, source = _overheads(tensor_peak, comps, cfg, card)
    runtime = {Component(k): int(v) for k, v in over.components.items()}
    unc = int(over.uncertainty_bytes)
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
    from ..stacks import get_stack

    packages = _package_versions(cfg.framework)
    stack_sources = list(get_stack(cfg.framework).sources)
    emulated: list[str] = []
    if "liger_ce" in cfg.techniques:
        from ..runtime import liger

        emulated.append("Liger's fused linear cross-entropy (Triton only; vramplan.runtime.liger)")
        stack_sources += list(liger.SOURCES)
    tokens = cfg.batch * cfg.seq * cfg.recipe.sequences_per_example
    layer = {
        "index": sample,
        "tokens": tokens,
        "saved": tracker.layer_saved(),
        "recomputed": tracker.layer_saved(recompute=True) if cfg.grad_ckpt else None,
    }
    emu = trainee.emulation
    own = get_stack(cfg.framework).dryrun_builds
    assumptions = [
        f"dry run ({cfg.framework} stack, {run}): {own} on meta"
        + (f", with vramplan's emulation of {'; '.join(emulated)}" if emulated else "")
        + ", one measured steady-state step after a warm-up step (optimizer states exist; gradients set to None "
        "between steps)",
        "emulated CUDA: autocast op lists and weight-cast cache, SDPA backend choice "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(emu.sdpa_calls.items())) or 'no SDPA calls'}), kernel workspaces "
        f"({', '.join(sorted(tracker.transients)) or 'none'})",
        f"precision {trainee.regime.name} ({trainee.regime.runner}): {trainee.regime.summary}",
        f"runtime overheads: {source}",
        "inputs: full-length sequences, no padding mask; training forwards use_cache=False",
    ]
    assumptions += cfg.recipe.behaviour.dryrun_assumptions(cfg)
    assumptions += trainee.notes
    if traced is not cfg:
        assumptions.append(f"gradient accumulation: 2 of the {cfg.grad_accum} micro-batches traced (the 3rd and "
                           "later hold the same tensors as the 2nd, so the peak is the same)")
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
        seconds=time.perf_counter() - t0, stack=cfg.framework, run=run, packages=packages,
        stack_sources=stack_sources, emulated=emulated)
    if card is not None:
        res.gpu = card.name
        res.capacity_bytes = int(card.memory_bytes)
        res.fits = peak <= card.memory_bytes
    return res


"""Runtime overheads beyond tensor storages: CUDA context, cuBLAS workspaces, allocator reserve.

This module is the one implementation of the chain from the analytic tensors to the device
total: the planner (``plan.estimate_config`` and its vectorised grids), the calibration fit
(``calibration.predict.calibrated``) and its report all call :func:`runtime_overheads` or
:func:`device_total`.

Chain (bytes; ``f`` is the method's activation factor, ``paged`` the optimiser states of a
paged optimiser, which bitsandbytes keeps in ``cudaMallocManaged`` memory outside PyTorch's
caching allocator, so no reserve applies to them)::

    tensors   = tensor_peak + round((f - 1) * activations)          activations: activations + logits + KV cache
    allocated = tensors - paged + workspace                         torch.cuda.max_memory_allocated
    reserved  = allocator(allocated, method)                        torch.cuda.max_memory_reserved
                (default: allocated + r x (tensors - paged - loaded))   loaded: the model state loaded once
    device    = context + reserved + paged                          what nvidia-smi shows for the process

A card's calibration profile (``profiles/<gpu>.json``, :mod:`vramplan.profiles`) supplies each
figure it measured; every figure it lacks (a ``null`` field, or no profile at all) takes its
default below, and :attr:`Overheads.figures` records which was used, figure by figure.

Defaults (public measurements, ``shared/REFERENCE.md``):

* CUDA context with lazy module loading (PyTorch's default since 1.13): 287,047,680 B
  measured in PyTorch PR #86509; 426 MiB on an RTX 6000 Ada with torch 2.10. It grows with
  the SM count, so the default takes the high end, 512 MiB. A catalogue card with published
  PyTorch OOM messages that print the process's memory outside PyTorch (torch >= 2.1) takes their
  median instead (:mod:`vramplan.cudamem`, ``vramplan/data/cuda_memory.json``: a T4 about 139 MiB,
  an A100 40GB 502 MiB), reported as "published"; those cards' capacity is also what PyTorch
  can use there (its "total capacity"), not the nvidia-smi total.
* cuBLAS workspace: 8 MiB per handle and stream by default, 32 MiB on Hopper (PyTorch PRs
  #89027, #120925) and, in current PyTorch, on Blackwell too (compute capability 9.x-12.x,
  ``parseChosenWorkspaceSize``); forward and the autograd thread each hold a handle: two workspaces.
  None for a profile measured by the dry run (no cuBLAS on the meta device).
* Caching allocator: requests rounded to 512 B, blocks cached and fragmented; reserved
  exceeds allocated by 10-35% for LLM training (REFERENCE.md). The reserve comes from the
  blocks a step frees and allocates again; the state loaded once before the first step
  (weights, quantisation state, adapters, master weights: :data:`LOADED_COMPONENTS`) is
  allocated in exact-size blocks and carries almost none (torchtune PR #1348, a CodeLlama-7B
  after model init: 13.19 GiB allocated, 13.27 GiB reserved, +0.6%; an Unsloth Llama-3.3-70B QLoRA
  fits a 48 GB card, which a 15% reserve on its ~40 GiB of 4-bit weights and adapters would
  forbid). Default: 20% of the tensors the step allocates (in the allocator, paged optimiser
  states and the loaded state excluded; the workspaces not counted), fitted on the published
  reserved, device-total and context-capacity rows (``benchmarks/published_accuracy.py``: the
  fraction of the grid 10-35% that best predicts every source's reserve evidence; it has moved
  between 20% and 30% as mechanisms and rows were added -- the objective is flat there -- and the
  leave-one-source-out fits choose 20-35%, which is how the benchmark scores it). Sharded, the loaded state is each GPU's resident shard (:func:`loaded_terms` reads the
  step memory's model state; gathered units are step allocations). The dry run's own accounting
  passes no loaded state: there the reserve applies to every tensor.
* Activation factor: 1 (the analytic activations as they are).
* Uncertainty: +/-10% of the tensor peak by default; with a calibrated allocator, the
  profile's own residuals (:meth:`vramplan.profiles.Profile.memory_band`).

Known limitations: the activation factor scales the activations at the analytic peak phase;
it does not move the peak to another phase when it shrinks them. The vectorised callers
(``plan._total``, ``vramplan.matrix``, ``vramplan.recommend``) pass the same terms to
:func:`device_total` (from :func:`peak_terms`), so their totals equal :func:`runtime_overheads`'
to the byte; the dry run passes its paged states but no activations (it measures them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .cudamem import context_bytes
from .gpus import GPUSpec, generation, parse_compute_capability
from .memory import StepMemory
from .optimizers import get_optimizer
from .profiles import load_profile
from .taxonomy import RESIDENT_COMPONENTS, Component
from .units import MIB

DEFAULT_CONTEXT_BYTES = 512 * MIB
DEFAULT_RESERVE_FRACTION = 0.25  # refitted on the corpus (benchmarks/published_accuracy.py; test holds it to the fit)
#: allocated once at load, before the first step: no reserve (vramplan.overheads.loaded_terms)
LOADED_COMPONENTS = RESIDENT_COMPONENTS
DEFAULT_UNCERTAINTY_FRACTION = 0.10
#: The figures of the chain that a profile may calibrate, in the order they are reported.
FIGURES = ("context", "workspace", "allocator", "activation_factor")
CALIBRATED, DEFAULT = "calibrated", "default"

_LOAD = object()  # runtime_overheads(profile=...) default: look the card's profile up


def _workspace_for(compute_capability) -> int:
    """Two cuBLAS workspaces (forward handle + autograd thread's): 32 MiB each from Hopper on, else 8 MiB.

    PyTorch's default (``parseChosenWorkspaceSize``, aten/src/ATen/cuda/CublasHandlePool.cpp):
    32 MiB for compute capability major 9-12 (Hopper and Blackwell, including the 12.x RTX 50
    cards), else ``4096 * 1024 * 2 + 16 * 1024 * 8`` bytes (8 MiB, the 128 KiB rounded off).
    ``compute_capability``: ``"9.0"``, a ``(major, minor)`` pair, or None (unknown: 8 MiB).
    """
    per = 32 * MIB if generation(parse_compute_capability(compute_capability)) in ("hopper", "blackwell") else 8 * MIB
    return 2 * per


def _workspace(gpu: GPUSpec | None) -> int:
    return _workspace_for(gpu.cc if gpu is not None else None)


default_workspace_bytes = _workspace_for

#: Components the activation factor scales (the activation group of the taxonomy).
ACTIVATION_COMPONENTS = (Component.ACTIVATIONS, Component.LOGITS, Component.KV_CACHE)


def peak_terms(components: Mapping[Component, Any], optimizer: str):
    """``(activation_bytes, paged_bytes)`` of a step's components at its peak (ints or arrays).

    Activations are the activation group (activations, logits, KV cache); paged bytes are
    the optimiser states when ``optimizer`` is a paged one (``OptimizerDef.paged``), else 0.
    """
    act = sum(components.get(c, 0) for c in ACTIVATION_COMPONENTS)
    paged = components.get(Component.OPTIMIZER_STATES, 0) if get_optimizer(optimizer).paged else 0
    return act, paged


def rounded_terms(mem, optimizer: str):
    """``(tensor_peak, activation_bytes, paged_bytes, loaded_bytes)`` of a step memory
    (``vramplan.memory.StepMemory``, arrays over batch/seq) in whole bytes, rounded as
    :func:`vramplan.plan.estimate_config` rounds them (each component and the peak up): the terms the
    vectorised callers hand :func:`device_total`."""
    act, paged = peak_terms({c: np.ceil(v) for c, v in mem.components.items()}, optimizer)
    return np.ceil(mem.peak), act, paged, loaded_terms(mem)


def split_loaded(loaded_bytes):
    """``loaded_bytes`` as the chain's callers pass it -> ``(bytes loaded once, what the load left reserved)``.

    A number (or array): the bytes allocated once at load, which carry no reserve; a pair adds what the
    model's load left reserved in the caching allocator (``ModelState.load_reserved``,
    :mod:`vramplan.loadreserve`), a floor under the reserved total."""
    if isinstance(loaded_bytes, tuple):
        return loaded_bytes[0], loaded_bytes[1]
    return loaded_bytes, 0


def load_reserved_terms(mem) -> int:
    """What the model's load left reserved (``ModelState.load_reserved``; 0 for anything but a ``StepMemory``)."""
    return int(mem.state.load_reserved) if isinstance(mem, StepMemory) and mem.state is not None else 0


def step_device_total(mem, cfg, gpu: GPUSpec | None, *, profile=_LOAD) -> np.ndarray:
    """:func:`device_total` of a step memory of ``cfg`` (``vramplan.memory.StepMemory``) on ``gpu``."""
    peak, act, paged, loaded = rounded_terms(mem, cfg.optimizer)
    return device_total(peak, gpu, method=cfg.recipe.name, activation_bytes=act, paged_bytes=paged, profile=profile,
                        stack=getattr(cfg, "framework", None), loaded_bytes=(loaded, load_reserved_terms(mem)))


def loaded_terms(mem) -> int:
    """Bytes allocated once while loading the model (weights, quantisation state, adapters, master
    weights of the step memory's ``ModelState``: per GPU, the resident shard when sharded), which the
    caching allocator holds without a reserve; 0 for anything but a ``StepMemory``."""
    st = mem.state if isinstance(mem, StepMemory) else None
    if st is None:
        return 0
    return int(sum(st.bytes.get(c, 0) for c in LOADED_COMPONENTS))


def activation_correction(activation_bytes, factor: float):
    """Bytes the activation ``factor`` adds to the tensors: ``round((factor - 1) x activation_bytes)``.

    Ints or arrays (float64 bytes); zeros for factor 1. The chain's own rounding, for callers
    that report the tensors after the factor (``vramplan.matrix``'s ``tensor_peak_bytes``).
    """
    act = np.asarray(activation_bytes, dtype=np.float64)
    return np.rint((factor - 1.0) * act) if factor != 1.0 else np.zeros_like(act)


def apply_activation_factor(components: dict[Component, int], over: "Overheads") -> dict[Component, int]:
    """``components`` with the activation group scaled by ``over.activation_factor``.

    Each of activations, logits and KV cache is scaled (rounded to a byte); the rounding
    remainder goes to activations, so the tensor components grow by exactly
    ``over.activation_correction_bytes``.
    """
    out = dict(components)
    if not over.activation_correction_bytes:
        return out
    delta = 0
    for c in ACTIVATION_COMPONENTS:
        if c in out:
            d = int(round((over.activation_factor - 1.0) * out[c]))
            out[c] += d
            delta += d
    out[Component.ACTIVATIONS] = out.get(Component.ACTIVATIONS, 0) + over.activation_correction_bytes - delta
    return out


def card_profile(gpu: GPUSpec | None):
    """The calibration profile of catalogue card ``gpu`` (None for no card, a custom card, or none found).

    Raises:
        ProfileError: the profile found is corrupt or of an unknown schema version.
    """
    if gpu is None or getattr(gpu, "custom", False):
        return None
    return load_profile(gpu.name)


@dataclass(frozen=True)
class _Figures:
    """The chain's parameters once each is taken from the profile or its default."""

    context: int
    workspace: int
    factor: float
    allocator: Any            # profiles.AllocatorModel, or None: the default reserve fraction
    correction: float | None  # the method's allocator correction
    paged_outside: bool       # paged states live outside the allocator (False for a dry-run profile)
    status: dict              # figure -> "calibrated" | "default"


PUBLISHED = "published"


def default_context(gpu: GPUSpec | None) -> tuple[int, str]:
    """``(bytes, status)`` of the CUDA context of ``gpu`` without a calibrated one: the median non-PyTorch
    memory of published OOM messages on that catalogue card (:mod:`vramplan.cudamem`, status "published"),
    else :data:`DEFAULT_CONTEXT_BYTES` ("default")."""
    if gpu is not None and not getattr(gpu, "custom", False):
        ctx = context_bytes(gpu.name)
        if ctx is not None:
            return ctx, PUBLISHED
    return DEFAULT_CONTEXT_BYTES, DEFAULT


def _figures(gpu: GPUSpec | None, profile, method: str | None, stack: str | None = None) -> _Figures:
    if profile is None:
        ctx, st = default_context(gpu)
        return _Figures(ctx, _workspace(gpu), 1.0, None, None, True, {**dict.fromkeys(FIGURES, DEFAULT), "context": st})
    if not profile.applies_to(stack):
        # card figures only: the allocator model and per-method figures belong to the profile's stack
        from dataclasses import replace

        profile = replace(profile, allocator=None, activation_factors={}, throughput={}, qlora_dequant=None)
    status = {}
    ctx = profile.context_bytes
    if ctx is None:
        ctx, status["context"] = default_context(gpu)
    else:
        status["context"] = CALIBRATED
    ws = profile.workspace_bytes
    status["workspace"] = CALIBRATED if ws is not None else DEFAULT
    measured_on_device = profile.allocated_source == "torch.cuda"
    if ws is None:
        cc = gpu.cc if gpu is not None else (profile.device or {}).get("compute_capability")
        ws = _workspace_for(cc) if measured_on_device or gpu is not None else 0
    status["allocator"] = CALIBRATED if profile.allocator is not None else DEFAULT
    factor = 1.0
    if method is not None and profile.is_calibrated(f"activation:{method}"):
        factor = profile.activation_factor(method)
        status["activation_factor"] = CALIBRATED
    else:
        status["activation_factor"] = DEFAULT
    return _Figures(int(ctx), int(ws), float(factor), profile.allocator,
                    profile.allocator_correction(method), measured_on_device or gpu is not None, status)


_FIGURES_CACHE: dict = {}


def _kept_figures(gpu: GPUSpec | None, prof, method: str | None, stack: str | None) -> _Figures:
    """:func:`_figures`, kept per (card, profile, method, stack): what it reads (without a profile, the card alone:
    every method and stack gets the card's defaults). The card and the profile (frozen dataclasses) are keyed by
    identity and held in the entry, so a kept entry is for these very objects; a search asks for the same few
    figures hundreds of times. Its ``status`` is shared: read it, never change it."""
    key = (id(gpu), id(prof), method, stack) if prof is not None else (id(gpu), None, None, None)
    try:
        kept = _FIGURES_CACHE.get(key)
    except TypeError:  # an unhashable method or stack: worked out each time
        return _figures(gpu, prof, method, stack)
    if kept is not None and kept[0] is gpu and kept[1] is prof:
        return kept[2]
    fig = _figures(gpu, prof, method, stack)
    if len(_FIGURES_CACHE) > 256:
        _FIGURES_CACHE.clear()
    _FIGURES_CACHE[key] = (gpu, prof, fig)
    return fig


def _chain(fig: _Figures, tensor_peak, activation_bytes, paged_bytes, loaded_bytes=0, load_reserved=0) -> dict[str, Any]:
    """The chain of the module docstring on float64 arrays (or scalars); every term in bytes. ``load_reserved``:
    what the model's load left reserved (``ModelState.load_reserved``), a floor under the reserved total."""
    t = np.asarray(tensor_peak, dtype=np.float64)
    act = np.asarray(activation_bytes, dtype=np.float64)
    paged = np.asarray(paged_bytes, dtype=np.float64) if fig.paged_outside else np.zeros_like(t)
    corr = activation_correction(act, fig.factor)
    tensors = t + corr
    in_alloc = np.maximum(0.0, tensors - paged)
    allocated = in_alloc + fig.workspace
    if fig.allocator is not None:
        reserved = fig.allocator.reserve(allocated, fig.correction)
    else:
        step_alloc = np.maximum(0.0, in_alloc - np.asarray(loaded_bytes, dtype=np.float64))
        reserved = allocated + np.floor(DEFAULT_RESERVE_FRACTION * step_alloc)
    reserved = np.maximum(np.asarray(reserved, dtype=np.float64), np.asarray(load_reserved, dtype=np.float64))
    device = fig.context + reserved + (tensors - in_alloc)
    return {"correction": corr, "tensors": tensors, "paged": tensors - in_alloc, "allocated": allocated,
            "reserved": reserved, "reserve": reserved - allocated, "device": device}


@dataclass(frozen=True)
class Overheads:
    """Runtime components of one step and how they were obtained.

    ``components`` (context, workspace, allocator reserve) plus ``tensor_peak_bytes +
    activation_correction_bytes`` add up to ``device_bytes``. ``figures`` says, per figure
    of the chain, ``calibrated`` or ``default``; ``band_fraction`` / ``band_source`` the
    uncertainty band used for ``uncertainty_bytes``.
    """

    components: dict[Component, int]
    uncertainty_bytes: int
    calibrated: bool                    # any figure came from the card's profile
    source: str                         # one line for the estimate's assumptions
    figures: dict[str, str] = field(default_factory=lambda: dict.fromkeys(FIGURES, DEFAULT))
    activation_factor: float = 1.0
    activation_correction_bytes: int = 0  # (factor - 1) x activations, added to the activation components
    paged_bytes: int = 0                # optimiser states outside the caching allocator (no reserve)
    allocated_bytes: int = 0            # predicted max_memory_allocated (workspaces included, paged states not)
    reserved_bytes: int = 0             # predicted max_memory_reserved
    device_bytes: int = 0               # predicted device total (nvidia-smi)
    band_fraction: float = DEFAULT_UNCERTAINTY_FRACTION
    band_source: str = "+/-10% of the tensor peak (default)"
    profile: str | None = None          # the profile's file and versions (Profile.describe), None without one
    profile_path: str | None = None
    versions: dict = field(default_factory=dict)  # the profile's GPU driver / CUDA / torch versions

    def is_calibrated(self, figure: str) -> bool:
        return self.figures.get(figure) == CALIBRATED

    def to_json(self) -> dict:
        return {"calibrated": self.calibrated, "figures": dict(self.figures),
                "profile": self.profile_path, "profile_versions": dict(self.versions) if self.profile_path else None,
                "cuda_context_bytes": int(self.components.get(Component.CUDA_CONTEXT, 0)),
                "workspace_bytes": int(self.components.get(Component.WORKSPACE, 0)),
                "allocator_reserve_bytes": int(self.components.get(Component.ALLOCATOR_RESERVE, 0)),
                "activation_factor": round(float(self.activation_factor), 6),
                "activation_correction_bytes": int(self.activation_correction_bytes),
                "paged_optimizer_bytes": int(self.paged_bytes),
                "allocated_bytes": int(self.allocated_bytes), "reserved_bytes": int(self.reserved_bytes),
                "uncertainty_bytes": int(self.uncertainty_bytes), "uncertainty_fraction": round(self.band_fraction, 6),
                "uncertainty_source": self.band_source, "source": self.source}


def runtime_overheads(tensor_peak_bytes: int, gpu: GPUSpec | None = None, *, method: str | None = None,
                      activation_bytes: int = 0, paged_bytes: int = 0, profile=_LOAD, stack: str | None = None,
                      loaded_bytes=0) -> Overheads:
    """Runtime components for a step whose live tensors peak at ``tensor_peak_bytes``.

    Args:
        tensor_peak_bytes: the analytic tensor peak (bytes).
        gpu: the card; its calibration profile is looked up unless ``profile`` is given.
        method: the recipe (``lora``, ``dpo+qlora``, ...) whose activation factor and allocator
            correction apply.
        activation_bytes: activations + logits + KV cache at the peak (what the factor scales).
        paged_bytes: optimiser states of a paged optimiser at the peak (kept out of the reserve).
        profile: a loaded :class:`~vramplan.profiles.Profile`, or None for the defaults only.
        stack: the training stack of the run (``hf``, ``torchtune``, ...); a profile measured
            with another stack contributes its card figures only (None: the profile's stack).

    Returns:
        :class:`Overheads`; ``device_bytes = tensor_peak + activation_correction + sum(components)``.

    Raises:
        ProfileError: the card's profile is corrupt or of an unknown schema version.
    """
    prof = card_profile(gpu) if profile is _LOAD else profile
    fig = _kept_figures(gpu, prof, method, stack)
    loaded, floor = split_loaded(loaded_bytes)
    c = _chain(fig, int(tensor_peak_bytes), int(activation_bytes), int(paged_bytes), int(loaded), int(floor))
    val = {k: int(v) for k, v in c.items()}
    comps = {Component.CUDA_CONTEXT: fig.context, Component.WORKSPACE: fig.workspace,
             Component.ALLOCATOR_RESERVE: val["reserve"]}
    band = prof.memory_band() if (prof is not None and prof.allocator is not None and fig.allocator is not None) else None
    if band is not None:
        frac, applies, label = band
        unc = int(frac * (val["device"] if applies == "device_total" else val["reserved"]))
        band_source = f"+/-{100 * frac:.1f}% of the {applies.replace('_', ' ')} (calibrated: residuals of the {label})"
    else:
        frac = DEFAULT_UNCERTAINTY_FRACTION
        unc = int(frac * val["tensors"])
        band_source = f"+/-{100 * frac:.0f}% of the tensor peak (default)"
    calibrated = any(s == CALIBRATED for s in fig.status.values())
    over = Overheads(comps, unc, calibrated, "", dict(fig.status), fig.factor, val["correction"], val["paged"],
                     val["allocated"], val["reserved"], val["device"], frac, band_source,
                     prof.describe() if prof is not None else None, getattr(prof, "path", None) if prof else None,
                     {k: v for k, v in (prof.versions if prof is not None else {}).items()
                      if k in ("driver", "cuda", "cuda_driver", "torch")})
    return _with_source(over, gpu, method, prof, stack)


def _with_source(o: Overheads, gpu: GPUSpec | None, method: str | None, prof, stack: str | None = None) -> Overheads:
    from dataclasses import replace

    def mib(n: int) -> str:
        return f"{n / MIB:,.0f} MiB"

    st = o.figures
    ctx, ws = o.components[Component.CUDA_CONTEXT], o.components[Component.WORKSPACE]
    ctx_src = st["context"] + (": PyTorch OOM messages, vramplan/data/cuda_memory.json" if st["context"] == PUBLISHED else "")
    parts = [f"CUDA context {mib(ctx)} ({ctx_src})", f"cuBLAS workspace {mib(ws)} ({st['workspace']})"]
    if prof is not None and prof.allocator is not None and prof.applies_to(stack):
        a = prof.allocator
        k = prof.allocator_correction(method)
        parts.append(f"allocator reserve (calibrated: reserved = {a.slope:.4g} x allocated + {a.intercept_bytes / MIB:,.0f} MiB"
                     + (f", x {k:.4g} for {method}" if k is not None else "") + f", rounded to {a.round_bytes / MIB:g} MiB)")
    else:
        parts.append(f"allocator reserve {DEFAULT_RESERVE_FRACTION:.0%} of the tensors the step allocates, the loaded "
                     "weights, quantisation state and adapters exempt (default, fitted on published rows)")
    parts.append(f"activation factor {o.activation_factor:.3g}" + (f" for {method}" if method else "")
                 + f" ({st['activation_factor']})")
    if o.paged_bytes:
        parts.append(f"paged optimizer states {mib(o.paged_bytes)} in managed memory, outside the allocator's reserve")
    if prof is not None:
        head = ("calibrated from profile " if o.calibrated else "defaults (profile without memory figures: ") + o.profile
        head += "" if o.calibrated else ")"
        head += f" [{prof.scope_note(stack)}]"
    else:
        why = "no card" if gpu is None else ("custom card" if getattr(gpu, "custom", False)
                                             else f"no calibration profile for {gpu.name}")
        head = f"defaults ({why})"
    return replace(o, source=f"{head}: " + "; ".join(parts) + f"; uncertainty {o.band_source}")


def device_total(tensor_peak, gpu: GPUSpec | None = None, *, method: str | None = None, activation_bytes=0,
                 paged_bytes=0, profile=_LOAD, stack: str | None = None, loaded_bytes=0) -> np.ndarray:
    """Vectorised :func:`runtime_overheads`: the device total (float64 bytes) over arrays of tensor peaks.

    Arguments as :func:`runtime_overheads`; ``tensor_peak``, ``activation_bytes`` and
    ``paged_bytes`` broadcast. Equal to ``runtime_overheads(...).device_bytes`` element by element.
    """
    return device_terms(tensor_peak, gpu, method=method, activation_bytes=activation_bytes, paged_bytes=paged_bytes,
                        profile=profile, stack=stack, loaded_bytes=loaded_bytes)["device"]


def device_terms(tensor_peak, gpu: GPUSpec | None = None, *, method: str | None = None, activation_bytes=0,
                 paged_bytes=0, profile=_LOAD, stack: str | None = None, loaded_bytes=0) -> dict[str, np.ndarray]:
    """Every term of the chain (float64 bytes, broadcast), arguments as :func:`device_total`.

    Keys: ``correction`` (the activation factor's), ``tensors`` (the tensor peak after it:
    ``Estimate.tensor_peak_bytes``), ``paged``, ``allocated``, ``reserved``, ``reserve``, ``device``
    (``Estimate.peak_bytes`` on one GPU); each equals its :func:`runtime_overheads` figure.
    """
    prof = card_profile(gpu) if profile is _LOAD else profile
    fig = _kept_figures(gpu, prof, method, stack)
    return _chain(fig, tensor_peak, activation_bytes, paged_bytes, *split_loaded(loaded_bytes))

"""Feasibility matrices: every model x method x card, vectorised, with writers for docs.

:func:`feasibility_matrix` answers, for each (model, method, card, sequence length), the
question ``vramplan fit`` answers for one model on one card: does it fit at micro-batch 1
(:mod:`vramplan.verdict`: comfortable / tight / no), its predicted device-total peak, the
largest micro-batch that fits, and the settings that make it fit. It tries gradient
checkpointing and 8-bit optimisers in a fixed order (:data:`SETTINGS_LADDER`, cheapest in
throughput first) at the method's own adapter, rank and targets, and picks with
:func:`vramplan.verdict.pick`. ``vramplan fit`` searches more (rank, targets, attention,
micro-batch, a QLoRA fallback) and ranks by speed; with those fixed, the two give the same
verdict (``tests/test_matrix.py``).

Speed: the Python loop runs over models x methods x settings (about 37 x 7 x 6); inside it
one call of :func:`vramplan.memory.step_memory` evaluates every (sequence, micro-batch)
pair as a numpy array. The device total is :mod:`vramplan.overheads`' chain on those
arrays (:func:`~vramplan.overheads.device_total` with :func:`~vramplan.overheads.peak_terms`:
activation factor, paged optimiser states outside the allocator's reserve, a profile's
allocator), so every cell equals :func:`vramplan.estimate`'s ``peak_bytes`` to the byte. The
chain is evaluated once per group of cards that run the same one (:class:`_Overheads`: cards
without a calibration profile differ only in context and workspace) and broadcast to them.

:func:`peak_grid` is the raw vectorised evaluation (every config of a grid, no settings
choice); ``benchmarks/matrix_speed.py`` times both.

Writers (``write_markdown``, ``write_csv``, ``write_html``, ``write_png``) take the
:class:`FeasibilityMatrix`; pandas is imported only by the CSV writer and matplotlib (the
``plot`` extra) only by the PNG writer.
"""

from __future__ import annotations

import html as _html
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

from .config import make_config
from .errors import CardUnsupportedError, UnknownNameError, VramplanError, require
from .gpus import GPUSpec, custom_gpu, get_gpu
from .gpus import catalogue as gpu_catalogue
from .memory import step_memory
from .methods import Recipe, default_methods, parse_recipe_name, resolve
from .models import ModelSpec, get_model
from .models import catalogue as model_catalogue
from .optimizers import DEFAULT_OPTIMIZER, get_optimizer, searched_optimizers
from .overheads import (DEFAULT_RESERVE_FRACTION, activation_correction, card_profile, device_total, rounded_terms,
                        runtime_overheads)
from .planner.checks import check_card, stack_text
from .planner.limits import BATCH_GRID, fitting_prefix
from .precision import DEFAULT_REGIME, DTYPE_BYTES, get_regime
from .request import BENCH_BATCHES, BENCH_SEQS, GridRequest, MatrixRequest, call_request
from .taxonomy import Component
from .units import GIB, parse_size
from .verdict import COMFORTABLE_FRACTION, SYMBOLS, THRESHOLDS_TEXT, VERDICTS, Verdict, classify_array, label, pick

#: (gradient checkpointing, optimizer) in the order tried: no checkpointing before
#: checkpointing (it costs ~30 % throughput), then the searched optimisers in optimizers.toml's order
#: (AdamW before 8-bit and paged 8-bit AdamW).
SETTINGS_LADDER: tuple[tuple[bool, str], ...] = tuple((gc, opt) for gc in (False, True)
                                                      for opt in searched_optimizers())
#: The benchmark grid of the issue (5 sequence lengths x 8 micro-batches): BENCH_SEQS, BENCH_BATCHES,
#: defined beside the request that defaults to them (vramplan.request.GridRequest).
FORMATS = ("md", "csv", "html", "png")

_SIZE_LIKE = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*(g|gb|gib|m|mb|mib|t|tb|tib)\s*$", re.I)


# -- selection of models, methods, cards --------------------------------------------------

def _split(items: str | Iterable[str] | None) -> list[str]:
    if items is None:
        return ["all"]
    if isinstance(items, str):
        return [s.strip() for s in items.split(",") if s.strip()]
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise VramplanError(f"expected a comma list or a list of names, got {type(items).__name__}")
    return [str(s).strip() for s in items]


def select_models(items: str | Iterable | None = "all") -> list[ModelSpec]:
    """``"all"`` (the catalogue, smallest first) or names, aliases, HF ids or config paths."""
    out: list[ModelSpec] = []
    for it in ([items] if isinstance(items, ModelSpec) else _split(items) if not isinstance(items, list) else items):
        if isinstance(it, ModelSpec):
            out.append(it)
        elif str(it).lower() == "all":
            out += sorted(model_catalogue().values(), key=lambda m: m.params)
        else:
            out.append(get_model(it))
    if not out:
        raise VramplanError("no models selected", "pass --models all or a list such as 1b,3b,7b,13b")
    return list({m.name: m for m in out}.values())


def select_methods(items: str | Iterable | None = "all") -> list[Recipe]:
    """``"all"`` (every method with its default adapter) or ``method`` / ``method+adapter`` names."""
    out: list[Recipe] = []
    for it in _split(items) if not isinstance(items, list) else items:
        if isinstance(it, Recipe):
            out.append(it)
            continue
        text = str(it).lower()
        if text == "all":
            out += [resolve(m) for m in default_methods()]
            continue
        out.append(resolve(*parse_recipe_name(text)))
    if not out:
        raise VramplanError("no methods selected", "pass --methods all or a list such as lora,qlora,dpo+qlora")
    return list({r.name: r for r in out}.values())


def select_gpus(items: str | Iterable | None = "all") -> list[GPUSpec]:
    """``"all"`` (the catalogue, smallest first), catalogue names/aliases, or capacities (``24GiB``)."""
    out: list[GPUSpec] = []
    for it in _split(items) if not isinstance(items, list) else items:
        if isinstance(it, GPUSpec):
            out.append(it)
        elif str(it).lower() == "all":
            out += sorted(gpu_catalogue().values(), key=lambda g: g.memory_bytes)
        else:
            try:
                out.append(get_gpu(it))
            except UnknownNameError:
                if not _SIZE_LIKE.match(str(it)):
                    raise
                out.append(custom_gpu(parse_size(it)))
    if not out:
        raise VramplanError("no GPUs selected", "pass --gpus all or a list such as rtx3080,rtx4000ada")
    return list({g.name: g for g in out}.values())


def _seqs(seqs) -> list[int]:
    """Sequence lengths (``2048``, ``"1k,4k,32k"``, a list), each in 1..16M, at most :data:`MAX_SEQS` of them."""
    from .validate import integer, parse_int

    if isinstance(seqs, bool):
        raise VramplanError(f"--seq must be positive integers, got {seqs!r}")
    if isinstance(seqs, str):
        vals = _split(seqs)
    elif isinstance(seqs, (list, tuple, np.ndarray)):
        vals = list(seqs)
    else:
        vals = [seqs]  # one value: integer() says what is wrong with it
    if len(vals) > MAX_SEQS:
        raise VramplanError(f"--seq lists {len(vals)} sequence lengths; the limit is {MAX_SEQS}",
                            "run the matrix in several parts")
    out = []
    for v in vals:
        out.append(parse_int(v, "seq", suffixes=True) if isinstance(v, str) else integer(v, "seq"))
    if not out:
        raise VramplanError("no sequence length given", "pass --seq 2048 or --seq 1024,2048,4096")
    return sorted(set(out))


#: Most sequence lengths and cells one matrix computes (a bound on work and memory, with a message).
MAX_SEQS = 64
MAX_CELLS = 200_000


# -- vectorised evaluation ----------------------------------------------------------------

@dataclass(frozen=True)
class _Chain:
    """Cards that run the same device-memory chain (:mod:`vramplan.overheads`) for one method."""

    card: GPUSpec          # the first of them: the chain is evaluated with its figures
    profile: object        # its calibration profile (vramplan.profiles.Profile), None for the defaults
    members: np.ndarray    # the cards' indices into the matrix's card list
    method: str            # the recipe (``lora``, ``dpo+qlora``): its activation factor and allocator correction
    factor: float          # that activation factor (1 without a calibrated one)

    def total(self, tensor_peak, activation_bytes, paged_bytes, loaded_bytes=0) -> np.ndarray:
        """Device totals (float64 bytes) of tensor peaks and their chain terms, broadcast."""
        return device_total(tensor_peak, self.card, method=self.method, activation_bytes=activation_bytes,
                            paged_bytes=paged_bytes, profile=self.profile, loaded_bytes=loaded_bytes)

    def tensors(self, tensor_peak, activation_bytes) -> np.ndarray:
        """The tensor peaks after the activation factor (``Estimate.tensor_peak_bytes``)."""
        return np.asarray(tensor_peak, dtype=np.float64) + activation_correction(activation_bytes, self.factor)


class _Overheads:
    """The cards' device-memory chains, each card's calibration profile loaded once.

    A card with a profile runs its own chain. Cards without one run the defaults, whose
    figures differ between cards only in the CUDA context and cuBLAS workspace
    (``vramplan.overheads``: every other default is a constant), so cards sharing those two
    are evaluated once -- the catalogue's cards form two such groups (Hopper's workspaces and
    the others'). ``tests/test_matrix.py`` and ``tests/test_overheads.py`` (a calibrated card among
    default ones) check cells against ``estimate`` to the byte.

    Raises:
        ProfileError: a card's profile is corrupt or of an unknown schema version.
    """

    def __init__(self, cards: Sequence[GPUSpec]):
        self.cards = list(cards)
        self.profiles = [card_profile(c) for c in self.cards]
        self._keys: list = []
        for i, (card, prof) in enumerate(zip(self.cards, self.profiles)):
            if prof is None:
                o = runtime_overheads(0, card, profile=None)
                self._keys.append(("default", o.components[Component.CUDA_CONTEXT], o.components[Component.WORKSPACE]))
            else:
                self._keys.append(("profile", i))
        self._factors: dict[tuple[int, str], float] = {}

    def chains(self, idx: Iterable[int], method: str) -> list[_Chain]:
        """The cards of ``idx`` grouped by the chain they run for ``method``, in order of first appearance."""
        groups: dict = {}
        for g in idx:
            groups.setdefault(self._keys[g], []).append(int(g))
        out = []
        for members in groups.values():
            g = members[0]
            prof = self.profiles[g]
            if prof is None:
                factor = 1.0
            else:
                if (g, method) not in self._factors:
                    self._factors[(g, method)] = runtime_overheads(0, self.cards[g], method=method,
                                                                   profile=prof).activation_factor
                factor = self._factors[(g, method)]
            out.append(_Chain(self.cards[g], prof, np.asarray(members), method, factor))
        return out


def _memory_key(precision: str) -> tuple:
    """What the analytic model reads of a precision regime: dtype sizes, autocast on/off, the runner.

    bf16-mixed and fp16-mixed share a key (same sizes), so cards of both are evaluated once;
    ``tests/test_matrix.py`` checks cells against ``estimate`` on a card of each regime.
    """
    r = get_regime(precision)
    return (DTYPE_BYTES[r.trainable_dtype], DTYPE_BYTES[r.frozen_dtype], DTYPE_BYTES[r.adapter_dtype],
            DTYPE_BYTES[r.compute_dtype], r.autocast is not None, r.runner)


def _card_groups(cards: Sequence[GPUSpec], recipe: Recipe, precision: str | None, attn: str,
                 framework: str = "hf"):
    """Cards grouped by what their precision regime costs in memory; each card's regime; errors per card.

    Returns ``(groups, precs, errors)``: ``groups`` maps a regime evaluated to card indices,
    ``precs`` a card index to the regime it runs (the stack's default -- bf16-mixed for hf --
    or fp16-mixed without bf16). One ``framework`` per matrix, so the key needs no stack.
    """
    groups: dict[tuple, tuple[str, list[int]]] = {}
    precs: dict[int, str] = {}
    errors: dict[int, str] = {}
    for i, card in enumerate(cards):
        try:
            prec = check_card(precision, recipe.method.name, recipe.adapter.value, attn, card, framework)
        except CardUnsupportedError as exc:  # the card cannot run it: the cells say why (a bad name raises)
            errors[i] = str(exc)
            continue
        precs[i] = get_regime(prec or DEFAULT_REGIME).name
        groups.setdefault(_memory_key(precs[i]), (precs[i], []))[1].append(i)
    return {prec: idx for prec, idx in groups.values()}, precs, errors


def _tensor_peaks(spec: ModelSpec, recipe: Recipe, precision: str, ladder, seqs: np.ndarray, batches: np.ndarray,
                  req: "MatrixRequest | GridRequest") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tensor peaks and their chain terms, one step_memory call per setting.

    ``req``: the rank, targets, attention, stack, techniques and method options of every cell
    (``framework`` and ``techniques`` already validated).

    Returns ``(tensor_peak, activation_bytes, paged_bytes, loaded_bytes)``, each of shape (len(ladder),
    len(seqs), len(batches)), in whole bytes as :func:`vramplan.plan.estimate_config` rounds
    them (each component and the peak rounded up; :func:`vramplan.overheads.rounded_terms`).
    """
    shape = (len(ladder), len(seqs), len(batches))
    peak, act, paged, loaded = np.empty(shape), np.empty(shape), np.empty(shape), np.empty(shape)
    # PPO generates seq // 2 response tokens at each sequence length (make_config's default, as estimate
    # runs it). make_config fixes the response of one length; left open (None), the analytic model takes
    # seq / 2 of each, the same for even lengths: odd ones are evaluated one at a time.
    rollout = recipe.behaviour.generates
    parts = ([(slice(i, i + 1), seqs[i:i + 1]) for i in range(len(seqs))]
             if rollout and bool((np.asarray(seqs) % 2).any()) else [(slice(None), seqs)])
    for k, (gc, opt) in enumerate(ladder):
        for at, sq in parts:
            cfg = make_config(spec, recipe.method.name, adapter=recipe.adapter.value, seq=int(sq[0]), grad_ckpt=gc,
                              optimizer=opt, precision=precision,
                              **req.pick("rank", "targets", "attn", "framework", "techniques", "method_options"))
            if rollout and len(sq) > 1:
                cfg = cfg.with_(**recipe.behaviour.reset_shape())
            mem = step_memory(spec, cfg, batch=batches[None, :], seq=sq[:, None])
            peak[k, at], act[k, at], paged[k, at], loaded[k, at] = rounded_terms(mem, cfg.optimizer)
    return peak, act, paged, loaded


@dataclass
class PeakGrid:
    """Device-total peaks (bytes, float) of a full grid; NaN where a card cannot run the method.

    ``peaks`` has shape (models, methods, settings, gpus, seqs, batches); ``codes`` the
    verdict codes (0 comfortable, 1 tight, 2 no) of the same shape.
    """

    models: list[str]
    methods: list[str]
    settings: list[tuple[bool, str]]
    gpus: list[str]
    seqs: list[int]
    batches: list[int]
    peaks: np.ndarray
    codes: np.ndarray

    @property
    def configurations(self) -> int:
        return int(self.peaks.size)


def peak_grid(models: Any = "all", methods: Any = None, gpus: Any = None, seqs: Any = None, batches: Any = None,
              **settings: Any) -> PeakGrid:
    """Every configuration of a grid at once: models x methods x settings x cards x seqs x batches.

    Takes a :class:`~vramplan.request.GridRequest` (or its fields: ``models``, ``methods``,
    ``gpus``, ``seqs``, ``batches`` positionally, the rest as keywords). ``settings`` defaults to
    each method's own default (one setting: no gradient checkpointing except QLoRA, AdamW); pass
    :data:`SETTINGS_LADDER` for all six. ``framework``, ``techniques`` (training stack,
    memory-saving techniques) and ``method_options`` apply to every cell.
    """
    req = call_request(GridRequest, models, "models",
                       _given(methods=methods, gpus=gpus, seqs=seqs, batches=batches) | settings)
    framework, techniques = _stack_args(req.framework, req.techniques)
    req = req.with_(framework=framework, techniques=techniques)
    specs, recipes, cards = select_models(req.models), select_methods(req.methods), select_gpus(req.gpus)
    s = np.asarray(_seqs(req.seqs), dtype=np.int64)
    n_cells = len(s) * len(cards) * len(specs) * len(recipes)
    if n_cells > MAX_CELLS:
        raise VramplanError(f"the matrix would have {n_cells:,} cells ({len(specs)} models x {len(recipes)} methods x "
                            f"{len(cards)} GPUs x {len(s)} sequence lengths); the limit is {MAX_CELLS:,}",
                            "narrow --models, --methods, --gpus or --seq, or run it in parts")
    b = np.asarray(sorted({int(x) for x in req.batches}), dtype=np.int64)
    if b.size == 0 or b.min() <= 0:
        raise VramplanError("batches must be positive integers")
    cap = np.array([c.memory_bytes for c in cards], dtype=np.float64)
    over = _Overheads(cards)
    ladder = list(req.settings) if req.settings else [(None, "adamw")]
    peaks = np.full((len(specs), len(recipes), len(ladder), len(cards), len(s), len(b)), np.nan)
    for i, spec in enumerate(specs):
        for j, recipe in enumerate(recipes):
            groups, _precs, _errors = _card_groups(cards, recipe, req.precision, req.attn, framework)
            for prec, idx in groups.items():
                terms = _tensor_peaks(spec, recipe, prec, ladder, s, b, req)
                for chain in over.chains(idx, recipe.name):
                    peaks[i, j][:, chain.members] = chain.total(*terms)[:, None]
    from .bands import band_for, method_key

    bands = [band_for(framework, method_key(r.method.name, r.adapter.value)) for r in recipes]
    his = np.array([b.hi for b in bands])
    los = np.array([b.lo for b in bands])
    codes = np.where(np.isnan(peaks), 2, classify_array(np.nan_to_num(peaks, nan=np.inf), cap[:, None, None],
                                                         his[None, :, None, None, None, None],
                                                         los[None, :, None, None, None, None])).astype(np.int8)
    return PeakGrid([m.name for m in specs], [r.name for r in recipes],
                    [(bool(gc) if gc is not None else None, o) for gc, o in ladder], [c.name for c in cards],
                    [int(x) for x in s], [int(x) for x in b], peaks, codes)


def _band(framework: str, recipe) -> tuple[float, float]:
    """``(lo, hi)`` of the published band of ``recipe`` on ``framework`` (:mod:`vramplan.bands`)."""
    from .bands import band_for, method_key

    b = band_for(framework, method_key(recipe.method.name, recipe.adapter.value))
    return b.lo, b.hi


def _given(**positional: Any) -> dict[str, Any]:
    """The positional arguments a caller gave (None: left to the request's default)."""
    return {k: v for k, v in positional.items() if v is not None}


def _stack_args(framework: str, techniques) -> tuple[str, tuple[str, ...]]:
    """Validate ``framework`` and ``techniques`` once (unknown names: a did-you-mean error)."""
    from .stacks import get_stack, parse_techniques

    return get_stack(framework).name, parse_techniques(techniques)


# -- the matrix ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One model x method x card x sequence length.

    ``peak_bytes`` is the predicted device total at micro-batch ``batch`` with the chosen
    settings (None when the card cannot run the method at all, see ``note``);
    ``max_batch`` the largest micro-batch (<= 1024) that fits with those settings.
    """

    model: str
    method: str
    gpu: str
    seq: int
    batch: int
    verdict: Verdict
    peak_bytes: int | None
    tensor_peak_bytes: int | None
    capacity_bytes: int
    max_batch: int
    grad_ckpt: bool | None
    optimizer: str | None
    precision: str | None
    note: str = ""

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / GIB

    @property
    def peak_fraction(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / self.capacity_bytes

    @property
    def settings_label(self) -> str:
        """Short form of the memory savers the cell needs: ``GC`` and an optimiser other than the default
        (its optimizers.toml ``title``: ``8-bit AdamW``, ``paged 8-bit AdamW``)."""
        parts = []
        if self.grad_ckpt:
            parts.append("GC")
        opt = None if self.optimizer is None else get_optimizer(self.optimizer)
        if opt is not None and opt.name != DEFAULT_OPTIMIZER:
            parts.append(opt.title)
        return " + ".join(parts)

    def to_json(self) -> dict:
        return {"model": self.model, "method": self.method, "gpu": self.gpu, "seq": self.seq, "batch": self.batch,
                "verdict": self.verdict.value, "peak_bytes": self.peak_bytes,
                "peak_gib": None if self.peak_gib is None else round(self.peak_gib, 3),
                "tensor_peak_bytes": self.tensor_peak_bytes, "capacity_bytes": self.capacity_bytes,
                "max_batch": self.max_batch, "grad_ckpt": self.grad_ckpt, "optimizer": self.optimizer,
                "precision": self.precision, "note": self.note}


@dataclass
class FeasibilityMatrix:
    """Cells of every (model, method, card, seq), with what they assume."""

    models: list[str]
    methods: list[str]
    gpus: list[GPUSpec]
    seqs: list[int]
    batch: int
    cells: list[Cell]
    assumptions: list[str] = field(default_factory=list)
    thresholds: str = THRESHOLDS_TEXT
    framework: str = "hf"                 # the training stack every cell assumes (vramplan/data/stacks.toml)
    techniques: tuple[str, ...] = ()      # memory-saving techniques every cell uses

    @property
    def stack_text(self) -> str:
        """``hf (transformers + PEFT ...)`` plus the techniques: what the tables say they assume."""
        from .stacks import get_stack

        text = f"{self.framework} — {get_stack(self.framework).summary}"
        return text + (f", techniques {', '.join(self.techniques)}" if self.techniques else "")

    def __post_init__(self):
        self._index = {(c.model, c.method, c.gpu, c.seq): c for c in self.cells}

    def cell(self, model: str, method: str, gpu: str, seq: int | None = None) -> Cell:
        """Look a cell up by catalogue names (aliases accepted for model and card)."""
        m = model if model in self.models else get_model(model).name
        g = gpu if gpu in self._gpu_names else get_gpu(gpu).name
        meth = method if method in self.methods else resolve(*(method.split("+", 1) + [None])[:2]).name
        try:
            return self._index[(m, meth, g, seq if seq is not None else self.seqs[0])]
        except KeyError:
            raise VramplanError(f"the matrix has no cell {m} / {meth} / {g} / seq {seq}") from None

    @property
    def _gpu_names(self) -> list[str]:
        return [g.name for g in self.gpus]

    def to_json(self) -> dict:
        return {"models": self.models, "methods": self.methods,
                "gpus": [{"name": g.name, "display_name": g.display_name, "memory_bytes": g.memory_bytes}
                         for g in self.gpus],
                "seqs": self.seqs, "batch": self.batch, "thresholds": self.thresholds,
                "framework": self.framework, "techniques": list(self.techniques),
                "comfortable_fraction": COMFORTABLE_FRACTION, "assumptions": self.assumptions,
                "cells": [c.to_json() for c in self.cells]}


def _assumptions(req: MatrixRequest, ladder) -> list[str]:
    """What every cell of a feasibility matrix assumes, one line each."""
    from .stacks import get_stack

    framework, techniques, precision, attn, rank, targets, batch = (
        req.framework, req.techniques, req.precision, req.attn, req.rank, req.targets, req.batch)

    default_prec = get_stack(framework).default_precision
    return [
        f"stack: {stack_text(framework)}" + (f"; techniques: {', '.join(techniques)}" if techniques else ""),
        f"precision: {precision or default_prec + ' (fp16-mixed on cards without bf16)'}; attention {attn}; "
        f"LoRA/DoRA rank {rank}, targets {targets or 'PEFT defaults for the model type'}",
        f"peak: predicted device total (what nvidia-smi shows) at micro-batch {batch}, steady-state step",
        "settings tried in this order, first comfortable kept, else first that fits the card, else the least "
        "memory (tight when the card's limit is inside its band: may fit): "
        + "; ".join(f"{'GC' if gc else 'no GC'} + {opt}" for gc, opt in ladder),
        "largest micro-batch: with the chosen settings, searched up to 1024",
        "runtime overheads: the card's calibration profile if one ships, else defaults "
        "(CUDA context from published PyTorch OOM messages on the card where they exist, "
        "vramplan/data/cuda_memory.json, else 512 MiB; cuBLAS workspaces; the allocator reserve "
        f"{DEFAULT_RESERVE_FRACTION:.0%} of the step's allocations; paged optimizer states outside it)",
    ]


def feasibility_matrix(models: Any = "all", methods: Any = None, gpus: Any = None, seqs: Any = None, *,
                       progress=None, **settings: Any) -> FeasibilityMatrix:
    """Verdict, peak and largest micro-batch of every model x method x card x sequence length.

    Takes a :class:`~vramplan.request.MatrixRequest` (``feasibility_matrix(MatrixRequest(gpus="t4"))``)
    or its fields (``models``, ``methods``, ``gpus``, ``seqs`` positionally, the rest as keywords):

    * models: ``"all"`` or a comma list / list of names, aliases (``7b``), HF ids, config paths.
    * methods: ``"all"`` or names, ``method+adapter`` for DPO/PPO (``dpo+qlora``).
    * gpus: ``"all"`` or card names/aliases, or capacities such as ``24GiB``.
    * seqs: tokens per sequence, one or several (default 2048).
    * batch: micro-batch at which the verdict and the peak are given (examples).
    * ladder: the settings tried, in preference order (default :data:`SETTINGS_LADDER`).
    * framework: training stack of every cell (hf, torchtune, unsloth, litgpt); its default
      precision applies when ``precision`` is None. techniques: memory-saving techniques
      every cell uses (``"chunked_ce,act_offload"`` or a list).
    * method_options: the methods' own options (``{"num_generations": 4}``), each applied to the
      methods that declare it.

    ``progress``: ``(done, total, item)`` called after each model x method (the CLI's progress bar).

    Returns:
        :class:`FeasibilityMatrix`; cells are in (seq, card, model, method) order.

    Raises:
        VramplanError: a keyword that is not a MatrixRequest field, unknown names (models, cards, methods,
            framework, techniques), non-positive shapes, an impossible rank.
    """
    req = call_request(MatrixRequest, models, "models", _given(methods=methods, gpus=gpus, seqs=seqs) | settings)
    framework, techniques = _stack_args(req.framework, req.techniques)
    req = req.with_(framework=framework, techniques=techniques)
    ladder = tuple(req.ladder) if req.ladder is not None else SETTINGS_LADDER
    batch, precision, attn = req.batch, req.precision, req.attn
    specs, recipes, cards = select_models(req.models), select_methods(req.methods), select_gpus(req.gpus)
    s = np.asarray(_seqs(req.seqs), dtype=np.int64)
    n_cells = len(s) * len(cards) * len(specs) * len(recipes)
    if n_cells > MAX_CELLS:
        raise VramplanError(f"the matrix would have {n_cells:,} cells ({len(specs)} models x {len(recipes)} methods x "
                            f"{len(cards)} GPUs x {len(s)} sequence lengths); the limit is {MAX_CELLS:,}",
                            "narrow --models, --methods, --gpus or --seq, or run it in parts")
    cap = np.array([c.memory_bytes for c in cards], dtype=np.float64)
    over = _Overheads(cards)
    cells: dict[tuple, Cell] = {}
    done, todo = 0, len(specs) * len(recipes)
    for spec in specs:
        for recipe in recipes:
            done += 1
            if progress is not None:
                progress(done - 1, todo, f"{spec.name} {recipe.name}")
            groups, precs, errors = _card_groups(cards, recipe, precision, attn, framework)
            for gi, msg in errors.items():
                for sq in s:
                    cells[(int(sq), gi, spec.name, recipe.name)] = Cell(
                        spec.name, recipe.name, cards[gi].name, int(sq), batch, Verdict.NO, None, None,
                        cards[gi].memory_bytes, 0, None, None, None, note=msg)
            for prec, idx in groups.items():
                # every setting at the requested micro-batch: (L, S) each
                t1, a1, p1, l1 = (x[..., 0] for x in _tensor_peaks(spec, recipe, prec, ladder, s, np.array([batch]),
                                                                   req))
                wide: dict[int, tuple] = {}  # setting -> its terms over micro-batches 1..1024, (S, NB) each
                si = np.arange(len(s))[None, :]
                for chain in over.chains(idx, recipe.name):
                    ix = chain.members
                    total = chain.total(t1, a1, p1, l1)                                     # (L, S)
                    # 1. pick a setting per card and seq
                    band_lo, band_hi = _band(framework, recipe)
                    choice = pick(np.broadcast_to(total[:, None, :], (len(ladder), len(ix), len(s))),
                                  cap[ix][:, None], band_hi, band_lo)                            # (G, S)
                    # 2. the largest micro-batch of each chosen setting: device totals over 1..1024; a batch
                    #    counts only if every smaller one fits (limits.fitting_prefix, as fit's max_batch)
                    max_b = np.zeros(choice.shape, dtype=np.int64)
                    for k in np.unique(choice):
                        if k not in wide:
                            wide[k] = tuple(x[0] for x in _tensor_peaks(spec, recipe, prec, [ladder[k]], s, BATCH_GRID,
                                                                         req))
                        counts = fitting_prefix(chain.total(*wide[k])[None, :, :], cap[ix][:, None])  # (G, S)
                        max_b = np.where(choice == k, counts, max_b)
                    peak = total[choice, si]                                              # (G, S)
                    tensor = chain.tensors(t1, a1)[choice, si]                            # (G, S)
                    codes = classify_array(peak, cap[ix][:, None], band_hi, band_lo)
                    for a, g in enumerate(ix):
                        for b_, sq in enumerate(s):
                            gc, opt = ladder[int(choice[a, b_])]
                            cells[(int(sq), int(g), spec.name, recipe.name)] = Cell(
                                spec.name, recipe.name, cards[g].name, int(sq), batch, VERDICTS[int(codes[a, b_])],
                                int(np.ceil(peak[a, b_])), int(np.ceil(tensor[a, b_])), cards[g].memory_bytes,
                                int(max_b[a, b_]), bool(gc), opt, precs[int(g)])
    if progress is not None:
        progress(todo, todo, "")
    mpos = {m.name: i for i, m in enumerate(specs)}
    rpos = {r.name: i for i, r in enumerate(recipes)}
    ordered = [cells[k] for k in sorted(cells, key=lambda k: (k[0], k[1], mpos[k[2]], rpos[k[3]]))]
    assumptions = _assumptions(req, ladder)
    return FeasibilityMatrix([m.name for m in specs], [r.name for r in recipes], list(cards), [int(x) for x in s],
                             batch, ordered, assumptions, framework=framework, techniques=techniques)


# -- writers ------------------------------------------------------------------------------

def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.1f} GiB"


def cell_text(c: Cell) -> str:
    """The short text of a cell in tables: ``~ tight · 9.4 GiB · b≤1 · GC + 8-bit AdamW`` (symbols: :data:`vramplan.verdict.SYMBOLS`)."""
    if c.peak_bytes is None:
        return f"{SYMBOLS[Verdict.NO]} no · n/a ({c.note})"
    parts = [f"{SYMBOLS[c.verdict]} {label(c.verdict, c.peak_bytes, c.capacity_bytes)}", _gib(c.peak_bytes)]
    if c.verdict.fits:
        if c.max_batch:
            parts.append(f"b≤{c.max_batch}")
        else:  # tight over the card: inside the band's lower end
            over = 100 * (c.peak_fraction - 1)
            parts.append(("<0.1" if over < 0.05 else f"{over:.1f}") + "% over, the band's lower end under the card")
        if c.settings_label:
            parts.append(c.settings_label)
    return " · ".join(parts)


def _card_title(g: GPUSpec, seq: int) -> str:
    return f"{g.display_name} ({g.memory_bytes / GIB:.2f} GiB) · seq {seq}"


def write_markdown(mx: FeasibilityMatrix, out: TextIO, *, title: str | None = "Feasibility matrix") -> None:
    """One table per card and sequence length: rows models, columns methods."""
    if title:
        out.write(f"# {title}\n\n")
    out.write(f"Stack: {mx.stack_text}.\n\n")
    out.write(f"Verdicts: {mx.thresholds}.\n\n")
    out.write("Each cell: verdict · predicted peak at micro-batch "
              f"{mx.batch} · largest micro-batch that fits (b≤N) · memory savers needed "
              "(GC = gradient checkpointing). Generated by `vramplan matrix`.\n\n")
    for seq in mx.seqs:
        for g in mx.gpus:
            out.write(f"## {_card_title(g, seq)}\n\n")
            out.write("| model | " + " | ".join(mx.methods) + " |\n")
            out.write("|---|" + "---|" * len(mx.methods) + "\n")
            for m in mx.models:
                row = [cell_text(mx._index[(m, meth, g.name, seq)]) for meth in mx.methods]
                out.write(f"| {m} | " + " | ".join(row) + " |\n")
            out.write("\n")
    out.write("Assumptions:\n\n" + "".join(f"* {a}\n" for a in mx.assumptions))


def to_frame(mx: FeasibilityMatrix):
    """The cells as a pandas DataFrame (one row per cell)."""
    import pandas as pd

    rows = []
    disp = {g.name: g.display_name for g in mx.gpus}
    for c in mx.cells:
        rows.append({"model": c.model, "method": c.method, "gpu": c.gpu, "gpu_name": disp[c.gpu],
                     "capacity_gib": round(c.capacity_bytes / GIB, 3), "seq": c.seq, "batch": c.batch,
                     "verdict": c.verdict.value, "peak_gib": None if c.peak_gib is None else round(c.peak_gib, 3),
                     "peak_bytes": c.peak_bytes, "peak_pct_of_capacity":
                         None if c.peak_fraction is None else round(100 * c.peak_fraction, 1),
                     "max_batch": c.max_batch, "grad_ckpt": c.grad_ckpt, "optimizer": c.optimizer,
                     "precision": c.precision, "framework": mx.framework, "techniques": "+".join(mx.techniques),
                     "note": c.note})
    return pd.DataFrame(rows)


def write_csv(mx: FeasibilityMatrix, out: TextIO) -> None:
    """Long format: one row per cell, bytes and GiB."""
    to_frame(mx).to_csv(out, index=False)


_COLOURS = {Verdict.COMFORTABLE: "#2e9d4f", Verdict.TIGHT: "#f0a020", Verdict.NO: "#c8382e"}
_TINTS = {Verdict.COMFORTABLE: "#d6f0dc", Verdict.TIGHT: "#fde9c4", Verdict.NO: "#f6d2cf"}


def write_html(mx: FeasibilityMatrix, out: TextIO, *, title: str = "vramplan feasibility matrix") -> None:
    """A single self-contained page (inline CSS, no scripts or external files)."""
    e = _html.escape
    css = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:0 0 2em}"
           "th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:center}th{background:#f4f4f4}"
           "td.m{text-align:left;font-weight:600}small{color:#555}.lg span{display:inline-block;padding:2px 8px;"
           "margin-right:6px;border-radius:3px}")
    out.write(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
              f"<style>{css}</style></head><body>\n<h1>{e(title)}</h1>\n")
    out.write("<p class=\"lg\">" + "".join(f"<span style=\"background:{_TINTS[v]}\">{v.value}</span>" for v in VERDICTS)
              + f"</p>\n<p><small>Stack: {e(mx.stack_text)}.<br>{e(mx.thresholds)}. "
                f"Cell: predicted peak at micro-batch {mx.batch}; "
                "b&le;N: largest micro-batch that fits; GC: gradient checkpointing.</small></p>\n")
    for seq in mx.seqs:
        for g in mx.gpus:
            out.write(f"<h2>{e(_card_title(g, seq))}</h2>\n<table><tr><th>model</th>"
                      + "".join(f"<th>{e(m)}</th>" for m in mx.methods) + "</tr>\n")
            for m in mx.models:
                out.write(f"<tr><td class=\"m\">{e(m)}</td>")
                for meth in mx.methods:
                    c = mx._index[(m, meth, g.name, seq)]
                    if c.peak_bytes is None:
                        body = f"<b>no</b><br><small>{e(c.note)}</small>"
                    else:
                        body = f"<b>{c.verdict.value}</b><br>{_gib(c.peak_bytes)}"
                        if c.verdict.fits:
                            body += ("<br><small>" + (f"b&le;{c.max_batch}" if c.max_batch else "over, may fit") + (
                                f" · {e(c.settings_label)}" if c.settings_label else "") + "</small>")
                    tip = (f"{c.model} {c.method} on {g.display_name}, seq {seq}: "
                           f"{'' if c.peak_fraction is None else f'{100 * c.peak_fraction:.0f}% of capacity; '}"
                           f"optimizer {c.optimizer}, GC {'on' if c.grad_ckpt else 'off'}")
                    out.write(f"<td style=\"background:{_TINTS[c.verdict]}\" title=\"{e(tip)}\">{body}</td>")
                out.write("</tr>\n")
            out.write("</table>\n")
    out.write("<h3>Assumptions</h3><ul>" + "".join(f"<li>{e(a)}</li>" for a in mx.assumptions) + "</ul>\n")
    out.write("<p><small>Generated by <code>vramplan matrix</code>.</small></p></body></html>\n")


#: A PNG holds at most this many (card, sequence) panels; larger matrices get one figure per card.
MAX_PANELS_PER_PNG = 6


def png_paths(mx: FeasibilityMatrix, path: str | Path) -> list[tuple[Path, list]]:
    """Where ``--format png`` writes: ``(file, cards)`` per figure.

    One figure (``path``) while it holds at most :data:`MAX_PANELS_PER_PNG` panels (cards x
    sequence lengths); otherwise one per card, ``<stem>-<card>.png`` beside ``path``, each a
    readable heat map of every model x method at every sequence length (a single figure of the
    whole catalogue was 2409 x 24312 px).
    """
    path = Path(path)
    if len(mx.gpus) * len(mx.seqs) <= MAX_PANELS_PER_PNG:
        return [(path, list(mx.gpus))]
    return [(path.with_name(f"{path.stem}-{g.name}{path.suffix}"), [g]) for g in mx.gpus]


def write_png(mx: FeasibilityMatrix, path: str | Path, *, dpi: int = 110, progress=None) -> list[Path]:
    """Heat maps per card and sequence length: colour = verdict, text = peak GiB and largest batch.

    Writes the files :func:`png_paths` names (one, or one per card) and returns them;
    ``progress(done, total, file)`` after each.
    """
    require("matplotlib", "plot")
    figures = png_paths(mx, path)
    workers = min(len(figures), os.cpu_count() or 1, 4)
    if workers > 1:
        # one figure per card: draw them in parallel processes (matplotlib's Agg is single-threaded)
        from concurrent.futures import ProcessPoolExecutor, as_completed

        try:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futs = [pool.submit(_write_png_figure, mx, p, cards, dpi=dpi) for p, cards in figures]
                for k, f in enumerate(as_completed(futs), 1):
                    f.result()
                    if progress is not None:
                        progress(k, len(figures), "")
            return [p for p, _ in figures]
        except (OSError, ImportError, RuntimeError):  # no process pool here (sandbox, frozen app): draw in turn
            pass
    out = []
    for k, (p, cards) in enumerate(figures, 1):
        _write_png_figure(mx, p, cards, dpi=dpi)
        out.append(p)
        if progress is not None:
            progress(k, len(figures), p.name)
    return out


def _write_png_figure(mx: FeasibilityMatrix, path: Path, cards: list, *, dpi: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    panels = [(seq, g) for seq in mx.seqs for g in cards]
    ncol = min(2 if len(cards) > 1 else 3, len(panels))
    nrow = -(-len(panels) // ncol)
    w = 1.25 * len(mx.methods) + 2.2
    h = 0.42 * len(mx.models) + 1.4
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, h * nrow + 0.8), squeeze=False)
    cmap = ListedColormap([_COLOURS[v] for v in VERDICTS])
    for ax, (seq, g) in zip(axes.flat, panels):
        grid = np.zeros((len(mx.models), len(mx.methods)))
        for i, m in enumerate(mx.models):
            for j, meth in enumerate(mx.methods):
                c = mx._index[(m, meth, g.name, seq)]
                grid[i, j] = c.verdict.code
                text = "n/a" if c.peak_bytes is None else f"{c.peak_bytes / GIB:.1f}"
                if c.verdict.fits:
                    text += f"\nb≤{c.max_batch}" if c.max_batch else "\nmay fit"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white")
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto")
        ax.set_xticks(range(len(mx.methods)), mx.methods, fontsize=8)
        ax.set_yticks(range(len(mx.models)), mx.models, fontsize=8)
        ax.xaxis.tick_top()
        ax.set_title(_card_title(g, seq), fontsize=9, pad=18)
        ax.set_xticks(np.arange(-0.5, len(mx.methods)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(mx.models)), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    foot = 0.9 / (h * nrow + 0.8)  # figure fraction for the legend and the note, ~0.9 inch
    fig.legend(handles=[Patch(color=_COLOURS[v], label=v.value) for v in VERDICTS], loc="lower center", ncol=3,
               frameon=False, fontsize=9, bbox_to_anchor=(0.5, foot * 0.4))
    fig.text(0.5, foot * 0.12, f"cell: predicted peak GiB at micro-batch {mx.batch}; b≤N: largest micro-batch that "
             f"fits. comfortable: peak ≤ {COMFORTABLE_FRACTION:.0%} of memory; tight: ≤ 100%; no: above",
             ha="center", fontsize=8, color="#444")
    # fixed margins in inches (the labels' room) instead of tight_layout, which draws the figure once more
    W, H = w * ncol, h * nrow + 0.8
    fig.subplots_adjust(left=2.0 / W, right=1 - 0.2 / W, top=1 - 1.0 / H, bottom=1.1 / H,
                        wspace=2.2 / max(w - 2.2, 0.1), hspace=1.4 / max(h - 1.4, 0.1))
    try:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    from .validate import atomic_write

    atomic_write(path, buf.getvalue(), what="plot")  # atomic; a failed write: one line, no temp file left


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    fs = _split(formats) if isinstance(formats, str) else list(formats)
    bad = [f for f in fs if f not in FORMATS]
    if bad:
        from .errors import unknown

        raise unknown("format", bad[0], FORMATS)
    if not fs:
        raise VramplanError("no output format", f"choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(fs))


def write_reports(mx: FeasibilityMatrix, out_dir: str | Path, formats="md,csv,html,png",
                  name: str = "feasibility", *, preamble: str | None = None, progress=None) -> list[Path]:
    """Write ``<out_dir>/<name>.<ext>`` for each format; return the paths written.

    ``png`` may be several files (:func:`png_paths`); ``progress(done, total, file)`` follows them.

    ``preamble`` (markdown) is inserted into the .md file after its title (for a written
    comparison); the tables follow.
    """
    from .validate import atomic_write, file_stem

    fs = parse_formats(formats)
    name = file_stem(name, "--name")  # output names cannot leave out_dir
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VramplanError(f"cannot create {out}: {exc.strerror or exc}") from None
    paths = []
    for f in fs:
        p = out / f"{name}.{f}"
        if f == "png":
            paths += write_png(mx, p, progress=progress)
            continue
        else:
            buf = io.StringIO()
            if f == "md":
                buf.write("# Feasibility matrix\n\n")
                if preamble:
                    buf.write(preamble.rstrip() + "\n\n")
                write_markdown(mx, buf, title=None)
            elif f == "csv":
                write_csv(mx, buf)
            else:
                write_html(mx, buf)
            atomic_write(p, buf.getvalue(), what="report")
        paths.append(p)
    return paths

"""Limits of one configuration on a card: device totals over grids, the largest micro-batch, the longest sequence.

The planner's second layer (:mod:`vramplan.planner`): above the estimate's chain, below the
search. One implementation of each limit, used by ``fit`` (``max_batch``/``max_seq``), the
trainer callback, the published-accuracy scorer and, through :data:`BATCH_GRID`, the matrix
(which evaluates the same grid for many cards at once; ``tests/test_matrix.py`` holds the two equal).

Semantics (:func:`fitting_prefix`, the one definition): a limit is the largest grid value such that
it *and every smaller one* has a per-GPU device total (tensors + CUDA context + cuBLAS workspace +
allocator reserve, as :func:`vramplan.planner.estimating.estimate_config` computes it) at or below
``usable`` bytes -- the card's capacity unless a margin is given. What ``fit`` tells the user is band-aware
(:func:`band_limits`): the comfortable limit (the verdict's margin and band's upper end) and the tight one
(the band's lower end under the card: may fit). The monotone envelope errs on the
safe side where the model's total is not monotone in the batch or sequence (allocator rounding).
Bytes are float64 arrays of whole bytes; numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import TrainConfig, fields_but
from ..gpus import GPUSpec
from ..memory import StepMemory, model_state, resident_floor, step_memory, step_terms
from ..models import ModelSpec
from ..optimizers import get_optimizer
from ..overheads import (ACTIVATION_COMPONENTS, LOADED_COMPONENTS, card_profile, device_terms, device_total,
                         peak_terms, runtime_overheads, step_device_total)
from ..taxonomy import RESIDENT_COMPONENTS, Component
from .estimating import DEVICE_CHAIN_READS

if TYPE_CHECKING:
    from ..distributed import Parallel

# ``par=None`` is one GPU (vramplan.distributed.SINGLE); the sharded model loads only for a distributed
# layout, so that ``import vramplan`` does not import it

#: Micro-batches searched for the largest that fits (``fit``'s ``max_batch``, the matrix's cells).
BATCH_GRID = np.arange(1, 1025)
#: Sequence lengths of a longest-sequence search, multiples of 128 (:func:`longest_sequence` goes to the
#: model's context, which may be longer than this grid's 128 Ki tokens).
SEQ_GRID = np.arange(128, 131072 + 1, 128)


class DeviceTotals:
    """Per-GPU device totals (tensor peak -> nvidia-smi total) of step memories, as ``estimate`` computes them.

    :mod:`vramplan.overheads`' chain on arrays (:func:`~vramplan.overheads.step_device_total`:
    the activation factor, paged optimiser states outside the allocator's reserve, the card's
    profile), plus NCCL's buffers on several GPUs as
    :func:`vramplan.planner.estimating.estimate_config` adds them. Each card's profile is looked
    up once per instance (a search keeps one for all its candidates).
    """

    def __init__(self):
        self._profiles: dict[str, object] = {}
        self._factors: dict[tuple, float] = {}
        #: activation terms of the configurations evaluated so far (vramplan.memory's step_memory_rows
        #: cache): one instance serves one planning call, so nothing outlives it
        self.terms: dict = {}
        #: floors computed so far (:meth:`floor`: equal arguments, equal floor), for the same planning call
        self._floors: dict[tuple, tuple] = {}
        #: what their chains read (:meth:`_floor_parts`), likewise
        self._parts: dict[tuple, tuple] = {}
        #: whether flash ties sdpa (memory.ties_stand_in) per (model, configuration but optimiser and attention)
        self.ties: dict[tuple, bool] = {}
        #: the least rollout KV cache over a micro-batch grid (:meth:`_least_kv`), for the same planning call
        self._kvs: dict[tuple, tuple] = {}

    def __call__(self, mem: StepMemory, cfg: TrainConfig, card: GPUSpec, par: Parallel | None = None) -> np.ndarray:
        """Device totals (float64 bytes) of ``mem`` (arrays over batch/seq) for ``cfg`` on ``card`` under ``par``."""
        if card.name not in self._profiles:
            self._profiles[card.name] = card_profile(card)
        total = step_device_total(mem, cfg, card, profile=self._profiles[card.name])
        if par is not None and par.distributed:
            from ..distributed import NCCL_BYTES

            return total + NCCL_BYTES
        return total + 0

    def rows(self, mem: StepMemory, states: list, cfgs: list[TrainConfig], card: GPUSpec) -> np.ndarray:
        """One-GPU device totals (float64 bytes) of a :func:`vramplan.memory.step_memory_rows` result, row by row.

        The chain of :meth:`__call__` on every row at once (rows grouped by the recipe and stack
        whose figures apply); each row equals ``self(step_memory(spec, cfg), cfg, card)``. ``mem`` needs only the
        components :meth:`reads` names for ``cfgs``.

        When no row's optimiser is paged the paged bytes are the scalar 0.0 (every element of the chain's
        ``tensors - paged`` is then what it is less an array of zeros), and with one group of rows the chain's
        result (of the peak's shape) is returned as it is rather than copied into a new array: the same values,
        shape and dtype (tests/test_rows11_speed.py).
        """
        if card.name not in self._profiles:
            self._profiles[card.name] = card_profile(card)
        prof = self._profiles[card.name]
        peak, act, _ = np.ceil(mem.peak), *peak_terms({c: np.ceil(v) for c, v in mem.components.items()
                                                         if c in ACTIVATION_COMPONENTS}, "adamw")
        shape = (len(cfgs),) + (1,) * (peak.ndim - 1)
        # a search's rows repeat a few optimisers, states and recipes: each worked out once (by identity: every
        # object is held by ``cfgs``/``states`` while this runs)
        pages: dict[str, bool] = {}
        flags = [pages[c.optimizer] if c.optimizer in pages else
                 pages.setdefault(c.optimizer, get_optimizer(c.optimizer).paged) for c in cfgs]
        paged = (np.where(np.array(flags).reshape(shape), np.ceil(mem.components.get(Component.OPTIMIZER_STATES, 0)),
                          0.0) if any(flags) else 0.0)
        sums: dict[int, int] = {}
        loaded = np.array([sums[id(st)] if id(st) in sums else
                           sums.setdefault(id(st), sum(st.bytes.get(c, 0) for c in LOADED_COMPONENTS)) for st in states],
                          dtype=np.float64).reshape(shape)
        load_reserved = np.array([st.load_reserved for st in states], dtype=np.float64).reshape(shape)
        groups = _recipe_groups(cfgs)
        if len(groups) == 1:  # every row in order: the chain on the whole arrays
            (method, stack), = groups
            total = device_total(peak, card, method=method, activation_bytes=act, paged_bytes=paged, profile=prof,
                                 stack=stack, loaded_bytes=(loaded, load_reserved))
            # (of the peak's shape, as the chain's element-wise result is; else filled to it, as float64)
            return total if total.shape == peak.shape else np.array(np.broadcast_to(total, peak.shape), np.float64)
        act, paged = np.broadcast_to(act, peak.shape), np.broadcast_to(paged, peak.shape)
        out = np.empty(peak.shape)
        for (method, stack), idx in groups.items():
            ix = np.array(idx, dtype=np.intp)
            out[ix] = device_total(peak[ix], card, method=method, activation_bytes=act[ix], paged_bytes=paged[ix],
                                   profile=prof, stack=stack, loaded_bytes=(loaded[ix], load_reserved[ix]))
        return out

    @staticmethod
    def reads(cfgs: list[TrainConfig]) -> frozenset:
        """The components :meth:`rows` reads of a step memory of ``cfgs`` (``combine_phases``' ``components=``): the
        activation group, and the optimiser states only when some configuration's optimiser is paged (the chain
        reads them as paged bytes, 0 for the others)."""
        if any(get_optimizer(o).paged for o in {c.optimizer for c in cfgs}):
            return DEVICE_CHAIN_READS
        return _ACTIVATION_READS

    def floor(self, spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, any_optimizer: bool = False,
              batch: np.ndarray | None = None) -> float | None:
        """A lower bound (bytes) on the one-GPU device total of ``cfg`` at every micro-batch and sequence.

        The chain (:func:`vramplan.overheads.device_total`) of :func:`vramplan.memory.resident_floor`
        with no activations and every optimiser state paged (for a paged optimiser): the device total
        never decreases with the tensor peak and never increases with the paged bytes, so no
        micro-batch or sequence length of ``cfg`` comes out below it. ``any_optimizer``: the floor
        without the optimiser's states and temporaries and nothing paged -- the paged bytes never
        exceed the states, so the bytes in the allocator stay at least this -- a bound for ``cfg``
        under every optimiser. None where the card's calibrated activation factor for the recipe
        is below 1 (the chain then shrinks the peak's activations, and this bound would not hold).
        Kept per instance: a fit asks for the same floors from several places (other_setups' bound, its
        setups' candidates).

        ``batch``: a bound only over these micro-batches (an int array) at ``cfg.seq``, which for a recipe that
        generates (``Behaviour.generates``) also holds the rollout phase -- the resident bytes, the optimiser's
        states (not with ``any_optimizer``) and the KV cache, whose least over the grid is :meth:`_least_kv`
        (the rollout's other bytes, ``StepTerms.rollout_logits``, are never negative): a step's peak is its
        largest phase (:func:`vramplan.phases.combine_phases`), so no micro-batch of the grid comes out below it.
        """
        return _kept_per_identity(self._floors, self._floor, spec, cfg, card, any_optimizer, batch)

    def _least_kv(self, spec: ModelSpec, cfg: TrainConfig, batch: np.ndarray) -> float:
        """The least rollout KV cache (bytes, :class:`~vramplan.phases.StepTerms`' ``kv``) of ``cfg`` over the
        micro-batches ``batch`` at ``cfg.seq``: :func:`vramplan.memory.step_terms`' own, worked out once per
        configuration but its checkpointing, optimiser, attention, rank and targets, none of which the KV cache
        reads (the generated sequences' keys and values: tests/test_setups_speed.py holds it equal over them)."""
        key = (id(spec), fields_but(cfg, "grad_ckpt", "optimizer", "attn", "rank", "alpha", "targets"),
               _grid_of(batch))
        kept = self._kvs.get(key)
        if kept is None or kept[0] is not spec:
            kept = (spec, float(np.min(step_terms(spec, cfg, batch=batch).kv)))
            self._kvs[key] = kept
        return kept[1]

    def _factor(self, cfg: TrainConfig, card: GPUSpec) -> float:
        """The card's activation factor for ``cfg``'s recipe and stack (:func:`vramplan.overheads.runtime_overheads`),
        its profile looked up once."""
        if card.name not in self._profiles:
            self._profiles[card.name] = card_profile(card)
        method, stack = cfg.recipe.name, cfg.framework
        if (card.name, method, stack) not in self._factors:
            self._factors[(card.name, method, stack)] = runtime_overheads(
                0, card, method=method, profile=self._profiles[card.name], stack=stack).activation_factor
        return self._factors[(card.name, method, stack)]

    def at_least(self, cfg: TrainConfig, card: GPUSpec, tensors: float) -> float | None:
        """A lower bound (bytes) on the device total, on one GPU or per GPU of any layout, of a step of ``cfg`` on
        ``card`` whose tensor peak is at least ``tensors`` bytes: the CUDA context, the cuBLAS workspace and those
        tensors. The chain (:func:`vramplan.overheads.device_total`) reserves at least what is allocated (the
        default reserve adds to it, a profile's allocator model takes the larger of it and its fit), counts paged
        bytes beside the reserve, and an activation factor of at least 1 only adds to the tensors; NCCL's buffers
        of a layout come on top. None where the factor is below 1 (the chain then shrinks the activation group).
        """
        if self._factor(cfg, card) < 1.0:
            return None
        d = device_terms(0, card, method=cfg.recipe.name, profile=self._profiles[card.name], stack=cfg.framework)
        # with no tensors: allocated = the workspace, device = the context + reserved
        return float(d["device"] - d["reserved"] + d["allocated"]) + float(tensors)

    def floor_tensors(self, spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, any_optimizer: bool = False,
                      batch: np.ndarray | None = None) -> int | None:
        """The tensor bytes :meth:`floor` puts through the device chain (None where it is None): a lower bound of the
        floor itself -- the chain adds the context, the workspace and the reserve to them and takes nothing away
        (no activations for the factor to scale; paged bytes stay beside the reserve: :meth:`at_least`'s reasoning)
        -- for a caller that only asks whether the floor is over a limit (settled without the chain when these are).
        Kept per instance, with what the floor's chain reads, as :meth:`floor` keeps the floors."""
        parts = self._floor_parts(spec, cfg, card, any_optimizer, batch)
        return None if parts is None else parts[0]

    def _floor_parts(self, spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, any_optimizer: bool,
                     batch: np.ndarray | None = None) -> tuple | None:
        """``(tensors, paged, loaded)`` of :meth:`floor`'s chain (None where the floor is None), kept as :meth:`floor`
        keeps the floors (keyed on the spec's and card's identity, each kept beside its value)."""
        return _kept_per_identity(self._parts, self._new_parts, spec, cfg, card, any_optimizer, batch)

    def _new_parts(self, spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, any_optimizer: bool,
                   batch: np.ndarray | None = None) -> tuple | None:
        """:meth:`_floor_parts`, computed."""
        if self._factor(cfg, card) < 1.0:
            return None
        st = model_state(spec, cfg)
        paged = st.bytes.get(Component.OPTIMIZER_STATES, 0) if get_optimizer(cfg.optimizer).paged else 0
        loaded = sum(st.bytes.get(c, 0) for c in LOADED_COMPONENTS)
        tensors = resident_floor(spec, cfg, st, optimizer=not any_optimizer)
        if batch is not None and cfg.recipe.behaviour.generates:  # the rollout phase (floor's docstring)
            static = sum(st.bytes.get(c, 0) for c in RESIDENT_COMPONENTS)
            states = 0 if any_optimizer else st.bytes.get(Component.OPTIMIZER_STATES, 0)
            tensors = max(tensors, int(static + states + self._least_kv(spec, cfg, batch)))
        return tensors, paged, loaded

    def _floor(self, spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, any_optimizer: bool,
               batch: np.ndarray | None = None) -> float | None:
        """:meth:`floor`, computed: the device chain of :meth:`_floor_parts`."""
        parts = self._floor_parts(spec, cfg, card, any_optimizer, batch)
        if parts is None:
            return None
        tensors, paged, loaded = parts
        return float(device_total(tensors, card, method=cfg.recipe.name, activation_bytes=0,
                                  paged_bytes=0 if any_optimizer else paged, profile=self._profiles[card.name],
                                  stack=cfg.framework, loaded_bytes=loaded))


#: :meth:`DeviceTotals.reads` where no optimiser is paged: the activation group only.
_ACTIVATION_READS = frozenset(ACTIVATION_COMPONENTS)


def _recipe_groups(cfgs: list[TrainConfig]) -> dict[tuple, list[int]]:
    """The rows of ``cfgs`` by (recipe name, stack), in order of first appearance: the figures of the device chain
    that apply to them (each recipe's name read once, by identity)."""
    groups: dict[tuple, list[int]] = {}
    names: dict[int, str] = {}
    for i, c in enumerate(cfgs):
        r = c.recipe
        name = names[id(r)] if id(r) in names else names.setdefault(id(r), r.name)
        groups.setdefault((name, c.framework), []).append(i)
    return groups


def _kept_per_identity(store: dict, compute, spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, any_optimizer: bool,
                       batch: np.ndarray | None):
    """``compute(spec, cfg, card, any_optimizer, batch)`` kept in ``store`` (:meth:`DeviceTotals.floor` and its parts):
    keyed on the identity of the spec and the card (their field-by-field hashes cost more than the look-up saves),
    each kept beside its value, so a kept object's identity is not reused while it is kept."""
    key = (id(spec), id(card), cfg, any_optimizer, None if batch is None else _grid_of(batch))
    kept = store.get(key)
    if kept is None or kept[0] is not spec or kept[1] is not card:
        kept = store[key] = (spec, card, compute(spec, cfg, card, any_optimizer, batch))
    return kept[2]


def _grid_of(batch) -> tuple:
    """A hashable key of a micro-batch grid (equal grids, equal keys)."""
    a = np.asarray(batch)
    return (a.dtype.str, a.shape, a.tobytes())


def step_memory_for(spec: ModelSpec, cfg: TrainConfig, par: Parallel | None = None, batch=None, seq=None,
                    components: "bool | frozenset" = True) -> StepMemory:
    """Per-GPU tensor bytes of ``cfg`` under ``par`` (arrays over batch/seq), with the components at the peak.

    ``components``: a set works out only those components (:data:`DEVICE_CHAIN_READS` for a device total)."""
    if par is not None and par.distributed:
        from ..distributed import parallel_step_memory

        return parallel_step_memory(spec, cfg, par, batch=batch, seq=seq, components=components)
    return step_memory(spec, cfg, batch=batch, seq=seq, components=components)


def device_totals(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec | None, batch=None, seq=None,
                  par: Parallel | None = None, totals: DeviceTotals | None = None) -> np.ndarray:
    """Vectorised per-GPU device-total peak (float64 bytes) of ``cfg`` over ``batch``/``seq`` arrays.

    The same chain as :func:`~vramplan.planner.estimating.estimate_config`
    (:func:`vramplan.overheads.device_total`): activation factor, paged optimiser states outside
    the reserve, the profile's allocator; NCCL's buffers on several GPUs.
    """
    mem = step_memory_for(spec, cfg, par, batch, seq, components=DEVICE_CHAIN_READS)
    if card is None:
        return step_device_total(mem, cfg, card)
    return (totals or DeviceTotals())(mem, cfg, card, par)


def fitting_prefix(totals, usable) -> np.ndarray:
    """How many leading grid points fit: the count of ``totals`` (bytes, grid on the last axis) whose
    running maximum stays at or below ``usable`` (broadcast against ``totals`` without its last axis).

    The limit of an ascending grid ``g`` is ``g[count - 1]``, or 0 when the count is 0.
    """
    envelope = np.maximum.accumulate(np.asarray(totals, dtype=np.float64), axis=-1)
    return (envelope <= np.asarray(usable)[..., None]).sum(axis=-1)


def _limit(grid: np.ndarray, totals, usable) -> int:
    n = int(fitting_prefix(totals, usable))
    return int(grid[n - 1]) if n else 0


def _batch_curve(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, par: Parallel | None, totals) -> tuple:
    grid = BATCH_GRID[BATCH_GRID >= cfg.recipe.behaviour.min_batch()]  # KTO: TRL refuses micro-batch 1
    return grid, device_totals(spec, cfg, card, batch=grid, par=par, totals=totals)


def _seq_curve(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, par: Parallel | None, totals) -> tuple:
    grid = np.arange(128, max(128, spec.max_position_embeddings) + 1, 128)  # SEQ_GRID's steps, to the context
    grid = grid[grid >= cfg.recipe.behaviour.min_seq()]
    b = cfg.recipe.behaviour.min_batch()
    c = cfg.with_(batch=b, **cfg.recipe.behaviour.reset_shape())
    return grid, device_totals(spec, c, card, batch=b, seq=grid, par=par, totals=totals)


def largest_micro_batch(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, par: Parallel | None = None,
                        usable: int | None = None, totals: DeviceTotals | None = None) -> int:
    """Largest micro-batch (<= 1024, :data:`BATCH_GRID`) of ``cfg`` at ``cfg.seq`` below ``usable`` bytes per GPU
    (default the capacity); 0 if none."""
    grid, tot = _batch_curve(spec, cfg, card, par, totals)
    return _limit(grid, tot, usable or card.memory_bytes)


def largest_batch(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec) -> int:
    """Largest micro-batch (<= 1024) that fits ``card`` at ``cfg.seq`` on one GPU; 0 if none
    (:func:`largest_micro_batch` without a margin: the raw limit, the central peak at the card). What ``fit`` and
    the callback's advice suggest is :func:`band_limits`' ``max_batch`` (the verdict's comfortable limit)."""
    return largest_micro_batch(spec, cfg, card)


def longest_sequence(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, par: Parallel | None = None,
                     usable: int | None = None, totals: DeviceTotals | None = None) -> int:
    """Longest sequence (multiple of 128, <= the model's context) of ``cfg`` at micro-batch 1 (the method's
    smallest, :meth:`~vramplan.methods.base.Behaviour.min_batch`); 0 if none."""
    grid, tot = _seq_curve(spec, cfg, card, par, totals)
    return _limit(grid, tot, usable or card.memory_bytes)


def verdict_limits(grid, totals, capacity: int, band_hi: float = 0.0, band_lo: float = 0.0,
                   margin: float | None = None) -> tuple[int, int]:
    """``(comfortable, tight)``: the largest values of an ascending ``grid`` whose device ``totals`` (bytes, and
    every smaller one's) the verdict (:mod:`vramplan.verdict`) calls comfortable -- under
    :func:`~vramplan.verdict.comfortable_limit` (the margin and the band's upper end) -- and not "no" (the band's
    lower end under the card: may fit); 0 where none is."""
    from ..verdict import comfortable_limit

    lo = min(0.0, float(band_lo))
    return (_limit(grid, totals, comfortable_limit(capacity, band_hi, margin)),
            _limit(grid, totals, capacity / (1.0 + max(lo, -0.99))))


@dataclass(frozen=True)
class Limits:
    """A configuration's largest micro-batch (at its sequence) and longest sequence (at micro-batch 1) on a card,
    as the verdict words them: ``max_batch`` / ``max_seq`` comfortable, ``*_tight`` the largest that may fit
    (tight: the card inside the prediction's band). 0: none."""

    max_batch: int
    max_seq: int
    max_batch_tight: int
    max_seq_tight: int


def band_limits(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, par: Parallel | None = None,
                totals: DeviceTotals | None = None, margin: float | None = None, searched: tuple | None = None) -> Limits:
    """:class:`Limits` of ``cfg`` on ``card`` with its stack and method's band (:func:`vramplan.bands.band_for_config`)
    and ``margin`` (default the verdict's 15%): ``fit``'s ``max_batch`` / ``max_seq``.

    ``searched``: ``(micro-batches, accumulation steps, device totals)`` the search already worked out for ``cfg``
    on ``card`` at other micro-batches (a plan's row, ``Plan._totals``): when their prefix shared with the batch
    grid settles both batch limits (:func:`_settled_prefix`) the grid is not worked out again."""
    from ..bands import band_for_config
    from ..verdict import comfortable_limit

    b = band_for_config(cfg, multi=par is not None and par.distributed)
    capacity = card.memory_bytes
    top = max(comfortable_limit(capacity, b.hi, margin), capacity / (1.0 + max(min(0.0, float(b.lo)), -0.99)))
    curve = _settled_prefix(cfg, par, searched, top) or _batch_curve(spec, cfg, card, par, totals)
    cb, tb = verdict_limits(*curve, capacity, b.hi, b.lo, margin)
    cs, ts = verdict_limits(*_seq_curve(spec, cfg, card, par, totals), capacity, b.hi, b.lo, margin)
    return Limits(cb, cs, tb, ts)


def _settled_prefix(cfg: TrainConfig, par: Parallel | None, searched: tuple | None, top: float) -> tuple | None:
    """``(grid, totals)``: the leading micro-batches of :func:`_batch_curve`'s grid whose device totals a search
    already has (``searched``: its micro-batches, accumulation steps and totals for ``cfg`` at another micro-batch,
    on one GPU), when their running maximum already exceeds ``top`` (the larger of :func:`verdict_limits`' two
    limits): every later grid point is over both limits too, so :func:`fitting_prefix` counts the same on the prefix
    as on the whole grid. None (work the grid out) on several GPUs, at another accumulation than ``cfg``'s (the
    search's grid to a global batch), or when the prefix does not settle it.

    The search's totals of a micro-batch are the batch curve's (one GPU: :meth:`DeviceTotals.rows` equals the chain
    row by row, and the activation terms are the grid's element by element; tests/test_reuse10_speed.py)."""
    if searched is None or (par is not None and par.distributed):
        return None
    b_grid, a_grid, row = searched
    if np.any(np.asarray(a_grid) != cfg.grad_accum):
        return None
    grid = BATCH_GRID[BATCH_GRID >= cfg.recipe.behaviour.min_batch()]
    n = min(len(grid), len(b_grid))
    same = np.asarray(b_grid[:n]) == grid[:n]
    k = n if same.all() else int(np.argmin(same))  # the shared prefix
    if k == 0 or not float(np.max(row[:k])) > top:
        return None
    return grid[:k], np.asarray(row[:k], dtype=np.float64)

"""The settings search behind ``vramplan fit`` (layer 3 of :mod:`vramplan.planner`): the fastest configuration that fits with a margin.

For one method on one card (or N cards with a strategy) the search tries every combination
of the settings a user controls -- gradient checkpointing, optimiser (AdamW, then 8-bit or
paged 8-bit AdamW as a fallback), attention implementation, LoRA rank and targets, the
LoRA-to-QLoRA fallback, and the sharding strategy on several GPUs -- and, for each, every
micro-batch at once, on one vectorised grid as the matrix evaluates its cells: on one GPU,
:func:`vramplan.memory.step_memory_rows` evaluates the phases of every candidate in one call
(rows x micro-batches; the activation terms once per configuration but its optimiser) and
:meth:`~vramplan.planner.limits.DeviceTotals.rows` their device totals in one chain;
``step_time`` broadcasts over the micro-batches of each configuration. With a target global
batch ``G`` the micro-batch ``b`` runs ``G / (N b)`` accumulation steps; without one,
accumulation is 1. A plan fits when its per-GPU device total stays below
``min(capacity x (1 - margin), capacity / (1 + hi))`` (:func:`vramplan.verdict.comfortable_limit`;
``hi``: the upper end of the stack and method's published band, :mod:`vramplan.bands`); the margin
(default :data:`vramplan.verdict.DEFAULT_MARGIN`, 15%) and the band make a recommended plan
"comfortable", as the verdict says.

Feasible plans are ranked by tokens/s (ties: simpler settings first), except that a fallback
(LoRA's QLoRA) ranks after every plan of the method's own adapter that fits: it is what the
method becomes when that adapter does not fit, not a faster variant. Each plan carries the
reason it loses to the best; a plan that fits the card but not the margin, or whose prediction
exceeds the card by less than its band's lower end, is "tight", never "does not fit". When
nothing fits, :func:`what_would_fit` says what would: the smallest catalogue card, a number of
GPUs with ZeRO-3/FSDP (or CPU offload), a shorter sequence, and :func:`other_setups` which other
stack or precision would. It needs one plan of each setup, not the ranking: it evaluates (on the
arrays, :func:`_setup_best`) only the candidates whose lower bound (:meth:`DeviceTotals.floor`: the
batch-independent phases through the device chain; :func:`least_total` is the least of them) leaves
them a chance, and builds one plan, the one the search would rank first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..attention import searched_kernels
from ..config import TrainConfig, check_rank, fields_but, make_config, resolve_targets
from ..distributed import (SHARDED_PARAMS, SINGLE, STRATEGIES, Parallel, accumulation_step_memory, deepspeed_cast,
                           make_parallel, parallel_step_memory, shard_state)
from ..errors import CardUnsupportedError, VramplanError
from ..gpus import GPUSpec, catalogue
from ..memory import StepMemory, fill_step_terms, model_state, step_memory_rows_shared, step_terms, ties_stand_in
from ..phases import filled
from ..methods import Adapter, resolve
from ..models import ModelSpec
from ..optimizers import get_optimizer, searched_optimizers, update_cost
from ..overheads import card_profile
from ..request import DEFAULT_ATTENTION, SearchRequest
from ..throughput import StepTime, StepTimeInputs, step_time_rows, time_to_train
from ..taxonomy import RESIDENT_COMPONENTS, Component
from ..units import GIB
from ..verdict import DEFAULT_MARGIN, Verdict, classify, comfortable_limit
from .checks import check_card
from .estimating import engine_starts, step_capacity
from .limits import DEVICE_CHAIN_READS, DeviceTotals, step_memory_for

OPTIMIZERS = searched_optimizers()  # optimizers.toml `searched`, in its order
RANKS = (8, 16, 64)
#: Micro-batches searched without a target global batch: every one to 32, then coarser to 256
#: (the fastest plan is the largest micro-batch that fits; the coarse steps cost < 12% of it).
MICRO_BATCHES = np.array(list(range(1, 33)) + [40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256])
GPU_COUNTS = (2, 4, 8, 16, 32, 64, 128, 256)



@dataclass
class Plan:
    """One candidate configuration with its per-GPU memory, speed and rank among the others."""

    method: str
    adapter: str
    config: TrainConfig
    parallel: Parallel
    peak_bytes: int          # per GPU, device total
    capacity_bytes: int      # per GPU
    usable_bytes: int        # the comfortable limit: min(capacity x (1 - margin), capacity / (1 + band hi))
    fits: bool               # peak_bytes <= usable_bytes (comfortable)
    tokens_per_s: float      # all GPUs
    step_time_s: float       # one optimiser step
    time_to_train_s: float | None = None
    gpu_hours: float | None = None
    fallback: str | None = None
    rank: int = 0
    reason: str = ""
    band: tuple[float, float] = (0.0, 0.0)  # (lo, hi) of the stack and method (vramplan.bands)
    _grid: tuple[StepTime, int] | None = field(default=None, repr=False, compare=False)  # (over the batch grid, index)
    #: (micro-batches, accumulation steps, device totals over them): the search's row this plan was picked from
    #: (:func:`vramplan.planner.limits.band_limits` reads its prefix instead of working it out again)
    _totals: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def recipe(self) -> str:
        return self.config.recipe.name

    @property
    def verdict(self) -> Verdict:
        """comfortable / tight / no on the card, with the band (:func:`vramplan.verdict.classify`)."""
        return classify(self.peak_bytes, self.capacity_bytes, self.band[1], self.band[0])

    @property
    def time(self) -> StepTime | None:
        """The step-time breakdown of this plan (:class:`vramplan.throughput.StepTime`)."""
        if self._grid is None:
            return None
        t, i = self._grid
        return t.at(i)

    @property
    def global_batch(self) -> int:
        return self.config.batch * self.config.grad_accum * self.parallel.gpus

    @property
    def settings(self) -> dict:
        c = self.config
        s = {"batch": c.batch, "grad_accum": c.grad_accum, "global_batch": self.global_batch, "grad_ckpt": c.grad_ckpt,
             "optimizer": c.optimizer, "attn": c.attn, "precision": c.precision, "adapter": c.adapter}
        if c.recipe.adapter.low_rank:
            s.update(rank=c.rank, targets=list(c.targets))
        s.update(gpus=self.parallel.gpus, strategy=self.parallel.strategy, offload=self.parallel.offload)
        return s

    def summary(self) -> str:
        """Short settings text for tables: ``b4 x ga2, GC off, adamw, sdpa``."""
        c = self.config
        parts = [f"b{c.batch}" + (f"×ga{c.grad_accum}" if c.grad_accum > 1 else ""),
                 f"GC {'on' if c.grad_ckpt else 'off'}", c.optimizer, c.attn]
        if c.recipe.adapter.low_rank:
            parts.append(f"r{c.rank} {'all-linear' if len(c.targets) > 2 else ','.join(c.targets)}")
        if self.fallback:
            parts.insert(0, c.adapter)
        if self.parallel.distributed:
            parts.append(self.parallel.label)
        return ", ".join(parts)

    def to_json(self) -> dict:
        out = {"rank": self.rank, "method": self.method, "adapter": self.adapter, "recipe": self.recipe,
               "settings": self.settings, "fits": self.fits, "verdict": self.verdict.value,
               "peak_bytes": int(self.peak_bytes),
               "peak_gib": round(self.peak_bytes / GIB, 3), "capacity_bytes": int(self.capacity_bytes),
               "usable_bytes": int(self.usable_bytes), "fallback": self.fallback, "reason": self.reason,
               "tokens_per_s": round(float(self.tokens_per_s), 1), "step_time_s": round(float(self.step_time_s), 6),
               "time_to_train_s": None if self.time_to_train_s is None else round(self.time_to_train_s, 1),
               "gpu_hours": None if self.gpu_hours is None else round(self.gpu_hours, 3)}
        if self._grid is not None:
            t, i = self._grid
            out["throughput"] = t.json_at(i)  # self.time.to_json()
        return out


@dataclass
class Suggestion:
    """A change that would make a method fit: ``kind`` is ``gpu``, ``gpus``, ``offload`` or ``seq``."""

    kind: str
    text: str
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": self.kind, "text": self.text, **self.detail}


@dataclass
class MethodPlans:
    """The ranked plans of one method: ``best`` is None when nothing fits (then ``suggestions``)."""

    method: str
    plans: list[Plan]
    best: Plan | None
    smallest: Plan           # the least memory of all candidates (what is shown when nothing fits)
    suggestions: list[Suggestion] = field(default_factory=list)
    left_out: tuple[str, ...] = ()  # recipes whose colocated engine cannot start on the card (search._engines_start)

    def to_json(self, top: int | None = None) -> dict:
        plans = self.plans if top is None else self.plans[:top]
        return {"method": self.method, "best": None if self.best is None else self.best.to_json(),
                "plans": [p.to_json() for p in plans], "considered": len(self.plans),
                "suggestions": [s.to_json() for s in self.suggestions]}



# -- the search ------------------------------------------------------------------------------

def _batch_grid(global_batch: int | None, gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """(micro-batches, accumulation steps) to try."""
    if global_batch is None:
        return MICRO_BATCHES, np.ones_like(MICRO_BATCHES)
    if global_batch % gpus:
        raise VramplanError(f"--global-batch {global_batch} is not a multiple of --gpus {gpus}",
                            f"use a multiple of {gpus}")
    per = global_batch // gpus
    b = np.array([d for d in range(1, min(per, 1024) + 1) if per % d == 0])
    return b, per // b


def adapters_for(method: str, adapter: str | None) -> list[tuple[str, str | None, str | None]]:
    """(method, adapter, fallback note) to search: the method's adapter, then its fallback."""
    rec = resolve(method, adapter)
    out = [(rec.method.name, adapter, None)]
    if adapter is not None:
        return out
    four = rec.adapter.four_bit  # the same adapter over an NF4 base (LoRA -> QLoRA, DoRA -> QDoRA, IA³ -> 4-bit IA³)
    if four is None:
        return out
    if rec.method.name == rec.adapter.value:  # an adapter's own method (lora, dora, ia3): its 4-bit method
        out.append((four.value, None, f"{four.label} fallback"))
    elif four in rec.method.adapters:  # a method taking an adapter choice (dpo+lora -> dpo+qlora)
        out.append((rec.method.name, four.value, f"{four.label} fallback"))
    return out


def fallback_note(mp: "MethodPlans", shown: "Plan | None" = None) -> str | None:
    """Why the plan shown of ``mp`` (its best, or ``shown``: a tight one) is its fallback (QLoRA), from the
    plans of the method's own adapter.

    Says what is true of them: none fits even without the margin (the least memory, against the
    capacity), or the best fits only without the margin ("tight"). None when the plan is not a
    fallback.
    """
    best = mp.best or shown
    if best is None or best.fallback is None:
        return None
    own = [p for p in mp.plans if p.fallback is None]
    if not own and mp.left_out:
        return (f"{best.fallback}: the colocated engine's 16-bit weights ({', '.join(mp.left_out)}) do not load in "
                "its share of the card")
    if not own:
        return best.fallback
    what = f"{own[0].adapter} over a 16-bit base"
    least = min(own, key=lambda p: p.peak_bytes)
    if least.peak_bytes > least.capacity_bytes:
        return (f"{best.fallback}: {what} does not fit (least {least.peak_bytes / GIB:.2f} GiB > "
                f"{least.capacity_bytes / GIB:.2f} GiB)")
    return (f"{best.fallback}: {what} fits only without the {1 - least.usable_bytes / least.capacity_bytes:.0%} "
            f"margin (least {least.peak_bytes / GIB:.2f} GiB > {least.usable_bytes / GIB:.2f} GiB usable)")


def _combos(spec: ModelSpec, method: str, adapter: str | None, card: GPUSpec, fixed: dict,
            strategies: list[Parallel]):
    """Every settings combination of one method: yields (method, adapter, fallback, settings, parallel)."""
    gcs, opts, attn = _searched(card, fixed)
    for m, ad, note in adapters_for(method, adapter):
        shapes = _shapes(m, ad, fixed)
        for gc, opt, at, (r, tg), par in itertools.product(gcs, opts, attn, shapes, strategies):
            yield m, ad, note, dict(grad_ckpt=gc, optimizer=opt, attn=at, rank=r, targets=tg), par


def _grid_for(global_batch: int | None, batch: int | None, par: Parallel,
              least: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(micro-batches, accumulation steps) of ``par``: :func:`_batch_grid` from the method's smallest micro-batch
    ``least`` (KTO: 2, TRL refuses 1), or its one ``batch`` (a micro-batch asked for is planned as given: the
    plan's assumptions warn)."""
    b_grid, a_grid = _batch_grid(global_batch, par.gpus)
    if batch is None:
        low = b_grid >= least
        return b_grid[low], a_grid[low]
    keep = b_grid == batch
    if not keep.any():
        raise VramplanError(f"--global-batch {global_batch} is not a multiple of --gpus x --batch "
                            f"({par.gpus} x {batch})", f"use a multiple of {par.gpus * batch}")
    return b_grid[keep], a_grid[keep]


def _candidates(spec: ModelSpec, method: str, card: GPUSpec, req: SearchRequest,
                fixed: dict | None = None, keep=None) -> list[tuple[TrainConfig, str | None]]:
    """The distinct configurations (micro-batch 1) of :func:`_combos`, each with its fallback note.

    ``fixed``: the settings held fixed (default: those ``req`` fixes). ``keep``: ``(base, optimiser) -> bool``,
    whether to list the candidates of a (recipe, rank, targets) configuration ``base`` with that optimiser (asked
    once per distinct pair; the others are left out without being built).

    Raises:
        VramplanError: a rank or targets the caller fixed is invalid for the model (a searched
            rank larger than a small model's layer is skipped instead).
    """
    out: list[tuple[TrainConfig, str | None]] = []
    seen: set = set()
    built: dict[tuple, TrainConfig | None] = {}
    # a base's fields but the three each candidate sets -> one number: two candidates are equal exactly when
    # their bases' numbers and those three settings are (without hashing every candidate)
    bases: dict[tuple, int] = {}
    names: dict[str, str] = {}  # optimiser as given -> its catalogue name
    fixed = req.fixed if fixed is None else fixed
    common = req.pick("seq", "precision", "ppo_response", "framework", "techniques", "method_options")
    gcs, opts, attns = _searched(card, fixed)
    kept: dict[tuple[int, str], bool] = {}  # (base number, optimiser) -> keep's answer
    for m, ad, note in adapters_for(method, req.adapter):
        # gradient checkpointing, the optimiser and the attention only enter make_config as validated
        # values: one make_config per (recipe, rank, targets), in _combos' order (rank, then targets, innermost),
        # the candidates that configuration with them set
        shapes = []  # (base, its number) of each (rank, targets), in _combos' order; None: skipped
        for rank, targets in _shapes(m, ad, fixed):
            settings = dict(grad_ckpt=gcs[0], optimizer=opts[0], attn=attns[0], rank=rank, targets=targets)
            shape = (m, ad, rank, repr(targets))
            if shape not in built:
                try:
                    built[shape] = _config_of(spec, m, ad, common, settings, built)
                except VramplanError:
                    if fixed.get("rank") or fixed.get("targets"):
                        raise  # the user's own setting is invalid: say so
                    built[shape] = None  # a searched rank larger than a small model's layer
            base = built[shape]
            if base is not None:
                shapes.append((base, bases.setdefault(fields_but(base, "grad_ckpt", "optimizer", "attn"), len(bases))))
        if not shapes:
            continue  # nothing built: the optimisers are not looked up (make_config refused them, or the ranks)
        for gc in gcs:
            gc = bool(gc)
            for opt in opts:
                if opt not in names:
                    names[opt] = get_optimizer(opt).name
                opt = names[opt]
                for attn in attns:
                    for base, number in shapes:
                        if keep is not None:
                            if (number, opt) not in kept:
                                kept[number, opt] = bool(keep(base, opt))
                            if not kept[number, opt]:
                                continue
                        key = (number, gc, opt, attn)
                        if key in seen:
                            continue  # e.g. all-linear is already the model's default target set
                        seen.add(key)
                        out.append((base.with_(grad_ckpt=gc, optimizer=opt, attn=attn), note))
    return out


def _engines_start(spec: ModelSpec, card: GPUSpec, req: SearchRequest, cands: list,
                   strict: bool = False) -> tuple[list, tuple[str, ...]]:
    """``cands`` less those whose colocated engine cannot start (GRPO's vLLM: its weights do not load in its share
    of the whole card, ``req.whole_card_bytes`` or ``card``: :func:`~vramplan.planner.estimating.engine_starts`;
    they fit at no micro-batch, and the QLoRA fallback's 4-bit weights may), asked once per recipe, and the
    recipes left out; all of them when none can start (the row then says why: the estimate's unmet constraint),
    unless ``strict`` (what other setups list must fit: none of them)."""
    if not cands or not cands[0][0].recipe.behaviour.card_share(cands[0][0]):
        return cands, ()  # no engine beside the step (the candidates of one search share the method's options)
    whole = card if req.whole_card_bytes is None else replace(card, memory_bytes=req.whole_card_bytes)
    starts: dict[str, bool] = {}
    for cfg, _ in cands:
        if cfg.recipe.name not in starts:
            starts[cfg.recipe.name] = engine_starts(spec, cfg, whole)
    if all(starts.values()) or (not strict and not any(starts.values())):
        return cands, ()
    return [(cfg, note) for cfg, note in cands if starts[cfg.recipe.name]], tuple(r for r, ok in starts.items() if not ok)


def _searched(card: GPUSpec, fixed: dict) -> tuple[list, list, list]:
    """(checkpointing, optimisers, attentions) a search tries (:func:`_combos`'): a fixed setting, else every choice."""
    attn = [fixed["attn"]] if fixed.get("attn") else searched_kernels(card)
    gcs = [fixed["grad_ckpt"]] if fixed.get("grad_ckpt") is not None else [False, True]
    opts = [fixed["optimizer"]] if fixed.get("optimizer") else list(OPTIMIZERS)
    return gcs, opts, attn


def _shapes(m: str, ad: str | None, fixed: dict) -> list[tuple]:
    """(rank, targets) a search tries for recipe ``(m, ad)`` (:func:`_combos`'), in its order."""
    if resolve(m, ad).adapter.low_rank:
        ranks = [fixed["rank"]] if fixed.get("rank") else list(RANKS)
        targets = [fixed["targets"]] if fixed.get("targets") else [None, "all-linear"]
    else:
        ranks, targets = [fixed.get("rank") or 8], [fixed.get("targets")]
    return list(itertools.product(ranks, targets))


def _config_of(spec: ModelSpec, m: str, ad: str | None, common: dict, settings: dict, built: dict) -> TrainConfig:
    """``make_config`` of one (recipe, rank, targets) of :func:`_candidates`, its recipe, stack and regime resolved.

    The rank and the targets of a low-rank adapter enter make_config in three places: the rank and alpha (= rank,
    the search gives no alpha) fields, the targets resolved (:func:`~vramplan.config.resolve_targets`) and
    :func:`~vramplan.config.check_rank` of the rank against the adapted linears; no other field reads them. So a
    shape whose recipe was already built (``built``: at another rank, or other targets) is that configuration with
    its rank, alpha and targets set, once they are resolved and checked: the same fields as make_config's
    (tests/test_fit_speed.py), without resolving the names again.

    Raises:
        VramplanError: as make_config (a rank larger than an adapted linear, an invalid setting).
    """
    tg = repr(settings["targets"])
    same = other = None
    for (m2, ad2, _, tg2), c in built.items():
        if c is not None and m2 == m and ad2 == ad:
            if tg2 == tg:
                same = c
                break
            other = other or c
    if same is not None and same.recipe.adapter.low_rank:
        check_rank(spec, same.targets, settings["rank"])
        return same.with_(rank=settings["rank"], alpha=float(settings["rank"]))
    if same is None and other is not None and other.recipe.adapter.low_rank:
        targets = resolve_targets(spec, settings["targets"])
        check_rank(spec, targets, settings["rank"])
        return other.with_(rank=settings["rank"], alpha=float(settings["rank"]), targets=targets)
    cfg = make_config(spec, m, adapter=ad, batch=1, **common, **settings)
    _resolve_once(cfg)
    return cfg


def _resolve_once(cfg: TrainConfig) -> None:
    """Resolve ``cfg``'s recipe, stack and regime now, so that the configurations derived from it with
    :meth:`TrainConfig.with_` (checkpointing, optimiser, attention, micro-batch) carry them instead of each
    resolving its own (a regime that cannot be resolved is left to raise where it is read, as before)."""
    try:
        cfg.recipe, cfg.stack, cfg.regime  # noqa: B018 - cached on the (immutable) config
    except Exception:  # noqa: BLE001
        pass


def _shared_key(cfg: TrainConfig, tie: bool) -> tuple:
    """The key of the configuration whose tensors and time ``cfg`` shares: its fields, with flash as sdpa where
    they tie (``tie``: :func:`vramplan.memory.ties_stand_in`) and an optimiser as the one whose states it keeps
    (``OptimizerDef.same_states_as``: paged 8-bit AdamW as 8-bit AdamW)
    (:func:`~vramplan.config.fields_but` and the two: equal exactly when those configurations are).

    flash and sdpa run the same kernels (SDPA dispatches to FlashAttention-2) and save the same tensors unless
    SDPA gets a mask or a composite flash-attn does not (a padded batch, a sliding window shorter than the
    sequence, ...: then ``tie`` is False and each is evaluated); paged 8-bit AdamW keeps the same states as
    8-bit AdamW (on the GPU while they fit): each pair's tensors and time are evaluated once. Their device
    totals differ (paged states live outside the allocator's reserve): one per optimiser.
    (:func:`_shared_rows` builds the same keys, each candidate's fields looked up once.)
    """
    return (fields_but(cfg, "optimizer", "attn"),) + _stand_ins(cfg, tie)


def _stand_ins(cfg: TrainConfig, tie: bool) -> tuple[str, str]:
    """The last two parts of :func:`_shared_key`: ``cfg``'s attention and optimiser as the ones they share with."""
    return (cfg.attention.same_as if tie else None) or cfg.attn, get_optimizer(cfg.optimizer).same_states_as or cfg.optimizer


def _evaluate(spec: ModelSpec, cands: list, card: GPUSpec, parallels: list[Parallel], grids: dict, prof,
              totals: DeviceTotals) -> tuple[np.ndarray, dict]:
    """Device totals and step times of every candidate under every layout, over its batch grid.

    Returns ``(which, {parallel: (totals, times)})``: ``totals`` an array (candidates x micro-batches),
    ``times`` one :class:`StepTime` per shared configuration, candidate ``j``'s being ``times[which[j]]``.
    On one GPU every shared configuration's memory is evaluated in one vectorised call
    (:func:`vramplan.memory.step_memory_rows`) and the device totals of all candidates in one
    chain (:meth:`DeviceTotals.rows`); on several, one :func:`parallel_step_memory` per shared
    configuration (the activation terms shared across layouts).
    """
    reps, which = _shared_rows(spec, cands, totals.ties)  # shared key -> the first candidate with it (evaluated for all)
    states = {k: model_state(spec, r) for k, r in reps.items()}
    results: dict[Parallel, tuple] = {}
    terms: dict[tuple, dict] = {}
    for p in parallels:
        b_grid, a_grid = grids[p]
        sharded = {k: shard_state(spec, r, p, states[k]) for k, r in reps.items()} if p.distributed else {}
        times = step_time_rows(spec, list(reps.values()), card, batch=b_grid, grad_accum=a_grid, parallel=p,
                               inputs=[StepTimeInputs(profile=prof, state=states[k], sharded=sharded.get(k))
                                       for k in reps])
        if not p.distributed:
            results[p] = (_single_totals(spec, cands, card, reps, which, b_grid, a_grid, totals,
                                         [states[k] for k in reps]), times)
            continue
        # each shared configuration's activation terms once per grid (the ranks of a low-rank setting in one pass)
        tkeys = [(k, tuple(b_grid)) for k in reps]
        fill_step_terms(spec, list(reps.values()), tkeys, b_grid, None, terms)
        mems = []
        for (k, r), tkey in zip(reps.items(), tkeys):
            mems.append(accumulation_step_memory(spec, r, p, b_grid, a_grid, state=sharded[k], terms=terms[tkey],
                                                 components=DEVICE_CHAIN_READS))  # what the device totals read
        rows = [totals(mems[j], cfg, card, p) for j, (cfg, _) in zip(which, cands)]
        results[p] = (np.array([filled(r, np.shape(b_grid)) for r in rows]), times)
    return which, results


def _choices(total: np.ndarray, times: list[StepTime], which: np.ndarray, usable: list[int]) -> tuple:
    """Each candidate's chosen micro-batch under one layout, for every candidate at once.

    ``total``: device totals (candidates x micro-batches); ``times``: the shared configurations'
    step times (candidate ``j``'s is ``times[which[j]]``); ``usable``: each candidate's comfortable
    limit. The fastest micro-batch under the limit, else the least memory (the first such index,
    as ``np.argmax``/``np.argmin`` of each row). Returns ``(index, peak, fits, tokens/s, step s)``,
    each a list over the candidates (Python numbers, equal to the arrays' elements).
    """
    shape = total.shape[1:]

    def grid(values) -> np.ndarray:  # (shared configurations x micro-batches) -> (candidates x micro-batches)
        if all(type(v) is np.ndarray and v.shape == shape for v in values):  # already the grid's (step_time_rows')
            return np.array(values)[which]  # (filled(v, shape) would be a copy of each)
        return np.array([filled(v, shape) for v in values])[which]  # np.stack of np.broadcast_to's, faster
    tps, step = grid([t.tokens_per_s for t in times]), grid([t.step_s for t in times])
    ok = total <= np.asarray(usable, dtype=np.int64).reshape((-1,) + (1,) * len(shape))
    best = np.where(ok.any(axis=-1), np.argmax(np.where(ok, tps, -np.inf), axis=-1), np.argmin(total, axis=-1))
    at = (np.arange(total.shape[0]), best)
    return best.tolist(), total[at].tolist(), ok[at].tolist(), tps[at].tolist(), step[at].tolist()


def _shared_rows(spec: ModelSpec, cands: list, ties: dict) -> tuple[dict, np.ndarray]:
    """(shared key -> the first candidate with it, each candidate's row among them): :func:`_shared_key`, whether
    flash ties sdpa asked once per configuration but its optimiser and attention (kept in ``ties``, a planning
    call's :attr:`DeviceTotals.ties`).

    Each candidate's fields but its optimiser and attention are taken and looked up once: under them, the rows of
    their configurations by the key's other two parts (:func:`_stand_ins`); a new pair is a new key, that
    ``rest`` with the pair (the first part of every key under it), in the order of first appearance."""
    try:
        hash(spec)
    except TypeError:  # a spec built with list fields (from a log's JSON): nothing kept between calls
        ties = {}
    reps: dict[tuple, TrainConfig] = {}
    under: dict[tuple, list] = {}  # fields but optimiser and attention -> [whether flash ties sdpa, {pair: row}]
    which = []
    for cfg, _ in cands:
        rest = fields_but(cfg, "optimizer", "attn")
        got = under.get(rest)
        if got is None:
            got = under[rest] = [None, {}]
        if got[0] is None and cfg.attention.same_as is not None:
            base = (spec, rest)
            tie = ties.get(base)
            if tie is None:
                tie = ties[base] = ties_stand_in(spec, cfg)
            got[0] = tie
        pair = _stand_ins(cfg, bool(got[0]))
        j = got[1].get(pair)
        if j is None:
            j = got[1][pair] = len(reps)
            reps[(rest,) + pair] = cfg
        which.append(j)
    return reps, np.array(which, dtype=np.intp)


def _single_totals(spec: ModelSpec, cands: list, card: GPUSpec, reps: dict, which: np.ndarray, b_grid: np.ndarray,
                   a_grid: np.ndarray, totals: DeviceTotals, states: list | None = None) -> np.ndarray:
    """One-GPU device totals (bytes, candidates x micro-batches): one :func:`step_memory_rows` call over the
    shared configurations ``reps``, one :meth:`DeviceTotals.rows` chain over the candidates. ``states``: the model
    state of each of ``reps``, when the caller has them."""
    # only what the device chain reads (the peak, the activation group, the optimiser states if some are paged)
    read = totals.reads([cfg for cfg, _ in cands])
    mem, sts = step_memory_rows_shared(spec, list(reps.values()), batch=b_grid, grad_accum=a_grid, terms=totals.terms,
                                       components=read, states=states)
    mem = StepMemory(components={c: v[which] for c, v in mem.components.items() if c in read}, phases={},
                     peak=mem.peak[which], peak_phase=mem.peak_phase[which], state=None)
    return totals.rows(mem, [sts[j] for j in which], [cfg for cfg, _ in cands], card)


def _setup_best(spec: ModelSpec, method: str, card: GPUSpec, current_fits: bool,
                req: SearchRequest) -> tuple[Plan, str] | None:
    """The plan :func:`other_setups` lists for the setup :func:`search` would rank with ``req``, and its verdict.

    The search's best plan (``comfortable``) or, when none fits with the margin and ``current_fits`` is
    False, its fastest plan within the card (``tight``); None when it lists nothing. On one GPU this
    is :func:`_best_of` of the search, found on its arrays, for the candidates that can be listed
    (:func:`_listing_filter`: whose floor, :meth:`DeviceTotals.floor`, leaves them a chance; the others can
    neither fit the margin nor, when a tight plan counts, the card, so they are never the search's best or
    its fastest plan within the card; they are not even built): their device totals; when none of them can be listed, nothing more;
    else the step times of those that can win (:func:`_contenders`), their chosen micro-batches (:func:`_choices`),
    the winner by the search's own order
    (:func:`_winner`), and one :class:`Plan` built -- the winner's. Several GPUs or offload: the search itself.

    Raises:
        VramplanError: as :func:`search` (an invalid setting).
    """
    parallels = req.parallels or [SINGLE]
    par = parallels[0]
    if len(parallels) != 1 or par.distributed:
        return _best_of(search(spec, method, card, req), current_fits)
    totals = req.totals or DeviceTotals()
    grid = _grid_for(req.global_batch, req.batch, par, resolve(method, req.adapter).behaviour.min_batch())
    capacity = card.memory_bytes
    asked: list = []  # whether _candidates had a configuration to ask about
    can_list = _listing_filter(spec, card, req.margin, current_fits, totals, grid[0])
    cands = _candidates(spec, method, card, req, keep=lambda base, opt: asked.append(1) or can_list(base, opt))
    if not asked:  # no candidate at all
        return _best_of(search(spec, method, card, req), current_fits)
    cands, _ = _engines_start(spec, card, req, cands, strict=True)
    if not cands:  # none can be listed
        return None
    limits = _limits(cands, capacity, req.margin, False)
    usable = [u for _, u in limits]
    reps, which = _shared_rows(spec, cands, totals.ties)
    total = _single_totals(spec, cands, card, reps, which, grid[0], grid[1], totals)
    rows = _contenders(total, usable, capacity, current_fits)
    if not rows:
        return None
    if len(rows) < len(cands):  # the others are never the winner: no step time of theirs is worked out
        cands, limits, usable, total = [cands[j] for j in rows], [limits[j] for j in rows], \
            [usable[j] for j in rows], total[rows]
        reps, which = _rows_of(reps, which, rows)
    prof = card_profile(card)
    times = step_time_rows(spec, list(reps.values()), card, batch=grid[0], grad_accum=grid[1], parallel=par,
                           inputs=[StepTimeInputs(profile=prof, state=model_state(spec, r)) for r in reps.values()])
    picks = _choices(total, times, which, usable) + ([times[k] for k in which],)
    j, verdict = _winner(cands, par, picks, capacity, current_fits)
    if j is None:
        return None
    return _plan_at(req, cands[j][0], cands[j][1], par, grid, [v[j] for v in picks], limits[j], capacity), verdict


def fastest_plan(spec: ModelSpec, method: str, card: GPUSpec, request: SearchRequest | None = None,
                 **settings: Any) -> Plan | None:
    """The plan :func:`search` ranks first when one fits with the margin, else its fastest plan within the card
    (tight), else None: what a caller needing one plan, not the ranking, takes from a search.

    A comfortable plan is found on the arrays (:func:`_setup_best`, one :class:`Plan` built, ranked 1 with
    the search's reason); otherwise the search itself runs (a tight plan's rank is its place among all).
    ``request``/``settings``: as :func:`search`.

    Raises:
        VramplanError: as :func:`search`.
    """
    req = SearchRequest.build(request, **settings)
    listed = _setup_best(spec, method, card, True, req)  # True: only a comfortable plan is listed
    if listed is not None:
        plan = listed[0]
        plan.rank, plan.reason = 1, _reason(plan, plan)
        return plan
    listed = _best_of(search(spec, method, card, req), False)
    return None if listed is None else listed[0]


def _winner(cands: list, par: Parallel, picks: tuple, capacity: int, current_fits: bool) -> tuple[int | None, str]:
    """The candidate :func:`_best_of` picks from :func:`search`'s plans, found on the picks' lists.

    ``picks``: :func:`_choices`' lists (index, peak, fits, tokens/s, ...). A comfortable winner is the
    first of the search's ranking (fallback last, then tokens/s rounded to 1e-6, then
    :func:`_preference_of`; ties: candidate order, as the stable sort); a tight one the fastest plan
    within the card, ties going to the first of the search's order of unfit plans (peak, preference).
    """
    _, peak, fits, tps = picks[:4]
    pref = [_preference_of(cfg, note, par) for cfg, note in cands]
    ok = [j for j in range(len(cands)) if fits[j]]
    if ok:
        return min(ok, key=lambda j: (cands[j][1] is not None, -round(tps[j], 6), pref[j])), "comfortable"
    tight = [j for j in range(len(cands)) if int(peak[j]) <= capacity]
    if current_fits or not tight:
        return None, ""
    return min(tight, key=lambda j: (-tps[j], int(peak[j]), pref[j])), "tight"


def _best_of(mp: MethodPlans, current_fits: bool) -> tuple[Plan, str] | None:
    """What :func:`other_setups` lists of a finished search: its best plan (comfortable) or, when it has none and
    the plan shown (``current_fits``) does not fit, its fastest plan within the card (tight); else None."""
    if mp.best is not None:
        return mp.best, "comfortable"
    tight = [q for q in mp.plans if q.peak_bytes <= q.capacity_bytes]
    if current_fits or not tight:
        return None
    return max(tight, key=lambda q: q.tokens_per_s), "tight"


def _listing_filter(spec: ModelSpec, card: GPUSpec, margin: float, current_fits: bool, totals: DeviceTotals,
                    batch: np.ndarray | None = None):
    """``(base, optimiser) -> bool``: whether :func:`other_setups` could list a candidate of ``base`` (a configuration of
    :func:`_candidates`) with that optimiser, by its lower bound (:meth:`DeviceTotals.floor`).

    A candidate whose floor (every micro-batch's total is at least it) is over its comfortable limit
    (:func:`_limits`), and at least a byte over the card when a tight plan would count (``current_fits``
    False), cannot be listed. The floor is made of batch-independent phases, which checkpointing and
    attention leave alone (least_total's bound, tests/test_search_floor.py): one per configuration
    but those two (the base with the optimiser, checkpointing off and sdpa). First the floor of every optimiser at
    once (``any_optimizer``: at or below each optimiser's own, as :func:`least_total` uses it); only when that
    leaves a chance, the optimiser's own. ``batch``: the micro-batches searched; a recipe that generates then takes
    the floors over them after the first (``floor(..., batch=batch)``: at or above the floor over every
    micro-batch, with its rollout's KV cache, which neither checkpointing nor attention changes either): every
    optimiser's, then its own.
    """
    capacity = card.memory_bytes
    limits: dict[tuple, int] = {}  # (stack, method, adapter) -> the comfortable limit (_limits')
    # base -> (whether the every-optimiser floors shut it, its limit, its floors' grid, the base with AdamW, checkpointing
    # off and sdpa): what does not read the optimiser, worked out once per base, not once per (base, optimiser)
    shared: dict[TrainConfig, tuple] = {}

    def shut(floor: float | None, limit: int) -> bool:
        return floor is not None and floor > limit and (current_fits or floor >= capacity + 1)

    def shut_floor(cfg: TrainConfig, limit: int, any_optimizer: bool = False, grid=None) -> bool:
        # shut(totals.floor(...)): settled by the floor's tensors (a lower bound of it) where they are shut already
        tensors = totals.floor_tensors(spec, cfg, card, any_optimizer=any_optimizer, batch=grid)
        return tensors is not None and (shut(tensors, limit) or shut(
            totals.floor(spec, cfg, card, any_optimizer=any_optimizer, batch=grid), limit))

    def base_bound(base: TrainConfig) -> tuple:
        any_key = base.with_(grad_ckpt=False, optimizer="adamw", attn=DEFAULT_ATTENTION)
        band = (any_key.framework, any_key.method, any_key.adapter)
        if band not in limits:
            limits[band] = _limits([(any_key, None)], capacity, margin, False)[0][1]
        limit = limits[band]
        grid = batch if batch is not None and any_key.recipe.behaviour.generates else None
        closed = shut_floor(any_key, limit, True) or (grid is not None and shut_floor(any_key, limit, True, grid))
        return closed, limit, grid, any_key

    def can_list(base: TrainConfig, optimizer: str) -> bool:
        got = shared.get(base)
        if got is None:
            got = shared[base] = base_bound(base)
        closed, limit, grid, any_key = got
        if closed:
            return False
        key = any_key if optimizer == "adamw" else any_key.with_(optimizer=optimizer)
        return not shut_floor(key, limit, grid=grid)
    return can_list


def _contenders(total: np.ndarray, usable: list[int], capacity: int, current_fits: bool) -> list[int]:
    """The rows of device totals ``total`` (candidates x micro-batches) that :func:`_winner` can pick, in order.

    Those that fit their comfortable limit at some micro-batch (:func:`_choices` then marks them as fitting, at
    their fastest such micro-batch), when any does: the winner is the first of them by the search's ranking.
    Else, when a tight plan counts (``current_fits`` False), those whose least total is within the card (a
    plan's ``peak_bytes`` is ``int`` of the least total when nothing fits the margin): the winner is the fastest
    of them. Else none: nothing is listed.
    """
    fit = (total <= np.asarray(usable, dtype=np.int64).reshape((-1,) + (1,) * (total.ndim - 1))).any(axis=-1)
    ok = np.flatnonzero(fit).tolist()
    if ok or current_fits:
        return ok
    return np.flatnonzero(np.floor(total.min(axis=-1)) <= capacity).tolist()  # int() of whole-byte totals


def _rows_of(reps: dict, which: np.ndarray, rows: list[int]) -> tuple[dict, np.ndarray]:
    """:func:`_shared_rows`' ``(reps, which)`` for the candidates ``rows`` only: the shared configurations they use
    (in their order among ``reps``) and each candidate's row among them."""
    keys = list(reps)
    used = sorted({int(which[j]) for j in rows})
    row = {old: k for k, old in enumerate(used)}
    return {keys[o]: reps[keys[o]] for o in used}, np.array([row[int(which[j])] for j in rows], dtype=np.intp)


def _preference(plan: Plan) -> tuple:
    """Tie-breakers among equally fast plans: fewer moving parts first (:func:`_preference_of`)."""
    return _preference_of(plan.config, plan.fallback, plan.parallel)


def _preference_of(c: TrainConfig, fallback: str | None, parallel: Parallel) -> tuple:
    """:func:`_preference` of a plan with settings ``c`` (its micro-batch aside), ``fallback`` and ``parallel``."""
    return (fallback is not None, c.grad_ckpt, OPTIMIZERS.index(c.optimizer) if c.optimizer in OPTIMIZERS else 9,
            not c.attention.default, c.rank, len(c.targets),
            (STRATEGIES.index(parallel.strategy) if parallel.strategy else -1), parallel.offload != "none")


def search(spec: ModelSpec, method: str, card: GPUSpec, request: SearchRequest | None = None,
           **settings: Any) -> MethodPlans:
    """Rank every settings combination of ``method`` on ``card`` (see the module docstring).

    Args:
        spec: the model. method: the method (DPO/PPO take an adapter: ``request.adapter``; None =
            default plus its QLoRA fallback). card: the GPU (per-GPU capacity).
        request: a :class:`~vramplan.request.SearchRequest`; ``settings`` are its fields, set over it:
            ``seq``, ``global_batch`` (target examples per optimiser step over all GPUs; None:
            accumulation 1), ``parallels`` (GPU layouts to try), ``grad_ckpt``/``optimizer``/``attn``/
            ``rank``/``targets`` (fix a setting; None searches it), ``batch`` (fix the micro-batch; None
            searches 1..256, or the divisors of ``global_batch / gpus``), ``margin`` (fraction of the
            capacity kept free), ``tokens``/``epochs`` (dataset size for time to train), ``framework``/
            ``techniques`` (stack and memory-saving techniques of every plan), ``method_options``.

    Returns:
        :class:`MethodPlans` with every combination's best micro-batch, ranked.

    Raises:
        VramplanError: a keyword that is not a SearchRequest field, a margin outside [0, 1), an invalid
            fixed setting.
    """
    req = SearchRequest.build(request, **settings)
    totals = req.totals or DeviceTotals()
    parallels = req.parallels or [SINGLE]
    capacity = card.memory_bytes
    least = resolve(method, req.adapter).behaviour.min_batch()
    grids = {par: _grid_for(req.global_batch, req.batch, par, least) for par in parallels}
    cands, left_out = _engines_start(spec, card, req, _candidates(spec, method, card, req))
    prof = card_profile(card)
    plans: list[Plan] = []
    limits = _limits(cands, capacity, req.margin, any(p.distributed for p in parallels))
    chosen = {}
    if cands:
        which, results = _evaluate(spec, cands, card, parallels, grids, prof, totals)
        chosen = {p: _choices(total, times, which, [u for _, u in limits]) + ([times[k] for k in which], list(total))
                  for p, (total, times) in results.items()}
    # (each layout's grid and picks looked up once, not per plan: a Parallel hashes field by field)
    layouts = [(p, grids[p], chosen[p]) for p in parallels] if cands else []
    for j, (cfg, note) in enumerate(cands):
        for p, grid, picks in layouts:
            plans.append(_plan_at(req, cfg, note, p, grid, [v[j] for v in picks], limits[j], capacity))
    # a fallback (QLoRA for LoRA) is what the method becomes when its own adapter does not fit: its plans
    # rank after every plan of the method's own adapter that fits, however fast the throughput model
    # rates them (a larger micro-batch over an NF4 base can come out marginally faster, inside the
    # model's resolution, and QLoRA changes the weights the adapter trains against)
    feasible = sorted((p for p in plans if p.fits),
                      key=lambda p: (p.fallback is not None, -round(p.tokens_per_s, 6), _preference(p)))
    rest = sorted((p for p in plans if not p.fits), key=lambda p: (p.peak_bytes, _preference(p)))
    ranked = feasible + rest
    best = feasible[0] if feasible else None
    for k, p in enumerate(ranked, 1):
        p.rank = k
        p.reason = _reason(p, best)
    smallest = min(plans, key=lambda p: p.peak_bytes)
    return MethodPlans(method=method, plans=ranked, best=best, smallest=smallest, left_out=left_out)


def _limits(cands: list, capacity: int, margin: float, multi: bool) -> list[tuple]:
    """Each candidate's (band, comfortable limit in bytes): :func:`vramplan.bands.band_for_config` once per
    (stack, method, adapter); ``multi``: the multi-GPU bands of a sharded search (bands.band_for)."""
    from ..bands import band_for_config

    bands: dict[tuple, tuple] = {}
    for cfg, _ in cands:
        key = (cfg.framework, cfg.method, cfg.adapter)
        if key not in bands:
            band = band_for_config(cfg, multi=multi)
            bands[key] = (band, comfortable_limit(capacity, band.hi, margin))
    return [bands[(cfg.framework, cfg.method, cfg.adapter)] for cfg, _ in cands]


def _plan_at(req: SearchRequest, cfg: TrainConfig, note: str | None, p: Parallel, grid: tuple, pick: list,
             limit: tuple, capacity: int) -> Plan:
    """The :class:`Plan` of candidate ``cfg`` under ``p`` at its chosen micro-batch.

    ``grid``: (micro-batches, accumulation steps); ``pick``: ``(index, peak, fits, tokens/s, step s,
    step times over the grid[, device totals over the grid])`` as :func:`_choices` gives them and the search keeps
    them; ``limit``: (band, comfortable limit)."""
    index, peak, fits, tps, step, times = pick[:6]
    band, usable = limit
    b_grid, a_grid = grid
    batch, accum = int(b_grid[index]), int(a_grid[index])
    # (the candidate itself at its own micro-batch and accumulation: an equal configuration, not built again)
    cfg_i = cfg if batch == cfg.batch and accum == cfg.grad_accum else cfg.with_(batch=batch, grad_accum=accum)
    ttt, gh = time_to_train(req.tokens, req.epochs, tps, p.gpus)
    return Plan(method=cfg.method, adapter=cfg.adapter, config=cfg_i, parallel=p,
                peak_bytes=int(peak), capacity_bytes=capacity, usable_bytes=usable, fits=fits,
                tokens_per_s=tps, step_time_s=step, time_to_train_s=ttt,
                gpu_hours=gh, fallback=note, band=(band.lo, band.hi), _grid=(times, index),
                _totals=(b_grid, a_grid, pick[6]) if len(pick) > 6 else None)


def _reason(p: Plan, best: Plan | None) -> str:
    """Why ``p`` loses to ``best`` (or ``best``)."""
    if p is best:
        return "best: fastest that fits with the margin"
    if not p.fits:
        if p.peak_bytes <= p.capacity_bytes:  # fits the card, not the margin: never call that "does not fit"
            return (f"tight: {p.peak_bytes / GIB:.2f} GiB fits the {p.capacity_bytes / GIB:.2f} GiB card but not "
                    f"the margin ({p.usable_bytes / GIB:.2f} GiB usable with the band's upper end)")
        if p.verdict is Verdict.TIGHT:  # over the card by less than the band's lower end: it may fit
            return (f"tight: {p.peak_bytes / GIB:.2f} GiB is {100 * (p.peak_bytes / p.capacity_bytes - 1):.1f}% over the "
                    f"{p.capacity_bytes / GIB:.2f} GiB card, inside the band's lower end ({100 * p.band[0]:+.0f}%): "
                    "may fit")
        return f"does not fit: {p.peak_bytes / GIB:.2f} GiB > {p.capacity_bytes / GIB:.2f} GiB"
    if p.fallback is not None and best.fallback is None:
        return f"{p.adapter} fallback: used only when {best.adapter} over a 16-bit base cannot fit, and here it fits"
    slower = 1.0 - p.tokens_per_s / best.tokens_per_s
    diffs = _differences(p, best)
    if slower <= 1e-9:
        return "ties the best" + (f": {'; '.join(diffs)}" if diffs else "")
    pct = f"{100 * slower:.1f}%" if slower >= 0.001 else "<0.1%"
    return f"{pct} slower" + (f": {'; '.join(diffs)}" if diffs else "")


def _differences(p: Plan, best: Plan) -> list[str]:
    """What sets ``p`` apart from ``best``, each as a short reason (adapter, GC, optimiser, batch, rank,
    targets, layout, attention)."""
    diffs = []
    c, b = p.config, best.config
    if p.adapter != best.adapter:
        diffs.append(f"{p.adapter} instead of {best.adapter}" + (" (dequantises the NF4 base every pass)"
                                                                   if p.config.recipe.adapter.quantized_base else ""))
    if c.grad_ckpt != b.grad_ckpt:
        diffs.append("gradient checkpointing recomputes the forward" if c.grad_ckpt else "no gradient checkpointing")
    if c.optimizer != b.optimizer:
        title = get_optimizer(c.optimizer).title
        # at fp32 gradients (what mixed precision steps): the per-parameter factor of the optimiser's seconds
        diffs.append(title + (" updates slower" if update_cost(c.optimizer, 4) > update_cost(b.optimizer, 4) else ""))
    if c.batch != b.batch:
        diffs.append(f"micro-batch {c.batch} vs {b.batch}" + (" (the larger one leaves no margin)" if c.batch < b.batch and
                                                              c.grad_ckpt == b.grad_ckpt else ""))
    if c.rank != b.rank and c.recipe.adapter.low_rank:
        diffs.append(f"rank {c.rank}")
    if c.targets != b.targets and c.recipe.adapter.low_rank:
        diffs.append("all-linear targets" if len(c.targets) > len(b.targets) else "fewer targets")
    if p.parallel != best.parallel:
        diffs.append(p.parallel.label)
    if c.attn != b.attn:
        diffs.append(c.attention.note)
    return diffs


# -- when nothing fits -------------------------------------------------------------------------

def _frugal_cfg(spec: ModelSpec, method: str, req: SearchRequest):
    """The least-memory configuration of ``method``: GC on, 8-bit AdamW, the QLoRA fallback, batch 1, sdpa."""
    choices = adapters_for(method, req.adapter)
    m, ad, _ = choices[-1]
    return make_config(spec, m, adapter=ad, batch=1, grad_ckpt=True, optimizer="adamw_8bit", attn=DEFAULT_ATTENTION,
                       rank=req.rank or 8, targets=req.targets,
                       **req.pick("seq", "precision", "ppo_response", "framework", "techniques", "method_options"))


def _runs_on(cfg: TrainConfig, g: GPUSpec) -> bool:
    """Whether card ``g`` can run ``cfg`` at all (:func:`~vramplan.planner.checks.check_card`: its precision's
    bf16, its attention kernel, 4-bit kernels): a card that cannot is never suggested."""
    try:
        check_card(cfg.precision, cfg.recipe.method.name, cfg.recipe.adapter.value, cfg.attn, g, cfg.framework)
    except CardUnsupportedError:
        return False
    return True


def what_would_fit(spec: ModelSpec, method: str, card: GPUSpec, request: SearchRequest | None = None,
                   gpus: int = 1, **settings: Any) -> list[Suggestion]:
    """What would make ``method`` fit when no setting does: a bigger card, more GPUs, offload, shorter sequences.

    Each suggestion uses the method's least-memory settings (gradient checkpointing, 8-bit
    AdamW, the QLoRA fallback where there is one, micro-batch 1, sdpa) and the same margin, on the
    bytes each card gives the step (:func:`~vramplan.planner.estimating.step_capacity`: the card less
    a colocated engine's share of it, GRPO's vLLM, which is a fraction of whichever card). A card
    on which that engine's weights do not load into its share is never suggested, nor is anything
    on ``card`` when they do not load there (the hard constraint ``estimate`` holds it to).
    ``request``/``settings``: a :class:`~vramplan.request.SearchRequest` and its fields (``seq``,
    ``precision``, ``margin``, ``adapter``, ``rank``, ``targets``, ``framework``, ``techniques``,
    ``method_options``, ``totals``); ``gpus``: the GPUs already planned.
    """
    req = SearchRequest.build(request, **settings)
    totals = req.totals or DeviceTotals()
    seq, margin = req.seq, req.margin
    out: list[Suggestion] = []
    try:
        cfg = _frugal_cfg(spec, method, req)
    except VramplanError:
        return out
    from ..bands import band_for_config

    hi = band_for_config(cfg).hi

    def comfy(g: GPUSpec) -> int:  # the comfortable limit of the step on card g (margin and the band's upper end)
        return comfortable_limit(step_capacity(g, cfg), hi, margin)
    # 1. the smallest card of the catalogue
    cards = sorted(catalogue().values(), key=lambda g: (g.memory_bytes, -g.bf16_tflops))
    mem = step_memory_for(spec, cfg, SINGLE, components=DEVICE_CHAIN_READS)  # read by the device chain only
    for g in cards:
        if g.memory_bytes <= card.memory_bytes or not _runs_on(cfg, g):
            continue
        if engine_starts(spec, cfg, g) and float(totals(mem, cfg, g, SINGLE)) <= comfy(g):
            step = step_capacity(g, cfg)
            out.append(Suggestion("gpu", f"1x {g.name} ({g.memory_bytes / GIB:.0f} GiB"
                                  + (f", {step / GIB:.1f} GiB of it the step's" if step != g.memory_bytes else "") + ")"
                                  + (f" as {cfg.recipe.name}" if cfg.recipe.name != method else ""),
                                  {"gpu": g.name, "capacity_bytes": g.memory_bytes}
                                  | ({"step_capacity_bytes": step} if step != g.memory_bytes else {})))
            break
    if not engine_starts(spec, cfg, card):
        return out  # more of this card, offload or a shorter sequence leave the engine's share as small
    # 2.-3. more of this card with ZeRO-3 / FSDP, CPU offload
    out += _sharded_suggestions(spec, cfg, card, gpus, totals, comfy(card))
    # 4. a shorter sequence on this card
    limit = min(seq - 128, spec.max_position_embeddings)
    if limit >= 128:
        grid = np.arange(128, limit + 1, 128)
        grid = grid[grid >= cfg.recipe.behaviour.min_seq()]
        if grid.size:
            par = make_parallel(gpus) if gpus > 1 else SINGLE
            c = cfg.with_(**cfg.recipe.behaviour.reset_shape())
            ok = totals(step_memory_for(spec, c, par, batch=1, seq=grid, components=DEVICE_CHAIN_READS), c, card,
                        par) <= comfy(card)  # c: cfg's share of the card (the shape is reset, not the options)
            if ok.any():
                s = int(grid[ok].max())
                out.append(Suggestion("seq", f"seq <= {s:,} on {card.name}",
                                      {"seq": s}))
    return out


def _sharded_suggestions(spec: ModelSpec, cfg: TrainConfig, card: GPUSpec, gpus: int, totals: DeviceTotals,
                         limit: int) -> list[Suggestion]:
    """:func:`what_would_fit`'s suggestions of more of ``card`` with ZeRO-3 / FSDP (the fewest GPUs over ``gpus``
    of :data:`GPU_COUNTS` on which each fits ``limit``, the step's comfortable bytes) and of CPU offload on the
    same number of cards (ZeRO-3, else FSDP), for the least-memory configuration ``cfg``.

    Every layout's per-GPU peak holds its rollout's KV cache (a phase of its step,
    :func:`vramplan.phases.combine_phases`), which sharding leaves whole -- each GPU generates its own
    micro-batch's sequences: a strategy whose engine runs ``cfg`` as it is (:func:`deepspeed_cast`) fits at no
    GPU count, offload or not, where that cache alone puts the device total over ``limit``
    (:meth:`DeviceTotals.at_least`), and none of its layouts is worked out.
    """
    terms: list = []  # the activation terms of one GPU's micro-batch, for every layout

    def sharded(par: Parallel, state=None) -> StepMemory:  # step_memory_for(spec, cfg, par) of a distributed layout
        if not terms:
            terms.append(step_terms(spec, cfg))
        return parallel_step_memory(spec, cfg, par, state=state, terms=terms[0],
                                    components=DEVICE_CHAIN_READS)  # what the device totals read

    def fits(par: Parallel) -> bool:  # float(totals(sharded(par), ...)) <= limit, settled by a bound where it can be
        state = None
        if deepspeed_cast(cfg, par) is cfg:  # a lower bound of the layout's peak: its forward and rollout phases
            if not terms:
                terms.append(step_terms(spec, cfg))
            state = shard_state(spec, cfg, par)
            least = totals.at_least(cfg, card, _phase_floor(state, terms[0], cfg.recipe.behaviour.generates))
            if least is not None and least > limit:
                return False
        return float(totals(sharded(par, state), cfg, card, par)) <= limit

    def hopeless(par: Parallel) -> bool:  # the rollout's KV cache alone is over the limit on every layout of par's
        if not cfg.recipe.behaviour.generates or deepspeed_cast(cfg, par) is not cfg:
            return False
        if not terms:
            terms.append(step_terms(spec, cfg))
        least = totals.at_least(cfg, card, float(np.min(terms[0].kv)))
        return least is not None and least > limit
    out: list[Suggestion] = []
    found: dict[int, list[str]] = {}
    for strategy in SHARDED_PARAMS:  # ZeRO-3, then FSDP
        if hopeless(make_parallel(2, strategy)):
            continue
        for n in GPU_COUNTS:
            if n <= gpus:
                continue
            if fits(make_parallel(n, strategy)):
                found.setdefault(n, []).append(strategy)
                break
    for n, strategies in sorted(found.items()):
        out.append(Suggestion("gpus", f"{n}x {card.name} with {' or '.join(strategies)}",
                              {"gpus": n, "strategies": strategies, "gpu": card.name}))
    # CPU offload (DeepSpeed places a model built outside zero.Init whole on each GPU first, offload or not:
    # vramplan.distributed._zero3_whole_module_bytes)
    for strategy in SHARDED_PARAMS:  # ZeRO-3, then FSDP
        par = make_parallel(max(1, gpus), strategy, "cpu")
        if not hopeless(par) and fits(par):
            out.append(Suggestion("offload", f"{max(1, gpus)}x {card.name} with {strategy} --offload cpu (slow)",
                                  {"gpus": max(1, gpus), "strategy": strategy, "offload": "cpu"}))
            break
    return out


def _phase_floor(state, t, generates: bool) -> float:
    """A lower bound (bytes) on the per-GPU tensor peak of :func:`~vramplan.distributed.parallel_step_memory` with the
    sharded state ``state`` (:func:`~vramplan.distributed.shard_state`) and the activation terms ``t`` of one GPU's
    micro-batch, its least over the grid. The peak is the largest phase (:func:`vramplan.phases.combine_phases`;
    FSDP2's unit walk only raises a phase): the forward holds the resident shard, the communication buffers and the
    optimiser states beside at least the saved activations, the last step's graph and the logits (the casts, held
    gradients, gathered units and larger working sets only add to them); a method that generates (``generates``) has
    its rollout, those states beside the KV cache, the rollout's logits and the gathered policy."""
    b = state.bytes
    held = sum(b.get(c, 0) for c in RESIDENT_COMPONENTS) + state.comm_buffer_bytes + b.get(Component.OPTIMIZER_STATES, 0)
    floor = np.min(t.acts + t.last_graph + t.logits_fwd)
    if generates:
        floor = max(floor, np.min(t.kv + t.rollout_logits) + state.rollout_gather_bytes)
    return float(held + floor)


# -- other stacks and precisions ---------------------------------------------------------------

def least_total(spec: ModelSpec, method: str, card: GPUSpec, settings: "SearchRequest | dict",
                stop_below: float | None = None) -> float | None:
    """A lower bound (bytes) on the device total of every plan :func:`search` ranks with ``settings``.

    ``settings``: :func:`search`'s request (or its fields as a dict). The least :meth:`DeviceTotals.floor` over
    the configurations the search tries, gradient checkpointing and attention aside (neither
    changes the batch-independent phases the floor is made of); the micro-batch and sequence
    grid are covered by the floor itself. None when it cannot say: several GPUs or offload (the
    sharded model), a calibrated activation factor below 1, or an invalid setting (the search
    says what). ``stop_below``: return the first floor below it (the caller only asks whether
    the least is that low).
    """
    try:
        req = settings if isinstance(settings, SearchRequest) else SearchRequest.build(**settings)
    except VramplanError:
        return None
    parallels = req.parallels or [SINGLE]
    if any(p.distributed for p in parallels):
        return None
    totals = req.totals or DeviceTotals()
    fixed = dict(req.fixed, grad_ckpt=False, attn=DEFAULT_ATTENTION)
    try:
        cands = _candidates(spec, method, card, req, fixed)
    except VramplanError:
        return None
    # with stop_below, first one floor per configuration but its optimiser (a bound for every
    # optimiser at once); if that does not settle it, the tighter floor of each optimiser
    shapes = list({cfg.with_(optimizer="adamw"): cfg for cfg, _ in reversed(cands)}.values())
    stages = ((shapes, True), ([cfg for cfg, _ in cands], False)) if stop_below is not None else \
        (([cfg for cfg, _ in cands], False),)
    least = None
    for group, any_opt in stages:
        least = None
        for cfg in group:
            floor = totals.floor(spec, cfg, card, any_optimizer=any_opt)
            if floor is None:
                return None
            least = floor if least is None else min(least, floor)
            if stop_below is not None and least < stop_below:
                break
        if least is None or (stop_below is not None and least >= stop_below):
            return least
    return least


def other_setups(spec: ModelSpec, method: str, card: GPUSpec, request: SearchRequest | None = None,
                 current: Plan | None = None, **settings: Any) -> list[Suggestion]:
    """Stacks (``stacks.toml``) and precisions that make ``method`` fit where the request's framework/precision do not.

    Tries every other stack at its own default precision, and the current stack in pure bf16
    (``--precision bf16``: no fp32 master weights or states) when the card has bf16 and it is
    not already the precision. A setup is listed when its best plan fits with the margin
    (``comfortable``), or fits without it while ``current`` (the plan shown) does not fit at all
    (``tight``). ``request``/``settings``: :func:`search`'s request and fields (seq, margin, fixed
    settings, framework, precision, ...).

    Returns:
        :class:`Suggestion` of kind ``stack`` or ``precision`` with ``framework``, ``precision``,
        ``peak_bytes``, ``tokens_per_s`` and ``verdict``, comfortable ones first, then fastest.
    """
    req = SearchRequest.build(request, **settings)
    framework, precision = req.framework, req.precision
    from ..stacks import stacks

    tries: list[tuple[str, str | None, str]] = []
    for name in stacks():
        if name != framework:
            tries.append((name, None, "stack"))
    if card.bf16 and precision != "bf16":
        tries.append((framework, "bf16", "precision"))
    found = []
    current_fits = current is not None and current.peak_bytes <= current.capacity_bytes
    for fw, prec, kind in tries:
        try:
            p = check_card(prec, method, None, req.attn or DEFAULT_ATTENTION, card, fw)
            # the setup's best plan, or None: its candidates' floors (_listing_filter) skip those that cannot be
            # listed before any device total or step time, a setup that fits the card nowhere entirely
            listed = _setup_best(spec, method, card, current_fits, req.with_(framework=fw, precision=p))
        except VramplanError:
            continue  # the stack does not run this method or card (e.g. no bf16)
        if listed is None:
            continue
        best, verdict = listed
        flag = f"--framework {fw}" if kind == "stack" else "--precision bf16"
        prec_name = best.config.precision
        text = (f"{flag} ({prec_name}{', ' + best.adapter if best.adapter != method else ''}) fits"
                + (" (tight)" if verdict == "tight" else "")
                + f": {best.peak_bytes / GIB:.2f} GiB, {best.tokens_per_s:,.0f} tok/s, {best.summary()}")
        found.append(Suggestion(kind, text, {"framework": fw, "precision": prec_name, "verdict": verdict,
                                             "peak_bytes": int(best.peak_bytes),
                                             "tokens_per_s": round(float(best.tokens_per_s), 1)}))
    found.sort(key=lambda s: (s.detail["verdict"] != "comfortable", -s.detail["tokens_per_s"]))
    return found

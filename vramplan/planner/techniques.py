"""Memory-saving techniques for one configuration on a card (layer 4 of :mod:`vramplan.planner`).

:func:`recommend_techniques` says what each technique of ``vramplan/data/stacks.toml`` saves on a
configuration and, when it is not comfortable, the cheapest set that makes it fit; it runs the
peaks of :func:`~vramplan.planner.estimating.estimate_config` (:func:`~vramplan.planner.estimating.estimate_peaks`) with and without each. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import TrainConfig
from ..distributed import SINGLE, Parallel
from ..errors import VramplanError
from ..gpus import get_gpu
from ..models import get_model
from ..results import Estimate
from ..stacks import techniques
from ..units import GIB
from ..verdict import DEFAULT_MARGIN
from ..overheads import card_profile
from .estimating import Peaks, engine_starts, estimate_peaks, estimate_peaks_rows, step_capacity

if TYPE_CHECKING:
    from .search import Plan

#: A technique saving less than this (device total) is not listed: it does not apply to the stack or
#: method (chunked_ce under a stack whose loss is already chunked, opt_offload over a LoRA adapter's
#: few MiB of states) or is below the analytic model's resolution (±10% of the tensor peak).
MIN_SAVING_BYTES = 64 << 20
#: ... nor less than this fraction of the card's capacity.
MIN_SAVING_FRACTION = 0.005


@dataclass(frozen=True)
class TechniqueSaving:
    """What one memory-saving technique (``vramplan/data/stacks.toml``) saves on a configuration.

    ``saving_bytes`` is the device-total peak without it minus with it (what decides whether a
    plan fits); ``tensor_saving_bytes`` the same on live tensors (``tensor_peak_bytes``). In a
    recommended set the savings are marginal: each on top of the ones before it. ``cost`` is the
    fraction of step time it adds (:meth:`vramplan.stacks.Technique.cost_for`).
    """

    technique: str
    label: str
    saving_bytes: int
    tensor_saving_bytes: int
    cost: float
    cost_source: str

    def to_json(self) -> dict:
        return {"technique": self.technique, "label": self.label, "saving_bytes": int(self.saving_bytes),
                "saving_gib": round(self.saving_bytes / GIB, 3), "tensor_saving_bytes": int(self.tensor_saving_bytes),
                "step_time_cost": round(float(self.cost), 4), "cost_source": self.cost_source}


@dataclass
class TechniqueAdvice:
    """Memory-saving techniques for one configuration on one card (:func:`recommend_techniques`).

    ``savings``: every technique that is not already on (requested or the stack's default) and
    saves at least :data:`MIN_SAVING_BYTES` on its own, cheapest first, then largest saving.
    ``recommended``: when the configuration is not comfortable (above ``usable_bytes``), the
    smallest set found that brings it below (else below the capacity, else as low as they go),
    in the order applied, each with its marginal saving; empty when not needed.
    ``plan``: in ``vramplan fit``, the fastest plan of the method with that set on.
    """

    config: TrainConfig
    peak_bytes: int
    tensor_peak_bytes: int
    capacity_bytes: int
    usable_bytes: int
    savings: list[TechniqueSaving]
    recommended: list[TechniqueSaving]
    peak_with_bytes: int
    fits: bool          # with the recommended set: peak <= capacity (and a colocated engine loads in its share)
    comfortable: bool   # with the recommended set: peak <= usable (likewise)
    plan: Plan | None = None

    @property
    def needed(self) -> bool:
        """The configuration alone is above its usable memory (tight or does not fit)."""
        return self.peak_bytes > self.usable_bytes

    @property
    def techniques(self) -> tuple[str, ...]:
        return tuple(s.technique for s in self.recommended)

    @property
    def cost(self) -> float:
        """Fraction of step time the recommended set adds."""
        return float(sum(s.cost for s in self.recommended))

    @property
    def saving_bytes(self) -> int:
        return int(self.peak_bytes - self.peak_with_bytes)

    def to_json(self) -> dict:
        on = [t for t in technique_names() if self.config.uses(t)]
        return {"framework": self.config.framework, "techniques_on": on,
                "peak_bytes": int(self.peak_bytes), "tensor_peak_bytes": int(self.tensor_peak_bytes),
                "capacity_bytes": int(self.capacity_bytes), "usable_bytes": int(self.usable_bytes),
                "needed": self.needed, "savings": [s.to_json() for s in self.savings],
                "recommended": [s.to_json() for s in self.recommended], "recommended_techniques": list(self.techniques),
                "peak_with_bytes": int(self.peak_with_bytes), "saving_bytes": self.saving_bytes,
                "step_time_cost": round(self.cost, 4), "fits": self.fits, "comfortable": self.comfortable,
                "plan": None if self.plan is None else self.plan.to_json()}


def technique_names() -> list[str]:
    """Every technique of ``stacks.toml``, in its order."""
    return list(techniques())


def _choose(on: tuple[str, ...], candidates: list[str], cost: dict[str, float], est, base, floor: int, usable: int,
            capacity: int, many=None) -> list[str]:
    """The techniques :func:`recommend_techniques` adds to ``on`` (in the order added), given ``est(techniques)``.

    Greedy: each round adds the cheapest technique whose saving on top of the chosen ones is worth
    listing (``>= floor`` bytes; ties: the largest saving) -- on top, because they interact: once
    opt_in_bwd frees the gradients the peak moves to the forward, where the logits are and liger_ce
    starts to count -- until the peak is at most ``usable``; then each one the target (``usable``,
    else ``capacity``) does not need is dropped again, dearest (then last added) first. ``many``: given a
    round's sets of techniques, works their estimates out at once for ``est`` to find (None: one at a time).
    """
    chosen: list[str] = []
    current = base
    if base.peak_bytes <= usable:
        return chosen
    while current.peak_bytes > usable:
        options = []
        if many is not None:
            many([on + tuple(chosen) + (name,) for name in candidates if name not in chosen])
        for name in candidates:
            if name in chosen:
                continue
            try:
                e = est(on + tuple(chosen) + (name,))
            except VramplanError:
                continue  # conflicts with one already chosen (chunked_ce after liger_ce)
            gain = current.peak_bytes - e.peak_bytes
            if gain >= floor:
                options.append((cost[name], -gain, name, e))
        if not options:
            break
        _c, _g, name, current = min(options, key=lambda o: o[:3])
        chosen.append(name)
    target = usable if current.peak_bytes <= usable else capacity if current.peak_bytes <= capacity else None
    if target is not None:  # drop what the target does not need, dearest (then last added) first
        for name in sorted(chosen, key=lambda n: (-cost[n], -chosen.index(n))):
            rest = [n for n in chosen if n != name]
            if est(on + tuple(rest)).peak_bytes <= target:
                chosen = rest
    return chosen


def _estimate_singles(spec, cfg: TrainConfig, card, profile, names: list[str], cache: dict, terms: dict) -> None:
    """Fill ``cache`` (sorted techniques -> :class:`Peaks`) with the one-GPU peaks of ``cfg`` plus each of
    ``names`` alone, in one :func:`~vramplan.planner.estimating.estimate_peaks_rows` call (:func:`_estimate_many`)."""
    _estimate_many(spec, cfg, card, profile, [cfg.techniques + (name,) for name in names], cache, terms)


def _estimate_many(spec, cfg: TrainConfig, card, profile, combos: list[tuple[str, ...]], cache: dict,
                   terms: dict) -> None:
    """Fill ``cache`` (sorted techniques -> :class:`Peaks`) with the one-GPU peaks of ``cfg`` with each set of
    techniques of ``combos`` requested, in one :func:`~vramplan.planner.estimating.estimate_peaks_rows` call. A
    set that ``cfg`` refuses (a conflict, accumulation) is left out; if the rows cannot be evaluated together,
    nothing is filled (each is then estimated on its own, raising what it raises). ``terms``: the activation terms
    kept between the calls of one :func:`recommend_techniques` (every set is ``cfg``'s shape: a later round's set
    that adds only a technique the terms do not read, ``vramplan.memory.TERMS_BLIND_TECHNIQUES``, reuses them)."""
    cfgs, keys = [], []
    for techs in combos:
        key = tuple(sorted(techs))
        if key in cache or key in keys:
            continue
        try:
            cfgs.append(cfg.with_techniques(techs))
        except VramplanError:
            continue
        keys.append(key)
    if len(cfgs) < 2:
        return
    try:
        peaks = estimate_peaks_rows(spec, cfgs, card, profile, terms=terms)
    except VramplanError:
        return
    cache.update(zip(keys, peaks))


def recommend_techniques(model, cfg: TrainConfig, gpu, *, parallel: Parallel | None = None,
                         margin: float = DEFAULT_MARGIN, base: Estimate | None = None) -> TechniqueAdvice:
    """Which memory-saving techniques make ``cfg`` fit on ``gpu``, cheapest first, and what each saves.

    Every technique of ``stacks.toml`` that is a memory saver and not already on is evaluated
    alone (the peaks of :func:`~vramplan.planner.estimating.estimate_config`, :func:`~vramplan.planner.estimating.estimate_peaks`, with and without it; savings below
    ``max(MIN_SAVING_BYTES, MIN_SAVING_FRACTION x capacity)`` are dropped). When ``cfg`` is above
    its comfortable limit (:func:`vramplan.verdict.comfortable_limit`: ``capacity x (1 - margin)`` and the band's
    upper end under the capacity), techniques are added greedily -- each round the cheapest in step
    time whose saving on top of those already chosen is worth listing, ties to the largest --
    until the estimate is below that (or, failing that, below the capacity); then each one the
    target does not need is dropped again, dearest first, so the set is minimal (no technique can
    be removed; not necessarily the cheapest of all subsets). Techniques that exclude each other
    (chunked_ce and liger_ce; opt_in_bwd with gradient accumulation) are skipped when they conflict.

    Args:
        model: a :class:`~vramplan.models.ModelSpec` or a name. cfg: the configuration.
        gpu: a :class:`~vramplan.gpus.GPUSpec` or a catalogue name. parallel: its GPU layout.
        margin: fraction of the capacity kept free. base: ``cfg``'s estimate, if already computed.

    Returns:
        :class:`TechniqueAdvice` (bytes are device totals per GPU unless named tensor).
    """
    spec, card = get_model(model), get_gpu(gpu)
    par = parallel or SINGLE
    if not 0.0 <= margin < 1.0:
        raise VramplanError(f"margin must be in [0, 1), got {margin!r}", "use e.g. --margin 0.1 for 10%")
    capacity = step_capacity(card, cfg)  # a colocated engine's share (GRPO's vLLM) is not the step's
    from ..bands import band_for_config
    from ..verdict import comfortable_limit

    usable = comfortable_limit(capacity, band_for_config(cfg, multi=par.distributed).hi, margin)  # the verdict's "comfortable"
    floor = max(MIN_SAVING_BYTES, int(MIN_SAVING_FRACTION * capacity))
    cache: dict[tuple, Estimate | Peaks] = {}
    terms: dict = {}  # the activation terms of the technique sets tried, kept between _estimate_many's calls
    profile = card_profile(card)

    def est(techs: tuple[str, ...]):
        key = tuple(sorted(techs))
        if key not in cache:
            c = cfg if techs == cfg.techniques else cfg.with_techniques(techs)
            cache[key] = estimate_peaks(spec, c, card, parallel=par, profile=profile)
        return cache[key]

    base = base if base is not None and base.config == cfg else est(cfg.techniques)
    cache[tuple(sorted(cfg.techniques))] = base
    catalogue = techniques()
    if not par.distributed:  # every technique alone, in one vectorised call (est's answers, to the byte)
        _estimate_singles(spec, cfg, card, profile, [name for name, t in catalogue.items()
                                                     if t.saver and not cfg.uses(name)], cache, terms)

    def saving(name: str, before, after) -> TechniqueSaving:
        t = catalogue[name]
        return TechniqueSaving(name, t.label, int(before.peak_bytes - after.peak_bytes),
                               int(before.tensor_peak_bytes - after.tensor_peak_bytes), t.cost_for(cfg), t.cost_source)

    candidates: list[str] = []
    singles: list[TechniqueSaving] = []
    for name, t in catalogue.items():
        if not t.saver or cfg.uses(name):
            continue
        try:
            e = est(cfg.techniques + (name,))
        except VramplanError:
            continue  # excluded by a technique already on, or by gradient accumulation
        candidates.append(name)
        s = saving(name, base, e)
        if s.saving_bytes >= floor:
            singles.append(s)
    singles.sort(key=lambda s: (s.cost, -s.saving_bytes, s.technique))

    cost = {n: catalogue[n].cost_for(cfg) for n in candidates}
    many = None if par.distributed else (lambda combos: _estimate_many(spec, cfg, card, profile, combos, cache, terms))
    chosen = _choose(cfg.techniques, candidates, cost, est, base, floor, usable, capacity, many)
    recommended: list[TechniqueSaving] = []
    before = base
    for i, name in enumerate(chosen):
        after = est(cfg.techniques + tuple(chosen[:i + 1]))
        recommended.append(saving(name, before, after))
        before = after
    final = before
    # no technique of the step makes room for a colocated engine whose weights do not load in its share
    starts = engine_starts(spec, cfg, card)
    return TechniqueAdvice(config=cfg, peak_bytes=int(base.peak_bytes), tensor_peak_bytes=int(base.tensor_peak_bytes),
                           capacity_bytes=capacity, usable_bytes=usable, savings=singles, recommended=recommended,
                           peak_with_bytes=int(final.peak_bytes), fits=bool(starts and final.peak_bytes <= capacity),
                           comfortable=bool(starts and final.peak_bytes <= usable))

"""Predicted vs measured, like for like, on measurement records; leave-one-source-out bands.

The core of ``benchmarks/published_accuracy.py`` (and its CI test). For each record:

* ``measured`` with a number: the planner predicts the quantity the source printed --
  ``max_allocated`` / ``torchtune_active``: ``Overheads.allocated_bytes`` (tensors in the
  caching allocator + cuBLAS workspaces; paged optimiser states excluded); ``max_reserved``:
  ``Overheads.reserved_bytes``; ``device_total``: ``Estimate.peak_bytes``; ``unknown_peak``:
  the range from the predicted allocated to the predicted reserved (the figure could be either):
  its error is the distance to the range's nearer end, 0 inside it (reported apart, by quantity).
  ``error = predicted / measured - 1`` (negative: under-predicted, the unsafe side).
* ``oom``: whether the verdict the user sees (:func:`vramplan.verdict.classify` with the row's
  leave-one-source-out band) calls it "comfortable" (a false "fits"); the central prediction
  (``peak_bytes <= capacity``) and "tight" are counted apart.
* ``fit_only``: whether the verdict calls it "no" (a false "does not fit": even the band's lower
  end exceeds the card); the central prediction over the card and "tight" are counted apart.
* ``inconsistent``: a measured figure below the stated configuration's own model state (weights,
  gradients, optimizer states: :func:`static_floor`), which no run of that configuration can print;
  listed, not scored.
* a row whose source leaves the LoRA rank or targets unknown (``config.unstated``) is planned once per
  plausible configuration (:mod:`vramplan.measurements.plausible`, ``vramplan/data/adapter_configs.toml``):
  its OOM / fit-only verdict is the envelope's (comfortable only if every configuration is, "no" only if
  every one is, else tight); a scored row keeps the central configuration's prediction and error, and
  :func:`widen_by_envelope` widens its band by the configurations' spread.
* anything the planner cannot express (model outside the catalogue, unknown batch or sequence,
  a method or strategy it does not model) is ``skipped`` with the reason, never dropped.

Bands (:func:`loso_bands`): for every scored row, the ratio ``measured / predicted - 1`` of the
*other* sources' rows of the same stack and method (else the same stack, else all), its 5th and
95th percentiles widened to at least +/-5%; the row's measured value is inside when
``predicted x (1 + lo) <= measured <= predicted x (1 + hi)``. ``estimated`` rows are scored apart
and never enter a band. :func:`fit_bands` computes the same from all sources: the planner's
bands (``vramplan/data/bands.toml``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..errors import VramplanError
from ..methods import Adapter, resolve, takes_adapter_choice
from .plausible import AdapterConfig, central_config, envelope_verdict, plausible_configs
from .record import MeasurementRecord

#: Percentiles of the residual ratio that bound the band, and its minimum half-width.
BAND_PERCENTILES = (5.0, 95.0)
MIN_BAND = 0.05
#: A group needs this many residuals from other sources to set its own band (else the wider group).
MIN_BAND_ROWS = 3
#: Compare-to quantity for each measured quantity.
LIKE_FOR_LIKE = {"max_allocated": "allocated", "torchtune_active": "allocated", "max_reserved": "reserved",
                 "device_total": "device", "unknown_peak": "reserved"}


@dataclass
class Scored:
    """One record against the planner (bytes per GPU)."""

    record: MeasurementRecord
    status: str                     # scored | oom | fit_only | skipped | estimated | inconsistent
    reason: str = ""
    predicted: int | None = None    # the like-for-like quantity
    allocated: int | None = None
    reserved: int | None = None
    device: int | None = None
    capacity: int | None = None
    fits: bool | None = None
    band: tuple[float, float] | None = None
    band_from: str = ""
    longest_seq: int | None = None  # a capacity row (limit max_seq): the planner's longest sequence on the card
    seq_curve: tuple | None = None  # (sequence grid, device totals) of a capacity row
    #: a row whose adapter settings are unstated: (configuration name, like-for-like predicted bytes or None,
    #: device total bytes) for each plausible configuration (vramplan.measurements.plausible), central first
    envelope: tuple = ()

    @property
    def capacity_error(self) -> float | None:
        """Raw longest sequence (central prediction at the card) / published longest - 1: the reserve's evidence."""
        if self.longest_seq is None or not self.record.config.seq:
            return None
        return self.longest_seq / self.record.config.seq - 1.0

    @property
    def comfortable_seq(self) -> int | None:
        """The longest sequence the planner calls comfortable with this row's band (what ``fit`` says as max_seq)."""
        if self.seq_curve is None or not self.capacity:
            return None
        from ..planner.limits import verdict_limits

        lo, hi = self.band if self.band else (0.0, 0.0)
        return verdict_limits(*self.seq_curve, self.capacity, hi, lo)[0]

    @property
    def comfortable_capacity_error(self) -> float | None:
        """Comfortable longest sequence / published longest - 1 (positive: the planner promises more: unsafe)."""
        c = self.comfortable_seq
        if c is None or not self.record.config.seq:
            return None
        return c / self.record.config.seq - 1.0

    @property
    def measured(self) -> int | None:
        return self.record.measurement.bytes

    @property
    def error(self) -> float | None:
        """predicted / measured - 1 (None unless scored)."""
        if self.predicted is None or not self.measured:
            return None
        return self.predicted / self.measured - 1.0

    @property
    def ratio(self) -> float | None:
        """measured / predicted - 1: how far the truth lies above the prediction (the band's variable)."""
        if self.predicted is None or not self.measured:
            return None
        return self.measured / self.predicted - 1.0

    @property
    def inside(self) -> bool | None:
        if self.band is None or self.ratio is None:
            return None
        return self.band[0] - 1e-12 <= self.ratio <= self.band[1] + 1e-12

    @property
    def central_verdict(self) -> str | None:
        """The verdict on the central prediction alone with this row's (leave-one-source-out) band."""
        if self.device is None or not self.capacity:
            return None
        from ..verdict import classify

        lo, hi = self.band if self.band else (0.0, 0.0)
        return classify(self.device, self.capacity, hi, lo).value

    @property
    def verdict(self) -> str | None:
        """The planner's verdict with this row's (leave-one-source-out) band: comfortable | tight | no. A row whose
        adapter settings are unstated takes the envelope's verdict over its plausible configurations
        (:func:`~vramplan.measurements.plausible.envelope_verdict`: comfortable only if every one is)."""
        if not self.envelope:
            return self.central_verdict
        if not self.capacity:
            return None
        from ..verdict import classify

        lo, hi = self.band if self.band else (0.0, 0.0)
        return envelope_verdict(classify(d, self.capacity, hi, lo).value for _, _, d in self.envelope)

    @property
    def envelope_spread(self) -> tuple[float, float] | None:
        """(smallest, largest) like-for-like prediction of the plausible configurations / the central - 1."""
        ps = [p for _, p, _ in self.envelope if p]
        if not ps or not self.predicted:
            return None
        return min(ps) / self.predicted - 1.0, max(ps) / self.predicted - 1.0

    @property
    def stack(self) -> str:
        return self.record.config.stack or "?"

    @property
    def method(self) -> str:
        c = self.record.config
        if takes_adapter_choice(c.method):
            return f"{c.method}+{c.adapter}"
        return c.method or "?"

    @property
    def source(self) -> str:
        return self.record.source.id

    @property
    def multi(self) -> bool:
        """Whether the run was sharded or offloaded (several GPUs, a ZeRO/FSDP strategy or offload): its
        error belongs to the multi-GPU engines' mechanisms, so it backs the multi-GPU bands, not the
        single-device ones (:func:`vramplan.bands.band_for`)."""
        c = self.record.config
        return (c.gpus or 1) > 1 or bool(c.strategy) or bool(c.offload)

    @property
    def gpu(self) -> str:
        c = self.record.config
        return f"{c.gpus}x{self.record.device.name or '?'}"

    @property
    def quantity(self) -> str:
        return self.record.measurement.quantity


#: the fields of a record's config the planner needs, each with why it cannot plan the record without it
_REQUIRED = (("model", "model not in the catalogue"), ("method", "method not modelled"), ("batch", "batch not stated"),
             ("seq", "sequence not stated"), ("optimizer", "optimizer not modelled"),
             ("grad_ckpt", "gradient checkpointing not stated"))


def plan(record: MeasurementRecord, adapter_config: AdapterConfig | None = None):
    """The planner's :class:`~vramplan.results.Estimate` for a record, or a VramplanError saying why not.

    A record whose adapter settings are unstated (``config.unstated``) is planned with ``adapter_config`` (one of
    :func:`~vramplan.measurements.plausible.plausible_configs`) filling them, by default the central one."""
    from ..plan import estimate

    c = record.config
    for name, why in _REQUIRED:
        if getattr(c, name) is None:
            raise VramplanError(why)
    gpu = record.device.name
    gpu_mem = record.device.memory_bytes if gpu is None else None
    kw: dict[str, Any] = dict(adapter=c.adapter if takes_adapter_choice(c.method) else None, gpu=gpu, gpu_mem=gpu_mem,
                              batch=c.batch, seq=c.seq, grad_ckpt=c.grad_ckpt, optimizer=c.optimizer,
                              precision=c.precision, attn=c.attn or "sdpa", framework=c.stack or "hf",
                              techniques=list(c.techniques) or None, gpus=c.gpus, strategy=c.strategy,
                              offload=c.offload, grad_accum=c.grad_accum)
    ad = _adapter(c)
    if ad is not None and ad.is_peft:  # adapters have target modules; the LoRA family a rank
        if ad.low_rank:
            kw["rank"] = c.rank or central_config().rank
        kw["targets"] = _fused_targets(c.model, list(c.targets)) or None
    if c.unstated:
        fill = (adapter_config or central_config()).settings(c.unstated, dropout_stated=c.dropout is not None)
        if "targets" in fill:
            fill["targets"] = _fused_targets(c.model, fill["targets"]) or None
        kw.update(fill)
    if c.double_quant is not None:
        kw["double_quant"] = c.double_quant
    if c.dropout:
        kw["dropout"] = c.dropout
    # the package versions the source ran; a package it does not name is planned at its latest
    # behaviour (never this machine's installed version: the score must not depend on the machine)
    from ..stacks import behaviours

    versions = {b.package: "latest" for b in behaviours().values()}
    versions.update({k.lower(): v for k, v in record.device.versions.items()})
    kw["versions"] = versions
    if c.engine_options:
        # the engine's settings the run used (sources.toml engine_options): the per-GPU planner takes them
        from ..planner.estimating import per_gpu_peak

        return per_gpu_peak(c.model, c.method, engine_options=dict(c.engine_options), **kw).estimate
    return estimate(c.model, c.method, **kw)


def _adapter(c) -> Adapter | None:
    """The :class:`~vramplan.methods.Adapter` a record's configuration trains (its method's, or the adapter it chose
    for a method that takes one), or None when the planner cannot resolve it."""
    try:
        return resolve(c.method, c.adapter if takes_adapter_choice(c.method) else None).adapter
    except VramplanError:
        return None


def _fused_targets(model: str, targets: list[str]) -> list[str]:
    """A source's q/k/v targets on an architecture with one fused qkv linear (Falcon, GPT-NeoX: litgpt adapts
    the q and v slices of its fused ``attn`` linear): the fused module, which is what PEFT can target -- its
    LoRA-B is q+2kv wide where litgpt's covers the adapted slices (a few rank-wide vectors more per token)."""
    from ..models import get_model

    spec = get_model(model)
    if not spec.fused_qkv or not targets:
        return targets
    qkv = {spec.mod(r) for r in ("q_proj", "k_proj", "v_proj")} | {"q_proj", "k_proj", "v_proj"}
    fused = spec.mod("qkv_proj")
    out = [fused if t in qkv else t for t in targets]
    return list(dict.fromkeys(out))


#: A measured figure below this fraction of the stated configuration's static model state cannot be a
#: measurement of that configuration (a mislabelled card count, a different optimizer): "inconsistent".
FLOOR_FRACTION = 0.95


def static_floor(est, like: str) -> int:
    """Bytes of the model state alone (weights, quantisation constants, adapters, master weights,
    gradients, optimizer states) as the estimate holds them at its peak; paged optimizer states are
    left out of the allocator's quantities (they live outside it)."""
    from ..taxonomy import Component as C

    keys = (C.WEIGHTS, C.QUANT_STATE, C.ADAPTERS, C.MASTER_WEIGHTS, C.GRADIENTS, C.OPTIMIZER_STATES)
    total = sum(int(est.components.get(k, 0)) for k in keys)
    if like != "device":
        total -= int(getattr(est.overheads, "paged_bytes", 0) or 0)
    return max(0, total)


def score_one(record: MeasurementRecord) -> Scored:
    m = record.measurement
    if record.estimated:
        status = "estimated"
    elif m.outcome == "measured":
        status = "scored"
    else:
        status = m.outcome
    try:
        est = plan(record)
    except VramplanError as exc:
        why = str(exc.args[0]) if exc.args else str(exc)
        return Scored(record, "estimated" if record.estimated else "skipped", why)
    o = est.overheads
    s = Scored(record, status, allocated=int(o.allocated_bytes), reserved=int(o.reserved_bytes),
               device=int(est.peak_bytes), capacity=est.capacity_bytes,
               fits=None if est.capacity_bytes is None else bool(est.peak_bytes <= est.capacity_bytes))
    if m.outcome == "measured":
        s.predicted = _like_for_like(m, est)
        floor = static_floor(est, LIKE_FOR_LIKE[m.quantity])
        if s.status == "scored" and m.bytes < FLOOR_FRACTION * floor:
            s.status = "inconsistent"
            s.reason = (f"measured {m.bytes / 2**30:.2f} GiB is below the stated configuration's model state "
                        f"({floor / 2**30:.2f} GiB: weights, gradients and optimizer states, no activations)")
    elif s.capacity is None:
        s.status, s.reason = "skipped", f"{m.outcome} without a stated card capacity"
    elif m.limit == "max_seq":
        from ..planner.limits import fitting_prefix

        s.seq_curve = _seq_curve(record, est)
        n = int(fitting_prefix(s.seq_curve[1], s.capacity))
        s.longest_seq = int(s.seq_curve[0][n - 1]) if n else 0
    if record.config.unstated and s.status in ("scored", "oom", "fit_only", "estimated"):
        s.envelope = _envelope(record, est)
    return s


def _like_for_like(m, est) -> int:
    """The prediction of quantity ``m.quantity`` from an estimate (bytes per GPU)."""
    o = est.overheads
    alloc, res = int(o.allocated_bytes), int(o.reserved_bytes)
    if m.quantity == "unknown_peak":
        # a peak of unknown kind is one of allocated / active / reserved: the prediction is that range,
        # and its error the distance from the measured value to the range's nearer end
        return int(min(max(m.bytes, alloc), res))
    return {"allocated": alloc, "reserved": res, "device": int(est.peak_bytes)}[LIKE_FOR_LIKE[m.quantity]]


def _envelope(record: MeasurementRecord, central_est) -> tuple:
    """(name, like-for-like predicted or None, device total) of each plausible configuration, central first."""
    m = record.measurement
    out = []
    for cfg in plausible_configs():
        try:
            est = central_est if cfg.central else plan(record, cfg)
        except VramplanError:  # a configuration the planner refuses for this model (a rank wider than a layer)
            continue
        like = _like_for_like(m, est) if m.outcome == "measured" and m.bytes else None
        out.append((cfg.name, like, int(est.peak_bytes)))
    return tuple(out)


def _seq_curve(record: MeasurementRecord, est) -> tuple:
    """(grid, device totals) of the record's configuration at its batch on its card (~400 steps up to 2x the
    published sequence)."""
    from ..models import get_model
    from ..planner.checks import resolve_gpu
    from ..planner.limits import device_totals

    card = resolve_gpu(record.device.name, record.device.memory_bytes if record.device.name is None else None)
    top = 2 * int(record.config.seq)
    step = max(16, top // 400)
    grid = np.arange(step, top + 1, step)
    return grid, device_totals(get_model(record.config.model), est.config, card, batch=est.config.batch, seq=grid)


def score(records: Iterable[MeasurementRecord]) -> list[Scored]:
    return [score_one(r) for r in records]


#: Candidate allocator reserves (fractions of the step's allocations, ``vramplan.overheads``) that
#: :func:`score_reserve_loso` fits leave-one-source-out.
RESERVE_GRID = (0.10, 0.15, 0.20, 0.25, 0.30, 0.35)
#: Measured quantities that include the allocator's reserve. Their rows, and the published context
#: capacities (a run stops fitting when the device runs out), are the reserve's evidence; allocated
#: quantities carry none and a peak of unknown kind cannot tell.
RESERVE_QUANTITIES = ("max_reserved", "device_total")


def reserve_evidence(scored: list[Scored]) -> list[float]:
    """|log(predicted / measured)| of the rows that measure the reserve: scored rows of a reserved or
    device-total quantity, and capacity rows (predicted / published longest sequence, floored at 0.1)."""
    out = []
    for s in scored:
        if s.status == "scored" and s.quantity in RESERVE_QUANTITIES and s.error is not None:
            out.append(abs(float(np.log1p(s.error))))
        elif s.capacity_error is not None:
            out.append(abs(float(np.log(max(0.1, 1.0 + s.capacity_error)))))
    return out


@contextmanager
def reserve_fraction(frac: float):
    """Plan with ``frac`` as the default allocator reserve inside the block (the benchmark's fit)."""
    from .. import overheads

    old = overheads.DEFAULT_RESERVE_FRACTION
    overheads.DEFAULT_RESERVE_FRACTION = float(frac)
    try:
        yield
    finally:
        overheads.DEFAULT_RESERVE_FRACTION = old


def _best_fraction(by_frac: dict[float, list[Scored]], exclude: str | None) -> float:
    """The grid's fraction with the smallest median reserve evidence over the sources but ``exclude``
    (ties: the larger reserve, the safe side)."""
    best, best_obj = None, None
    for frac in sorted(by_frac, reverse=True):
        ev = reserve_evidence([s for s in by_frac[frac] if s.source != exclude])
        obj = float(np.median(ev)) if ev else 0.0
        if best_obj is None or obj < best_obj - 1e-12:
            best, best_obj = frac, obj
    return float(best)


def score_reserve_loso(records: Iterable[MeasurementRecord], grid=RESERVE_GRID):
    """Score ``records`` with the default allocator reserve fitted leave-one-source-out.

    Every record is scored at each fraction of ``grid``; a source's rows take the fraction that best
    predicts the other sources' reserve evidence (:func:`reserve_evidence`). Returns ``(scored,
    {source: fraction}, fraction fitted on every source)``: the last is what the planner ships
    (``vramplan.overheads.DEFAULT_RESERVE_FRACTION``)."""
    records = list(records)
    by_frac = {}
    for frac in grid:
        with reserve_fraction(frac):
            by_frac[float(frac)] = score(records)
    fits = {src: _best_fraction(by_frac, src) for src in sorted({r.source.id for r in records})}
    out = [by_frac[fits[r.source.id]][i] for i, r in enumerate(records)]
    return out, fits, _best_fraction(by_frac, None)


def _band_of(ratios: list[float]) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(ratios, dtype=np.float64), BAND_PERCENTILES)
    return (float(min(lo, -MIN_BAND)), float(max(hi, MIN_BAND)))


LEVELS = ("stack+method", "stack", "all")


def _key(level: str, s: Scored, layout: str | None = None) -> tuple:
    """``s``'s group at ``level``, within its layout (``single`` | ``multi``, :attr:`Scored.multi`) unless given."""
    lay = layout or ("multi" if s.multi else "single")
    return {"stack+method": (lay, s.stack, s.method), "stack": (lay, s.stack), "all": (lay,)}[level]


def _groups(s: Scored) -> list[tuple[str, tuple]]:
    """The band's groups, most specific first: stack+method, stack, all -- of the row's layout; a sharded or
    offloaded row then falls back to the single-device groups (:func:`vramplan.bands.band_for`'s chain)."""
    out = [(level, _key(level, s)) for level in LEVELS]
    if s.multi:
        out += [(level, _key(level, s, "single")) for level in LEVELS]
    return out


def band_name(key: tuple) -> str:
    """The name of a group in ``bands.json``: ``hf/lora``, ``hf``, ``all`` (single device); ``multi:hf/lora``,
    ``multi:hf``, ``multi`` (sharded or offloaded runs)."""
    lay, rest = key[0], key[1:]
    name = "/".join(rest) if rest else ("all" if lay == "single" else "")
    if lay == "single":
        return name
    return f"multi:{name}" if name else "multi"


def loso_bands(scored: list[Scored]) -> list[Scored]:
    """Set each scored row's band from the other sources' residuals (leave one source out)."""
    pool = [s for s in scored if s.status == "scored" and s.ratio is not None]
    for s in scored:
        outcome = s.status in ("oom", "fit_only") and s.device is not None
        if not outcome and (s.status not in ("scored", "estimated") or s.ratio is None):
            continue
        for level, key in _groups(s):
            others = [o.ratio for o in pool if o.source != s.source and _key(level, o) == key]
            if len(others) >= MIN_BAND_ROWS:
                s.band, s.band_from = _band_of(others), f"{level} ({len(others)} rows of other sources)"
                break
    return scored


def widen_by_envelope(scored: list[Scored]) -> list[Scored]:
    """Widen the band of each scored row whose adapter settings are unstated by its plausible configurations'
    spread: ``lo' = p_min / p x (1 + lo) - 1``, ``hi' = p_max / p x (1 + hi) - 1`` (``p``: the central prediction),
    so the band covers the truth of whichever configuration ran. The central prediction and its error stay."""
    for s in scored:
        sp = s.envelope_spread
        if s.status != "scored" or s.band is None or sp is None or sp == (0.0, 0.0):
            continue
        lo, hi = s.band
        s.band = ((1.0 + sp[0]) * (1.0 + lo) - 1.0, (1.0 + sp[1]) * (1.0 + hi) - 1.0)
        s.band_from += "; widened by the plausible adapter configurations' spread"
    return scored


def shipped_bands(scored: list[Scored]) -> list[Scored]:
    """Set each row's band to the one the planner ships (``vramplan/data/bands.json``, fitted on the shipped
    corpus; :func:`vramplan.bands.band_for`): how held-out tables are scored, as a user would be told."""
    from ..bands import band_for

    for s in scored:
        outcome = s.status in ("oom", "fit_only") and s.device is not None
        if not outcome and (s.status not in ("scored", "estimated") or s.ratio is None):
            continue
        b = band_for(s.stack, s.method or "?", multi=s.multi)
        s.band, s.band_from = (b.lo, b.hi), f"shipped {b.level} {b.key} ({b.rows} rows)"
    return scored


def fit_bands(scored: list[Scored]) -> dict[str, dict]:
    """Bands from every source, per layout (:func:`band_name`): name -> level, lo, hi, n, sources."""
    pool = [s for s in scored if s.status == "scored" and s.ratio is not None]
    out: dict[str, dict] = {}
    for level in LEVELS:
        for key in sorted({_key(level, s) for s in pool}, key=str):
            rs = [s for s in pool if _key(level, s) == key]
            if len(rs) < MIN_BAND_ROWS:
                continue
            lo, hi = _band_of([s.ratio for s in rs])
            out[band_name(key)] = {"level": level, "lo": round(lo, 4), "hi": round(hi, 4), "n": len(rs),
                                   "sources": len({s.source for s in rs})}
    return out


@dataclass
class Summary:
    """The accounting and the accuracy figures of a set of scored rows."""

    rows: int
    scored: int
    skipped: int
    inconsistent: int
    estimated: int
    oom: int
    fit_only: int
    median_abs: float | None
    p90_abs: float | None
    under_10: float | None           # share of scored rows with error < -10%
    inside_band: float | None        # share of scored rows with a band whose measured value is inside it
    oom_predicted_fit: int               # OOM rows the verdict calls comfortable (a false "fits")
    fit_only_predicted_no: int           # fit-only rows the verdict calls "no" (a false "does not fit")
    oom_predicted_comfortable: int = 0   # = oom_predicted_fit (the name the report used before the verdict was two-sided)
    oom_raw_fit: int = 0                 # OOM rows whose central predicted peak is <= the card
    oom_tight: int = 0                   # OOM rows the verdict calls tight (may fit)
    fit_only_raw_no: int = 0             # fit-only rows whose central predicted peak exceeds the card
    fit_only_tight: int = 0              # fit-only rows the verdict calls tight
    capacity_rows: int = 0               # fit-only rows that are a published longest sequence
    capacity_median: float | None = None  # median of comfortable longest sequence / published - 1 (what fit says)
    capacity_over: int = 0               # capacity rows whose comfortable longest sequence exceeds the published
    capacity_raw_median: float | None = None  # the same with the raw limit (central prediction at the card)
    capacity_raw_over: int = 0
    skip_reasons: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def summarize(scored: list[Scored]) -> Summary:
    from collections import Counter

    sc = [s for s in scored if s.status == "scored" and s.error is not None]
    errs = np.asarray([s.error for s in sc], dtype=np.float64)
    banded = [s for s in sc if s.inside is not None]
    oom = [s for s in scored if s.status == "oom"]
    fo = [s for s in scored if s.status == "fit_only"]
    cap = [s for s in fo if s.capacity_error is not None]
    return Summary(
        rows=len(scored), scored=len(sc), skipped=sum(s.status == "skipped" for s in scored),
        inconsistent=sum(s.status == "inconsistent" for s in scored),
        estimated=sum(s.status == "estimated" for s in scored), oom=len(oom), fit_only=len(fo),
        median_abs=float(np.median(np.abs(errs))) if len(sc) else None,
        p90_abs=float(np.percentile(np.abs(errs), 90)) if len(sc) else None,
        under_10=float(np.mean(errs < -0.10)) if len(sc) else None,
        inside_band=float(np.mean([s.inside for s in banded])) if banded else None,
        oom_predicted_fit=sum(s.verdict == "comfortable" for s in oom),
        fit_only_predicted_no=sum(s.verdict == "no" for s in fo),
        oom_predicted_comfortable=sum(s.verdict == "comfortable" for s in oom),
        oom_raw_fit=sum(bool(s.fits) for s in oom), oom_tight=sum(s.verdict == "tight" for s in oom),
        fit_only_raw_no=sum(s.fits is False for s in fo), fit_only_tight=sum(s.verdict == "tight" for s in fo),
        capacity_rows=len(cap),
        capacity_median=float(np.median([s.comfortable_capacity_error for s in cap])) if cap else None,
        capacity_over=sum(s.comfortable_capacity_error > 0 for s in cap),
        capacity_raw_median=float(np.median([s.capacity_error for s in cap])) if cap else None,
        capacity_raw_over=sum(s.capacity_error > 0 for s in cap),
        skip_reasons=dict(Counter(s.reason for s in scored if s.status == "skipped")),
    )


def group_by(scored: list[Scored], attr: str) -> dict[str, Summary]:
    keys = sorted({str(getattr(s, attr)) for s in scored})
    return {k: summarize([s for s in scored if str(getattr(s, attr)) == k]) for k in keys}

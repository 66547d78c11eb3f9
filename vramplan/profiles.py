"""Per-card calibration profiles: the versioned schema, validation on load, and lookup.

A profile is what ``vramplan calibrate`` fits from real steps on one card
(``profiles/<gpu>.json``, beside the raw JSONL log it was fitted from). The planner asks it
for the runtime overheads and corrections it would otherwise take from defaults; every
getter returns ``None`` (or 1.0 for a factor) when the profile did not calibrate that
number, so the caller can say which numbers are calibrated and which are defaults.

Schema (``"schema": "vramplan.profile"``, ``"version": 1``)::

    gpu            catalogue name of the card (the file's stem)
    device         {name, kind, total_bytes, compute_capability, sm_count, index}
    versions       {driver, cuda, torch, transformers, peft, bitsandbytes, vramplan, python}
    created        ISO-8601 UTC time of the fit
    source         {log, sha256, records, points, fit_points, holdout_points, suite}
    allocated_source  "torch.cuda" (max_memory_allocated) or "dryrun" (a CPU profile)
    context        {bytes, n, residual} | null   NVML process memory minus torch reserved
    workspace      {bytes, n, residual} | null   cuBLAS workspace, probed from the allocator
    allocator      {slope, intercept_bytes, round_bytes, by_method, margin, trimmed, loo, n, residual} | null
                   reserved = ceil((slope * allocated + intercept) / round) * round, times
                   by_method[method] where the method has its own correction (a trimmed fit:
                   vramplan.calibration.fit); margin: the safety margin, a fraction of reserved,
                   kept apart from the fitted value (the planner's band takes it in); loo:
                   {method: residual} of leave-one-out predictions; trimmed: outliers left out
    activation_factors  {method: {factor, n, residual}}   measured/predicted activations
    throughput     {method: {coef, features, knots, n, residual}}
                   step seconds = coef . features (see :func:`step_features`); coef is null
                   for QLoRA recipes, timed as their LoRA twin plus qlora_dequant;
                   knots = [[tokens per step, achieved TFLOP/s], ...] (medians)
    qlora_dequant  {s_per_gparam, n, residual} | null   seconds per 1e9 NF4 weights dequantised
    holdout        {reserved, allocated, device_total, tokens_per_s: residual}   held-out accuracy
    holdout_by_method  {method: {quantity: residual}}   the same, per method
    stack          the training stack the per-method figures were measured with ("hf")
    scope          {card: [context, workspace], stack: [allocator, activation_factors, ...]}:
                   card figures apply to any run on the card; stack figures only to runs on
                   ``stack`` (the planner says which it used)

Validation on load is in value, not only in shape: finite numbers, non-negative residuals,
plausible bytes, TFLOP/s and margins (``MAX_*``), and the profile is bound to its device
(:func:`check_binding`: its ``gpu`` names the card looked up, a GPU's profile was measured
on a GPU, its recorded device name is not another catalogue card). Anything else -- UTF-16,
deep nesting, a huge file -- is one :class:`ProfileError` line, never a traceback.

A residual is ``{n, median_rel, median_abs_rel, p90_abs_rel, max_under_rel, max_over_rel}``
with relative error ``(predicted - measured) / measured`` (negative: under-prediction).

Lookup order of :func:`load_profile`: directories in ``$VRAMPLAN_PROFILES`` (``os.pathsep``
separated), ``./profiles``, the source checkout's top-level ``profiles/``, then the
packaged ``vramplan/profiles_data/``. This module never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import ProfileError
from .stacks import DEFAULT_STACK

SCHEMA = "vramplan.profile"
SCHEMA_VERSION = 1
PACKAGE_DIR = Path(__file__).resolve().parent / "profiles_data"
REPO_DIR = Path(__file__).resolve().parent.parent / "profiles"
#: Allocator segment granularity: large blocks are rounded to 2 MiB (c10/cuda/CUDACachingAllocator.cpp, kRoundLarge).
ALLOCATOR_ROUND = 2 << 20
#: The features of the step-time model, in the order of ``throughput[method].coef``.
TIME_FEATURES = ("layer_passes", "gen_passes", "flops", "flops_per_width")
#: Plausibility bounds of a profile's values (a profile outside them is refused on load).
MAX_REL_ERROR = 1000.0          # a residual of 100,000%: not even a noisy CPU timing is that wrong
MAX_BYTES = 1 << 44             # 16 TiB: more than any card (and than float64 holds exactly per byte)
MAX_CONTEXT_BYTES = 64 << 30    # CUDA context + lazily loaded kernels: hundreds of MiB on real cards
MAX_TFLOPS = 100_000.0          # achieved TFLOP/s of one card
MAX_MARGIN = 1.0                # an allocator safety margin of 100%
# DEFAULT_STACK (vramplan.stacks): the stack a profile's per-method figures were measured with when the file
# does not say (runtime: HF + PEFT).


def profile_key(gpu_name: str) -> str:
    """File stem of a card's profile: lower case, runs of other characters folded to ``-``."""
    key = re.sub(r"[^a-z0-9.+_]+", "-", str(gpu_name).lower()).strip("-")
    if not key:
        raise ProfileError(f"cannot name a profile after GPU {gpu_name!r}")
    return key


# -- residuals -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Residual:
    """Relative errors ``(predicted - measured) / measured`` of one fitted quantity."""

    n: int = 0
    median_rel: float | None = None
    median_abs_rel: float | None = None
    p90_abs_rel: float | None = None
    max_under_rel: float | None = None  # most negative error, as a positive fraction (0.02 = 2 % under)
    max_over_rel: float | None = None

    @classmethod
    def of(cls, predicted: Sequence[float], measured: Sequence[float]) -> "Residual":
        rel = [(p - m) / m for p, m in zip(predicted, measured) if m and p is not None and m > 0]
        if not rel:
            return cls()
        rel.sort()
        absr = sorted(abs(r) for r in rel)
        return cls(n=len(rel), median_rel=median(rel), median_abs_rel=median(absr),
                   p90_abs_rel=_quantile(absr, 0.9), max_under_rel=max(0.0, -rel[0]), max_over_rel=max(0.0, rel[-1]))

    def to_json(self) -> dict:
        return {k: (None if v is None else (v if isinstance(v, int) else round(float(v), 6)))
                for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Residual":
        if d is None:
            return cls()
        _need_map(d, where)
        out = {}
        for k in cls.__dataclass_fields__:
            v = d.get(k)
            if k == "n":
                out[k] = _int(v if v is not None else 0, f"{where}.n")
            elif v is not None:
                x = _num(v, f"{where}.{k}")
                if k != "median_rel" and x < 0:
                    raise ProfileError(f"{where}.{k} must be non-negative, got {x}", "re-run `vramplan calibrate`")
                if abs(x) > MAX_REL_ERROR or (k == "max_under_rel" and x > 1):  # under: at most 100%
                    raise ProfileError(f"{where}.{k} = {x} is implausible (a relative error beyond "
                                       f"{MAX_REL_ERROR:g})", "re-run `vramplan calibrate`")
                out[k] = x
        return cls(**out)


def median(xs: Sequence[float]) -> float:
    """The median of ``xs`` (the mean of the middle two for an even count)."""
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


# -- fitted parts --------------------------------------------------------------------------

@dataclass(frozen=True)
class Fitted:
    """A fitted scalar (bytes, a factor, seconds per Gparam) with its residual."""

    value: float
    n: int
    residual: Residual = field(default_factory=Residual)


@dataclass(frozen=True)
class AllocatorModel:
    """``reserved = ceil((slope * allocated + intercept) / round) * round``, never below allocated."""

    slope: float
    intercept_bytes: int
    round_bytes: int = ALLOCATOR_ROUND
    n: int = 0
    residual: Residual = field(default_factory=Residual)
    by_method: dict = field(default_factory=dict)  # method -> multiplicative correction of reserved
    margin: float = 0.0    # safety margin, a fraction of reserved (p90 of the leave-one-out under-predictions)
    loo: dict = field(default_factory=dict)  # method -> Residual of leave-one-out predictions
    trimmed: int = 0       # points the trimmed fit left out (fragmented caches, stray readings)

    def __call__(self, allocated: int) -> int:
        return int(self.reserve(int(allocated)))

    def reserve(self, allocated, correction: float | None = None):
        """Reserved bytes for ``allocated`` (an int or a numpy array of them), times ``correction``.

        The one implementation of the formula (the planner's vectorised grids and the scalar
        getters both call it): ``r0 = ceil(max(A, slope * A + intercept) / round) * round``;
        with a per-method ``correction`` k, ``max(A, ceil(r0 * k / round) * round)``. float64
        holds every byte count below 2**53 exactly, so scalars and arrays agree to the byte.
        """
        a = np.asarray(allocated, dtype=np.float64)
        r = float(max(1, int(self.round_bytes)))
        out = np.ceil(np.maximum(a, self.slope * a + float(self.intercept_bytes)) / r) * r
        if correction is not None:
            out = np.maximum(a, np.ceil(out * float(correction) / r) * r)
        return out if out.ndim else float(out)


@dataclass(frozen=True)
class Throughput:
    """Step-time model of one method: ``seconds = coef . features`` (see :func:`step_features`)."""

    coef: tuple[float, ...] | None  # None: no time model of its own (QLoRA: its LoRA twin + dequantisation)
    knots: tuple[tuple[int, float], ...] = ()  # (tokens per step, achieved TFLOP/s), tokens ascending
    n: int = 0
    residual: Residual = field(default_factory=Residual)

    def seconds(self, features: Mapping[str, float]) -> float | None:
        if self.coef is None:
            return None
        return float(sum(c * float(features.get(name, 0.0)) for c, name in zip(self.coef, TIME_FEATURES)))


def step_features(*, flops: float, layers: int, hidden: int, passes: int = 3, gen_tokens: int = 0) -> dict[str, float]:
    """The regressors of the step-time model.

    Args:
        flops: FLOPs of one optimiser step (``vramplan.throughput.step_work``'s ``model_flops``).
        layers: decoder layers of the model.
        hidden: hidden width (small widths run matmuls below peak: the ``flops / width`` term).
        passes: sequential passes over the layers per step (forward + backward = 2 plus a
            recompute under GC, plus no-grad forwards of frozen copies); each costs kernel launches.
        gen_tokens: tokens generated one at a time (PPO rollout), each a pass over the layers.

    The model ``t = a * layers * passes + b * layers * gen_tokens + c * flops + d * flops / hidden``
    is a launch-overhead plus roofline form: ``1 / c`` is the asymptotic FLOP rate, and
    ``d`` the loss of efficiency of narrow matmuls (tile quantisation).
    """
    return {"layer_passes": float(layers * passes), "gen_passes": float(layers * gen_tokens),
            "flops": float(flops), "flops_per_width": float(flops) / max(1, hidden)}


# -- the profile ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """A card's calibration, as loaded from ``profiles/<gpu>.json``.

    Getters return ``None`` for numbers this profile did not calibrate (the planner then
    uses its defaults and says so); :meth:`activation_factor` returns 1.0.
    """

    gpu: str
    device: dict
    versions: dict
    created: str
    source: str  # the JSONL log the profile was fitted from (file name, beside the profile)
    source_info: dict
    allocated_source: str
    context: Fitted | None = None
    workspace: Fitted | None = None
    allocator: AllocatorModel | None = None
    activation_factors: dict[str, Fitted] = field(default_factory=dict)
    throughput: dict[str, Throughput] = field(default_factory=dict)
    qlora_dequant: Fitted | None = None
    holdout: dict[str, Residual] = field(default_factory=dict)
    path: str | None = None
    stack: str = DEFAULT_STACK  # the training stack the per-method figures were measured with
    holdout_by_method: dict = field(default_factory=dict)  # method -> {quantity: Residual} of held-out points

    #: What a profile holds, by what it belongs to. ``card``: figures of this card whatever runs on
    #: it (CUDA context, cuBLAS workspace). ``stack``: figures of one allocator and training stack,
    #: measured per method, which transfer between cards of that allocator and stack but not to
    #: another stack (allocator reserve model and its per-method corrections, activation factors,
    #: step-time models).
    CARD_FIGURES = ("context", "workspace")
    STACK_FIGURES = ("allocator", "activation_factors", "throughput", "qlora_dequant")

    def applies_to(self, stack: str | None) -> bool:
        """Whether this profile's stack figures apply to a run on ``stack`` (None: the profile's own)."""
        return stack is None or str(stack).lower() == self.stack

    def scope_note(self, stack: str | None) -> str:
        """One phrase saying which of the profile's figures a run on ``stack`` uses."""
        if self.applies_to(stack):
            return f"card figures and {self.stack} stack figures from the profile"
        return (f"card figures only (context, workspace): the profile's per-method figures were measured "
                f"with the {self.stack} stack, not {stack}")

    # -- getters the planner uses --
    @property
    def context_bytes(self) -> int | None:
        """CUDA context and lazily loaded kernels (NVML process memory minus torch's reserve)."""
        return None if self.context is None else int(self.context.value)

    @property
    def workspace_bytes(self) -> int | None:
        """cuBLAS/cuBLASLt workspaces held in the caching allocator (counted as allocated)."""
        return None if self.workspace is None else int(self.workspace.value)

    @property
    def qlora_dequant_s_per_gparam(self) -> float | None:
        """Seconds to dequantise 1e9 NF4 weights once (forward or backward pass)."""
        return None if self.qlora_dequant is None else float(self.qlora_dequant.value)

    def reserved_bytes(self, allocated_peak: int, method: str | None = None) -> int | None:
        """Peak ``max_memory_reserved`` for a peak ``max_memory_allocated`` (None if not calibrated).

        ``allocated_peak`` is what ``torch.cuda.max_memory_allocated`` would show: live tensors
        *including* the cuBLAS workspaces (:attr:`workspace_bytes`). With ``method``, that
        method's own correction of the allocator model applies where one was fitted.
        """
        if self.allocator is None:
            return None
        return int(self.allocator.reserve(int(allocated_peak), self.allocator_correction(method)))

    def allocator_correction(self, method: str | None) -> float | None:
        """``method``'s multiplicative correction of the allocator model, or None (none fitted)."""
        if self.allocator is None or method is None:
            return None
        k = self._lookup(self.allocator.by_method, method)
        return None if k is None else float(k)

    def memory_band(self) -> tuple[float, str, str] | None:
        """The +/- band of a calibrated memory prediction, from this profile's own residuals.

        Returns ``(fraction, applies_to, source)``: the larger of the p90 absolute error and
        the worst under-prediction of, in order of preference, the held-out device totals
        (``applies_to = "device_total"``), the held-out reserved peaks, or the allocator
        fit's own points (``"reserved"``). None where no residual was measured: the planner
        then uses its default band and says so.
        """
        cands = [("device_total", self.holdout.get("device_total"), "held-out device total"),
                 ("reserved", self.holdout.get("reserved"), "held-out peak reserved"),
                 ("reserved", self.allocator.residual if self.allocator else None, "allocator fit points")]
        margin = self.allocator.margin if self.allocator is not None else 0.0
        for applies, r, label in cands:
            if r is None or not r.n:
                continue
            frac = max(r.p90_abs_rel or 0.0, r.max_under_rel or 0.0)
            if margin > frac:
                return margin, applies, f"allocator safety margin (p90 of leave-one-out under-predictions), n={self.allocator.n}"
            return frac, applies, f"{label}, n={r.n}"
        if margin > 0:
            return margin, "reserved", f"allocator safety margin (p90 of leave-one-out under-predictions), n={self.allocator.n}"
        return None

    def reserved_uncertainty_bytes(self, allocated_peak: int) -> int:
        """A +/- band on :meth:`reserved_bytes` (:meth:`memory_band`'s fraction of it; 0 without residuals)."""
        band = self.memory_band()
        base = self.reserved_bytes(allocated_peak) or int(allocated_peak)
        return 0 if band is None else int(band[0] * base)

    def describe(self) -> str:
        """``<file> (<device>; driver D, CUDA C, torch T; fitted <time>)``: where a calibration comes from."""
        v = self.versions or {}
        parts = [f"{k} {v[k2]}" for k, k2 in (("driver", "driver"), ("CUDA", "cuda"), ("torch", "torch"))
                 if v.get(k2)]
        dev = (self.device or {}).get("name") or self.gpu
        return (f"{self.path or self.gpu + '.json'} ({dev}; " + (", ".join(parts) or "versions not recorded")
                + f"; fitted {self.created})")

    def activation_factor(self, method: str) -> float:
        """Measured / predicted activation bytes for ``method`` (``dpo+qlora``, ``dpo``, ...); 1.0 if unknown."""
        f = self._lookup(self.activation_factors, method)
        return 1.0 if f is None else float(f.value)

    def step_seconds(self, method: str, features: Mapping[str, float], *, dequant_gparams: float = 0.0,
                     stack: str | None = None) -> float | None:
        """Predicted seconds of one step from :func:`step_features`, plus QLoRA dequantisation.

        ``dequant_gparams`` is NF4 weights dequantised per step in 1e9 (linear params x passes);
        a QLoRA method without its own time model uses its LoRA twin's model plus this term.
        ``stack``: the run's training stack; None (not calibrated) when the profile measured another.
        """
        if not self.applies_to(stack):
            return None
        from .methods import sixteen_bit_twin

        key = method.lower()
        twin_key = sixteen_bit_twin(key)
        own = self._lookup(self.throughput, key, siblings=twin_key is None)
        if own is not None and own.coef is not None:
            return max(own.seconds(features), 1e-9)
        if twin_key is None or self.qlora_dequant is None:
            return None
        twin = self._lookup(self.throughput, twin_key, siblings=True)
        if twin is None or twin.coef is None:
            return None
        return max(twin.seconds(features), 1e-9) + self.qlora_dequant.value * float(dequant_gparams)

    def achieved_tflops(self, method: str, tokens: int | None = None, *, flops: float | None = None,
                        features: Mapping[str, float] | None = None, stack: str | None = None) -> float | None:
        """Achieved TFLOP/s of ``method`` (FLOPs as ``vramplan.throughput.step_work`` counts them).

        With ``features`` (and ``flops``), from the step-time model; with ``tokens`` only, the
        measured medians interpolated in log(tokens per step) and clamped at the ends; with
        neither, the median over the method's points. None when the method was not calibrated.
        """
        if not self.applies_to(stack):
            return None
        if features is not None:
            t = self.step_seconds(method, features)
            f = flops if flops is not None else features.get("flops")
            return None if t is None or not f else float(f) / t / 1e12
        tp = self._lookup(self.throughput, method, siblings=True)
        if tp is None or not tp.knots:
            return None
        if tokens is None:
            return median([k[1] for k in tp.knots])
        return _interp_log(tp.knots, float(tokens))

    def is_calibrated(self, what: str) -> bool:
        """``context``, ``workspace``, ``allocator``, ``qlora_dequant``, ``activation:<m>``, ``throughput:<m>``."""
        kind, _, m = what.partition(":")
        if kind == "activation":
            return self._lookup(self.activation_factors, m) is not None
        if kind == "throughput":
            return self.step_seconds(m, step_features(flops=1e12, layers=1, hidden=1024), dequant_gparams=1.0) is not None
        return getattr(self, kind, None) is not None

    @property
    def calibrated(self) -> list[str]:
        """Names of the calibrated quantities (for the planner's 'calibrated vs default' notes)."""
        out = [k for k in ("context", "workspace", "allocator", "qlora_dequant") if getattr(self, k) is not None]
        out += [f"activation:{m}" for m in self.activation_factors]
        out += [f"throughput:{m}" for m in self.throughput]
        return out

    @staticmethod
    def _lookup(table: Mapping[str, Any], method: str, siblings: bool = False):
        """``table[method]``, accepting a method name (``dpo``) for its default recipe (``dpo+lora``).

        With ``siblings``, fall back to another adapter of the same method (``dpo+dora`` ->
        ``dpo+lora``), the default adapter first: for throughput, where adapters differ little.
        """
        key = method.lower()
        if key in table:
            return table[key]
        from .methods import parse_recipe_name, resolve

        base, adapter = parse_recipe_name(key)
        try:
            default = resolve(base).name
        except Exception:  # an unknown method name: no fallback
            default = None
        if adapter is None and default in table:
            return table[default]
        if siblings:
            if default in table:
                return table[default]
            for k in sorted(table):
                if parse_recipe_name(k)[0] == base:
                    return table[k]
        return None

    # -- (de)serialisation --
    def to_json(self) -> dict:
        def fitted(f: Fitted | None, name: str):
            if f is None:
                return None
            return {name: (int(f.value) if name == "bytes" else round(float(f.value), 9)), "n": f.n,
                    "residual": f.residual.to_json()}

        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "gpu": self.gpu,
            "device": self.device,
            "versions": self.versions,
            "created": self.created,
            "source": {**self.source_info, "log": self.source},
            "allocated_source": self.allocated_source,
            "context": fitted(self.context, "bytes"),
            "workspace": fitted(self.workspace, "bytes"),
            "allocator": None if self.allocator is None else {
                "slope": round(self.allocator.slope, 6), "intercept_bytes": int(self.allocator.intercept_bytes),
                "round_bytes": int(self.allocator.round_bytes), "n": self.allocator.n,
                "by_method": {m: round(float(k), 6) for m, k in sorted(self.allocator.by_method.items())},
                "margin": round(float(self.allocator.margin), 6), "trimmed": int(self.allocator.trimmed),
                "loo": {m: r.to_json() for m, r in sorted(self.allocator.loo.items())},
                "residual": self.allocator.residual.to_json()},
            "activation_factors": {m: {"factor": round(f.value, 6), "n": f.n, "residual": f.residual.to_json()}
                                   for m, f in sorted(self.activation_factors.items())},
            "throughput": {m: {"features": list(TIME_FEATURES),
                               "coef": None if t.coef is None else [float(f"{c:.6g}") for c in t.coef],
                               "knots": [[int(a), round(b, 4)] for a, b in t.knots], "n": t.n,
                               "residual": t.residual.to_json()}
                           for m, t in sorted(self.throughput.items())},
            "qlora_dequant": fitted(self.qlora_dequant, "s_per_gparam"),
            "holdout": {k: r.to_json() for k, r in self.holdout.items()},
            "holdout_by_method": {m: {k: r.to_json() for k, r in d.items()}
                                  for m, d in sorted(self.holdout_by_method.items())},
            "stack": self.stack,
            "scope": {"card": list(self.CARD_FIGURES), "stack": list(self.STACK_FIGURES)},
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "profile") -> "Profile":
        """Validate a parsed profile document; raise :class:`ProfileError` naming the first problem."""
        _check_header(data, where)
        src = data["source"]
        alloc = None if data.get("allocator") is None else _allocator_from_json(data["allocator"], where)
        factors = {m: _factor_from_json(d, f"{where}.activation_factors.{m}", where, m)
                   for m, d in data["activation_factors"].items()}
        thr = {m: _throughput_from_json(d, f"{where}.throughput.{m}") for m, d in data["throughput"].items()}
        holdout = {k: Residual.from_json(v, f"{where}.holdout.{k}") for k, v in data["holdout"].items()}
        holdout_by_method = _holdout_by_method(data.get("holdout_by_method", {}), f"{where}.holdout_by_method")
        stack = data.get("stack", DEFAULT_STACK)
        if not isinstance(stack, str) or not re.fullmatch(r"[a-z0-9_.-]{1,40}", stack):
            raise ProfileError(f"{where}: stack must name a training stack (hf, torchtune, ...), got {stack!r}")
        _check_device(data["device"], where)
        return cls(
            gpu=data["gpu"], device=dict(data["device"]), versions=dict(data["versions"]), created=data["created"],
            source=src["log"], source_info={k: v for k, v in src.items() if k != "log"},
            allocated_source=data["allocated_source"],
            context=_fitted_from_json(data, "context", "bytes", where),
            workspace=_fitted_from_json(data, "workspace", "bytes", where), allocator=alloc,
            activation_factors=factors, throughput=thr,
            qlora_dequant=_fitted_from_json(data, "qlora_dequant", "s_per_gparam", where),
            holdout=holdout, stack=stack, holdout_by_method=holdout_by_method,
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves half a profile."""
        from .validate import atomic_write  # a failed write: one line, no temp file, the old profile intact

        return atomic_write(path, json.dumps(self.to_json(), indent=2) + "\n", what="profile")


def _interp_log(knots: Sequence[tuple[int, float]], x: float) -> float:
    if x <= knots[0][0]:
        return float(knots[0][1])
    if x >= knots[-1][0]:
        return float(knots[-1][1])
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return float(y1)
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return float(y0 + w * (y1 - y0))
    return float(knots[-1][1])  # pragma: no cover


def _need_map(v: Any, where: str) -> None:
    if not isinstance(v, dict):
        raise ProfileError(f"{where} must be a JSON object, got {type(v).__name__}")


def _num(v: Any, where: str) -> float:
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
    except OverflowError:  # an integer literal beyond float range
        ok = False
    if not ok:
        raise ProfileError(f"{where} must be a finite number, got {str(v)[:40]!r}")
    return float(v)


def _int(v: Any, where: str, signed: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and not signed):
        raise ProfileError(f"{where} must be a {'' if signed else 'non-negative '}integer, got {v!r}")
    return int(v)


# -- loading -------------------------------------------------------------------------------

#: Profiles already read, by (path, inode, mtime, size): the planner asks for a card's profile on
#: every estimate, and a search makes thousands; a rewritten file is read again.
_CACHE: dict[tuple[str, int, int, int], Profile] = {}
MAX_PROFILE_BYTES = 16 << 20  # a real profile is tens of KiB


def read_profile(path: str | Path) -> Profile:
    """Read and validate one profile file. Raises :class:`ProfileError` with one clear line."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)  # save() replaces: a new inode
    except OSError:
        key = None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ProfileError(f"profile {path} is too large to be a profile (over {MAX_PROFILE_BYTES >> 20} MiB)",
                               "delete it or re-run `vramplan calibrate`")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"profile {path} is not UTF-8 text (saved as UTF-16?)",
                           "delete it or re-run `vramplan calibrate`") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {path} is corrupt (not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno})",
                           "delete it or re-run `vramplan calibrate`") from None
    except (ValueError, RecursionError):
        raise ProfileError(f"profile {path} is corrupt (not valid JSON, or nested too deeply)",
                           "delete it or re-run `vramplan calibrate`") from None
    try:
        prof = Profile.from_json(data, where=f"profile {path}")
    except ProfileError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError, OverflowError) as exc:
        # a shape the checks above did not foresee: still one line, never a traceback
        raise ProfileError(f"profile {path} is malformed ({type(exc).__name__}: {str(exc)[:120]})",
                           "delete it or re-run `vramplan calibrate`") from None
    from dataclasses import replace

    prof = replace(prof, path=str(path))
    if key is not None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = prof
    return prof


def default_search() -> tuple[Path, ...]:
    """Profile directories in lookup order (see the module docstring).

    Resolved once per (``VRAMPLAN_PROFILES``, working directory, package directories): a search
    looks a card's profile up for every candidate.
    """
    env, cwd = os.environ.get("VRAMPLAN_PROFILES", ""), os.getcwd()
    last = _LAST_SEARCH
    if last and last[0] == env and last[1] == cwd and last[2] is REPO_DIR and last[3] is PACKAGE_DIR:
        return last[4]  # the key of the last call again (compared without hashing its paths)
    key = (env, cwd, REPO_DIR, PACKAGE_DIR)
    if key not in _SEARCH_DIRS:
        if len(_SEARCH_DIRS) > 64:
            _SEARCH_DIRS.clear()
            _LAST_SEARCH.clear()
        _SEARCH_DIRS[key] = _resolve_search(*key)
    _LAST_SEARCH[:] = [*key, _SEARCH_DIRS[key]]
    return _SEARCH_DIRS[key]


_SEARCH_DIRS: dict[tuple, tuple[Path, ...]] = {}
_LAST_SEARCH: list = []  # env, cwd, REPO_DIR, PACKAGE_DIR and the directories of default_search's last call


def _resolve_search(env: str, cwd: str, repo_dir: Path, package_dir: Path) -> tuple[Path, ...]:
    dirs = [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path(cwd) / "profiles", repo_dir, package_dir]
    out: list[Path] = []
    for d in dirs:
        try:
            r = d.resolve()
        except OSError:  # pragma: no cover
            continue
        if r not in out:
            out.append(r)
    return tuple(out)


def find_profile(gpu_name: str, search: Iterable[str | Path] | None = None) -> Path | None:
    """Path of the first ``<key>.json`` for ``gpu_name`` in the search directories, or None.

    Every lookup looks at the files anew (a profile written meanwhile is found); the candidate paths of the
    default search are kept per (card name, directories): a search looks a card's profile up for every
    candidate."""
    if search is None and type(gpu_name) is str:
        dirs = default_search()
        kept = _CANDIDATES.get(gpu_name)
        if kept is None or kept[0] is not dirs:
            kept = (dirs, _candidates(gpu_name, dirs))
            if len(_CANDIDATES) > 64:
                _CANDIDATES.clear()
            _CANDIDATES[gpu_name] = kept
        paths = kept[1]
    else:
        paths = _candidates(gpu_name, default_search() if search is None else search)
    for p in paths:
        if os.path.isfile(p):
            return Path(p)
    return None


_CANDIDATES: dict[str, tuple] = {}  # card name -> (the search directories, the paths of its file in them)


def _candidates(gpu_name: str, dirs: Iterable[str | Path]) -> tuple[str, ...]:
    """The paths of ``gpu_name``'s profile file in ``dirs``, in order (``Path(d) / name``, without building Paths
    for the directories a card has none in)."""
    name = f"{profile_key(gpu_name)}.json"
    return tuple(os.path.join(d, name) for d in dirs)


def load_profile(gpu_name: str, search: Iterable[str | Path] | None = None) -> Profile | None:
    """The calibration profile of card ``gpu_name`` (a catalogue name), or None if there is none.

    Args:
        gpu_name: the GPU's catalogue name (``GPUSpec.name``), e.g. ``h100-sxm``.
        search: directories to look in, in order (default: :func:`default_search`).

    Raises:
        ProfileError: the profile found is corrupt or has an unknown schema version.
    """
    path = find_profile(gpu_name, search)
    if path is None:
        return None
    prof = read_profile(path)
    check_binding(prof, gpu_name)
    return prof


def check_binding(prof: Profile, gpu_name: str) -> None:
    """Refuse a profile that was measured on another device than card ``gpu_name``.

    The profile's own ``gpu`` must name the card, a card's profile must come from a CUDA
    device (not a dry-run/CPU profile renamed), and the device name it recorded (NVML's
    or torch's) must not be a *different* catalogue card.

    Raises:
        ProfileError: one line naming both devices.
    """
    want = profile_key(gpu_name)
    where = prof.path or f"{prof.gpu}.json"
    if profile_key(prof.gpu) != want:
        raise ProfileError(f"profile {where} was measured on {prof.gpu!r}, not on {gpu_name!r}",
                           "calibrate this card (vramplan calibrate), or remove the copied file")
    dev = prof.device or {}
    if want != "cpu" and (dev.get("kind") == "cpu" or prof.allocated_source != "torch.cuda"):
        raise ProfileError(f"profile {where} was not measured on a GPU (device {dev.get('kind') or 'unknown'}, "
                           f"{prof.allocated_source} memory), so it cannot describe {gpu_name!r}",
                           "calibrate the card on the card itself: vramplan calibrate --gpu auto")
    from .cardnames import catalogue_name
    mine = catalogue_name(gpu_name)
    for k in ("nvml_name", "name"):
        seen = dev.get(k)
        other = catalogue_name(seen) if seen else None
        if mine is not None and other is not None and other != mine:
            raise ProfileError(f"profile {where} was measured on {seen} ({other}), not on {gpu_name!r}",
                               "calibrate this card, or remove the copied file")


# -- reading a profile document (Profile.from_json's parts; each raises ProfileError naming the field) ----

def _check_header(data: Any, where: str) -> None:
    """The schema, its version, the required strings and maps, and the source's log name."""
    _need_map(data, where)
    if data.get("schema") != SCHEMA:
        raise ProfileError(f"{where} is not a vramplan profile (schema {data.get('schema')!r})",
                           "re-run `vramplan calibrate` to make one")
    ver = data.get("version")
    if ver != SCHEMA_VERSION:
        raise ProfileError(f"{where} has profile schema version {ver!r}; this vramplan reads version {SCHEMA_VERSION}",
                           "upgrade vramplan or re-run `vramplan calibrate`")
    for k in ("gpu", "created", "allocated_source"):
        if not isinstance(data.get(k), str) or not data.get(k):
            raise ProfileError(f"{where}: field {k!r} must be a non-empty string")
    for k in ("device", "versions", "source", "activation_factors", "throughput", "holdout"):
        _need_map(data.get(k), f"{where}.{k}")
    if not isinstance(data["source"].get("log"), str):
        raise ProfileError(f"{where}: source.log must name the JSONL log")


def _fitted_from_json(data: Mapping, key: str, name: str, where: str) -> Fitted | None:
    """The fitted figure ``data[key][name]`` (bytes: whole and plausible; seconds per Gparam: below 1e6)."""
    d = data.get(key)
    if d is None:
        return None
    _need_map(d, f"{where}.{key}")
    v = _num(d.get(name), f"{where}.{key}.{name}")
    if v < 0:
        raise ProfileError(f"{where}: {key}.{name} must be non-negative, got {v}")
    if name == "bytes":
        top = MAX_CONTEXT_BYTES if key == "context" else MAX_BYTES
        if v > top or v != int(v):
            raise ProfileError(f"{where}: {key}.bytes = {v:g} is implausible (whole bytes up to {top:,} expected)",
                               "re-run `vramplan calibrate`")
    elif v > 1e6:  # seconds per 1e9 weights: even a CPU's noisy tiny-model figure stays far below
        raise ProfileError(f"{where}: {key}.{name} = {v:g} is implausible", "re-run `vramplan calibrate`")
    return Fitted(v, _int(d.get("n", 0), f"{where}.{key}.n"), Residual.from_json(d.get("residual"), f"{where}.{key}.residual"))


def _allocator_from_json(a: Any, where: str) -> AllocatorModel:
    """``allocator``: slope in [0.5, 10], per-method corrections in [0.5, 2], plausible intercept, rounding, margin."""
    w = f"{where}.allocator"
    _need_map(a, w)
    slope = _num(a.get("slope"), f"{w}.slope")
    if not 0.5 <= slope <= 10:
        raise ProfileError(f"{where}: allocator.slope {slope} is implausible (expected 0.5 to 10)")
    by_method = a.get("by_method", {})
    _need_map(by_method, f"{w}.by_method")
    bm = {m: _num(k, f"{w}.by_method.{m}") for m, k in by_method.items()}
    if any(not 0.5 <= k <= 2 for k in bm.values()):
        raise ProfileError(f"{where}: allocator.by_method corrections must lie in [0.5, 2]")
    icpt = _int(a.get("intercept_bytes"), f"{w}.intercept_bytes", signed=True)
    rnd = _int(a.get("round_bytes", ALLOCATOR_ROUND), f"{w}.round_bytes")
    if abs(icpt) > MAX_BYTES or not 0 < rnd <= 1 << 30:
        raise ProfileError(f"{where}: allocator intercept_bytes / round_bytes are implausible",
                           "re-run `vramplan calibrate`")
    margin = _num(a.get("margin", 0.0), f"{w}.margin")
    if not 0 <= margin <= MAX_MARGIN:
        raise ProfileError(f"{where}: allocator.margin must lie in [0, {MAX_MARGIN:g}], got {margin}",
                           "re-run `vramplan calibrate`")
    loo = a.get("loo", {})
    _need_map(loo, f"{w}.loo")
    return AllocatorModel(slope, icpt, rnd, _int(a.get("n", 0), f"{w}.n"),
                          Residual.from_json(a.get("residual"), f"{w}.residual"), bm, margin=margin,
                          loo={m: Residual.from_json(r, f"{w}.loo.{m}") for m, r in loo.items()},
                          trimmed=_int(a.get("trimmed", 0), f"{w}.trimmed"))


def _factor_from_json(d: Any, w: str, where: str, method: str) -> Fitted:
    """One method's activation factor, in (0, 100)."""
    _need_map(d, w)
    f = _num(d.get("factor"), f"{w}.factor")
    if not 0 < f < 100:
        raise ProfileError(f"{where}: activation factor of {method} must be in (0, 100), got {f}")
    return Fitted(f, _int(d.get("n", 0), f"{w}.n"), Residual.from_json(d.get("residual"), f"{w}.residual"))


def _throughput_from_json(d: Any, w: str) -> Throughput:
    """One method's step-time model: the known features, non-negative coefficients, sorted plausible knots."""
    _need_map(d, w)
    feats = d.get("features", list(TIME_FEATURES))
    if list(feats) != list(TIME_FEATURES):
        raise ProfileError(f"{w}: unknown time-model features {feats}", "re-run `vramplan calibrate`")
    coef_t = _coefficients(d.get("coef"), w)
    knots = d.get("knots", [])
    if not isinstance(knots, list) or any(not isinstance(k, list) or len(k) != 2 for k in knots):
        raise ProfileError(f"{w}.knots must be a list of [tokens, tflops] pairs")
    kn = tuple(sorted((_int(a, f"{w}.knots"), _num(b, f"{w}.knots")) for a, b in knots))
    if any(a <= 0 or not 0 <= b <= MAX_TFLOPS for a, b in kn):
        raise ProfileError(f"{w}.knots need positive tokens per step and TFLOP/s in [0, {MAX_TFLOPS:g}]",
                           "re-run `vramplan calibrate`")
    if coef_t is not None and any(c > 1e3 for c in coef_t):
        raise ProfileError(f"{w}.coef holds an implausible step time ({max(coef_t):g} s per unit)",
                           "re-run `vramplan calibrate`")
    return Throughput(coef_t, kn, _int(d.get("n", 0), f"{w}.n"), Residual.from_json(d.get("residual"), f"{w}.residual"))


def _coefficients(coef: Any, w: str) -> tuple[float, ...] | None:
    if coef is None:
        return None
    if not isinstance(coef, list) or len(coef) != len(TIME_FEATURES):
        raise ProfileError(f"{w}.coef must be null or a list of {len(TIME_FEATURES)} numbers")
    coef_t = tuple(_num(c, f"{w}.coef") for c in coef)
    if any(c < 0 for c in coef_t) or not any(c > 0 for c in coef_t):
        raise ProfileError(f"{w}.coef must be non-negative and not all zero")
    return coef_t


def _holdout_by_method(hbm: Any, w: str) -> dict:
    _need_map(hbm, w)
    out = {}
    for m, d in hbm.items():
        _need_map(d, f"{w}.{m}")
        out[m] = {k: Residual.from_json(v, f"{w}.{m}.{k}") for k, v in d.items()}
    return out


def _check_device(dev: Mapping, where: str) -> None:
    """``device``: totals whole positive bytes, a known kind, string names."""
    for k in ("total_bytes", "nvml_total_bytes"):
        total = dev.get(k)
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or not 0 < total <= MAX_BYTES):
            raise ProfileError(f"{where}: device.{k} must be a positive whole number of bytes, got {total!r}")
    if dev.get("kind") not in (None, "cuda", "cpu", "unknown"):
        raise ProfileError(f"{where}: device.kind must be cuda or cpu, got {dev.get('kind')!r}")
    for k in ("name", "nvml_name"):
        if dev.get(k) is not None and not isinstance(dev.get(k), str):
            raise ProfileError(f"{where}: device.{k} must be a string")

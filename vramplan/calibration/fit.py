"""Fitting a card's profile from its calibration log, and evaluating predictions against it.

Every fitted quantity uses the ``fit`` points only (and, for memory, the probes of the
largest-size searches); the ``holdout`` points are predicted with the finished profile and
their errors are the profile's ``holdout`` residuals -- the acceptance figures.

What is fitted, and how (relative error = (predicted - measured) / measured throughout):

* workspace: the cuBLAS/cuBLASLt workspace bytes probed at the start of each session (median).
* activation factor per method: ``(allocated - workspace - (tensor_peak - activations)) /
  activations`` per point (analytic tensors; allocated from ``max_memory_allocated``), median
  over the method's points where activations are at least 3% of the tensor peak; clamped to
  [0.25, 4]. Paged optimiser states live outside the allocator and are taken out first.
* allocator: ``reserved = slope * allocated + intercept`` by a *trimmed* least squares on
  relative error over the measured (allocated, reserved) pairs of the steps (the peak
  counters are reset after the build and warm-up, so a QLoRA build spike never enters):
  fit, drop the points whose residual lies beyond 3 scaled median absolute deviations
  (at least 2%; at most a quarter of the points: a fragmented segment cache, a stray
  reading), refit; slope clamped to [1, 3]. A method with three or more inlier points gets
  its own multiplicative correction (median ratio). The fitted line is the *central*
  estimate; the safety margin is separate: the 90th percentile of the leave-one-out
  under-predictions (``AllocatorModel.margin``, a fraction of reserved), which the planner's
  uncertainty band takes in. Leave-one-out residuals are kept per method (``loo``), and the
  points trimmed are counted (``trimmed``). One fragmented point therefore moves neither
  the slope nor any other point's prediction.
* context: NVML process memory minus torch's reserve after the timed steps, maximum over
  points without a paged optimiser (lazily loaded kernels only add up as a run goes on).
* step time per method: ``t = coef . step_features`` with non-negative coefficients, the
  subset of features with the best AIC on relative error (all subsets, at most 4 features),
  refitted once without outliers (off by > 25% and > 4 median errors; at most a fifth).
  QLoRA recipes are timed as their LoRA twin plus ``s_per_gparam`` x NF4 weights
  dequantised per step (median over the QLoRA points).
* knots: achieved TFLOP/s (``step_work``'s FLOPs / step time) per method and tokens per step.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..errors import VramplanError
from ..methods import sixteen_bit_twin
from ..models import ModelSpec, from_hf_config, get_model
from ..optimizers import get_optimizer
from ..overheads import default_workspace_bytes
from ..profiles import (TIME_FEATURES, AllocatorModel, Fitted, Profile, Residual, Throughput, median,
                        profile_key)
from .env import now_iso
from .flops import StepShape, step_shape
from .log import read_log
from .predict import Calibrated, TensorPrediction, analytic, calibrated

MIN_ACT_FRACTION = 0.03
FACTOR_RANGE = (0.25, 4.0)
SLOPE_RANGE = (1.0, 3.0)
METHOD_ALLOC_MIN_POINTS = 3


@dataclass
class Row:
    """One logged point, re-predicted with the current analytic model."""

    rec: dict
    spec: ModelSpec | None
    cfg: TrainConfig | None
    method: str
    split: str
    status: str
    pred: TensorPrediction | None
    shape: StepShape | None
    allocated: int | None
    reserved: int | None
    process: int | None
    outside: int | None
    step_s: float | None
    tokens: int
    paged: bool

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.step_s if self.step_s else None


def _config_from(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    kw["targets"] = tuple(kw.get("targets") or ())
    return TrainConfig(**kw)


def spec_from(rec: dict) -> ModelSpec:
    if rec.get("model_config"):
        return from_hf_config(dict(rec["model_config"]), name=rec["model"])
    return get_model(rec["model"])


def load_rows(records: list[dict], allocated_source: str | None = None) -> tuple[list[Row], str]:
    """Point records (the last record of each point/probe) as :class:`Row` s, and the allocated source."""
    latest: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") == "point":
            latest[(r["id"], r.get("search"), r.get("size"))] = r
    recs = list(latest.values())
    if allocated_source is None:
        has_cuda = any((r.get("memory") or {}).get("max_allocated") is not None for r in recs if r.get("status") == "ok")
        allocated_source = "torch.cuda" if has_cuda else ("dryrun" if any(r.get("dryrun") for r in recs) else "none")
    rows = []
    for r in recs:
        mem = r.get("memory") or {}
        spec = cfg = pred = shape = None
        try:
            spec = spec_from(r)
            cfg = _config_from(r["config"])
            shape = step_shape(spec, cfg)
            pred = analytic(spec, cfg)
        except (VramplanError, KeyError, TypeError, ValueError):
            pass
        if allocated_source == "torch.cuda":
            alloc = mem.get("max_allocated")
        elif allocated_source == "dryrun":
            alloc = (r.get("dryrun") or {}).get("tensor_peak_bytes")
        else:
            alloc = None
        # the training steps' peak only: the runner resets the peak counters after the build and the
        # warm-up, so a QLoRA build spike or the first step's allocations never enter the fit
        res = [x for x in (mem.get("max_reserved"),) if x is not None]
        split = "search" if r.get("search") else r.get("split", "fit")
        rows.append(Row(
            rec=r, spec=spec, cfg=cfg, method=r.get("method") or (cfg.recipe.name if cfg else "?"), split=split,
            status=r.get("status", "error"), pred=pred, shape=shape, allocated=alloc,
            reserved=max(res) if res else None, process=mem.get("nvml_process_max_bytes") or mem.get("nvml_process_bytes"),
            outside=mem.get("outside_allocator_bytes"), step_s=r.get("step_s_median"),
            tokens=int(r.get("tokens_per_step") or 0),
            paged=bool(cfg and get_optimizer(cfg.optimizer).paged),
        ))
    return rows, allocated_source


# -- pieces ----------------------------------------------------------------------------------

def _ok(rows: list[Row], splits: tuple[str, ...]) -> list[Row]:
    return [r for r in rows if r.status == "ok" and r.split in splits]


def _fit_activation(rows: list[Row], workspace: int, cuda: bool) -> dict[str, Fitted]:
    by: dict[str, list[tuple[float, Row]]] = {}
    for r in rows:
        if r.pred is None or r.allocated is None:
            continue
        act = r.pred.activation_bytes
        if act < MIN_ACT_FRACTION * max(1, r.pred.tensor_peak_bytes):
            continue
        paged = r.pred.paged_state_bytes if cuda else 0
        rest = r.pred.tensor_peak_bytes - paged - act
        f = (r.allocated - workspace - rest) / act
        by.setdefault(r.method, []).append((f, r))
    out = {}
    for m, items in by.items():
        f = min(max(median([x for x, _ in items]), FACTOR_RANGE[0]), FACTOR_RANGE[1])
        preds, meas = [], []
        for _, r in items:
            paged = r.pred.paged_state_bytes if cuda else 0
            preds.append(r.pred.tensor_peak_bytes - paged + (f - 1) * r.pred.activation_bytes + workspace)
            meas.append(r.allocated)
        out[m] = Fitted(float(f), len(items), Residual.of(preds, meas))
    return out


TRIM_MAD = 3.0         # residuals beyond this many scaled MADs are trimmed from the allocator fit ...
TRIM_FLOOR = 0.02      # ... and beyond 2% (exact data has a MAD of zero)
TRIM_SHARE = 0.25      # at most a quarter of the points
MARGIN_QUANTILE = 0.9  # the safety margin: this quantile of the leave-one-out under-predictions


def _line(A: np.ndarray, R: np.ndarray) -> tuple[float, float]:
    """``R ~ slope * A + intercept`` by least squares on relative error, slope clamped to SLOPE_RANGE."""
    if len(A) == 1:
        return 1.0, float(R[0] - A[0])
    X = np.stack([A / R, 1.0 / R], axis=1)
    (slope, icpt), *_ = np.linalg.lstsq(X, np.ones_like(R), rcond=None)
    slope, icpt = float(slope), float(icpt)
    if not (math.isfinite(slope) and SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]):
        slope = float(min(max(slope if math.isfinite(slope) else 1.0, SLOPE_RANGE[0]), SLOPE_RANGE[1]))
        icpt = float(np.median(R - slope * A))
    return slope, icpt


def _robust_allocator(A: np.ndarray, R: np.ndarray, methods: list[str]) -> tuple[float, float, dict[str, float], np.ndarray]:
    """The trimmed fit of the module docstring: ``(slope, intercept, by_method, inlier mask)``."""
    n = len(A)
    keep = np.ones(n, dtype=bool)
    slope, icpt = _line(A, R)
    if n >= 4:
        rel = (R - (slope * A + icpt)) / R
        med = float(np.median(rel))
        mad = 1.4826 * float(np.median(np.abs(rel - med)))
        cut = max(TRIM_MAD * mad, TRIM_FLOOR)
        order = np.argsort(-np.abs(rel - med))
        drop = [i for i in order[: int(n * TRIM_SHARE)] if abs(rel[i] - med) > cut]
        if drop:
            keep[drop] = False
            slope, icpt = _line(A[keep], R[keep])
    base = np.maximum(A, slope * A + icpt)
    by_method: dict[str, float] = {}
    for m in sorted(set(methods)):
        idx = [i for i, x in enumerate(methods) if x == m and keep[i]]
        if len(idx) >= METHOD_ALLOC_MIN_POINTS:
            k = float(np.median(R[idx] / base[idx]))
            if abs(k - 1) > 0.01:
                by_method[m] = min(max(k, 0.5), 2.0)
    return slope, icpt, by_method, keep


def _reserve(A, slope: float, icpt: float, k: float | None) -> float:
    return float(AllocatorModel(slope, int(round(icpt))).reserve(int(A), k))


def _fit_allocator(rows: list[Row]) -> AllocatorModel | None:
    pairs = [(float(r.allocated), float(r.reserved), r.method) for r in rows
             if r.allocated is not None and r.reserved is not None and r.allocated > 0 and r.reserved > 0]
    if not pairs:
        return None
    A = np.array([p[0] for p in pairs])
    R = np.array([p[1] for p in pairs])
    methods = [p[2] for p in pairs]
    slope, icpt, by_method, keep = _robust_allocator(A, R, methods)
    preds = [_reserve(a, slope, icpt, by_method.get(m)) for a, m in zip(A, methods)]
    # leave-one-out: every point predicted by the fit of all the others, residuals kept per method
    loo_pred: dict[str, list[float]] = {}
    loo_meas: dict[str, list[float]] = {}
    under: list[float] = []
    if len(pairs) >= 2:
        for i in range(len(pairs)):
            mask = np.arange(len(pairs)) != i
            s_i, c_i, bm_i, _ = _robust_allocator(A[mask], R[mask], [m for j, m in enumerate(methods) if j != i])
            p = _reserve(A[i], s_i, c_i, bm_i.get(methods[i]))
            loo_pred.setdefault(methods[i], []).append(p)
            loo_meas.setdefault(methods[i], []).append(float(R[i]))
            under.append(max(0.0, (R[i] - p) / R[i]))
    loo = {m: Residual.of(loo_pred[m], loo_meas[m]) for m in sorted(loo_pred)}
    margin = 0.0
    if under:
        u = sorted(under)
        pos = MARGIN_QUANTILE * (len(u) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(u) - 1)
        margin = float(u[lo] + (u[hi] - u[lo]) * (pos - lo))
    return AllocatorModel(float(slope), int(round(icpt)), n=len(pairs), by_method=by_method,
                          residual=Residual.of(preds, list(R)), margin=round(margin, 6), loo=loo,
                          trimmed=int((~keep).sum()))


def _fit_context(rows: list[Row]) -> Fitted | None:
    vals = [r.outside for r in rows if r.outside is not None and r.outside > 0 and not r.paged]
    if not vals:
        return None
    c = max(vals)
    return Fitted(float(c), len(vals), Residual.of([c] * len(vals), vals))


def _nnls_subsets(X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Non-negative least squares on relative error, choosing the feature subset by AIC."""
    n, k = X.shape
    Xr = X / y[:, None]
    ones = np.ones(n)
    cols = [j for j in range(k) if np.any(X[:, j] > 0)]
    best, best_aic = None, math.inf
    for size in range(1, min(len(cols), max(1, n - 1)) + 1):
        for sub in itertools.combinations(cols, size):
            A = Xr[:, sub]
            coef, *_ = np.linalg.lstsq(A, ones, rcond=None)
            if np.any(coef < 0) or not np.all(np.isfinite(coef)):
                continue
            sse = float(np.sum((A @ coef - ones) ** 2))
            aic = n * math.log(sse / n + 1e-12) + 2 * size
            if aic < best_aic - 1e-9:
                full = np.zeros(k)
                full[list(sub)] = coef
                best, best_aic = full, aic
    return best


def _fit_throughput(rows: list[Row]) -> tuple[dict[str, Throughput], Fitted | None]:
    timed = [r for r in rows if r.step_s and r.shape is not None and r.split == "fit"]
    by: dict[str, list[Row]] = {}
    for r in timed:
        by.setdefault(r.method, []).append(r)
    out: dict[str, Throughput] = {}

    def knots(items: list[Row]) -> tuple[tuple[int, float], ...]:
        g: dict[int, list[float]] = {}
        for r in items:
            g.setdefault(r.tokens, []).append(r.shape.flops / r.step_s / 1e12)
        return tuple(sorted((t, round(median(v), 4)) for t, v in g.items()))

    def fit_own(items: list[Row]) -> Throughput | None:
        X = np.array([[r.shape.features()[f] for f in TIME_FEATURES] for r in items])
        y = np.array([r.step_s for r in items])
        coef = _nnls_subsets(X, y)
        if coef is None:
            return None
        # one refit without outliers (a stalled step, a one-off warm-up cost): points off by more than
        # 4 median absolute deviations and 25%, at most a fifth of them
        rel = np.abs(X @ coef / y - 1)
        cut = max(0.25, 4 * float(np.median(rel)))
        out_idx = [i for i in np.argsort(-rel)[: len(items) // 5] if rel[i] > cut]
        if out_idx and len(items) - len(out_idx) >= 2:
            keep = np.setdiff1d(np.arange(len(items)), out_idx)
            refit = _nnls_subsets(X[keep], y[keep])
            if refit is not None:
                coef = refit
        th = Throughput(tuple(float(c) for c in coef), knots(items), len(items))
        return Throughput(th.coef, th.knots, th.n, Residual.of([th.seconds(r.shape.features()) for r in items], list(y)))

    twins = {m: sixteen_bit_twin(m) for m in by}
    for m, items in by.items():
        if twins[m] is None:
            t = fit_own(items)
            if t is not None:
                out[m] = t
    # an NF4-base recipe (QLoRA): its 16-bit twin (LoRA) + dequantisation
    d_vals, d_rows = [], []
    for m, items in by.items():
        if twins[m] is None:
            continue
        twin = out.get(twins[m])
        if twin is None:
            own = fit_own(items)
            if own is not None:
                out[m] = own
            continue
        for r in items:
            if r.shape.dequant_gparams > 0:
                d_vals.append((r.step_s - twin.seconds(r.shape.features())) / r.shape.dequant_gparams)
                d_rows.append((r, twin))
        out[m] = Throughput(None, knots(items), len(items))
    dequant = None
    if d_vals:
        d = max(0.0, median(d_vals))
        preds = [tw.seconds(r.shape.features()) + d * r.shape.dequant_gparams for r, tw in d_rows]
        dequant = Fitted(d, len(d_vals), Residual.of(preds, [r.step_s for r, _ in d_rows]))
        for m in list(out):
            if twins.get(m) is not None and out[m].coef is None:
                items = by[m]
                ps = [out[twins[m]].seconds(r.shape.features()) + d * r.shape.dequant_gparams for r in items]
                out[m] = Throughput(None, out[m].knots, out[m].n, Residual.of(ps, [r.step_s for r in items]))
    return out, dequant


# -- evaluation ------------------------------------------------------------------------------

@dataclass
class PointEval:
    """A point's measurements beside the default and the calibrated predictions."""

    row: Row
    cal: Calibrated | None

    @property
    def rec(self) -> dict:
        return self.row.rec


def evaluate(rows: list[Row], profile: Profile) -> list[PointEval]:
    out = []
    for r in rows:
        cal = None
        if r.pred is not None and r.spec is not None and r.cfg is not None:
            cal = calibrated(r.pred, r.spec, r.cfg, profile)
        out.append(PointEval(r, cal))
    return out


def residuals(evals: list[PointEval], split: str) -> dict[str, Residual]:
    ok = [e for e in evals if e.row.status == "ok" and e.row.split == split and e.cal is not None]
    cuda = [e for e in ok if e.row.allocated is not None]
    return {
        "allocated": Residual.of([e.cal.allocated_bytes for e in cuda], [e.row.allocated for e in cuda]),
        "reserved": Residual.of([e.cal.reserved_bytes for e in ok if e.cal.reserved_bytes is not None and e.row.reserved],
                                [e.row.reserved for e in ok if e.cal.reserved_bytes is not None and e.row.reserved]),
        "device_total": Residual.of([e.cal.device_bytes for e in ok if e.cal.device_bytes is not None and e.row.process],
                                    [e.row.process for e in ok if e.cal.device_bytes is not None and e.row.process]),
        "tokens_per_s": Residual.of([e.cal.tokens_per_s for e in ok if e.cal.tokens_per_s and e.row.step_s],
                                    [e.row.tokens_per_s for e in ok if e.cal.tokens_per_s and e.row.step_s]),
    }


# -- the fit ---------------------------------------------------------------------------------

def _stack(rows: list[Row]) -> str:
    """The training stack the measured points ran (``TrainConfig.framework``; the runtime's is ``hf``)."""
    stacks = sorted({(r.cfg.framework if r.cfg is not None else "hf") for r in rows})
    if len(stacks) > 1:
        raise VramplanError(f"the log mixes training stacks ({', '.join(stacks)}); a profile holds one stack's figures",
                            "calibrate each stack into its own log (--out)")
    return stacks[0] if stacks else "hf"


def fit_profile(log_path: str | Path, records: list[dict] | None = None) -> Profile:
    """Fit the profile of the card whose calibration log is ``log_path`` (``<gpu>.jsonl``).

    ``records``: the log's records when the caller has read them already (:func:`read_log`).

    Returns:
        The :class:`~vramplan.profiles.Profile` (not written; ``Profile.save`` writes it).

    Raises:
        VramplanError: the log is unreadable, corrupt or holds no measured point.
    """
    log_path = Path(log_path)
    records = read_log(log_path) if records is None else records
    sessions = [r for r in records if r.get("kind") == "session"]
    rows, source = load_rows(records)
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        raise VramplanError(f"{log_path} holds no measured point to fit", "run `vramplan calibrate` first")
    cuda = source == "torch.cuda"
    last = sessions[-1] if sessions else {}
    gpu = last.get("gpu") or profile_key(log_path.stem)
    ws_vals = [s.get("probes", {}).get("workspace_bytes") for s in sessions]
    ws_vals = [w for w in ws_vals if w is not None]
    workspace = Fitted(float(median(ws_vals)), len(ws_vals)) if (cuda and ws_vals) else None
    # without a workspace probe, the planner's default (vramplan.overheads) stands in, as it does
    # in the calibrated chain; a dry-run (CPU) profile has none
    cc = (last.get("device") or {}).get("compute_capability")
    w = int(workspace.value) if workspace else (default_workspace_bytes(cc) if cuda else 0)
    mem_rows = _ok(rows, ("fit", "search"))
    factors = _fit_activation(mem_rows, w, cuda)
    allocator = _fit_allocator(mem_rows) if cuda else None
    context = _fit_context(mem_rows) if cuda else None
    throughput, dequant = _fit_throughput(ok)
    ctx_init = [s.get("probes", {}).get("context_init_bytes") for s in sessions]
    ctx_init = [c for c in ctx_init if c is not None]
    digest = hashlib.sha256(log_path.read_bytes()).hexdigest()
    suites = sorted({(s.get("suite") or {}).get("name", "?") for s in sessions})
    prof = Profile(
        gpu=gpu, device={**(last.get("device") or {"kind": "unknown"})}, versions=dict(last.get("versions") or {}),
        created=now_iso(), source=log_path.name,
        source_info={"sha256": digest, "records": len(records), "sessions": len(sessions), "suites": suites,
                     "points_ok": len(ok), "fit_points": sum(r.split == "fit" for r in ok),
                     "holdout_points": sum(r.split == "holdout" for r in ok),
                     "search_probes": sum(r.split == "search" for r in rows),
                     "oom_points": sum(r.status == "oom" for r in rows),
                     "error_points": sum(r.status in ("error", "crashed") for r in rows),
                     "crashed_points": sum(r.status == "crashed" for r in rows),
                     "context_init_bytes": int(median(ctx_init)) if ctx_init else None,
                     "alloc_conf": (last.get("env") or {}).get("PYTORCH_CUDA_ALLOC_CONF")},
        allocated_source=source, context=context, workspace=workspace, allocator=allocator, stack=_stack(ok),
        activation_factors=factors, throughput=throughput, qlora_dequant=dequant,
    )
    evals = evaluate(rows, prof)
    hold = residuals(evals, "holdout")
    by_method = {}
    for m in sorted({e.row.method for e in evals if e.row.split == "holdout"}):
        r = residuals([e for e in evals if e.row.method == m], "holdout")
        by_method[m] = {k: v for k, v in r.items() if v.n}
    from dataclasses import replace

    return replace(prof, holdout={k: v for k, v in hold.items() if v.n}, holdout_by_method=by_method)

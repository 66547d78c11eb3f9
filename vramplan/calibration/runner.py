"""The calibration runner: real steps of every point of a suite, measured, logged, resumable.

For each point: build the model and method (``vramplan.runtime``: transformers + PEFT,
bitsandbytes for QLoRA and 8-bit optimisers, DPO and PPO steps in plain torch), run
``warmup`` untimed steps (the first allocates the optimiser states), reset the allocator's
peak statistics, run ``steps`` timed steps, and record:

* ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the timed steps and of
  load + warm-up, NVML process memory after each timed step, the median step time and
  tokens/s (tokens = batch x seq x sequences per example);
* the analytic prediction and the dry run's accounting of the same configuration.

An out-of-memory point is recorded as ``status = "oom"`` with the size tried; its
traceback's frames are cleared, the cache is emptied and the run goes on. Any other error
is recorded as ``status = "error"`` (retried by ``--resume``); if the device no longer
answers, the point is recorded as ``status = "crashed"`` and the run stops with
:class:`~vramplan.calibration.measure.DeviceLostError`. Before each point an ``attempt``
record is logged, so a point that killed the process outright (a segfault, the machine cut
off) is known too: ``--resume`` skips crashed points -- a point that took the device down
once is not tried first on every resume -- unless ``retry_failed`` asks for them again.

Each record is appended durably to ``<out>/<gpu>.jsonl`` before the next point starts
(:mod:`vramplan.calibration.log`), so Ctrl-C or a crash loses only the point in progress.
"""

from __future__ import annotations

import gc
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..config import TrainConfig
from ..errors import VramplanError, install_hint
from ..models import ModelSpec
from ..optimizers import get_optimizer
from ..profiles import Profile, profile_key
from .env import environment, now_iso
from .log import JsonlLog, LogState
from .measure import Device, DeviceLostError, first_line, is_oom, make_device, release, tried_bytes
from .predict import analytic, dryrun_accounting
from .search import next_size, outcome
from .suite import Point, SearchSpec, Suite, load_suite


class Workload(Protocol):
    """A built model + method on a device, ready to train (what a builder returns)."""

    def step(self) -> Any:
        """Run one full optimiser step (PPO: rollout included); may return the loss."""

    def close(self) -> None:
        """Release every reference to the model, optimiser and batch."""


#: ``builder(spec, config, torch_device) -> Workload``
Builder = Callable[[ModelSpec, TrainConfig, str], Workload]


@dataclass
class CalibrationResult:
    """What a calibration run did and wrote."""

    gpu: str
    device: str
    suite: str
    log_path: Path
    profile_path: Path | None = None
    report_path: Path | None = None
    plot_path: Path | None = None
    measured: int = 0      # points measured in this run (ok)
    oom: int = 0           # points found infeasible in this run
    errors: int = 0        # points that failed otherwise in this run
    skipped: int = 0       # points already in the log (--resume)
    searches: list = field(default_factory=list)
    profile: Profile | None = None
    elapsed_s: float = 0.0
    budget_s: float | None = None
    complete: bool = True  # False when time_limit_s stopped the run before the suite was done
    remaining: int = 0     # points and searches left for a --resume
    crashed_skipped: list = field(default_factory=list)  # ids of crashed points skipped (--retry-failed retries)

    def to_json(self) -> dict:
        return {"gpu": self.gpu, "device": self.device, "suite": self.suite, "log": str(self.log_path),
                "profile": str(self.profile_path) if self.profile_path else None,
                "report": str(self.report_path) if self.report_path else None,
                "plot": str(self.plot_path) if self.plot_path else None, "measured": self.measured, "oom": self.oom,
                "errors": self.errors, "skipped": self.skipped, "searches": self.searches,
                "elapsed_s": round(self.elapsed_s, 1), "budget_s": self.budget_s, "complete": self.complete,
                "remaining": self.remaining, "crashed_skipped": list(self.crashed_skipped)}


# -- naming ----------------------------------------------------------------------------------

def resolve_gpu_name(gpu: str | None, dev: Device, info: dict) -> str:
    """The card's catalogue name, or ``cpu``.

    ``auto`` matches the device's NVML (or torch) name against the GPU catalogue's names and
    aliases; a card the catalogue lacks keeps its normalised device name. An explicit name
    is resolved through the catalogue too, else used as given.
    """
    if dev.kind == "cpu":
        return "cpu" if gpu in (None, "auto") else profile_key(gpu)
    from ..gpus import get_gpu

    query = (info.get("nvml_name") or info.get("name") or "cuda") if gpu in (None, "auto") else gpu
    try:
        return get_gpu(query).name
    except VramplanError:
        return profile_key(query)


def default_builder() -> Builder:
    """Real training steps through ``vramplan.runtime``."""
    from .steps import runtime_builder

    return runtime_builder()


# -- one point -------------------------------------------------------------------------------

def _tokens(cfg: TrainConfig) -> int:
    return cfg.batch * cfg.seq * cfg.recipe.sequences_per_example


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def measure_point(point: Point, dev: Device, builder: Builder, *, session: str = "", search: str | None = None,
                  size: int | None = None, with_dryrun: bool = True) -> dict:
    """Build, warm up, time and measure one point; never raises for OOM or a failing step.

    Returns the log record (``status`` ok | oom | error). Raises KeyboardInterrupt after
    cleaning up, and :class:`DeviceLostError` if the device is unusable after an error.
    """
    cfg, spec = point.config, point.spec
    rec: dict[str, Any] = {
        "kind": "point", "id": point.id, "session": session, "time": now_iso(), "split": point.split,
        "search": search, "size": size, "model": point.model, "model_config": spec.hf_config or None,
        "method": point.method_key, "config": cfg.to_dict(), "device": dev.torch_device,
        "warmup": point.warmup, "steps": point.steps, "tokens_per_step": _tokens(cfg),
        "tried": {"batch": cfg.batch, "seq": cfg.seq, "tokens": _tokens(cfg)},
    }
    t_all = time.perf_counter()
    try:
        pred = analytic(spec, cfg)
        rec["prediction"] = pred.to_json() if pred else None
    except Exception as exc:  # a planner bug must not lose the measurement
        rec["prediction"] = None
        rec["prediction_error"] = first_line(exc)
    if with_dryrun:
        t0 = time.perf_counter()
        try:
            rec["dryrun"] = dryrun_accounting(spec, cfg)
        except Exception as exc:
            rec["dryrun"] = None
            rec["dryrun_error"] = first_line(exc)
        rec["dryrun_s"] = round(time.perf_counter() - t0, 3)

    dev.cleanup(collect=False)  # the previous point collected its garbage on the way out
    base = dev.sample()
    mem: dict[str, Any] = {"baseline_allocated": base.allocated, "baseline_reserved": base.reserved}
    workload = None
    step_s: list[float] = []
    failure: Exception | None = None
    try:
        t0 = time.perf_counter()
        workload = builder(spec, cfg, dev.torch_device)
        dev.synchronize()
        rec["load_s"] = round(time.perf_counter() - t0, 4)
        built = dev.sample()  # the build's own peak (a QLoRA base quantised layer by layer), kept apart
        mem["max_allocated_build"], mem["max_reserved_build"] = built.max_allocated, built.max_reserved
        notes = getattr(workload, "notes", None)
        if notes:
            rec["notes"] = [str(n) for n in notes]
        for _ in range(point.warmup):
            workload.step()
        dev.synchronize()
        warm = dev.sample()
        mem["max_allocated_load"], mem["max_reserved_load"] = warm.max_allocated, warm.max_reserved
        dev.reset_peak()
        proc_max = None
        for _ in range(point.steps):
            dev.synchronize()
            t = time.perf_counter()
            workload.step()
            dev.synchronize()
            step_s.append(time.perf_counter() - t)
            s = dev.sample()
            if s.process is not None:
                proc_max = s.process if proc_max is None else max(proc_max, s.process)
        end = dev.sample()
        mem.update(max_allocated=end.max_allocated, max_reserved=end.max_reserved, allocated_end=end.allocated,
                   reserved_end=end.reserved, nvml_process_bytes=end.process, nvml_process_max_bytes=proc_max,
                   nvml_device_used_bytes=end.device_used)
        if end.process is not None and end.reserved is not None:
            mem["outside_allocator_bytes"] = end.process - end.reserved  # context (+ managed memory)
        rec["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # OOM (torch's OutOfMemoryError, MemoryError), a failing step, a rejected config
        failure = exc
        rec["status"] = "oom" if is_oom(exc) else "error"
        rec["error"] = first_line(exc)
        req = tried_bytes(str(exc))
        if req is not None:
            rec["oom_requested_bytes"] = req
        try:
            at = dev.sample()
            mem["max_allocated_at_failure"], mem["max_reserved_at_failure"] = at.max_allocated, at.max_reserved
        except Exception:
            pass
        release(exc)
    finally:
        if workload is not None:
            try:
                workload.close()
            except Exception:
                pass
        del workload
        failure = None
        try:
            dev.cleanup()
        except Exception:
            pass
    del failure
    if step_s and rec["status"] == "ok":
        med = _median(step_s)
        rec["step_s"] = [round(x, 6) for x in step_s]
        rec["step_s_median"] = round(med, 6)
        rec["tokens_per_s"] = round(_tokens(cfg) / med, 3) if med else None
    rec["memory"] = mem
    rec["elapsed_s"] = round(time.perf_counter() - t_all, 3)
    if rec["status"] != "ok" and not dev.healthy():
        rec["status"] = "crashed"
        err = DeviceLostError(f"the device stopped answering after {point.describe()} ({rec.get('error')})",
                              "restart the process; --resume continues after the points already logged and skips "
                              "this one (--retry-failed tries it again)")
        err.record = rec
        raise err
    return rec


def _attempt(point: Point, session: str, search: str | None = None, size: int | None = None) -> dict:
    return {"kind": "attempt", "id": point.id, "session": session, "time": now_iso(), "search": search, "size": size,
            "model": point.model, "method": point.method_key}


def crashed_points(path: Path) -> tuple[set[str], dict[str, set[int]]]:
    """Grid points and search probes that crashed: ``(point ids, {search id: sizes})``.

    A point crashed when its last record says ``crashed`` (the device stopped answering) or
    when an ``attempt`` was logged and no result followed (the process died mid-point).
    """
    from .log import iter_log

    last: dict[tuple, str] = {}
    if path.exists():
        for r in iter_log(path):
            if r.get("kind") == "attempt":
                last[(r.get("id"), r.get("search"), r.get("size"))] = "interrupted" if r.get("interrupted") else "attempt"
            elif r.get("kind") == "point":
                last[(r.get("id"), r.get("search"), r.get("size"))] = r.get("status") or "error"
    points: set[str] = set()
    probes: dict[str, set[int]] = {}
    for (pid, search, size), status in last.items():
        if status not in ("attempt", "crashed"):
            continue
        if search:
            if size is not None:
                probes.setdefault(search, set()).add(int(size))
        else:
            points.add(pid)
    return points, probes


# -- the run ---------------------------------------------------------------------------------

class _Progress:
    """A rich progress bar with ETA on stderr (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, console: Any = None):
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=console or Console(stderr=True), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("calibrating", total=max(1, total))

    def describe(self, text: str) -> None:
        if self.bar:
            self.bar.update(self.task, description=text)

    def advance(self, n: int = 1) -> None:
        if self.bar:
            self.bar.advance(self.task, n)

    def grow(self, n: int) -> None:
        if self.bar and n:
            t = self.bar.tasks[0]
            self.bar.update(self.task, total=(t.total or 0) + n)

    def log(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()


_PROBES_GUESS = 7  # probes a search usually takes (for the ETA; corrected as searches finish)


def run_search(spec: SearchSpec, dev: Device, builder: Builder, log: JsonlLog, prior: dict[int, dict], *,
               session: str = "", progress: _Progress | None = None, with_dryrun: bool = False,
               deadline: float | None = None, on_record: Callable[[dict], None] | None = None,
               crashed: set[int] | None = None) -> dict | None:
    """Find the largest ``spec.vary`` that fits; every probe is logged; resumes from ``prior`` probes.

    ``crashed``: sizes whose probe crashed before; they count as not fitting.
    Returns the ``search`` record, or None if ``deadline`` (a ``time.perf_counter`` value)
    passed first (the probes made so far are logged; a resumed run carries on).
    """
    results = {int(s): r.get("status") == "ok" for s, r in prior.items() if r.get("status") in ("ok", "oom")}
    for size in crashed or ():
        results.setdefault(int(size), False)
    error = None
    kw = dict(start=spec.start, max_size=spec.max, granularity=spec.granularity)
    while (size := next_size(results, **kw)) is not None:
        if deadline is not None and time.perf_counter() > deadline:
            return None
        try:
            point = spec.point(size)
        except VramplanError as exc:
            error = f"size {size}: {exc}"
            break
        if progress:
            progress.describe(f"search {spec.model} {point.method_key} {spec.vary}={size}")
        log.append(_attempt(point, session, spec.id, size))
        try:
            rec = measure_point(point, dev, builder, session=session, search=spec.id, size=size,
                                with_dryrun=with_dryrun)
        except KeyboardInterrupt:
            log.append({**_attempt(point, session, spec.id, size), "interrupted": True})
            raise
        except DeviceLostError as exc:
            if getattr(exc, "record", None):
                log.append(exc.record)
            raise
        log.append(rec)
        if on_record:
            on_record(rec)
        if progress:
            progress.advance()
        if rec["status"] == "error":
            error = f"size {size}: {rec.get('error')}"
            break
        results[size] = rec["status"] == "ok"
    o = outcome(results, **kw)
    best = o.largest_fit or spec.start
    try:
        cfg = spec.config(best).to_dict()
    except VramplanError:
        cfg = None
    out = {"kind": "search", "id": spec.id, "session": session, "time": now_iso(), "model": spec.model,
           "model_config": spec.spec.hf_config or None, "method": spec.config(spec.start).recipe.name,
           "vary": spec.vary, "fixed": spec.fixed, "start": spec.start, "max": spec.max,
           "granularity": spec.granularity, "largest_fit": o.largest_fit, "smallest_oom": o.smallest_oom,
           "probes": o.probes, "reason": error or o.reason, "status": "error" if error else "ok",
           "config": cfg, "capacity_bytes": (dev.describe().get("total_bytes") if dev.kind == "cuda" else None)}
    log.append(out)
    if on_record:
        on_record(out)
    return out


def _needs_bnb(cfg: TrainConfig) -> bool:
    return cfg.recipe.adapter.quantized_base or get_optimizer(cfg.optimizer).package == "bitsandbytes"


def _check_bitsandbytes(points: list[Point], searches: list[SearchSpec]) -> None:
    """Fail before measuring anything if QLoRA or 8-bit optimiser points need a missing bitsandbytes."""
    import importlib.util

    need = [p for p in points if _needs_bnb(p.config)] + [s for s in searches if _needs_bnb(s.config(s.start))]
    if need and importlib.util.find_spec("bitsandbytes") is None:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(f"bitsandbytes is not installed, and {len(need)} points of the suite need it "
                                     "(QLoRA, 8-bit optimisers)", install_hint("calibrate") + "; on a lent GPU "
                                     "machine carry its wheel in .whl/ (calibrate/run_on_gpu.sh --fetch-wheels)")


def _paged(p: Point) -> bool:
    return get_optimizer(p.config.optimizer).paged


def _resolve_suite(suite: str | Path | Suite | None, quick: bool, dev: Device) -> Suite:
    if isinstance(suite, Suite):
        return suite.quick_subset() if quick else suite
    if suite is None:
        return load_suite("cpu" if dev.kind == "cpu" else ("quick" if quick else "standard"))
    s = load_suite(suite)
    if quick and Path(s.path).stem != "quick":
        s = s.quick_subset()
    return s


def run_calibration(gpu: str = "auto", suite: str | Path | Suite | None = None, out: str | Path = "profiles",
                    resume: bool = False, quick: bool = False, device: str = "cuda", *,
                    report_dir: str | Path | None = "reports/calibration", fit: bool = True, progress: bool = True,
                    builder: Builder | None = None, device_obj: Device | None = None, console: Any = None,
                    dryrun: bool | str | None = None, time_limit_s: float | None = None,
                    on_record: Callable[[dict], None] | None = None, retry_failed: bool = False) -> CalibrationResult:
    """Run a calibration suite on one device, then fit the card's profile and write the report.

    Args:
        gpu: ``auto`` (NVML, matched to the GPU catalogue) or a catalogue name; names the
            log, profile and report (``cpu`` on the CPU).
        suite: a suite name in ``calibrate/`` (``standard``, ``quick``, ``cpu``) or a path;
            default ``standard`` (``quick`` with ``quick=True``, ``cpu`` on the CPU).
        out: directory of ``<gpu>.jsonl`` (the raw log) and ``<gpu>.json`` (the profile).
        resume: continue an existing log, skipping points already measured or found infeasible.
        quick: the few-minute subset (``calibrate/quick.toml``, or the suite's ``quick = true`` grids).
        device: ``cuda``, ``cuda:N`` or ``cpu`` (tiny models: step time and dry-run accounting).
        report_dir: where ``<gpu>.md`` and ``<gpu>.png`` go (None: no report).
        fit: fit and write the profile after measuring.
        progress: show a rich progress bar with ETA on stderr.
        builder: ``builder(spec, config, torch_device) -> Workload`` (default: ``vramplan.runtime``).
        device_obj: a :class:`Device` to use instead of ``device`` (tests inject fakes).
        dryrun: record the dry run's accounting: True for every point, False for none, or
            ``"first"`` (the first point of each model x method group); default: the suite's ``dryrun``.
        time_limit_s: start no new point after this many seconds; the run then fits what the log
            holds and returns with ``complete = False`` (for machines lent by the 10 minutes:
            call again with ``resume=True``).
        on_record: called with every record once it is safely in the log (for plain-text progress).
        retry_failed: with ``resume``, measure again the points (and search probes) that crashed
            the device or the process before; by default they are skipped and stay recorded.

    Returns:
        :class:`CalibrationResult`.

    Raises:
        VramplanError: no such device, a bad suite, a log that exists without ``resume`` or
            that belongs to another card; DeviceLostError when the device stops answering.
        KeyboardInterrupt: after the points measured so far are safely in the log.
    """
    t_start = time.perf_counter()
    dev = device_obj or make_device(device)
    st = _resolve_suite(suite, quick, dev)  # a bad suite fails before CUDA starts
    dry_ids = st.dryrun_ids(dryrun)
    probes = dev.probe_context()  # before anything else touches CUDA: NVML before and after it starts
    probes.update(dev.probe_workspace())
    info = dev.describe()
    name = resolve_gpu_name(gpu, dev, info)
    key = profile_key(name)
    out = Path(out)
    log_path = out / f"{key}.jsonl"
    state = LogState.load(log_path) if log_path.exists() else LogState()
    if (state.points or state.searches) and not resume:
        raise VramplanError(f"{log_path} already holds {len(state.points)} points",
                            "pass --resume to continue it, or move it away to start afresh")
    prev_dev = next((s.get("device", {}).get("name") for s in reversed(state.sessions) if s.get("device")), None)
    if resume and prev_dev and info.get("name") and prev_dev != info.get("name"):
        raise VramplanError(f"{log_path} was measured on {prev_dev}, not on this {info.get('name')}",
                            "calibrate each card into its own log (--gpu NAME or another --out)")
    result = CalibrationResult(gpu=key, device=dev.torch_device, suite=st.name, log_path=log_path,
                               budget_s=st.time_budget_s)
    session = uuid.uuid4().hex[:12]
    crashed, crashed_probes = crashed_points(log_path) if resume else (set(), {})
    if retry_failed:
        crashed, crashed_probes = set(), {}
    todo = [p for p in st.points if not state.done(p.id) and p.id not in crashed]
    result.skipped = len(st.points) - len(todo)
    result.crashed_skipped = sorted(p.id for p in st.points if p.id in crashed and not state.done(p.id))
    searches = [s for s in st.searches if s.id not in state.searches]
    if builder is None and (todo or searches):
        _check_bitsandbytes(todo, searches)
    bld = builder if builder is not None else (default_builder() if todo or searches else None)
    bar = _Progress(progress, len(todo) + _PROBES_GUESS * len(searches), console)
    log = JsonlLog(log_path).open()
    interrupted = False
    # Everything imported so far (torch, transformers, ...) lives as long as the process: freeze it
    # out of the collector, so the full collection after each point scans only that point's objects.
    gc.collect()
    gc.freeze()
    try:
        log.append({"kind": "session", "session": session, "gpu": key, "gpu_name": name,
                    "suite": {"name": st.name, "path": st.path, "points": len(st.points), "searches": len(st.searches)},
                    "resume": resume, "probes": probes, **environment(info)})
        deadline = None if time_limit_s is None else t_start + float(time_limit_s)
        # Paged 8-bit optimisers put their states in cudaMallocManaged memory that bitsandbytes never
        # frees: run those points last, so no other point's NVML reading carries their leak.
        tasks: list = [p for p in todo if not _paged(p)] + list(searches) + [p for p in todo if _paged(p)]
        for i, task in enumerate(tasks):
            if deadline is not None and time.perf_counter() > deadline:
                result.complete = False
                result.remaining = len(tasks) - i
                break
            if isinstance(task, SearchSpec):
                before = len(state.probes.get(task.id, {}))
                res = run_search(task, dev, bld, log, state.probes.get(task.id, {}), session=session, progress=bar,
                                 with_dryrun=False, deadline=deadline, on_record=on_record,
                                 crashed=crashed_probes.get(task.id))
                if res is None:
                    result.complete = False
                    result.remaining = len(tasks) - i
                    break
                result.searches.append({k: res[k] for k in ("id", "vary", "fixed", "largest_fit", "smallest_oom",
                                                            "probes", "reason")})
                bar.grow(res["probes"] - before - _PROBES_GUESS)
                continue
            p = task
            bar.describe(p.describe())
            log.append(_attempt(p, session))
            try:
                rec = measure_point(p, dev, bld, session=session, with_dryrun=p.id in dry_ids)
            except KeyboardInterrupt:  # stopped, not crashed: a resume measures it
                log.append({**_attempt(p, session), "interrupted": True})
                raise
            except DeviceLostError as exc:
                if getattr(exc, "record", None):
                    log.append(exc.record)
                    if on_record:
                        on_record(exc.record)
                raise
            log.append(rec)
            if on_record:
                on_record(rec)
            status = rec["status"]
            result.measured += status == "ok"
            result.oom += status == "oom"
            result.errors += status == "error"
            if status != "ok":
                bar.log(f"[yellow]{status}[/]: {p.describe()}: {rec.get('error', '')[:160]}")
            bar.advance()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        gc.unfreeze()
        log.close()
        bar.stop()
        result.elapsed_s = time.perf_counter() - t_start
        if interrupted:
            import sys

            print(f"vramplan calibrate: interrupted; everything measured so far is in {log_path}; "
                  f"re-run with --resume to continue", file=sys.stderr)
    if fit and (result.complete or LogState.load(log_path).measured):  # a cut-short run fits what it has
        from .fit import fit_profile

        prof = fit_profile(log_path)
        result.profile = prof
        result.profile_path = prof.save(out / f"{key}.json")
        if report_dir is not None:
            from .report import write_report

            result.report_path, result.plot_path = write_report(log_path, prof, report_dir)
    result.elapsed_s = time.perf_counter() - t_start
    return result

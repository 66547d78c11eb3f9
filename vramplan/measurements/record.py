"""One measurement record: what ran, on what, what was measured, and where the figure came from.

Every path that measures a training run produces this record or is converted to it: the
calibration runner's log points (:func:`from_runner_point`), the ``VramplanCallback``'s log
(:func:`from_callback_point`) and published tables (:mod:`vramplan.measurements.importers`).
The benchmark of published accuracy and the band of the planner read only records.

Schema ``vramplan.measurement/1`` (JSON object, one per line in a ``.jsonl`` file)::

    {"schema": "vramplan.measurement/1",
     "config":  {model, model_config, model_text, params_b, method, adapter, rank, targets,
                 batch, seq, seq_bound, packing, grad_ckpt, precision, optimizer, attn,
                 stack, stack_version, techniques, gpus, strategy, offload, double_quant, dropout,
                 engine_options, unstated},
     "device":  {name, display, memory_bytes, versions},
     "measurement": {outcome, quantity, bytes, published, unit, step_s, tokens_per_s, limit},
     "source":  {kind, id, ref, row, machine},
     "estimated": false, "notes": ""}

* ``measurement.outcome``: ``measured`` (a number), ``oom`` (ran out of memory), ``fit_only``
  (ran, no number published).
* ``measurement.quantity`` (:data:`QUANTITIES`): ``max_allocated``
  (``torch.cuda.max_memory_allocated``), ``max_reserved`` (``max_memory_reserved``),
  ``torchtune_active`` (torchtune's ``peak_memory_active``: the allocator's active bytes, equal
  to allocated at the peak), ``device_total`` (NVML / nvidia-smi: the process's device memory),
  ``unknown_peak`` (a peak whose kind the source does not state).
* ``measurement.limit``: ``max_seq`` when a fit-only run is the longest sequence that fit (a
  published context capacity): the benchmark compares it with the planner's longest sequence.
* ``config.seq_bound``: ``exact`` (every sequence this long, packed or padded), ``max`` (a
  bound: dynamic padding to the longest of the batch, ``"<=512"``), ``unknown``.
* ``config.unstated``: the adapter settings the source leaves unknown (``rank``, ``targets``;
  optional, default none): the run is planned over the plausible configurations
  (:mod:`vramplan.measurements.plausible`), not at one guess.
* ``estimated``: another tool's rule of thumb, not a measurement: compared, never fitted.

Bytes are ints. :func:`MeasurementRecord.from_dict` validates and raises a one-line
:class:`~vramplan.errors.VramplanError` on anything malformed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

from ..errors import VramplanError

SCHEMA = "vramplan.measurement/1"
QUANTITIES = ("max_allocated", "max_reserved", "torchtune_active", "device_total", "unknown_peak")
OUTCOMES = ("measured", "oom", "fit_only")
SEQ_BOUNDS = ("exact", "max", "unknown")
SOURCE_KINDS = ("published", "runner", "callback", "machine")


def _bad(where: str, what: str, hint: str | None = None) -> VramplanError:
    return VramplanError(f"measurement record {where}: {what}", hint)


def _opt_int(d: dict, key: str, where: str, minimum: int = 0) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _bad(where, f"{key} must be an integer >= {minimum} or null, got {v!r}")
    return v


def _opt_num(d: dict, key: str, where: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v == v) or v < 0 or v == float("inf"):
        raise _bad(where, f"{key} must be a finite number >= 0 or null, got {v!r}")
    return float(v)


def _opt_str(d: dict, key: str, where: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _bad(where, f"{key} must be a string or null, got {type(v).__name__}")
    return v


def _opt_bool(d: dict, key: str, where: str) -> bool | None:
    v = d.get(key)
    if v is None or isinstance(v, bool):
        return v
    raise _bad(where, f"{key} must be true, false or null, got {v!r}")


def _strs(d: dict, key: str, where: str) -> tuple[str, ...]:
    v = d.get(key) or ()
    if isinstance(v, str):
        v = [t for t in v.split(",") if t.strip()]
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
        raise _bad(where, f"{key} must be a list of strings")
    return tuple(t.strip() for t in v)


def _unstated(d: dict, where: str) -> tuple[str, ...]:
    from .plausible import UNSTATED_FIELDS

    v = _strs(d, "unstated", where)
    bad = [x for x in v if x not in UNSTATED_FIELDS]
    if bad:
        raise _bad(where, f"unstated may name {', '.join(UNSTATED_FIELDS)}, not {bad[0]!r}")
    return tuple(dict.fromkeys(v))


def _only(d: Any, allowed: Iterable[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise _bad(where, f"expected an object, got {type(d).__name__}")
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise _bad(where, f"unknown field {extra[0]!r}", f"fields: {', '.join(sorted(allowed))}")
    return d


@dataclass(frozen=True)
class RunConfig:
    """The training configuration of a measured run (None: not stated by the source).

    ``model`` is a catalogue name (``vramplan.models``) or None with ``model_config`` (an HF
    ``config.json`` dict) or only ``model_text`` (as the source wrote it). Shapes are per GPU.
    """

    model: str | None = None
    model_config: dict | None = None
    model_text: str | None = None
    params_b: float | None = None
    method: str | None = None
    adapter: str | None = None
    rank: int | None = None
    targets: tuple[str, ...] = ()
    batch: int | None = None
    seq: int | None = None
    seq_bound: str = "unknown"
    packing: bool | None = None
    grad_ckpt: bool | None = None
    precision: str | None = None
    optimizer: str | None = None
    attn: str | None = None
    stack: str | None = None
    stack_version: str | None = None
    techniques: tuple[str, ...] = ()
    gpus: int = 1
    strategy: str | None = None
    offload: str | None = None
    double_quant: bool | None = None
    dropout: float | None = None
    grad_accum: int = 1
    #: the sharding engine's settings the run used where they differ from the stack's usual ones
    #: (:data:`vramplan.distributed.ENGINE_OPTIONS`, e.g. DeepSpeed's ``reduce_bucket_size`` in elements)
    engine_options: dict = field(default_factory=dict, hash=False)
    #: adapter settings the source does not state (``rank``, ``targets``: :data:`plausible.UNSTATED_FIELDS`):
    #: the run is planned over the plausible configurations (``vramplan/data/adapter_configs.toml``)
    unstated: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Any, where: str = "config") -> "RunConfig":
        d = _only(d, {f.name for f in fields(cls)}, where)
        mc = d.get("model_config")
        if mc is not None and not isinstance(mc, dict):
            raise _bad(where, "model_config must be an object (an HF config.json) or null")
        bound = d.get("seq_bound") or "unknown"
        if bound not in SEQ_BOUNDS:
            raise _bad(where, f"seq_bound must be one of {', '.join(SEQ_BOUNDS)}, got {bound!r}")
        gpus = d.get("gpus", 1)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise _bad(where, f"gpus must be a positive integer, got {gpus!r}")
        return cls(
            model=_opt_str(d, "model", where), model_config=mc, model_text=_opt_str(d, "model_text", where),
            params_b=_opt_num(d, "params_b", where), method=_opt_str(d, "method", where),
            adapter=_opt_str(d, "adapter", where), rank=_opt_int(d, "rank", where, 1),
            targets=_strs(d, "targets", where), batch=_opt_int(d, "batch", where, 1), seq=_opt_int(d, "seq", where, 1),
            seq_bound=bound, packing=_opt_bool(d, "packing", where), grad_ckpt=_opt_bool(d, "grad_ckpt", where),
            precision=_opt_str(d, "precision", where), optimizer=_opt_str(d, "optimizer", where),
            attn=_opt_str(d, "attn", where), stack=_opt_str(d, "stack", where),
            stack_version=_opt_str(d, "stack_version", where), techniques=_strs(d, "techniques", where),
            gpus=gpus, strategy=_opt_str(d, "strategy", where), offload=_opt_str(d, "offload", where),
            double_quant=_opt_bool(d, "double_quant", where), dropout=_opt_num(d, "dropout", where),
            grad_accum=_opt_int(d, "grad_accum", where, 1) or 1, engine_options=_engine_options(d, where),
            unstated=_unstated(d, where),
        )


def _engine_options(d: dict, where: str) -> dict:
    """``engine_options``: an object of option name -> positive number or bool (names checked when planned)."""
    eo = d.get("engine_options") or {}
    if not isinstance(eo, dict) or not all(isinstance(k, str) and isinstance(v, (int, float, bool)) and not (
            isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0) for k, v in eo.items()):
        raise _bad(where, "engine_options must be an object of option name -> positive number or true/false")
    return dict(eo)


@dataclass(frozen=True)
class Device:
    """The card: catalogue ``name`` (``vramplan.gpus``) where known, the name as reported, bytes, versions."""

    name: str | None = None
    display: str | None = None
    memory_bytes: int | None = None
    versions: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str = "device") -> "Device":
        d = _only(d, {f.name for f in fields(cls)}, where)
        v = d.get("versions") or {}
        if not isinstance(v, dict):
            raise _bad(where, "versions must be an object of name -> version")
        return cls(name=_opt_str(d, "name", where), display=_opt_str(d, "display", where),
                   memory_bytes=_opt_int(d, "memory_bytes", where, 1), versions={str(k): str(x) for k, x in v.items()})


@dataclass(frozen=True)
class Measurement:
    """What was measured. ``bytes`` is the figure in bytes (per GPU); ``published`` the text as printed."""

    outcome: str = "measured"
    quantity: str = "unknown_peak"
    bytes: int | None = None
    published: str | None = None
    unit: str | None = None
    step_s: float | None = None
    tokens_per_s: float | None = None
    limit: str | None = None   # "max_seq": the configuration's sequence is the longest that fit (a capacity)

    @classmethod
    def from_dict(cls, d: Any, where: str = "measurement") -> "Measurement":
        d = _only(d, {f.name for f in fields(cls)}, where)
        outcome = d.get("outcome", "measured")
        if outcome not in OUTCOMES:
            raise _bad(where, f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        quantity = d.get("quantity", "unknown_peak")
        if quantity not in QUANTITIES:
            raise _bad(where, f"quantity must be one of {', '.join(QUANTITIES)}, got {quantity!r}")
        b = _opt_int(d, "bytes", where, 1)
        if outcome == "measured" and b is None:
            raise _bad(where, "a measured outcome needs bytes", "use outcome fit_only for a run without a number")
        limit = d.get("limit")
        if limit not in (None, "max_seq"):
            raise _bad(where, f"limit must be null or 'max_seq', got {limit!r}")
        if limit and outcome != "fit_only":
            raise _bad(where, "limit 'max_seq' describes a fit-only outcome (the longest sequence that ran)")
        return cls(outcome=outcome, quantity=quantity, bytes=b, published=_opt_str(d, "published", where),
                   unit=_opt_str(d, "unit", where), step_s=_opt_num(d, "step_s", where),
                   tokens_per_s=_opt_num(d, "tokens_per_s", where), limit=limit)


@dataclass(frozen=True)
class Source:
    """Where the figure came from: ``id`` groups rows of one source (leave-one-source-out), ``ref`` is a
    URL or ``owner/repo:path @commit``, ``row`` its row in an imported table, ``machine`` a host name."""

    kind: str = "published"
    id: str = ""
    ref: str | None = None
    row: int | None = None
    machine: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "source") -> "Source":
        d = _only(d, {f.name for f in fields(cls)}, where)
        kind = d.get("kind", "published")
        if kind not in SOURCE_KINDS:
            raise _bad(where, f"kind must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
        sid = d.get("id")
        if not isinstance(sid, str) or not sid.strip():
            raise _bad(where, "id (the source's name) is required")
        if kind == "published" and not d.get("ref"):
            raise _bad(where, f"published source {sid!r} needs ref (a URL or repo path with commit)")
        return cls(kind=kind, id=sid, ref=_opt_str(d, "ref", where), row=_opt_int(d, "row", where),
                   machine=_opt_str(d, "machine", where))


@dataclass(frozen=True)
class MeasurementRecord:
    """One measured (or OOM, or fit-only) training run. See the module docstring for the schema."""

    config: RunConfig
    device: Device
    measurement: Measurement
    source: Source
    estimated: bool = False
    notes: str = ""
    schema: str = SCHEMA

    @property
    def card_key(self) -> str:
        """The card this record belongs to (catalogue name, else the reported name), for splitting logs."""
        return self.device.name or self.device.display or "unknown"

    @property
    def usable_for_fit(self) -> bool:
        """A number that may calibrate the planner: measured, not another tool's estimate, model and shape known."""
        c = self.config
        return (self.measurement.outcome == "measured" and not self.estimated and self.measurement.bytes is not None
                and (c.model is not None or c.model_config is not None) and c.batch is not None and c.seq is not None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"]["targets"] = list(self.config.targets)
        d["config"]["techniques"] = list(self.config.techniques)
        d["config"]["unstated"] = list(self.config.unstated)
        return {"schema": self.schema, "config": d["config"], "device": d["device"],
                "measurement": d["measurement"], "source": d["source"], "estimated": self.estimated,
                "notes": self.notes}

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> "MeasurementRecord":
        w = where or "record"
        d = _only(d, ("schema", "config", "device", "measurement", "source", "estimated", "notes"), w)
        schema = d.get("schema")
        if schema != SCHEMA:
            raise _bad(w, f"schema {schema!r} is not {SCHEMA!r}",
                       "convert runner/callback logs with `vramplan calibrate --import LOG`")
        est = d.get("estimated", False)
        if not isinstance(est, bool):
            raise _bad(w, f"estimated must be true or false, got {est!r}")
        notes = d.get("notes") or ""
        if not isinstance(notes, str):
            raise _bad(w, "notes must be a string")
        for part in ("config", "measurement", "source"):
            if part not in d:
                raise _bad(w, f"missing {part}")
        return cls(config=RunConfig.from_dict(d["config"], f"{w}.config"),
                   device=Device.from_dict(d.get("device") or {}, f"{w}.device"),
                   measurement=Measurement.from_dict(d["measurement"], f"{w}.measurement"),
                   source=Source.from_dict(d["source"], f"{w}.source"), estimated=est, notes=notes)

    def with_(self, **changes) -> "MeasurementRecord":
        return replace(self, **changes)


# -- files -------------------------------------------------------------------------------------

def dump_records(records: Iterable[MeasurementRecord], path: str | Path) -> Path:
    """Write records as JSONL, atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(), separators=(",", ":"), allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_records(path: str | Path) -> list[MeasurementRecord]:
    """Read a JSONL file of records, validating each (a bad line is a one-line VramplanError)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VramplanError(f"cannot read measurement records {path}: {getattr(exc, 'strerror', None) or exc}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise VramplanError(f"{path}: line {i} is not JSON") from None
        out.append(MeasurementRecord.from_dict(d, f"{path.name}:{i}"))
    return out


# -- converters: the runner's and the callback's log points ------------------------------------

_CONFIG_KEYS = ("method", "adapter", "rank", "batch", "seq", "grad_ckpt", "precision", "optimizer", "attn")


def _run_config(rec: dict, cfg: dict, stack_versions: dict | None = None) -> RunConfig:
    framework = cfg.get("framework") or "hf"
    ver = None
    if stack_versions:
        pkg = {"hf": "transformers", "torchtune": "torchtune", "litgpt": "litgpt", "unsloth": "unsloth"}.get(framework)
        ver = stack_versions.get(pkg) if pkg else None
    techs = cfg.get("techniques") or ()
    return RunConfig(
        model=rec.get("model") if not rec.get("model_config") else rec.get("model"),
        model_config=rec.get("model_config") or rec.get("hf_config") or None,
        **{k: cfg.get(k) for k in _CONFIG_KEYS}, targets=tuple(cfg.get("targets") or ()),
        seq_bound="exact", packing=None if "padding" not in techs else False, stack=framework,
        double_quant=cfg.get("double_quant"), dropout=cfg.get("dropout"),
        stack_version=None if ver is None else str(ver), techniques=tuple(techs),
        gpus=int(rec.get("gpus") or 1), strategy=rec.get("strategy"), offload=rec.get("offload"),
    )


def _step(rec: dict) -> tuple[float | None, float | None]:
    s = rec.get("step_s_median")
    t = rec.get("tokens_per_s")
    return (float(s) if isinstance(s, (int, float)) and s > 0 else None,
            float(t) if isinstance(t, (int, float)) and t > 0 else None)


def _measurement(mem: dict, status: str, rec: dict) -> list[Measurement]:
    """One Measurement per quantity the point holds (allocated, reserved, device total), or the OOM."""
    step_s, tps = _step(rec)
    if status == "oom":
        return [Measurement(outcome="oom", quantity="unknown_peak")]
    out = []
    for quantity, keys in (("max_allocated", ("max_allocated",)), ("max_reserved", ("max_reserved",)),
                           ("device_total", ("nvml_process_max_bytes", "nvml_process_bytes"))):
        v = next((mem.get(k) for k in keys if isinstance(mem.get(k), int) and mem.get(k) > 0), None)
        if v is not None:
            out.append(Measurement(outcome="measured", quantity=quantity, bytes=int(v), unit="B",
                                   step_s=step_s, tokens_per_s=tps))
    return out


def from_runner_point(rec: dict, session: dict | None = None, machine: str | None = None) -> list[MeasurementRecord]:
    """Records of one calibration-runner ``point`` (one per measured quantity; [] for an error or no number)."""
    if rec.get("kind") != "point" or rec.get("status") not in ("ok", "oom"):
        return []
    session = session or {}
    dev = session.get("device") if isinstance(session.get("device"), dict) else {}
    versions = {k: str(v) for k, v in (session.get("versions") or {}).items() if v is not None}
    device = Device(name=session.get("gpu"), display=dev.get("name") or session.get("gpu_name"),
                    memory_bytes=dev.get("total_bytes") if isinstance(dev.get("total_bytes"), int) else None,
                    versions=versions)
    cfg = _run_config(rec, rec.get("config") or {}, versions)
    src = Source(kind="runner", id=f"runner:{session.get('session') or rec.get('session') or 'log'}",
                 machine=machine or (session.get("env") or {}).get("HOSTNAME"))
    return [MeasurementRecord(config=cfg, device=device, measurement=m, source=src, notes=f"point {rec.get('id')}")
            for m in _measurement(rec.get("memory") or {}, rec["status"], rec)]


def from_callback_point(rec: dict, machine: str | None = None) -> list[MeasurementRecord]:
    """Records of one ``VramplanCallback`` point (its ``memory`` block, or the older ``measured`` one)."""
    if rec.get("kind") != "point":
        return []
    mem = dict(rec.get("memory") or {})
    old = rec.get("measured") or {}  # logs written before the callback used the runner's field names
    for new, key in (("max_allocated", "max_allocated_bytes"), ("max_reserved", "max_reserved_bytes"),
                     ("nvml_process_bytes", "process_bytes")):
        if mem.get(new) is None and old.get(key) is not None:
            mem[new] = old[key]
    d = rec.get("device") or {}
    versions = {k: str(v) for k, v in (rec.get("versions") or {}).items() if v is not None}
    device = Device(name=d.get("catalogue") or rec.get("gpu"), display=d.get("name"),
                    memory_bytes=d.get("total_bytes") if isinstance(d.get("total_bytes"), int) else None,
                    versions=versions)
    cfg = _run_config(rec, rec.get("config") or {}, versions)
    src = Source(kind="callback", id=f"callback:{machine or rec.get('machine') or 'log'}",
                 machine=machine or rec.get("machine"))
    return [MeasurementRecord(config=cfg, device=device, measurement=m, source=src, notes=f"step {rec.get('step')}")
            for m in _measurement(mem, rec.get("status", "ok"), rec)]


def from_log(records: list[dict], machine: str | None = None) -> list[MeasurementRecord]:
    """Every measurement in a runner or callback JSONL log (as read by ``calibration.log.read_log``)."""
    sessions: dict[Any, dict] = {}
    last_session: dict | None = None
    out: list[MeasurementRecord] = []
    for r in records:
        kind = r.get("kind")
        if kind == "session":
            sessions[r.get("session")] = r
            last_session = r
        elif kind == "point":
            if r.get("source") == "VramplanCallback":
                out.extend(from_callback_point(r, machine))
            else:
                out.extend(from_runner_point(r, sessions.get(r.get("session"), last_session), machine))
    return out


def fit_usable_points(log_records: list[dict]) -> int:
    """How many points of a runner/callback log the calibration fit can use: status ok, split fit or
    search, and a measured ``memory.max_allocated`` or a dry-run tensor peak (what ``calibration.fit``
    reads). 0 means a fit would write a profile of defaults over the card's real one."""
    n = 0
    for r in log_records:
        if r.get("kind") != "point" or r.get("status") != "ok":
            continue
        split = "search" if r.get("search") else r.get("split", "fit")
        if split not in ("fit", "search"):
            continue
        mem = r.get("memory") or {}
        if isinstance(mem.get("max_allocated"), int) or (r.get("dryrun") or {}).get("tensor_peak_bytes"):
            n += 1
    return n


def require_fit_points(log_records: list[dict], path: str | Path) -> None:
    """Raise a one-line VramplanError when a log holds no point the fit can use (see :func:`fit_usable_points`)."""
    if fit_usable_points(log_records):
        return
    pts = [r for r in log_records if r.get("kind") == "point"]
    why = ("no point records" if not pts else
           f"{len(pts)} point(s), none measured with max_allocated in the fit/search split "
           "(a VramplanCallback log written before vramplan 0.x used other field names)")
    raise VramplanError(f"{path} has {why}; refusing to write a profile of defaults over the card's real one",
                        "re-run the callback or `vramplan calibrate`; `vramplan calibrate --import LOG` reads old logs")

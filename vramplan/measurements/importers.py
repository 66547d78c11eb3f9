"""Importers: published CSV tables and runner/callback logs as :class:`MeasurementRecord` s.

``vramplan calibrate --import FILE`` calls :func:`import_file`:

* a ``.csv`` is a published table. Its columns are mapped onto record fields by a column
  mapping (default: the header of ``measurements/published.csv``; ``[columns]`` of a sources
  file overrides it), and each source id is read with its table in the sources file
  (``measurements/sources.toml``: stack, quantity, unit, documented defaults). Cells are read
  as published: a sequence bound (``"<=512"``, ``"max length 1024"``), GB (1e9 B) vs GiB (2^30 B)
  vs MB, ``OOM`` and ``fits (no number)`` outcomes, ranges (``"72-80"``: the low end), per-GPU
  products (``"2*24G"``), unknown cells (None).
* a ``.jsonl`` is a calibration runner or ``VramplanCallback`` log
  (:func:`vramplan.measurements.record.from_log`), or a file of records already.

Rows the planner cannot express (a model outside the catalogue, an unknown batch, a
model-parallel ``device_map``) keep their record with ``config.model`` or ``batch`` left None
and say why in ``notes``; the benchmark counts them as not predictable, it never drops them
silently.
"""

from __future__ import annotations

import csv
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VramplanError
from ..methods import Adapter, report_words, takes_adapter_choice
from .record import QUANTITIES, Device, Measurement, MeasurementRecord, RunConfig, Source, from_log, SCHEMA

UNITS = {"GB": 10**9, "GiB": 2**30, "MB": 10**6, "MiB": 2**20, "B": 1}


@dataclass
class SourceMap:
    """How one source is read (a table of ``sources.toml``)."""

    stack: str = "hf"
    stack_version: str | None = None
    quantity: str = "unknown_peak"
    unit: str = "GB"
    precision: str | None = None
    multi_gpu: str | None = None
    multi_gpu_ckpt: bool = False
    seq_unknown: int | None = None
    grad_ckpt_unknown: bool | None = None
    optimizer_unknown: str | None = None   # the optimizer the source's own documented recipe sets
    devices_note: str | None = None
    dropout: float | None = None
    versions: dict = field(default_factory=dict)
    global_batch: dict = field(default_factory=dict)  # "catalogue model/method" -> the config's global batch
    engine_options: dict = field(default_factory=dict)  # the sharding engine's settings the source's runs used
    why: str = ""


@dataclass
class Mapping:
    columns: dict[str, str]
    sources: dict[str, SourceMap]
    models: dict[str, dict] = field(default_factory=dict)


DEFAULT_COLUMNS = {
    "source": "source", "ref": "url_or_repo_path", "model": "model", "params_b": "params_b", "method": "method",
    "rank": "lora_r", "targets": "lora_targets", "precision": "base_precision", "optimizer": "optimizer",
    "batch": "micro_batch", "seq": "seq_len", "grad_ckpt": "grad_ckpt", "attn": "attn_impl", "gpu": "gpu",
    "value": "peak_mem_gib", "tokens_per_s": "tokens_per_s", "kind": "measured_or_estimated", "notes": "notes",
    # optional per-row columns (a third-party table may state them per row; else the source's reading)
    "unit": "unit", "quantity": "quantity",
}


def load_mapping(path: str | Path | None) -> Mapping:
    """Read a sources file (``measurements/sources.toml`` format); None: the default columns, no sources."""
    if path is None:
        return Mapping(dict(DEFAULT_COLUMNS), {})
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise VramplanError(f"cannot read sources file {path}: {exc}") from None
    cols = {**DEFAULT_COLUMNS, **{str(k): str(v) for k, v in (raw.get("columns") or {}).items()}}
    srcs = {}
    known = set(SourceMap.__dataclass_fields__)
    for sid, t in (raw.get("source") or {}).items():
        bad = sorted(set(t) - known)
        if bad:
            raise VramplanError(f"{path}: source {sid!r} has unknown field {bad[0]!r}", f"fields: {', '.join(sorted(known))}")
        if t.get("optimizer_unknown") is not None:
            from ..optimizers import OPTIMIZERS

            if t["optimizer_unknown"] not in OPTIMIZERS:
                raise VramplanError(f"{path}: source {sid!r} optimizer_unknown {t['optimizer_unknown']!r} is not one of "
                                    f"{', '.join(OPTIMIZERS)}")
        if t.get("unit", "GB") not in UNITS:
            raise VramplanError(f"{path}: source {sid!r} unit {t.get('unit')!r} is not one of {', '.join(UNITS)}")
        srcs[str(sid)] = SourceMap(**t)
    return Mapping(cols, srcs, {str(k): dict(v) for k, v in (raw.get("models") or {}).items()})


# -- cell parsers --------------------------------------------------------------------------

_UNKNOWN = ("", "unknown", "n/a", "na", "none", "?", "-")


def _unknown(text: str) -> bool:
    return text.strip().lower().split(" (")[0].strip() in _UNKNOWN


_UNIT_WORDS = {u.lower(): u for u in UNITS}


def _unit_of(word: str, default: str) -> str:
    """A unit printed in a cell (any case: ``gb``, ``GiB``, ``MiB``), else ``default`` (a bare ``G`` is the source's)."""
    return _UNIT_WORDS.get(word.strip().lower(), default)


def parse_value(text: str, unit: str) -> tuple[str, int | None, str]:
    """(outcome, bytes per GPU or None, note) from a published memory cell in ``unit``.

    ``"OOM"``/``"OOM (40000)"`` -> oom; ``"fits (no number)"`` -> fit_only; ``"72-80"`` -> 72 (low end);
    ``"2*24G"`` -> 24 per GPU; a unit suffix in the cell (``22.8G``, ``40G``, ``44.8 gb``) is read as printed
    (``gb``/``GiB`` in any case; a bare ``G`` is the source's unit); ``"~9.5"`` / ``"about 9.5"`` -> 9.5;
    thousands separators (``"18,432 MiB"``) are dropped; an upper bound (``"<=24 GB"``, ``"< 24"``) says the run
    fitted under it and no more: fit_only.
    """
    t = text.strip()
    low = t.lower()
    if low.startswith("oom") or "out of memory" in low:
        return "oom", None, ""
    if low.startswith("fit") or "no number" in low:
        return "fit_only", None, ""
    if low.startswith(("<", "\u2264", "under ", "below ")):
        return "fit_only", None, f"an upper bound ({t}): the run fitted under it"
    t = re.sub(r"(?i)^\s*(~|\u2248|approx\.?|approximately|about|ca\.?)\s*", "", t)
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    note = "approximate as published" if t != text.strip() and not re.search(r"\d,\d{3}", text) else ""
    m = re.fullmatch(r"\s*(\d+)\s*\*\s*([\d.]+)\s*[a-z]*\s*", t, re.I)
    if m:
        t, note = m.group(2), f"{m.group(1)} GPUs x {m.group(2)} (per GPU)"
    m = re.fullmatch(r"\s*([\d.]+)\s*-\s*([\d.]+)\s*([a-z]*)\s*", t, re.I)
    if m:
        t, note = m.group(1) + m.group(3), f"range {m.group(0).strip()}: read at its low end"
    m = re.match(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)", t, re.I)
    if not m or float(m.group(1)) <= 0:
        raise VramplanError(f"cannot read a memory figure from {text!r}",
                            "use a positive number (with GB/GiB/MB/MiB if not the source's unit), OOM, or 'fits (no number)'")
    unit = _unit_of(m.group(2), unit)  # a unit printed in the cell ("44.8 GB" among GiB rows) wins over the source's
    return "measured", int(round(float(m.group(1)) * UNITS[unit])), note


#: how third-party tables name the quantity they printed -> the record's quantity
_QUANTITY_WORDS = (("active", "torchtune_active"), ("reserved", "max_reserved"), ("allocated", "max_allocated"),
                   ("nvidia-smi", "device_total"), ("nvml", "device_total"), ("device", "device_total"),
                   ("total", "device_total"), ("smi", "device_total"))


def parse_quantity(text: str, default: str) -> tuple[str, str]:
    """(quantity, note) from a per-row quantity cell (``max_memory_allocated``, ``reserved``, ``nvidia-smi``,
    ``torchtune active``, a record name); empty: the source's ``default``; unrecognised: ``unknown_peak``."""
    t = text.strip().lower()
    if _unknown(t):
        return default, ""
    if t in QUANTITIES:
        return t, ""
    for word, q in _QUANTITY_WORDS:
        if word in t:
            return q, ""
    return "unknown_peak", f"quantity {text.strip()!r} not recognised: read as a peak of unknown kind"


def parse_seq(text: str) -> tuple[int | None, str, bool | None]:
    """(seq, bound, packing) from a sequence cell: ``"<=512"`` -> (512, max), ``"2048 (packed)"`` -> exact."""
    t = text.strip().lower()
    if _unknown(t):
        return None, "unknown", None
    packing = True if "packed" in t and "unpacked" not in t else None
    m = re.search(r"prompt[^\d]*(\d+).*?(\d+)", t)
    if re.match(r"\d+\s*prompt\s*\+\s*\d+", t):
        a, b = re.findall(r"\d+", t)[:2]
        return int(a) + int(b), "max", packing
    if m and "prompt" in t:
        return None, "unknown", packing
    bound = "max" if ("<=" in t or "max" in t or "dynamic" in t or "longest" in t or "~" in t) else "exact"
    nums = re.findall(r"\d+", t)
    if not nums:
        return None, "unknown", packing
    if t.startswith("<=") or t[0].isdigit():
        return int(nums[0]), bound, packing
    return int(nums[-1]), "max", packing


def parse_bool(text: str) -> bool | None:
    t = text.strip().lower()
    if t.startswith("on") or t.startswith("true") or t.startswith("yes"):
        return True
    if t.startswith("off") or t.startswith("false") or t.startswith("no"):
        return False
    return None


def parse_int(text: str) -> int | None:
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else None


_GPU_NAMES = [  # (pattern, catalogue name) most specific first
    (r"a100.*80", "a100-80gb"), (r"a100.*40", "a100-40gb"), (r"h100.*80|h100", "h100-sxm"), (r"h200", "h200"),
    (r"a10g", "a10g"), (r"rtx\s*4090|4090", "rtx4090"), (r"rtx\s*3090|3090", "rtx3090"), (r"t4\b", "t4"),
    (r"v100.*32", "v100-32gb"), (r"v100", "v100-16gb"), (r"a6000", "rtxa6000"), (r"l4\b", "l4"), (r"l40s", "l40s"),
]


def parse_gpu(text: str) -> tuple[int, str | None, int | None, str]:
    """(GPU count, catalogue name or None, capacity bytes for a generic "24GB GPUs", note)."""
    t = text.strip().lower()
    if t.startswith("unknown"):
        return 1, None, None, "card not stated"
    m = re.match(r"\s*(\d+)\s*(?:x|\*|gpus?\b)", t)
    count = int(m.group(1)) if m else 1
    for pat, name in _GPU_NAMES:
        if re.search(pat, t):
            return count, name, None, ""
    g = re.search(r"(\d+)\s*gb\s*gpu", t)
    if g:
        return count, None, int(g.group(1)) * 10**9, f"a generic {g.group(1)} GB card"
    g = re.search(r"(\d+)\s*gb\s*vram", t)
    if g:  # a VRAM class ("24 GB"): cards of that class hold that many GiB (a 24 GB RTX 4090: 24,564 MiB)
        return count, None, int(g.group(1)) * 2**30, f"a {g.group(1)} GB VRAM class, read as {g.group(1)} GiB"
    return count, None, None, "card not stated" if "unknown" in t or "not stated" in t else ""


#: words of a method cell the planner does not model, then the adapters (checked after the registered methods'
#: ``report_names``, vramplan.methods; a registered word wins over one listed here)
_WORDS = (("orpo", None), ("simpo", None), ("galore", None), ("freeze/", None),
          ("llm.int8", None), ("qdora", "qdora"), ("qlora", "qlora"), ("dora", "dora"), ("ia3", "ia3"), ("lora", "lora"),
          ("full", "full"))


def method_words() -> list[tuple[str, str | None]]:
    """(word, method or None) in the order a method cell is matched: registered methods first."""
    own = report_words()
    taken = {w for w, _ in own}
    return [*own, *((w, m) for w, m in _WORDS if w not in taken)]


def parse_method(text: str) -> tuple[str | None, str | None, str | None, str | None, str]:
    """(method, adapter, strategy, offload, note) from a method cell such as ``"QLoRA (FSDP + CPU offload)"``."""
    t = text.lower()
    method = adapter = None
    note = ""
    if "plain crossentropy" in t.replace(" ", "").replace("plaincross", "plain cross"):
        return None, None, None, None, "a plain CrossEntropyLoss, not the stack's chunked loss the planner models"
    for key, name in method_words():
        if key in t:
            method = name
            if name is None:
                note = f"{key.strip('/')} is not a method the planner models"
            break
    if takes_adapter_choice(method):
        adapter = "qlora" if "qlora" in t else ("lora" if "lora" in t else "full")
        if "8-bit" in t or "int8" in t:
            method, note = None, "an 8-bit (LLM.int8) base is not a precision the planner models"
    elif method is not None:
        adapter = method
    strategy = offload = None
    if "device_map" in t or "model-parallel" in t:
        method, note = None, "a model-parallel device_map split is not a strategy the planner models"
    if "zero-3" in t or "zero3" in t:
        strategy = "zero3"
    elif "fsdp" in t and "sharding_strategy ddp" not in t:
        strategy = "fsdp"
    elif "ddp" in t:
        strategy = "ddp"
    if ("cpu offload" in t or "cpu param offload" in t) and "no cpu offload" not in t:
        offload = "cpu"
    return method, adapter, strategy, offload, note


_TARGET_WORDS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up_proj", "down": "down_proj",
                 "gate": "gate_proj", "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj"}


def parse_targets(text: str) -> tuple[tuple[str, ...], str]:
    """Target modules: ``"q,v"`` -> q_proj, v_proj; anything naming the MLP, output or "all" -> all-linear."""
    t = text.strip().lower()
    if _unknown(t):
        return (), ""
    if "all" in t or "mlp" in t or "output_proj" in t or re.search(r"(^|,)\s*proj\s*(,|$)", t.split(" (")[0]):
        note = "the lm_head adapter is not modelled" if "head" in t or "output (" in t else ""
        return ("all-linear",), note
    head = t.split(" (")[0]
    words = [w.strip() for w in re.split(r"[,\s]+", head) if w.strip()]
    if words and all(w in _TARGET_WORDS for w in words):
        return tuple(dict.fromkeys(_TARGET_WORDS[w] for w in words)), ""
    return (), f"targets {text!r} not read (the model's default is used)"


def adapter_of(name: str | None) -> Adapter | None:
    """The :class:`~vramplan.methods.Adapter` a record's ``adapter`` names, or None (none, or not modelled)."""
    try:
        return Adapter(name) if name else None
    except ValueError:
        return None


def unstated_settings(adapter: str | None, rank_text: str, targets_text: str) -> tuple[str, ...]:
    """The adapter settings a row leaves unknown (``rank``, ``targets``: the cell is empty or "unknown"), for an
    adapter that has them (the LoRA family: :attr:`Adapter.low_rank`); the row is then planned over the plausible
    configurations (:mod:`vramplan.measurements.plausible`)."""
    ad = adapter_of(adapter)
    if ad is None or not ad.low_rank:
        return ()
    return tuple(f for f, text in (("rank", rank_text), ("targets", targets_text)) if _unknown(text))


def parse_optimizer(text: str) -> tuple[str | None, str]:
    t = text.lower()
    if "galore" in t:
        return None, "GaLore is not an optimizer the planner models"
    if "rmsprop" in t:
        return None, "RMSprop is not an optimizer the planner models"
    if "paged" in t and "8" in t:
        return "paged_adamw_8bit", ""
    if "8bit" in t or "8-bit" in t:
        return "adamw_8bit", ""
    if "paged" in t:
        return "paged_adamw_8bit", ("32-bit paged AdamW read as paged AdamW: its states live in managed memory "
                                    "outside the caching allocator, as paged 8-bit states do (allocator quantities "
                                    "agree; a device total would under-state by 6 B per parameter)")
    if "adam" in t:
        return "adamw", ""
    return "adamw", "optimizer not stated: AdamW assumed"


def parse_attn(text: str) -> str:
    t = text.lower()
    if "flash" in t:
        return "flash"
    if "eager" in t and "sdpa" not in t:
        return "eager"
    return "sdpa"


def resolve_model(text: str, mapping: Mapping) -> tuple[str | None, str]:
    """A catalogue model for a published model cell, or (None, why)."""
    from ..models import get_model

    head = text.split(" (")[0].strip()
    cands = [text.strip(), head]
    inner = re.findall(r"\(([^)]*)\)", text)
    for part in inner:
        cands += [p.strip() for p in re.split(r"[;,]", part) if p.strip()]
    for c in list(cands):
        if "/" in c:
            cands.append(c.split("/", 1)[1])
    for c in cands:
        if c in mapping.models:
            return mapping.models[c]["model"], mapping.models[c].get("why", "")
    for c in cands:
        for v in (c, c.lower(), re.sub(r"(?i)^meta-", "", c).lower(), re.sub(r"(?i)-hf$", "", c).lower(),
                  re.sub(r"(?i)^meta-", "", re.sub(r"(?i)-hf$", "", c)).lower()):
            try:
                return get_model(v).name, ""
            except VramplanError:
                continue
    return None, f"model {head!r} is not in the catalogue"


# -- tables --------------------------------------------------------------------------------

def _cell(row: dict, mapping: Mapping, key: str) -> str:
    col = mapping.columns.get(key)
    return "" if col is None else str(row.get(col) or "")


def record_from_row(row: dict, i: int, mapping: Mapping) -> MeasurementRecord:
    """One published CSV row as a record (see the module docstring)."""
    sid = _cell(row, mapping, "source").strip()
    if not sid:
        raise VramplanError(f"row {i}: no source", "every published row names its source")
    ref = _cell(row, mapping, "ref").strip()
    sm = mapping.sources.get(sid) or SourceMap()
    notes: list[str] = []
    kind = _cell(row, mapping, "kind").strip().lower()
    estimated = kind.startswith("estimated")
    method, adapter, strategy, offload, why = parse_method(_cell(row, mapping, "method"))
    if why:
        notes.append(why)
    stack = "unsloth" if "unsloth" in _cell(row, mapping, "method").lower() + _cell(row, mapping, "attn").lower() else sm.stack
    model, why = resolve_model(_cell(row, mapping, "model"), mapping)
    if why:
        notes.append(why)
    gpus, gpu, cap, why = parse_gpu(_cell(row, mapping, "gpu"))
    if why:
        notes.append(why)
    if gpus > 1 and strategy is None:
        strategy = sm.multi_gpu or "ddp"
    seq, bound, packing = parse_seq(_cell(row, mapping, "seq"))
    if seq is None and sm.seq_unknown:
        seq, bound = sm.seq_unknown, "max"
        notes.append(f"sequence not stated: {sm.seq_unknown} tokens as the bound (the source's reading: the dataset's "
                     "longest sample or the stack's default limit)")
    grad_ckpt = parse_bool(_cell(row, mapping, "grad_ckpt"))
    if grad_ckpt is None and sm.grad_ckpt_unknown is not None:
        grad_ckpt = sm.grad_ckpt_unknown
        notes.append(f"gradient checkpointing not stated: the stack's default ({'on' if grad_ckpt else 'off'})")
    if sm.devices_note:
        m = re.search(sm.devices_note, _cell(row, mapping, "notes"))
        gpus_ran = int(m.group(1)) if m else 1
    else:
        gpus_ran = gpus
    if gpus_ran > 1 and sm.multi_gpu_ckpt and grad_ckpt is False:
        grad_ckpt = True
        notes.append("the stack checkpoints activations with more than one GPU")
    opt, why = parse_optimizer(_cell(row, mapping, "optimizer"))
    if why.startswith("optimizer not stated") and sm.optimizer_unknown:
        opt = sm.optimizer_unknown
        why = f"optimizer not stated: the source's documented recipe ({opt})"
    if why:
        notes.append(why)
    techs = ["opt_in_bwd"] if "optimizer_in_bwd" in _cell(row, mapping, "optimizer").lower() else []
    if "activation offloading" in _cell(row, mapping, "grad_ckpt").lower():
        techs.append("act_offload")
    if "compile true" in _cell(row, mapping, "attn").lower():
        techs.append("compile")
    if "liger" in _cell(row, mapping, "attn").lower():
        techs.append("liger_ce")  # Liger's fused linear cross-entropy (its other kernels are not modelled: safe side)
    if sm.devices_note:
        m = re.search(sm.devices_note, _cell(row, mapping, "notes"))
        ran = int(m.group(1)) if m else 1
        if ran != gpus:
            notes.append(f"the {gpus}-GPU machine ran the config's devices: {ran} (same figure and time as the "
                         "single-GPU row)" if ran == 1 else f"the config ran on {ran} devices")
            gpus = ran
            if gpus == 1:
                strategy = None
    if opt is None:
        method = None
    targets, why = parse_targets(_cell(row, mapping, "targets"))
    if why:
        notes.append(why)
    unstated = unstated_settings(adapter, _cell(row, mapping, "rank"), _cell(row, mapping, "targets"))
    if unstated:
        notes.append(f"{' and '.join(unstated)} not stated: planned over the plausible adapter configurations "
                     "(vramplan/data/adapter_configs.toml)")
    prec_text = _cell(row, mapping, "precision").lower()
    precision = sm.precision
    if "fp32" in prec_text and "fp32 weights" not in prec_text:
        precision = "fp32"
    elif "pure bf16" in prec_text:
        precision = "bf16"  # bf16 weights trained in place (no fp32 master copy): states and gradients bf16
    elif "fp16 compute" in prec_text or (gpu in ("t4", "v100-16gb", "v100-32gb")):
        precision = "fp16-mixed"
    double_quant = "double" in prec_text or "nq" in prec_text
    if "fp4" in prec_text:
        notes.append("FP4 read as NF4 (the same 4-bit storage)")
    unit = _unit_of(_cell(row, mapping, "unit"), sm.unit)
    quantity, why = parse_quantity(_cell(row, mapping, "quantity"), sm.quantity)
    if why:
        notes.append(why)
    value_text = _cell(row, mapping, "value")
    outcome, nbytes, why = parse_value(value_text, unit)
    if why:
        notes.append(why)
    if kind.startswith("measured_oom"):
        outcome = "oom"
    elif kind.startswith("measured_fit_only"):
        outcome = "fit_only"
    tps = _cell(row, mapping, "tokens_per_s")
    tps_v = float(tps) if re.fullmatch(r"\s*[\d.]+\s*", tps or "") else None
    try:
        params_b = float(_cell(row, mapping, "params_b"))
    except ValueError:
        params_b = None
    # what the adapter has, by its attributes: a rank and a dropout (the LoRA family), a 4-bit base's double quantisation
    ad = adapter_of(adapter) if method is not None else None
    low_rank = ad is not None and ad.low_rank
    cfg = RunConfig(
        model=model, model_text=_cell(row, mapping, "model"), params_b=params_b, method=method, adapter=adapter,
        rank=parse_int(_cell(row, mapping, "rank")) if low_rank else None, targets=targets,
        batch=parse_int(_cell(row, mapping, "batch")), seq=seq, seq_bound=bound, packing=packing,
        grad_ckpt=grad_ckpt, precision=precision, optimizer=opt, attn=parse_attn(_cell(row, mapping, "attn")),
        stack=stack, stack_version=sm.stack_version, techniques=tuple(techs), double_quant=double_quant if ad is not None and ad.quantized_base else None,
        dropout=sm.dropout if low_rank else None, gpus=gpus, strategy=strategy, offload=offload,
        engine_options=dict(sm.engine_options) if strategy else {}, unstated=unstated,
    )
    gb = sm.global_batch.get(f"{model}/{method}") if (model and method) else None
    batch = cfg.batch
    if gb and batch:
        if int(gb) % (gpus * batch):
            raise VramplanError(f"source {sid!r}: global_batch {gb} of {model}/{method} is not a multiple of "
                                f"{gpus} GPU(s) x batch {batch}")
        from dataclasses import replace as _replace

        cfg = _replace(cfg, grad_accum=int(gb) // (gpus * batch))
        if cfg.grad_accum > 1:
            notes.append(f"global batch {gb}: {cfg.grad_accum} micro-batches accumulate per step")
    device = Device(name=gpu, display=_cell(row, mapping, "gpu") or None, memory_bytes=cap,
                    versions={str(k): str(v) for k, v in sm.versions.items()})
    limit = "max_seq" if "largest sequence that fit" in _cell(row, mapping, "notes").lower() and outcome == "fit_only" else None
    meas = Measurement(outcome=outcome, quantity=quantity, bytes=nbytes, published=value_text or None, unit=unit,
                       tokens_per_s=tps_v, limit=limit)
    return MeasurementRecord(config=cfg, device=device, measurement=meas,
                             source=Source(kind="published", id=sid, ref=ref or None, row=i),
                             estimated=estimated, notes="; ".join(n for n in notes if n))


def import_csv(path: str | Path, mapping: Mapping | str | Path | None = None) -> list[MeasurementRecord]:
    """Every row of a published CSV table as records (row numbers from 0, header excluded)."""
    path = Path(path)
    if not isinstance(mapping, Mapping):
        mapping = load_mapping(mapping)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VramplanError(f"cannot read table {path}: {getattr(exc, 'strerror', None) or exc}") from None
    need = [mapping.columns[k] for k in ("model", "method", "value") if mapping.columns.get(k)]
    missing = [c for c in need if c not in header]
    if missing:
        raise VramplanError(f"{path}: no column {missing[0]!r}",
                            "map the table's columns in a sources file ([columns] record_field = \"column\")")
    src_col = mapping.columns.get("source")
    if src_col not in header:  # a table without a source column is one source: the file
        rows = [{**r, src_col or "source": path.stem} for r in rows]
        if not src_col:
            mapping = Mapping({**mapping.columns, "source": "source"}, mapping.sources, mapping.models)
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(record_from_row(row, i, mapping))
        except VramplanError as exc:
            raise VramplanError(f"{path}: row {i + 2}: {exc.args[0]}", exc.hint) from None
    return out


def import_jsonl(path: str | Path, machine: str | None = None) -> list[MeasurementRecord]:
    """A runner/callback log, or a file of records (``schema`` on every line)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VramplanError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = []
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except ValueError:
            if i == len(raw) - 1:  # a torn last line (an interrupted append) is skipped, as read_log does
                continue
            raise VramplanError(f"{path}: line {i + 1} is not JSON", "remove that line and import again") from None
    if lines and all(isinstance(r, dict) and r.get("schema") == SCHEMA for r in lines):
        return [MeasurementRecord.from_dict(r, f"{path.name}:{i + 1}") for i, r in enumerate(lines)]
    return from_log([r for r in lines if isinstance(r, dict) and "kind" in r], machine)


def import_file(path: str | Path, mapping: str | Path | None = None, machine: str | None = None) -> list[MeasurementRecord]:
    """Records from a published ``.csv`` table or a ``.jsonl`` log; a VramplanError names what is wrong."""
    path = Path(path)
    if not path.exists():
        raise VramplanError(f"no such file: {path}")
    if path.suffix.lower() == ".csv":
        return import_csv(path, mapping)
    if path.suffix.lower() in (".jsonl", ".json", ".log"):
        return import_jsonl(path, machine)
    raise VramplanError(f"cannot import {path.name}: expected a .csv table or a .jsonl log")


def split_by_card(records: list[MeasurementRecord]) -> dict[str, list[MeasurementRecord]]:
    """Records grouped by card (catalogue name, else the reported name, else ``unknown``)."""
    out: dict[str, list[MeasurementRecord]] = {}
    for r in records:
        out.setdefault(r.card_key, []).append(r)
    return out


def one_card(records: list[MeasurementRecord], path: str | Path) -> str:
    """The single card of a log's records, or a one-line VramplanError naming the cards it mixes."""
    cards = split_by_card(records)
    if len(cards) > 1:
        names = ", ".join(f"{k} ({len(v)})" for k, v in sorted(cards.items()))
        raise VramplanError(f"{path} mixes measurements of {len(cards)} cards: {names}",
                            "import it with --split-by-card to write one file per card")
    return next(iter(cards), "unknown")


def write_import(records: list[MeasurementRecord], out: str | Path, split: bool = False) -> list[Path]:
    """Write imported records as JSONL: one file, or with ``split`` one ``<card>.jsonl`` per card under ``out``."""
    from .record import dump_records

    out = Path(out)
    if not split:
        return [dump_records(records, out)]
    paths = []
    for card, recs in sorted(split_by_card(records).items()):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", card)
        paths.append(dump_records(recs, out / f"{safe}.jsonl"))
    return paths


def summary(records: list[MeasurementRecord]) -> dict[str, Any]:
    """Counts for the CLI: by outcome, quantity and card; how many may calibrate."""
    from collections import Counter

    return {"records": len(records), "usable_for_fit": sum(r.usable_for_fit for r in records),
            "estimated": sum(r.estimated for r in records),
            "outcomes": dict(Counter(r.measurement.outcome for r in records)),
            "quantities": dict(Counter(r.measurement.quantity for r in records if r.measurement.outcome == "measured")),
            "cards": dict(Counter(r.card_key for r in records)),
            "sources": dict(Counter(r.source.id for r in records))}


def to_json(records: list[MeasurementRecord]) -> str:
    return json.dumps([r.to_dict() for r in records], indent=2)

"""The published multi-GPU rows of the measurement corpus, scored per GPU by the sharded planner.

Reads ``/work/shared/measurements/published.csv`` (or ``--csv``), keeps the rows run on more than
one GPU, maps each to a plan (:func:`score_row`: model, method, strategy, offload, batch per GPU,
sequence, LoRA settings, precision, checkpointing, the stack), asks
:func:`vramplan.distributed.per_gpu_peak`, and compares the quantity the source measured
(allocated, reserved or the device total, in its unit) with the published figure. Rows that do not
map (a model outside the catalogue, an unknown sequence length, model parallelism) are listed with
the reason. Writes ``reports/published_multigpu.txt``.

    PYTHONPATH=. python benchmarks/published_multigpu.py [--csv FILE] [--out FILE|-]

``score_row`` and ``multi_gpu_rows`` are importable (benchmarks/published_accuracy.py may use them).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CSV = Path("/work/shared/measurements/published.csv")
#: catalogue names of the corpus' model strings (no proxies: a model not here is not scored)
MODELS = {"llama-2-7b-hf": "llama-2-7b", "llama-2-7b": "llama-2-7b", "llama-2-70b-hf": "llama-2-70b",
          "meta-llama/llama-2-70b-hf": "llama-2-70b", "meta-llama-3-8b": "llama-3-8b",
          "tinyllama-1.1b-intermediate-step-1431k-3t": "tinyllama-1.1b"}
GPUS = {"rtx 3090": "rtx3090", "rtx 4090": "rtx4090", "a10g": "a10g", "h100": "h100-sxm"}
#: Answer.AI fsdp_qlora train.py defaults (benchmarks_03_2024.md @e877dda5, train.py at the same commit)
ANSWERAI_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj,gate_proj"


@dataclass
class Scored:
    index: int
    source: str
    model: str
    method: str
    gpu: str
    published: str
    quantity: str = ""
    planned_gib: float | None = None
    published_gib: float | None = None
    plan: str = ""
    reason: str = ""

    @property
    def error(self) -> float | None:
        if self.planned_gib is None or self.published_gib is None:
            return None
        return (self.planned_gib - self.published_gib) / self.published_gib


def multi_gpu_rows(path=CSV) -> list[tuple[int, dict]]:
    """``(row index, row)`` of every corpus row run on two or more GPUs (``NxGPU`` in its gpu field)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for i, r in enumerate(rows):
        m = re.match(r"\s*(\d+)\s*[x×*]", r.get("gpu", ""))
        if m and int(m.group(1)) > 1:
            out.append((i, r))
    return out


def _gpus(text: str) -> tuple[int, str | None, str | None]:
    n = int(re.match(r"\s*(\d+)", text).group(1))
    low = text.lower()
    card = next((v for k, v in GPUS.items() if k in low), None)
    mem = re.search(r"(\d+)\s*gb", low)
    return n, card, (f"{mem.group(1)}GB" if mem and card is None else None)


def score_row(i: int, r: dict) -> Scored:
    """Plan one corpus row per GPU, or say why it is not scored."""
    from vramplan.distributed import per_gpu_peak
    from vramplan.errors import VramplanError

    s = Scored(i, r["source"], r["model"], r["method"], r["gpu"], r["peak_mem_gib"])
    model = MODELS.get(r["model"].split(" (")[0].strip().lower())
    if model is None:
        s.reason = "model not in the catalogue (no proxy used)"
        return s
    meth = r["method"].lower()
    if "device_map" in meth or "model-parallel" in meth:
        s.reason = "model parallelism (device_map), not data parallel"
        return s
    method = "qlora" if "qlora" in meth else "lora" if "lora" in meth else "full" if "full" in meth else None
    if method is None:
        s.reason = "method not mapped"
        return s
    strategy = ("zero3" if "zero-3" in meth else "ddp" if "ddp" in meth else "fsdp" if "fsdp" in meth
                else "fsdp" if r["source"].startswith("litgpt") else None)
    if strategy is None:
        s.reason = "strategy not stated"
        return s
    offload = "cpu" if "offload" in meth else None
    n, card, mem = _gpus(r["gpu"])
    try:
        pub = float(re.sub(r"[^0-9.]", "", r["peak_mem_gib"].split("-")[0]) or "nan")
    except ValueError:
        pub = float("nan")
    if pub != pub:
        s.reason = f"no single published figure ({r['peak_mem_gib']})"
        return s
    notes = r.get("notes", "").lower()
    seq_text = r["seq_len"]
    seq_m = re.match(r"\s*(?:<=)?\s*(\d+)", seq_text)
    if not seq_m:
        s.reason = f"sequence length not stated ({seq_text})"
        return s
    seq = int(seq_m.group(1))
    batch = int(re.match(r"\s*(\d+)", r["micro_batch"]).group(1))
    gc = r["grad_ckpt"].strip().lower().startswith("on")
    kw = dict(batch=batch, seq=seq, grad_ckpt=gc, attn="flash" if "flash" in r["attn_impl"].lower() else "sdpa")
    framework = "hf"
    if r["source"].startswith("answerai"):
        kw.update(precision="bf16", rank=64, targets=ANSWERAI_TARGETS)
    elif r["source"].startswith("torchtune"):
        framework = "torchtune"
        kw.update(rank=int(r["lora_r"])) if method != "full" else None
        kw["targets"] = "q_proj,v_proj" if method != "full" else None
    elif r["source"].startswith("litgpt"):
        framework = "litgpt"
        if method != "full":
            kw.update(rank=int(r["lora_r"]))
    elif r["source"].startswith("peft"):
        kw.update(rank=int(r["lora_r"]), targets="all-linear", precision="bf16-mixed")
    kw["framework"] = framework
    kw = {k: v for k, v in kw.items() if v is not None}
    if "reserved" in notes:
        quantity = "reserved"
    elif "max_memory_allocated" in notes:
        quantity = "allocated"
    elif "nvidia-smi" in notes or "monitoring" in notes:
        quantity = "device total"
    else:
        quantity = "reserved (assumed)"
    gib_unit = "unit=gib" in notes or "gib" in r["peak_mem_gib"].lower()
    s.published_gib = pub if gib_unit else pub * 1e9 / 2**30
    try:
        res = per_gpu_peak(model, method, gpus=n, strategy=strategy, offload=offload, gpu=card, gpu_mem=mem, **kw)
    except VramplanError as exc:
        s.reason = f"planner refused: {exc}"
        return s
    val = {"allocated": res.tensor_peak_bytes, "device total": res.peak_bytes}.get(quantity, res.reserved_bytes)
    s.planned_gib = val / 2**30
    s.quantity = quantity
    s.plan = (f"{model} {method} {res.parallel.label} b{batch} s{seq} gc {'on' if gc else 'off'} {framework}"
              + (f" r{kw['rank']}" if 'rank' in kw else ""))
    return s


def report(scored: list[Scored], path: str) -> str:
    ok = [s for s in scored if s.error is not None]
    import statistics

    lines = [f"# published multi-GPU rows ({path}) scored per GPU by vramplan.distributed.per_gpu_peak",
             "# quantity: what the source measured (reserved for Answer.AI's train.py; allocated for litgpt; "
             "the device total for nvidia-smi readings); GiB",
             f"# {len(ok)} of {len(scored)} rows scored; median |error| "
             f"{100 * statistics.median(abs(s.error) for s in ok):.1f}%" if ok else "# no row scored",
             f"{'row':>4}  {'planned':>8} {'published':>9} {'error':>7}  quantity            plan / reason"]
    for s in scored:
        if s.error is None:
            lines.append(f"{s.index:>4}  {'':>8} {s.published:>9} {'':>7}  {'':<18}  not scored: {s.reason} "
                         f"[{s.source}; {s.model}; {s.method}; {s.gpu}]")
        else:
            lines.append(f"{s.index:>4}  {s.planned_gib:8.2f} {s.published_gib:9.2f} {100 * s.error:+6.1f}%  "
                         f"{s.quantity:<18}  {s.plan} [{s.source}]")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=str(CSV))
    ap.add_argument("--out", default=str(ROOT / "reports" / "published_multigpu.txt"))
    a = ap.parse_args(argv)
    scored = [score_row(i, r) for i, r in multi_gpu_rows(a.csv)]
    text = report(scored, a.csv)
    print(text, end="")
    if a.out != "-":
        with open(a.out + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

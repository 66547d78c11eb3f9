"""Analytic tensor peak per training stack and per memory-saving technique, side by side.

Usage: ``python benchmarks/stacks_compare.py [--dryrun] [--out reports/stacks_compare.md]``

For Llama-3-8B and Llama-3.2-3B, methods LoRA, QLoRA and full fine-tuning at sequence 2048,
micro-batch 2, gradient checkpointing on (PEFT default targets, rank 8, AdamW), the script
prints the analytic tensor peak (``tensor_peak_bytes``: live tensors, what
``torch.cuda.max_memory_allocated`` reports) of:

* each stack of ``vramplan/data/stacks.toml`` (hf, torchtune, unsloth, litgpt), each at its own
  default precision (hf and unsloth bf16-mixed, torchtune and litgpt pure bf16);
* each technique alone over the hf stack (``--techniques NAME``);
* with ``--dryrun``, the dry run (``vramplan.dryrun``: the real transformers + PEFT model
  traced on the meta device) of the hf stack, the reference the analytic hf row is tested
  against. Opt-in because the six traces take 20-25 s on an idle CPU core (and much longer
  on a loaded one); without it the table says so in that row.

Every figure is in GiB with its difference from the hf row. The same table is written as
markdown to ``--out`` (default with ``--dryrun``: ``reports/stacks_compare.md``, the committed
report; without ``--dryrun`` and ``--out`` the table is only printed, so a run without the dry
run's extra never replaces the committed report by one without its traced row), with the
command that made it; nothing in it is typed by hand. Runs in about 2 s, 25 s with ``--dryrun``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MODELS = ("llama-3-8b", "llama-3.2-3b")
METHODS = ("lora", "qlora", "full")
STACKS = ("hf", "torchtune", "unsloth", "litgpt")
SHAPE = dict(batch=2, seq=2048, grad_ckpt=True)
GIB = float(1 << 30)
REPORT = Path(__file__).resolve().parent.parent / "reports" / "stacks_compare.md"


def analytic(model: str, method: str, framework: str = "hf", techniques: str | None = None) -> int:
    import vramplan

    return vramplan.estimate(model, method, framework=framework, techniques=techniques, **SHAPE).tensor_peak_bytes


def traced(model: str, method: str) -> int | None:
    """The dry run's tensor peak of the hf stack, or None when the extra is missing or it fails."""
    import vramplan

    try:
        return vramplan.dry_run(model, method, **SHAPE).tensor_peak_bytes
    except vramplan.VramplanError as exc:  # MissingDependencyError included
        print(f"dry run {model} {method}: {exc}", file=sys.stderr)
        return None


def rows_for(model: str, dryrun: bool) -> tuple[list[tuple[str, list[int | None]]], float]:
    """(label, tensor peak per method) rows for one model; the hf row first. Returns the dry-run seconds."""
    from vramplan.stacks import techniques

    rows = [(f"stack {fw}", [analytic(model, m, fw) for m in METHODS]) for fw in STACKS]
    rows += [(f"hf + {name}", [analytic(model, m, "hf", name) for m in METHODS]) for name in techniques()]
    spent = 0.0
    if dryrun:
        t0 = time.perf_counter()
        rows.append(("hf, dry run (traced)", [traced(model, m) for m in METHODS]))
        spent = time.perf_counter() - t0
    else:
        rows.append(("hf, dry run (traced)", ["off"] * len(METHODS)))
    return rows, spent


def table(model: str, rows) -> list[str]:
    """One markdown table: a row per stack/technique, per method the peak (GiB) and its delta vs hf."""
    base = rows[0][1]
    head = "| " + model + " | " + " | ".join(f"{m} GiB | Δ vs hf" for m in METHODS) + " |"
    out = [head, "|---|" + "---:|---:|" * len(METHODS)]
    for label, peaks in rows:
        cells = []
        for p, b in zip(peaks, base):
            if p == "off":
                cells += ["not run", "(--dryrun)"]
            elif p is None:
                cells += ["n/a", "(failed)"]
            else:
                d = (p - b) / GIB
                cells += [f"{p / GIB:.2f}", "0" if label == rows[0][0] else f"{d:+.2f}"]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dryrun", action="store_true", help="add the traced hf rows (vramplan.dryrun, ~25 s)")
    ap.add_argument("--out", default=None,
                    help=f"write the markdown there (default with --dryrun: {REPORT}; without it nothing is written, "
                         "so the committed report, which has the dry-run row, is not replaced by one without it)")
    a = ap.parse_args(argv)
    if a.dryrun:
        try:
            import torch  # noqa: F401  (the dryrun extra)
        except ImportError:
            print("torch is not installed: no dry-run rows (pip install 'vramplan[dryrun]')", file=sys.stderr)
            a.dryrun = False
    from vramplan.stacks import get_stack, techniques

    t0 = time.perf_counter()
    lines = ["# Tensor peak by training stack and memory-saving technique", "",
             f"Analytic model (`vramplan estimate`), tensor peak (live tensors, `max_memory_allocated`) in GiB; "
             f"seq {SHAPE['seq']}, micro-batch {SHAPE['batch']}, gradient checkpointing on, AdamW, PEFT default "
             "targets at rank 8. Δ: difference from the `stack hf` row (negative = less memory). "
             f"Generated by `python benchmarks/stacks_compare.py{' --dryrun' if a.dryrun else ''}`.", ""]
    dry_s = 0.0
    for model in MODELS:
        rows, spent = rows_for(model, a.dryrun)
        dry_s += spent
        lines += table(model, rows) + [""]
    lines += ["Stacks (vramplan/data/stacks.toml), each at its default precision:", ""]
    lines += [f"* `{n}` ({get_stack(n).default_precision}): {get_stack(n).summary}" for n in STACKS]
    lines += ["", "Techniques, each alone over the hf stack (`--techniques NAME`):", ""]
    lines += [f"* `{t.name}`: {t.summary}" + ("" if t.saver else " (not a memory saver)") for t in techniques().values()]
    lines += ["", "Reading the table:", "",
              "* torchtune and litgpt run pure bf16 (bf16 AdamW states and gradients, no fp32 copies): most "
              "of their difference on full fine-tuning is precision, not the stack's code.",
              "* `selective_ckpt` checkpoints every second layer; with full gradient checkpointing already on "
              "it changes nothing (Δ 0).",
              "* `padding` is the cost of padded batches instead of packing (a mask, and SDPA without GQA).",
              "* `opt_offload` and `opt_in_bwd` act on optimizer states and gradients: large for full "
              "fine-tuning, within noise for an adapter's few MiB.",
              ("* the dry run traces the real transformers + PEFT step on the meta device; only the hf stack "
               "is traced here; the difference on full fine-tuning is the analytic model's error." if a.dryrun else
               "* dry run: not run (pass --dryrun; it needs the dryrun extra); it traces the hf stack here."),
              ""]
    text = "\n".join(lines)
    print(text)
    total = time.perf_counter() - t0
    out = a.out or (str(REPORT) if a.dryrun else None)
    if out is None:
        print(f"printed in {total:.1f} s; not written: {REPORT.relative_to(REPORT.parent.parent)} is the --dryrun "
              "table (pass --dryrun to regenerate it, or --out PATH)", file=sys.stderr)
        return 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)  # atomic
    print(f"wrote {out} in {total:.1f} s (dry run {dry_s:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

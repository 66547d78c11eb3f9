"""The published multi-GPU rows of the measurement corpus, scored per GPU: a view of the accuracy core.

The rows are scored once, by :mod:`vramplan.measurements.accuracy` through
``benchmarks/published_accuracy.py``'s ``run`` (the same corpus, mapping, quantities, allocator
reserve and leave-one-source-out bands as ``reports/published_accuracy.md``, whose headline counts
them); this script keeps the rows run on more than one GPU (``config.gpus > 1``: the sharded planner,
per GPU) and prints them with their own summary. Writes ``reports/published_multigpu.txt``.

    PYTHONPATH=. python benchmarks/published_multigpu.py [--out FILE|-]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
GIB = 2**30


def multi_gpu(scored: list) -> list:
    """The scored records (any status) whose configuration runs on two or more GPUs."""
    return [s for s in scored if (s.record.config.gpus or 1) > 1]


def report(rows: list) -> str:
    ok = [s for s in rows if s.error is not None]
    lines = ["# published multi-GPU rows scored per GPU by the accuracy core (vramplan.measurements.accuracy via "
             "benchmarks/published_accuracy.py run(): the rows of reports/published_accuracy.md run on > 1 GPU)",
             "# error = predicted / measured - 1 on the quantity the source printed; band: leave-one-source-out"]
    if ok:
        errs = [abs(s.error) for s in ok]
        lines.append(f"# {len(rows)} rows, {len(ok)} scored; median |error| {100 * statistics.median(errs):.1f}%, "
                     f"under-predicted by > 10%: {sum(s.error < -0.10 for s in ok)}, inside the band: "
                     f"{sum(bool(s.inside) for s in ok)}")
    lines.append(f"{'row':>4}  {'source':<32} {'stack':<10} {'method':<6} {'model':<24} {'gpus':<12} "
                 f"{'measured':>9} {'predicted':>9} {'error':>7}  status")
    for s in rows:
        r = s.record
        meas = "-" if s.measured is None else f"{s.measured / GIB:.2f}"
        pred = "-" if s.predicted is None else f"{s.predicted / GIB:.2f}"
        if s.status in ("oom", "fit_only") and s.device is not None:
            pred = f"{s.device / GIB:.2f}"
        err = "-" if s.error is None else f"{100 * s.error:+.1f}%"
        status = s.status + (f": {s.reason}" if s.reason else "")
        if s.status in ("oom", "fit_only"):
            status += f" (verdict {s.verdict})"
        lines.append(f"{r.source.row:>4}  {s.source[:32]:<32} {s.stack:<10} {s.method:<6} "
                     f"{(r.config.model or r.config.model_text)[:24]:<24} {s.gpu[:12]:<12} {meas:>9} {pred:>9} "
                     f"{err:>7}  {status}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "published_multigpu.txt"), help="'-' prints only")
    a = ap.parse_args(argv)
    import published_accuracy

    text = report(multi_gpu(published_accuracy.run()))
    print(text, end="")
    if a.out != "-":
        with open(a.out + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

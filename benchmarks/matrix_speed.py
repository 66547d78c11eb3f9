"""Time the vectorised feasibility evaluation over the whole catalogue; print configurations per second.

Usage: python benchmarks/matrix_speed.py [--runs 5]

Three workloads, each over every model x every method x every card of the catalogues:

1. ``grid``: 5 sequence lengths x 8 micro-batches, each method's default settings
   (:func:`vramplan.matrix.peak_grid`) -- the issue's target: under 2 s on a 2-core CPU.
2. ``grid x settings``: the same with all 6 settings of the ``fit`` ladder (GC x optimizer).
3. ``matrix``: :func:`vramplan.matrix.feasibility_matrix` at the 5 sequence lengths -- the
   settings choice at micro-batch 1 plus the largest micro-batch searched over 1..1024.

The first run of each includes cold caches (catalogue parsing); the median is over
``--runs`` runs. Exit status 1 if the grid's median misses the target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

TARGET_S = 2.0
SEQS = (512, 1024, 2048, 4096, 8192)


def _time(fn, runs: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from vramplan.gpus import catalogue as gpus
    from vramplan.matrix import SETTINGS_LADDER, feasibility_matrix, peak_grid
    from vramplan.methods import method_names
    from vramplan.models import catalogue as models

    n_m, n_k, n_g = len(models()), len(method_names()), len(gpus())
    print(f"import + catalogues: {time.perf_counter() - t0:.3f} s; {n_m} models x {n_k} methods x {n_g} GPUs; "
          f"CPU cores visible: {os.cpu_count()}")
    ok = True
    for label, fn, count in (
        ("grid (5 seqs x 8 batches)", lambda: peak_grid(seqs=SEQS), None),
        ("grid x 6 settings", lambda: peak_grid(seqs=SEQS, settings=SETTINGS_LADDER), None),
        ("matrix (5 seqs, settings choice, largest batch <= 1024)",
         lambda: feasibility_matrix("all", "all", "all", SEQS), None),
    ):
        med, times, out = _time(fn, args.runs)
        configs = getattr(out, "configurations", None) or len(out.cells)
        unit = "configurations" if hasattr(out, "configurations") else "cells"
        print(f"{label}: {configs:,} {unit}; first {times[0]:.3f} s, median {med:.3f} s "
              f"-> {configs / med:,.0f} {unit}/s")
        if label.startswith("grid ("):
            verdict = "OK" if med < TARGET_S else "SLOW"
            ok = med < TARGET_S
            print(f"  target: whole catalogue x 5 seqs x 8 batches in < {TARGET_S} s: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

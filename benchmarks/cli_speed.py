"""Time the planning path in fresh processes: `vramplan fit` must finish in < 0.5 s and import no torch.

Usage: python benchmarks/cli_speed.py [--runs 5]
Prints the wall time of each run of `vramplan fit --model 13b --gpu rtx4000ada` (a fresh
interpreter each time, imports included), the median, and whether torch was imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_S = 0.5


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cmd = [sys.executable, "-c", "import sys; from vramplan.cli import main; rc = main(['fit', '--model', '13b', "
           "'--gpu', 'rtx4000ada', '--json']); heavy = [m for m in ('torch', 'transformers', 'peft') if m in "
           "sys.modules]; sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n'); sys.exit(rc)"]
    times = []
    heavy = ""
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            print(out.stderr)
            return 1
        heavy = [l for l in out.stderr.splitlines() if l.startswith("HEAVY=")][-1][6:]
    for i, t in enumerate(times):
        print(f"run {i + 1}: {t:.3f} s")
    med = statistics.median(times)
    print(f"median {med:.3f} s (target < {TARGET_S} s): {'OK' if med < TARGET_S else 'SLOW'}")
    print(f"heavy modules imported: {heavy or 'none'}")
    return 0 if med < TARGET_S and not heavy else 1


if __name__ == "__main__":
    sys.exit(main())

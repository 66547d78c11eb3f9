"""Time the planning path in fresh processes: `vramplan fit` should finish in <= 0.3 s and import no torch.

Usage: python benchmarks/cli_speed.py [--runs 5] [--bytecode] [--profile] [--instructions] [--table]

Prints the wall time and the CPU time (user + system, of the child) of each run of
`vramplan fit --model 13b --gpu rtx4000ada --json` (a fresh interpreter each time, imports
included, through the script's entry point ``vramplan.__main__.main``), the medians, and whether torch was imported. On a shared machine the wall time
includes waiting for a core; the CPU time is what the command itself costs.

``--table``: time the command as the issue writes it, ``vramplan fit --model 13b --gpu rtx4000ada``,
printing the table (rich) instead of ``--json``.

``--bytecode``: run with compiled bytecode, as an installed package has it (pip compiles it on
install): one untimed run writes the bytecode of every module it imports into a temporary
``PYTHONPYCACHEPREFIX`` first, and with it what vramplan keeps beside its bytecode after a first
run (the catalogues' parses, ``vramplan._data``; the command's dataclass methods, ``vramplan._dataclass_code``). Without it, imports compile the sources whenever the environment forbids
writing bytecode (``PYTHONDONTWRITEBYTECODE``), and the figure includes that compilation.

``--profile``: also print where one in-process run spends its time: imports (``import
vramplan.cli``) and the command itself (fit, search, rendering), once cold and once warm.

``--instructions``: also count the instructions of one run (imports included) under valgrind's
callgrind (``I refs``): a figure that does not move with the machine's load, for comparing two
versions on a shared machine (it takes a minute or more; needs ``valgrind`` on the PATH). The run hashes
strings with ``PYTHONHASHSEED=0`` unless the environment sets a seed: a random seed moves the count by a few
tenths of a percent from run to run (dict and set orders).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout

TARGET_S = 0.3  # issue 11: `fit` as fast as the matrix
ARGV = ['fit', '--model', '13b', '--gpu', 'rtx4000ada', '--json']


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _profile() -> None:
    t0 = time.perf_counter()
    c0 = time.process_time()
    from vramplan.__main__ import import_numpy_single_threaded

    import_numpy_single_threaded()  # as the entry point does
    from vramplan.cli import main  # noqa: E402 - timed on purpose

    t1, c1 = time.perf_counter(), time.process_time()
    for label in ("cold", "warm"):
        s, c = time.perf_counter(), time.process_time()
        with redirect_stdout(io.StringIO()):
            main(list(ARGV))
        print(f"in-process {label}: fit command {time.perf_counter() - s:.3f} s wall, "
              f"{time.process_time() - c:.3f} s CPU")
    print(f"in-process: import vramplan.cli {t1 - t0:.3f} s wall, {c1 - c0:.3f} s CPU")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bytecode", action="store_true", help="use compiled bytecode, as an installed package does")
    ap.add_argument("--profile", action="store_true", help="split one in-process run into imports and the command")
    ap.add_argument("--instructions", action="store_true",
                    help="also count one run's instructions under valgrind (load-independent)")
    ap.add_argument("--table", action="store_true", help="print the table (no --json), as the issue's command does")
    args = ap.parse_args()
    if args.table:
        ARGV.remove("--json")
    print("command: vramplan " + " ".join(ARGV))
    if args.profile:
        _profile()
        return 0
    # the installed `vramplan` script's call (pyproject [project.scripts]; `python -m vramplan` runs the same main)
    cmd = [sys.executable, "-c", "import sys; sys.argv = ['vramplan', *" + repr(ARGV) + "]; "
           "from vramplan.__main__ import main; rc = main(); "
           "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
           "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n'); sys.exit(rc)"]
    env = dict(os.environ)
    tmp = None
    if args.bytecode:  # one untimed run writes the bytecode of every module it imports (numpy's too)
        tmp = tempfile.TemporaryDirectory(prefix="vramplan-pyc-")
        env["PYTHONPYCACHEPREFIX"] = tmp.name
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run(cmd, capture_output=True, env=env)
    times, cpus = [], []
    heavy = ""
    for _ in range(args.runs):
        c0 = _child_cpu()
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        cpus.append(_child_cpu() - c0)
        if out.returncode != 0:
            print(out.stderr)
            return 1
        heavy = [l for l in out.stderr.splitlines() if l.startswith("HEAVY=")][-1][6:]
    for i, (t, c) in enumerate(zip(times, cpus)):
        print(f"run {i + 1}: {t:.3f} s wall, {c:.3f} s CPU")
    med = statistics.median(times)
    print(f"bytecode: {'compiled beforehand (as installed)' if args.bytecode else 'as the environment leaves it'}")
    print(f"median {med:.3f} s wall, {statistics.median(cpus):.3f} s CPU (target <= {TARGET_S} s): "
          f"{'OK' if med <= TARGET_S else 'SLOW'}")
    print(f"heavy modules imported: {heavy or 'none'}")
    if args.instructions:
        print(f"instructions of one run: {_instructions(cmd, env)}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if med <= TARGET_S and not heavy else 1


def _instructions(cmd: list[str], env: dict) -> str:
    """``I refs`` of one run of ``cmd`` under ``valgrind --tool=callgrind`` (as printed), or why not."""
    import re
    import shutil

    if shutil.which("valgrind") is None:
        return "valgrind not found"
    env = {"PYTHONHASHSEED": "0", **env}  # the same string hashes each run, unless a seed is set
    with tempfile.TemporaryDirectory(prefix="vramplan-cg-") as d:
        out = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/cg.out", *cmd],
                             capture_output=True, text=True, env=env)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    return m.group(1) if m else "not reported (valgrind: " + (out.stderr.strip().splitlines() or ["no output"])[-1] + ")"


if __name__ == "__main__":
    sys.exit(main())

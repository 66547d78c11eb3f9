"""The command line's entry point: ``python -m vramplan`` and the installed ``vramplan`` script.

Both run :func:`main`, which sizes numpy's BLAS thread pool before numpy loads and then runs
:func:`vramplan.cli.main`. Planning does no large linear algebra, yet OpenBLAS starts one thread per
core when numpy is imported (``blas_thread_init``): about 0.05 s of wall time and more of CPU on a
machine with many cores, for threads the command never uses. So, unless the user has chosen a
thread count (``OPENBLAS_NUM_THREADS``, ``GOTO_NUM_THREADS`` or ``OMP_NUM_THREADS`` set: that
setting wins), numpy is imported with ``OPENBLAS_NUM_THREADS=1`` and the variable is removed again
once it has loaded, so that anything the command starts later (the dry run's torch, a calibration
subprocess) sees the environment the user gave. Only the command line does this: ``import
vramplan`` as a library (a trainer importing the planner) leaves its process's BLAS alone.
"""

from __future__ import annotations

import os
import sys

#: The variables by which a user chooses OpenBLAS's thread count (OpenBLAS reads them in this order).
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def import_numpy_single_threaded() -> bool:
    """Import numpy with a one-thread OpenBLAS pool unless the user chose a count or numpy is loaded.

    Returns:
        Whether the pool was capped (False: numpy was already imported, or a variable of
        :data:`BLAS_THREAD_VARS` is set, which OpenBLAS then obeys as usual).
    """
    if "numpy" in sys.modules or any(v in os.environ for v in BLAS_THREAD_VARS):
        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401 - loaded here, with the cap, for the command that follows
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the command line (:func:`vramplan.cli.main`) with numpy's BLAS pool sized first; the exit status."""
    import_numpy_single_threaded()
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

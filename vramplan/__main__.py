"""The command line's entry point: ``python -m vramplan`` and the installed ``vramplan`` script.

Both run :func:`main`, which sizes numpy's BLAS thread pool before numpy loads and then runs
:func:`vramplan.cli.main`. Planning does no large linear algebra, yet OpenBLAS starts one thread per
core when numpy is imported (``blas_thread_init``): ~0.04 s of CPU time of ``import numpy`` on a
2-core machine (0.13-0.17 s -> 0.08-0.13 s), more where there are more cores, for threads the
command never uses. So, unless the user has chosen a
thread count (``OPENBLAS_NUM_THREADS``, ``GOTO_NUM_THREADS`` or ``OMP_NUM_THREADS`` set: that
setting wins), numpy is imported with ``OPENBLAS_NUM_THREADS=1`` and the variable is removed again
once it has loaded, so that anything the command starts later (the dry run's torch, a calibration
subprocess) sees the environment the user gave. Only the command line does this: ``import
vramplan`` as a library (a trainer importing the planner) leaves its process's BLAS alone.

While the command runs, :mod:`dataclasses` compiles each generated method's text once across runs
(:func:`vramplan._dataclass_code.compiled_dataclass_methods`: the code objects are kept beside the
bytecode, one file per subcommand): ~14% of a ``fit``'s instructions went to compiling the same ~460
methods at every start.

Run as the program (no ``argv`` given), it also spares the interpreter's exit the garbage
collector's final passes over everything still alive (the catalogues, numpy, the result: ~30k
objects, ~1.4% of a ``fit``'s instructions): an ``atexit`` hook, registered first so that it runs
after every other exit hook, freezes the objects still tracked (``gc.freeze``), and the collections
of the interpreter's shutdown skip them. Nothing is lost by it: they are freed with the process;
objects without reference cycles are still released one by one as the modules are torn down;
vramplan writes its files through ``with`` blocks, atomic replaces and fsync'd raw descriptors,
never through a finaliser; and standard output is flushed by the shutdown itself.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys

from ._dataclass_code import compiled_dataclass_methods

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
    """Run the command line (:func:`vramplan.cli.main`) with numpy's BLAS pool sized first; the exit status.

    ``argv`` None: the program's own command line (``sys.argv``), and the process ends after it, so
    the exit's final collections are skipped (module docstring); with an ``argv`` (a caller running
    a command in its own process) nothing about its exit is changed.
    """
    from .cli import PLANNING_COMMANDS, command_of

    command = command_of(argv)
    if argv is None:
        atexit.register(gc.freeze)
        if command in PLANNING_COMMANDS:
            # the process ends with the command: pause the collector for good (from before numpy's import),
            # instead of cli.main's pause-and-restore, whose restore makes one young collection of everything
            # the command built
            gc.disable()
    with compiled_dataclass_methods(command):
        import_numpy_single_threaded()
        from .cli import main as cli_main

        return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""The command line's entry point (vramplan.__main__) and the lazy package (vramplan/__init__.py).

``import vramplan`` loads nothing until a name is used, so the entry point can start numpy with a
one-thread BLAS pool (the planner does no large linear algebra), unless the user chose a count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")}
ENV["PYTHONPATH"] = str(ROOT)


def _py(code: str, **env: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**ENV, **env})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def test_import_vramplan_loads_nothing_until_a_name_is_used():
    out = _py("import sys, vramplan\n"
              "print('numpy' in sys.modules, sorted(m for m in sys.modules if m.startswith('vramplan')))\n"
              "f = vramplan.fit\n"
              "print('numpy' in sys.modules)")
    assert out.splitlines() == ["False ['vramplan']", "True"]


def test_every_public_name_is_its_modules_object_and_submodules_are_attributes():
    import importlib

    import vramplan

    for name, (module, attr) in vramplan._LAZY.items():
        if name == "VramplanCallback":  # needs transformers; resolved in test_integrations
            continue
        assert getattr(vramplan, name) is getattr(importlib.import_module(module), attr), name
        assert name in dir(vramplan)
    assert vramplan.config is importlib.import_module("vramplan.config")
    assert vramplan.dryrun is importlib.import_module("vramplan.dryrun")  # the package, not the function
    assert vramplan.dry_run is vramplan.dryrun.dryrun
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        vramplan.no_such_name  # noqa: B018
    namespace: dict = {}
    exec("from vramplan import *", namespace)
    assert set(vramplan.__all__) <= set(namespace)


_THREADS = ("import re, sys\n"
            "from vramplan.__main__ import import_numpy_single_threaded\n"
            "capped = import_numpy_single_threaded()\n"
            "import numpy\n"
            "t = re.search(r'Threads:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "import os; print(capped, t, os.environ.get('OPENBLAS_NUM_THREADS'))")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads through /proc")
def test_the_entry_point_starts_numpy_with_one_blas_thread_and_restores_the_environment():
    capped, threads, left = _py(_THREADS).split()
    assert (capped, threads, left) == ("True", "1", "None")  # only the main thread; the variable removed again


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads through /proc")
def test_a_users_blas_thread_setting_wins():
    capped, threads, left = _py(_THREADS, OPENBLAS_NUM_THREADS="2").split()
    assert (capped, threads, left) == ("False", "2", "2")  # OpenBLAS's own pool as asked, variable untouched
    capped, _, left = _py(_THREADS, OMP_NUM_THREADS="2").split()
    assert (capped, left) == ("False", "None")


def test_a_library_import_leaves_numpys_blas_alone():
    """``import vramplan`` (a trainer using the planner) never sets the cap: only the command line does."""
    out = _py("import os, vramplan\nvramplan.fit\nprint(os.environ.get('OPENBLAS_NUM_THREADS'))\n"
              "from vramplan.__main__ import import_numpy_single_threaded\nprint(import_numpy_single_threaded())")
    assert out.splitlines() == ["None", "False"]  # numpy already loaded: the entry point leaves it as it is


@pytest.mark.parametrize("argv", [["models", "--json"], ["estimate", "--model", "1b", "--gpu", "rtx3080"],
                                  ["fit", "--model", "1b", "--gpu", "nosuchcard"], ["--version"]])
def test_python_dash_m_and_the_installed_script_run_the_same_main(argv):
    """``python -m vramplan`` and the console script (pyproject's ``vramplan.__main__:main``) agree to the byte."""
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["vramplan"]
    module, func = script.split(":")
    as_m = subprocess.run([sys.executable, "-m", "vramplan", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    as_script = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())",
                                *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert (as_m.returncode, as_m.stdout, as_m.stderr) == (as_script.returncode, as_script.stdout, as_script.stderr)
    assert module == "vramplan.__main__" and as_m.stdout + as_m.stderr


def test_tables_print_the_same_bytes_without_highlighting_where_no_colour_is_emitted(monkeypatch):
    """cli._console turns rich's highlighting off when it emits no colour: the same bytes, less work."""
    import io

    from rich.console import Console

    from vramplan import cli, estimate, fit
    from vramplan.render import render_estimate, render_fit

    rep = fit("1b", "rtx3080", methods=["lora", "qlora", "dpo"])
    est = estimate("7b", "qlora", gpu="rtx4090", seq=4096)
    for render, arg in ((render_fit, rep), (render_estimate, est)):
        texts = []
        for highlight in (True, False):
            buf = io.StringIO()
            render(arg, Console(file=buf, highlight=highlight, width=100))
            texts.append(buf.getvalue())
        assert texts[0] == texts[1] and len(texts[0]) > 500

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    plain = cli._console()  # pytest captures stdout: not a terminal, no colour
    assert plain.color_system is None and not plain.render_str("peak 12.5 GiB").spans
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    coloured = cli._console()
    assert coloured.color_system is not None and coloured.render_str("peak 12.5 GiB").spans  # still highlighted


def test_tables_print_names_as_written_not_as_emoji(monkeypatch):
    """cli._console prints ``:word:`` as written (vramplan's text never means an emoji code), coloured or not, and
    the command's table never loads rich's table of emoji codes."""
    from vramplan import cli

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    for colour in (False, True):
        if colour:
            monkeypatch.setenv("FORCE_COLOR", "1")
            monkeypatch.setenv("TERM", "xterm-256color")
        console = cli._console()
        assert console.render_str("model :fire: on :smiley:").plain == "model :fire: on :smiley:"
    out = _py("import io, sys\n"
              "from contextlib import redirect_stdout\n"
              "from vramplan.cli import main\n"
              "with redirect_stdout(io.StringIO()):\n"
              "    main(['fit', '--model', '1b', '--gpu', 'rtx3080', '--methods', 'lora'])\n"
              "print('rich._emoji_codes' in sys.modules, 'rich.table' in sys.modules)\n")
    assert out.split() == ["False", "True"]


def test_only_the_programs_own_run_skips_the_exits_final_collections():
    """``main()`` (the script, ``python -m``) registers gc.freeze at exit; ``main(argv)`` in a caller's process does not."""
    out = _py("import atexit, gc, io, sys\n"
              "calls = []\n"
              "atexit.register = lambda f, *a, **k: calls.append(f)\n"
              "from contextlib import redirect_stdout\n"
              "from vramplan.__main__ import main\n"
              "with redirect_stdout(io.StringIO()):\n"
              "    main(['methods'])\n"
              "print(calls == [], gc.isenabled())\n"
              "sys.argv = ['vramplan', '--version']\n"
              "with redirect_stdout(io.StringIO()):\n"
              "    main()\n"
              "print(calls == [gc.freeze], gc.isenabled())\n"
              "sys.argv = ['vramplan', 'methods']\n"
              "with redirect_stdout(io.StringIO()):\n"
              "    main()\n"
              "print(calls == [gc.freeze] * 2, gc.isenabled())")
    # a caller's main(argv) leaves the collector on; the program's own planning command pauses it for good
    assert out.splitlines() == ["True True", "True True", "True False"]


def test_a_large_json_report_reaches_a_pipe_whole_with_the_exit_unchanged(tmp_path):
    """The program's exit (frozen collector) still flushes everything: the piped JSON parses and equals main(argv)'s."""
    import io
    import json
    from contextlib import redirect_stdout

    from vramplan.cli import main

    argv = ["fit", "--model", "7b", "--gpu", "rtx4090", "--json"]
    res = subprocess.run([sys.executable, "-m", "vramplan", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(argv) == 0
    assert res.stdout == buf.getvalue() and json.loads(res.stdout)["rows"]


@pytest.mark.parametrize("command, argv, collects", [
    ("cmd_methods", ["methods"], False), ("cmd_fit", ["fit", "--model", "1b", "--gpu", "rtx3080"], False),
    ("cmd_dryrun", ["dryrun", "--model", "1b"], True)])
def test_planning_commands_pause_the_collector_and_restore_it(monkeypatch, command, argv, collects):
    import gc

    from vramplan import cli

    seen = []
    monkeypatch.setattr(cli, command, lambda a: seen.append(gc.isenabled()) or 0)
    assert gc.isenabled()
    assert cli.main(argv) == 0
    assert seen == [collects] and gc.isenabled()  # dryrun/calibrate build real models: collector kept
    gc.disable()
    try:
        cli.main(argv)
        assert not gc.isenabled()  # a caller's own setting is left as it was
    finally:
        gc.enable()


@pytest.mark.parametrize("columns", [None, "120", "57", "0", "-3", "wide", ""])
def test_help_is_argparses_at_the_same_width_without_shutil(monkeypatch, columns):
    """cli.terminal_columns is shutil.get_terminal_size().columns, so every help text is argparse's own."""
    import argparse
    import shutil

    from vramplan import cli

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setenv("LINES", "x")  # shutil then asks the terminal for the lines, keeping COLUMNS
    assert cli.terminal_columns() == shutil.get_terminal_size().columns
    parser = cli._parser_for(None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in (parser, *sub.choices.values()):
        ours = p.format_help()
        assert p.formatter_class is cli._Formatter
        p.formatter_class = argparse.HelpFormatter
        assert ours == p.format_help() and ours.count("\n") > 2, p.prog


def test_the_fit_imports_no_shutil():
    out = _py("import sys\nsys.argv = ['vramplan', 'fit', '--model', '1b', '--gpu', 'rtx3080', '--json']\n"
              "import io\nfrom contextlib import redirect_stdout\nfrom vramplan.__main__ import main\n"
              "with redirect_stdout(io.StringIO()):\n    main()\nprint('shutil' in sys.modules)")
    assert out == "False"

"""Bounded hostile-input fuzz of the CLI and the Python API (issue #16), for CI.

The generators and checks are those of ``benchmarks/fuzz.py`` (which runs >= 10,000 cases);
here hypothesis drives a few hundred, derandomized (a fixed seed: the same cases every run).
A case fails on a traceback, an exit code other than 0/2, an error not on one line, invalid
JSON, a NaN/negative figure, a changed input file or a call over the time limit; an API call
fails when it raises anything but ``VramplanError``.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("vramplan_fuzz", ROOT / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["vramplan_fuzz"] = fuzz  # dataclasses look their module up while the class is built
_spec.loader.exec_module(fuzz)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    files = fuzz.make_files(root / "in")
    cwd = os.getcwd()
    os.chdir(root)  # calibrate's default --out and the profile search stay in the sandbox
    yield root, files
    os.chdir(cwd)
    os.chmod(root / "in" / "readonly", 0o755)


def _failures(t) -> list[str]:
    out = [f"traceback {sig}: {t.examples[sig]}" for sig in t.tracebacks]
    out += [f"hang: {h}" for h in t.hangs] + [f"invalid JSON: {h}" for h in t.invalid_json]
    out += [f"bad figure: {h}" for h in t.bad_numbers] + [f"not one line: {h}" for h in t.multi_line]
    out += [f"exit code: {h}" for h in t.bad_codes] + [f"input changed: {h}" for h in t.changed_inputs]
    return out


# Corrupted profiles are read by vramplan/profiles.py (validated there, issue #13); they are fuzzed
# by benchmarks/fuzz.py, not gated here.
_FAST = dict(max_examples=250, derandomize=True, deadline=None, database=None,
             suppress_health_check=list(HealthCheck))


@settings(**_FAST)
@given(seed=st.integers(0, 2**32 - 1))
def test_cli_fuzz(sandbox, seed):
    root, files = sandbox
    rng = random.Random(seed)
    case = fuzz.gen_case(rng, files)
    if case.kind == "dryrun" or case.env:  # real dry runs (seconds each) and profiles: benchmarks/fuzz.py
        return
    case.hang_prone = False  # in-process, under the SIGALRM limit
    tally = fuzz.Tally()
    fuzz.check_case(case, root, tally)
    assert not _failures(tally), _failures(tally)


@settings(**{**_FAST, "max_examples": 300})
@given(seed=st.integers(0, 2**32 - 1))
def test_api_fuzz(seed):
    tally = fuzz.Tally()
    fuzz.check_api(random.Random(seed), tally, None)
    assert not _failures(tally), _failures(tally)


def test_no_temporary_files_left(sandbox):
    root, _ = sandbox
    assert fuzz.leftover_temp_files(root) == []

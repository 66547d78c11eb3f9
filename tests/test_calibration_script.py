"""calibrate/run_on_gpu.sh on the CPU: its syntax, and a preflight that fails in seconds with one
clear line (a fake interpreter stands in for a broken image), or passes on a working one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "calibrate" / "run_on_gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, env_extra, timeout=120):
    env = {**os.environ, "OUT": str(tmp_path / "out"), **env_extra}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_preflight_failure_is_one_clear_line(tmp_path):
    fake = tmp_path / "python"
    # an image whose interpreter runs but lacks torch: the real preflight script, an empty path
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    fake.chmod(0o755)
    r = _run(tmp_path, {"PYTHON": str(fake), "DEVICE": "cpu", "PYTHONPATH": ""})
    assert r.returncode == 4, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("PREFLIGHT FAILED:") and "torch" in lines[0]
    assert (tmp_path / "out" / "env.txt").exists()


def test_preflight_passes_on_a_working_cpu_image(tmp_path):
    r = _run(tmp_path, {"PYTHON": sys.executable, "DEVICE": "cpu", "PREFLIGHT_ONLY": "1"})
    assert r.returncode == 0, r.stderr + r.stdout
    env = (tmp_path / "out" / "env.txt").read_text()
    assert "preflight ok" in env and "torch " in env and "transformers " in env and "bitsandbytes " in env

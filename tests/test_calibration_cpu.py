"""The whole calibration pipeline on the CPU: the tiny suite (calibrate/cpu.toml) through
the real runtime (transformers + PEFT, DPO and PPO in plain torch), then fit and report."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from vramplan.calibration import LogState, load_suite, read_log, run_calibration  # noqa: E402
from vramplan.profiles import load_profile  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu")
    res = run_calibration(gpu="auto", suite="cpu", out=tmp / "profiles", device="cpu", progress=False,
                          report_dir=tmp / "reports")
    return tmp, res


def test_every_method_steps_on_the_cpu(cpu_run):
    tmp, res = cpu_run
    suite = load_suite("cpu")
    assert res.gpu == "cpu" and res.complete
    pts = [r for r in read_log(res.log_path) if r["kind"] == "point"]
    assert len(pts) == len(suite.points) == res.measured
    bad = [(r["id"], r.get("error")) for r in pts if r["status"] != "ok"]
    assert not bad
    assert {r["config"]["method"] for r in pts} == {"full", "lora", "qlora", "dora", "ia3", "dpo", "ppo", "grpo"}
    for r in pts:
        assert r["step_s_median"] > 0 and r["tokens_per_s"] > 0 and r["load_s"] >= 0
        assert r["prediction"]["tensor_peak_bytes"] > 0
        assert r["memory"]["max_allocated"] is None  # no allocator statistics on the CPU
    dry = [r for r in pts if r.get("dryrun")]
    assert {r["id"] for r in dry} == suite.dryrun_ids()  # the first point of each model x method group
    for r in dry:
        assert r["dryrun"]["tensor_peak_bytes"] > 0 and r["dryrun"]["components"]
    sess = next(r for r in read_log(res.log_path) if r["kind"] == "session")
    assert sess["versions"]["torch"] and sess["versions"]["transformers"] and sess["versions"]["peft"]


def test_profile_and_report_are_written(cpu_run):
    tmp, res = cpu_run
    prof = load_profile("cpu", search=[tmp / "profiles"])
    assert prof is not None and prof.source == "cpu.jsonl"
    assert prof.context_bytes is None and prof.reserved_bytes(1 << 30) is None  # not measurable on a CPU
    assert prof.allocated_source == "dryrun" and prof.activation_factors  # dry run vs analytic tensors
    assert prof.is_calibrated("throughput:lora") and prof.is_calibrated("throughput:ppo")
    assert prof.holdout["tokens_per_s"].n == sum(p.split == "holdout" for p in load_suite("cpu").points)
    md = res.report_path.read_text()
    assert "# Calibration report: cpu" in md and "| tokens/s |" in md
    assert res.plot_path is None or res.plot_path.exists()


def test_resume_of_a_finished_log_measures_nothing(cpu_run):
    tmp, res = cpu_run
    again = run_calibration(gpu="auto", suite="cpu", out=tmp / "profiles", device="cpu", progress=False,
                            resume=True, report_dir=None)
    assert again.measured == 0 and again.skipped == res.measured
    st = LogState.load(res.log_path)
    assert len(st.sessions) == 2 and st.measured == res.measured

"""The calibration runner's logic with torch.cuda and NVML mocked: OOM recovery, errors,
resume after a crash, atomic appends, searches, time limits. No GPU and no torch needed."""

from __future__ import annotations

import json
import math
import os
import warnings
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan.calibration import JsonlLog, LogState, load_suite, read_log, run_calibration
from vramplan.calibration.log import repair_tail
from vramplan.calibration.measure import CudaDevice, DeviceLostError, is_oom, tried_bytes
from vramplan.calibration.search import MAX_PROBES, next_size, outcome
from vramplan.errors import VramplanError
from vramplan.nvml import DeviceInfo

MIB, GIB = 1 << 20, 1 << 30
SEG = 2 * MIB

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True,
        "max_position_embeddings": 4096}

SUITE = """
schema = 1
name = "mock"
warmup = 1
steps = 2
holdout_every = 0
dryrun = false

[defaults]
precision = "bf16-mixed"

[models.tiny]
config = {config}

[[grid]]
models = ["tiny"]
methods = ["full", "lora", "dpo"]
batch = [1, 2]
seq = [64, 128]
grad_ckpt = [false]
{extra}
"""

SEARCH = """
[[search]]
model = "tiny"
method = "lora"
vary = "seq"
batch = 1
start = 64
max = 8192
granularity = 64
"""


def toml_inline(d: dict) -> str:
    parts = []
    for k, v in d.items():
        parts.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    return "{ " + ", ".join(parts) + " }"


def write_suite(tmp_path, extra: str = "") -> str:
    p = tmp_path / "mock.toml"
    p.write_text(SUITE.format(config=toml_inline(TINY), extra=extra))
    return str(p)


# -- fakes -----------------------------------------------------------------------------------

class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the runner recognises by name."""


class FakeCuda:
    """A caching allocator in miniature: 512-B rounding, 2-MiB segments, peaks, empty_cache."""

    def __init__(self, capacity: int = 4 * GIB, context: int = 300 * MIB):
        self.capacity, self.context = capacity, context
        self.alloc = self.reserved = self.peak_a = self.peak_r = 0
        self.initialized = False
        self.sticky = False
        self.empty_calls = 0

    # the calls the runner makes
    def is_available(self):
        return True

    def device_count(self):
        return 1

    def is_initialized(self):
        return self.initialized

    def synchronize(self, i=0):
        if self.sticky:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def memory_allocated(self, i=0):
        return self.alloc

    def memory_reserved(self, i=0):
        return self.reserved

    def max_memory_allocated(self, i=0):
        return self.peak_a

    def max_memory_reserved(self, i=0):
        return self.peak_r

    def reset_peak_memory_stats(self, i=0):
        self.peak_a, self.peak_r = self.alloc, self.reserved

    def empty_cache(self):
        self.empty_calls += 1
        self.reserved = math.ceil(self.alloc / SEG) * SEG

    def get_device_properties(self, i=0):
        return SimpleNamespace(name="Fake GPU", total_memory=self.capacity, major=9, minor=0, multi_processor_count=132)

    # what tensors do
    def malloc(self, n: int) -> int:
        self.initialized = True
        n = -(-n // 512) * 512
        if self.alloc + n > self.reserved:
            need = math.ceil((self.alloc + n - self.reserved) / SEG) * SEG
            if self.reserved + need + self.context > self.capacity:
                raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n / GIB:.2f} GiB. GPU 0 has a total "
                                       f"capacity of {self.capacity / GIB:.2f} GiB")
            self.reserved += need
        self.alloc += n
        self.peak_a = max(self.peak_a, self.alloc)
        self.peak_r = max(self.peak_r, self.reserved)
        return n

    def free(self, n: int) -> None:
        self.alloc -= n


class FakeNvml:
    def __init__(self, cuda: FakeCuda, baseline: int = 1 * GIB, hide_processes: bool = False):
        self.cuda, self.baseline, self.hide = cuda, baseline, hide_processes

    def device_info(self, i=0):
        return DeviceInfo(i, "Fake GPU", self.cuda.capacity, self.used_bytes(i), "999.1", 13000)

    def used_bytes(self, i=0):
        c = self.cuda
        return self.baseline + (c.context + c.reserved if c.initialized else 0)

    def process_used_bytes(self, i=0, pid=None):
        c = self.cuda
        return None if self.hide or not c.initialized else c.context + c.reserved


class FakeTensor:
    def __init__(self, cuda: FakeCuda, n: int):
        self.n = 0
        self.cuda = cuda
        self.n = cuda.malloc(n)

    def sum(self):
        return SimpleNamespace(item=lambda: 0.0)

    def __del__(self):
        self.cuda.free(self.n)


class FakeTorch:
    def __init__(self, cuda: FakeCuda):
        self.cuda = cuda

    def zeros(self, n, device=None, dtype=None):
        return FakeTensor(self.cuda, 4 * n)

    ones = zeros


def fake_device(capacity=4 * GIB, **kw):
    cuda = FakeCuda(capacity)
    return CudaDevice(0, cuda=cuda, nvml=FakeNvml(cuda, **kw), torch=FakeTorch(cuda)), cuda


class FakeWorkload:
    """Weights on build; activations ~ batch x seq x sequences during a step."""

    def __init__(self, cuda: FakeCuda, spec, cfg, fail=None):
        self.cuda = cuda
        self.buffers = [FakeTensor(cuda, 40 * MIB if cfg.adapter == "full" else 20 * MIB)]
        self.tokens = cfg.batch * cfg.seq * cfg.recipe.sequences_per_example
        self.fail = fail

    def step(self):
        if self.fail:
            raise self.fail
        acts = FakeTensor(self.cuda, self.tokens * 64 * 1024)  # 64 KiB a token
        del acts

    def close(self):
        self.buffers.clear()


class Builder:
    def __init__(self, cuda, fail_on=None, interrupt_at=None):
        self.cuda, self.calls = cuda, []
        self.fail_on = fail_on or {}
        self.interrupt_at = interrupt_at

    def __call__(self, spec, cfg, device):
        self.calls.append((cfg.method, cfg.adapter, cfg.batch, cfg.seq))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        fail = self.fail_on.get((cfg.method, cfg.batch, cfg.seq))
        return FakeWorkload(self.cuda, spec, cfg, fail)


def run(tmp_path, dev, builder, **kw):
    kw.setdefault("suite", write_suite(tmp_path))
    return run_calibration(gpu="fake-gpu", out=tmp_path / "profiles", device_obj=dev, builder=builder, progress=False,
                           report_dir=None, fit=kw.pop("fit", False), **kw)


def points(tmp_path, gpu="fake-gpu"):
    return [r for r in read_log(tmp_path / "profiles" / f"{gpu}.jsonl") if r["kind"] == "point"]


# -- tests -----------------------------------------------------------------------------------

def test_measures_every_point_and_logs_context(tmp_path):
    dev, cuda = fake_device()
    b = Builder(cuda)
    res = run(tmp_path, dev, b)
    recs = read_log(res.log_path)
    sess = [r for r in recs if r["kind"] == "session"]
    assert len(sess) == 1
    assert sess[0]["probes"]["context_init_bytes"] == 300 * MIB  # NVML delta minus the first tensor's segment
    assert sess[0]["device"]["name"] == "Fake GPU"
    assert sess[0]["versions"]["driver"] == "999.1"
    pts = [r for r in recs if r["kind"] == "point"]
    assert len(pts) == 12 == res.measured
    for r in pts:
        assert r["status"] == "ok"
        m = r["memory"]
        assert m["max_allocated"] >= r["tokens_per_step"] * 64 * 1024
        assert m["max_reserved"] >= m["max_allocated"]
        assert m["outside_allocator_bytes"] == 300 * MIB
        assert len(r["step_s"]) == 2 and r["tokens_per_s"] > 0
        assert r["prediction"]["tensor_peak_bytes"] > 0
    assert cuda.alloc == 0 and cuda.reserved == 0  # every workload released, the cache emptied


def test_oom_is_recorded_and_the_run_goes_on(tmp_path):
    dev, cuda = fake_device(capacity=300 * MIB + 40 * MIB + 10 * MIB)  # context + full weights + a little
    b = Builder(cuda)
    res = run(tmp_path, dev, b)
    pts = points(tmp_path)
    oom = [r for r in pts if r["status"] == "oom"]
    ok = [r for r in pts if r["status"] == "ok"]
    assert oom and ok and res.oom == len(oom) and res.measured == len(ok)
    for r in oom:
        assert r["tried"]["batch"] == r["config"]["batch"] and r["tried"]["seq"] == r["config"]["seq"]
        assert r["oom_requested_bytes"] > 0
        assert "out of memory" in r["error"]
        assert r["memory"]["max_allocated_at_failure"] is not None
    # after each OOM the cache was emptied: nothing left allocated (one 2-MiB segment of the health probe)
    assert cuda.alloc == 0 and cuda.reserved <= SEG
    assert cuda.empty_calls >= 2 * len(pts)
    # the small points still fit after the large ones failed
    assert any(r["config"]["seq"] == 64 and r["config"]["batch"] == 1 for r in ok)


def test_error_is_recorded_and_retried_on_resume(tmp_path):
    dev, cuda = fake_device()
    b = Builder(cuda, fail_on={("lora", 2, 128): ValueError("a bug in the step")})
    res = run(tmp_path, dev, b)
    assert res.errors == 1
    err = [r for r in points(tmp_path) if r["status"] == "error"]
    assert err[0]["error"].startswith("ValueError: a bug")
    b2 = Builder(cuda)
    res2 = run(tmp_path, dev, b2, resume=True)
    assert b2.calls == [("lora", "lora", 2, 128)]
    assert res2.measured == 1 and res2.skipped == 11
    st_ = LogState.load(res.log_path)
    assert all(st_.done(p.id) for p in load_suite(write_suite(tmp_path)).points)


def test_device_lost_stops_the_run(tmp_path):
    dev, cuda = fake_device()

    class Sticky(Builder):
        def __call__(self, spec, cfg, device):
            w = super().__call__(spec, cfg, device)
            if len(self.calls) == 3:
                cuda.sticky = True
                w.fail = RuntimeError("CUDA error: an illegal memory access was encountered")
            return w

    with pytest.raises(DeviceLostError, match="--resume"):
        run(tmp_path, dev, Sticky(cuda))
    pts = points(tmp_path)
    assert [r["status"] for r in pts] == ["ok", "ok", "crashed"]  # recorded, not done
    crashed_id = pts[-1]["id"]
    # a resume does not try the crashed point first (or at all) ...
    cuda.sticky = False
    b = Builder(cuda)
    res = run(tmp_path, dev, b, resume=True)
    assert res.crashed_skipped == [crashed_id] and len(b.calls) == 12 - 3
    assert crashed_id not in {r["id"] for r in points(tmp_path) if r["session"] == read_log(res.log_path)[-1]["session"]}
    # ... until asked to
    b = Builder(cuda)
    res = run(tmp_path, dev, b, resume=True, retry_failed=True)
    assert len(b.calls) == 1 and res.measured == 1 and not res.crashed_skipped


def test_a_point_that_killed_the_process_is_skipped_on_resume(tmp_path):
    """An attempt with no result after it: the process died mid-point (a segfault, a hard kill)."""
    from vramplan.calibration.log import JsonlLog

    dev, cuda = fake_device()
    run(tmp_path, dev, Builder(cuda))
    log = tmp_path / "profiles" / "fake-gpu.jsonl"
    lines = log.read_text().splitlines()
    # cut the log back to just after the 5th point's attempt, as if the process died there
    attempts = [i for i, x in enumerate(lines) if '"kind": "attempt"' in x or '"kind":"attempt"' in x]
    log.write_text("\n".join(lines[: attempts[4] + 1]) + "\n")
    b = Builder(cuda)
    res = run(tmp_path, dev, b, resume=True)
    assert len(res.crashed_skipped) == 1 and len(b.calls) == 12 - 5
    assert JsonlLog  # the log module stays the writer


def test_resume_after_a_crash_loses_nothing(tmp_path):
    dev, cuda = fake_device()
    b = Builder(cuda, interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, dev, b)
    first = points(tmp_path)
    assert len(first) == 4 and all(r["status"] == "ok" for r in first)
    # without --resume the log is protected
    with pytest.raises(VramplanError, match="--resume"):
        run(tmp_path, dev, Builder(cuda))
    b2 = Builder(cuda)
    res = run(tmp_path, dev, b2, resume=True)
    assert len(b2.calls) == 8 and res.skipped == 4
    allp = points(tmp_path)
    assert len(allp) == 12 and len({r["id"] for r in allp}) == 12
    sessions = [r for r in read_log(res.log_path) if r["kind"] == "session"]
    assert len(sessions) == 2 and sessions[1]["resume"] is True


def test_resume_refuses_another_card(tmp_path):
    dev, cuda = fake_device()
    run(tmp_path, dev, Builder(cuda), fit=False)
    dev2, cuda2 = fake_device()
    dev2.cuda.get_device_properties = lambda i=0: SimpleNamespace(name="Other GPU", total_memory=1, major=8, minor=0,
                                                                  multi_processor_count=1)
    with pytest.raises(VramplanError, match="measured on Fake GPU"):
        run(tmp_path, dev2, Builder(cuda2), resume=True)


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / "x.jsonl"
    log = JsonlLog(path).open()
    log.append({"kind": "point", "id": "a", "status": "ok"})
    log.close()
    with open(path, "ab") as fh:
        fh.write(b'{"kind": "point", "id": "b", "sta')  # a crash in the middle of a write
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert [r["id"] for r in read_log(path)] == ["a"]
        log = JsonlLog(path).open()
    log.append({"kind": "point", "id": "c", "status": "ok"})
    log.close()
    assert [r["id"] for r in read_log(path)] == ["a", "c"]
    assert path.read_bytes().endswith(b"\n")
    assert not repair_tail(path)


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"kind": "point", "id": "a"}\nnot json\n{"kind": "point", "id": "b"}\n')
    with pytest.raises(VramplanError, match="corrupt at line 2"):
        read_log(path)


def test_append_is_one_write_of_one_line(tmp_path, monkeypatch):
    path = tmp_path / "x.jsonl"
    writes, syncs = [], []
    real_write = os.write

    def trickle(fd, data):  # a filesystem that writes a byte at a time
        writes.append(len(data))
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", trickle)
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    with JsonlLog(path) as log:
        log.append({"kind": "point", "id": "multi\nline", "note": "tab\there"})
    monkeypatch.undo()
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 2 and lines[1] == b""
    assert json.loads(lines[0])["id"] == "multi\nline"
    assert syncs  # fsync-ed before append returned


def test_time_limit_stops_between_points(tmp_path):
    dev, cuda = fake_device()
    res = run(tmp_path, dev, Builder(cuda), time_limit_s=0.0)
    assert not res.complete and res.remaining == 12 and res.measured == 0
    res = run(tmp_path, dev, Builder(cuda), resume=True)
    assert res.complete and res.measured == 12


def test_nvml_without_process_list_falls_back_to_device_delta(tmp_path):
    dev, cuda = fake_device(hide_processes=True)
    run(tmp_path, dev, Builder(cuda))
    for r in points(tmp_path):
        assert r["memory"]["nvml_process_bytes"] == 300 * MIB + r["memory"]["reserved_end"]


def test_search_finds_the_largest_size_and_resumes(tmp_path):
    cap = 300 * MIB + 20 * MIB + 260 * MIB
    dev, cuda = fake_device(capacity=cap)
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE.format(config=toml_inline(TINY), extra="").replace(
        'methods = ["full", "lora", "dpo"]', 'methods = ["lora"]').replace("batch = [1, 2]", "batch = [1]")
        .replace("seq = [64, 128]", "seq = [64]") + SEARCH)
    b = Builder(cuda, interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, dev, b, suite=str(suite))
    b2 = Builder(cuda)
    res = run(tmp_path, dev, b2, suite=str(suite), resume=True)
    (s,) = res.searches
    # the truth: activations 64 KiB a token must fit beside the 20-MiB weights in the segments left
    truth = max(n for n in range(64, 8193, 64)
                if math.ceil((20 * MIB) / SEG) * SEG + math.ceil(n * 64 * 1024 / SEG) * SEG + 300 * MIB <= cap)
    assert s["largest_fit"] == truth
    assert s["smallest_oom"] == truth + 64
    probes = [r for r in points(tmp_path) if r.get("search")]
    sizes = [r["size"] for r in probes]
    assert len(sizes) == len(set(sizes))  # no probe repeated across the crash
    assert all(r["split"] == "search" and r["steps"] == 1 for r in probes)
    recs = [r for r in read_log(res.log_path) if r["kind"] == "search"]
    assert recs[-1]["largest_fit"] == truth and recs[-1]["capacity_bytes"] == cap


@settings(max_examples=200, deadline=None)
@given(start=st.integers(1, 64), top=st.integers(1, 5000), g=st.sampled_from([1, 8, 64]), cap=st.integers(1, 6000))
def test_search_brackets_any_threshold(start, top, g, cap):
    mx = max(top, start)
    results: dict[int, bool] = {}
    while (n := next_size(results, start=start, max_size=mx, granularity=g)) is not None:
        assert n not in results and 1 <= n <= max(mx, g)
        results[n] = n <= cap
    o = outcome(results, start=start, max_size=mx, granularity=g)
    assert o.done and o.probes <= MAX_PROBES
    if o.reason.startswith("bracketed"):
        assert o.largest_fit <= cap < o.smallest_oom
        assert o.smallest_oom - o.largest_fit <= g
    if o.largest_fit is not None:
        assert o.largest_fit <= cap


def test_oom_detection():
    assert is_oom(OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_oom(ValueError("out of memory"))  # only runtime errors carry CUDA's message
    assert tried_bytes("Tried to allocate 2.00 GiB. GPU") == 2 * GIB
    assert tried_bytes("Tried to allocate 512.00 MiB") == 512 * MIB
    assert tried_bytes("no size") is None


@pytest.mark.parametrize("head, tail, words", [
    ("", "[grid]\nmodels = 1\n", "at least one \\[\\[grid\\]\\]"),
    ("bogus = 1\n", "", "unknown key 'bogus'"),
    ("schema = 2\n", "", "schema 2"),
    ("warmup = 0\n", "", "warmup must be an integer >= 1"),
])
def test_suite_top_level_errors(tmp_path, head, tail, words):
    p = tmp_path / "bad.toml"
    p.write_text(head + '[models.tiny]\nconfig = ' + toml_inline(TINY) + "\n" + tail)
    with pytest.raises(VramplanError, match=words):
        load_suite(p)


@pytest.mark.parametrize("replace, words", [
    (('models = ["tiny"]', 'models = ["huge"]'), "unknown model 'huge'"),
    (('methods = ["full", "lora", "dpo"]', 'methods = ["sft"]'), "unknown method"),
    (("batch = [1, 2]", "batch = [0]"), "batch"),
    (("grad_ckpt = [false]", "grad_ckpt = [false]\nsplit = \"test\""), "split"),
    (("grad_ckpt = [false]", "grad_ckpt = [false]\ncolour = 1"), "unknown key 'colour'"),
])
def test_suite_grid_errors(tmp_path, replace, words):
    p = tmp_path / "bad.toml"
    p.write_text(SUITE.format(config=toml_inline(TINY), extra="").replace(*replace))
    with pytest.raises(VramplanError, match=words) as ei:
        load_suite(p)
    assert "\n" not in str(ei.value)


def test_suite_search_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(SUITE.format(config=toml_inline(TINY), extra="") + SEARCH.replace('vary = "seq"', 'vary = "rank"'))
    with pytest.raises(VramplanError, match="vary must be batch or seq"):
        load_suite(p)
    p.write_text(SUITE.format(config=toml_inline(TINY), extra="") + SEARCH.replace("start = 64", "start = 9999"))
    with pytest.raises(VramplanError, match="exceeds max"):
        load_suite(p)


def test_unknown_suite_name():
    with pytest.raises(VramplanError, match="no calibration suite"):
        load_suite("no-such-suite")


@pytest.mark.parametrize("name", ["standard", "quick", "cpu"])
def test_shipped_suites_load(name):
    s = load_suite(name)
    assert s.points
    assert len({p.id for p in s.points}) == len(s.points)
    methods = {p.config.method for p in s.points}
    assert {"full", "lora", "qlora", "dora", "ia3", "dpo", "ppo"} <= methods
    assert any(p.split == "holdout" for p in s.points)
    assert s.name == name


def test_standard_suite_holds_out_points_of_every_fitted_method():
    s = load_suite("standard")
    assert s.searches and len(s.points) <= 100
    fit_methods = {p.method_key for p in s.points if p.split == "fit"}
    held = {p.method_key for p in s.points if p.split == "holdout"}
    assert {"full", "lora", "qlora", "dora", "ia3", "dpo+lora"} <= held <= fit_methods
    assert s.quick_subset().points


def test_holdout_is_stable_across_loads():
    a = {p.id: p.split for p in load_suite("standard").points}
    b = {p.id: p.split for p in load_suite("standard").points}
    assert a == b


def test_missing_bitsandbytes_fails_before_measuring(tmp_path, monkeypatch):
    import importlib.util

    from vramplan.errors import MissingDependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="bitsandbytes is not installed"):
        run_calibration(suite="cpu", out=tmp_path / "p", device="cpu", progress=False, report_dir=None)
    log = tmp_path / "p" / "cpu.jsonl"
    assert not log.exists() or not [r for r in read_log(log) if r["kind"] == "point"]


def test_gpu_script_is_valid_bash():
    import shutil
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "calibrate" / "run_on_gpu.sh"
    assert script.exists() and os.access(script, os.X_OK)
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "--resume" in text and "--time-limit" in text and '"$OUT/' in text

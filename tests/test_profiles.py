"""Calibration profiles: schema round trip, validation on load, lookup, the planner's getters."""

from __future__ import annotations

import json

import pytest

from vramplan.errors import ProfileError, VramplanError
from vramplan.profiles import (ALLOCATOR_ROUND, SCHEMA, SCHEMA_VERSION, AllocatorModel, Fitted, Profile, Residual,
                               Throughput, find_profile, load_profile, profile_key, read_profile, step_features)

MIB = 1 << 20


def make_profile(**over) -> Profile:
    kw = dict(
        gpu="h100-sxm", device={"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85 * 10**9},
        versions={"torch": "2.11.0", "driver": "580.1"}, created="2026-11-23T00:00:00Z", source="h100-sxm.jsonl",
        source_info={"sha256": "ab" * 32, "points_ok": 10}, allocated_source="torch.cuda",
        context=Fitted(500 * MIB, 8, Residual.of([500.0] * 3, [490.0, 500.0, 495.0])),
        workspace=Fitted(16 * MIB, 2),
        allocator=AllocatorModel(1.05, 200 * MIB, n=9, by_method={"full": 1.02}),
        activation_factors={"lora": Fitted(1.1, 4), "dpo+lora": Fitted(0.9, 3)},
        throughput={"lora": Throughput((1e-4, 0.0, 1 / 400e12, 0.0), ((1024, 100.0), (8192, 300.0)), 5),
                    "qlora": Throughput(None, ((1024, 80.0),), 3),
                    "dpo+lora": Throughput((2e-4, 0.0, 1 / 350e12, 0.0), (), 3)},
        qlora_dequant=Fitted(0.002, 3),
        holdout={"reserved": Residual(n=5, median_rel=0.01, median_abs_rel=0.012, p90_abs_rel=0.02,
                                      max_under_rel=0.01, max_over_rel=0.03)},
    )
    kw.update(over)
    return Profile(**kw)


def test_round_trip(tmp_path):
    prof = make_profile()
    path = prof.save(tmp_path / "h100-sxm.json")
    back = read_profile(path)
    assert back.to_json() == prof.to_json()
    assert back.context_bytes == 500 * MIB
    assert back.workspace_bytes == 16 * MIB
    assert back.source == "h100-sxm.jsonl"
    assert back.versions["torch"] == "2.11.0"
    assert back.device["name"].startswith("NVIDIA")
    assert back.path == str(path)
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["version"] == SCHEMA_VERSION


def test_reserved_model_rounds_and_never_below_allocated():
    prof = make_profile()
    a = 10 * (1 << 30) + 123
    r = prof.reserved_bytes(a)
    assert r % ALLOCATOR_ROUND == 0
    assert r >= 1.05 * a + 200 * MIB
    assert r - (1.05 * a + 200 * MIB) < ALLOCATOR_ROUND
    assert prof.reserved_bytes(a, "full") >= 1.02 * r - ALLOCATOR_ROUND
    assert prof.reserved_bytes(a, "lora") == r  # no correction for lora
    low = make_profile(allocator=AllocatorModel(1.0, -500 * MIB))
    assert low.reserved_bytes(100 * MIB) >= 100 * MIB
    assert prof.reserved_uncertainty_bytes(a) > 0


def test_uncalibrated_getters_say_so():
    prof = make_profile(context=None, workspace=None, allocator=None, activation_factors={}, throughput={},
                        qlora_dequant=None)
    assert prof.context_bytes is None and prof.workspace_bytes is None
    assert prof.reserved_bytes(1 << 30) is None
    assert prof.activation_factor("lora") == 1.0
    assert prof.achieved_tflops("lora", 4096) is None
    assert prof.qlora_dequant_s_per_gparam is None
    assert prof.calibrated == []
    assert not prof.is_calibrated("allocator")


def test_method_lookup_and_fallbacks():
    prof = make_profile()
    assert prof.activation_factor("lora") == pytest.approx(1.1)
    assert prof.activation_factor("dpo") == pytest.approx(0.9)        # method name -> its default recipe
    assert prof.activation_factor("dpo+lora") == pytest.approx(0.9)
    assert prof.activation_factor("dora") == 1.0                      # not calibrated: the default
    assert prof.is_calibrated("activation:dpo")
    assert not prof.is_calibrated("activation:dora")
    assert prof.is_calibrated("throughput:dpo+dora")                  # sibling adapter of the same method
    assert prof.is_calibrated("throughput:qlora")                     # LoRA twin + dequantisation
    assert "context" in prof.calibrated and "throughput:lora" in prof.calibrated


def test_step_time_and_achieved_tflops():
    prof = make_profile()
    f = step_features(flops=4e14, layers=24, hidden=896, passes=2)
    t = prof.step_seconds("lora", f)
    assert t == pytest.approx(1e-4 * 48 + 1.0)
    tq = prof.step_seconds("qlora", f, dequant_gparams=2.0)
    assert tq == pytest.approx(t + 0.004)
    assert prof.achieved_tflops("lora", flops=4e14, features=f) == pytest.approx(4e14 / t / 1e12)
    # knots: log interpolation, clamped at the ends
    assert prof.achieved_tflops("lora", 1024) == pytest.approx(100.0)
    assert prof.achieved_tflops("lora", 10**6) == pytest.approx(300.0)
    mid = prof.achieved_tflops("lora", 2896)  # ~ geometric middle of 1024 and 8192
    assert 180 < mid < 220
    assert prof.achieved_tflops("lora") == pytest.approx(200.0)
    assert prof.achieved_tflops("qlora", 4096) == pytest.approx(80.0)
    assert prof.step_seconds("ppo", f) is None
    nodq = make_profile(qlora_dequant=None)
    assert nodq.step_seconds("qlora", f, dequant_gparams=1.0) is None


def test_every_nf4_recipe_is_timed_as_its_16bit_twin_plus_dequantisation():
    prof = make_profile()
    f = step_features(flops=4e14, layers=24, hidden=896, passes=2)
    # DPO over QLoRA: DPO's LoRA model plus the dequantisation (not DPO's LoRA model alone, a sibling)
    assert prof.step_seconds("dpo+qlora", f, dequant_gparams=2.0) == pytest.approx(
        prof.step_seconds("dpo+lora", f) + 0.004)
    # QDoRA: DoRA's model (here its sibling, LoRA) plus the dequantisation, by the adapter's 16-bit twin
    assert prof.step_seconds("qdora", f, dequant_gparams=1.0) is None  # no DoRA model and no LoRA sibling of it
    dora = make_profile(throughput={**prof.throughput, "dora": prof.throughput["lora"]})
    assert dora.step_seconds("qdora", f, dequant_gparams=1.0) == pytest.approx(dora.step_seconds("dora", f) + 0.002)


def test_profile_key():
    assert profile_key("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert profile_key("h100-sxm") == "h100-sxm"
    with pytest.raises(ProfileError):
        profile_key("///")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def _one_line(exc) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_corrupt_json_is_a_clear_error(tmp_path):
    _write(tmp_path, "h100-sxm.json", '{"schema": "vramplan.profile", "version": 1,')
    with pytest.raises(ProfileError) as ei:
        load_profile("h100-sxm", search=[tmp_path])
    text = _one_line(ei.value)
    assert "corrupt" in text and "h100-sxm.json" in text
    assert isinstance(ei.value, VramplanError) and ei.value.exit_code == 2


def test_unknown_version_is_a_clear_error(tmp_path):
    doc = make_profile().to_json()
    doc["version"] = 99
    _write(tmp_path, "h100-sxm.json", json.dumps(doc))
    with pytest.raises(ProfileError) as ei:
        load_profile("h100-sxm", search=[tmp_path])
    text = _one_line(ei.value)
    assert "version 99" in text and f"version {SCHEMA_VERSION}" in text


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(schema="something-else"), "not a vramplan profile"),
    (lambda d: d.pop("gpu"), "'gpu'"),
    (lambda d: d.update(device=[]), "device must be a JSON object"),
    (lambda d: d["allocator"].update(slope=50), "implausible"),
    (lambda d: d["allocator"].update(intercept_bytes="big"), "intercept_bytes"),
    (lambda d: d["context"].update(bytes=-1), "non-negative"),
    (lambda d: d["activation_factors"]["lora"].update(factor=0), "activation factor"),
    (lambda d: d["throughput"]["lora"].update(coef=[1, 2]), "coef"),
    (lambda d: d["throughput"]["lora"].update(coef=[-1, 0, 0, 0]), "non-negative"),
    (lambda d: d["throughput"]["lora"].update(features=["x"]), "features"),
    (lambda d: d["source"].pop("log"), "source.log"),
    (lambda d: d["holdout"]["reserved"].update(median_rel="x"), "median_rel"),
])
def test_invalid_fields_are_clear_errors(tmp_path, mutate, words):
    doc = make_profile().to_json()
    mutate(doc)
    p = _write(tmp_path, "x.json", json.dumps(doc))
    with pytest.raises(ProfileError) as ei:
        read_profile(p)
    assert words in _one_line(ei.value)


def test_top_level_not_an_object(tmp_path):
    p = _write(tmp_path, "x.json", "[1, 2]")
    with pytest.raises(ProfileError, match="JSON object"):
        read_profile(p)


def test_lookup_order_and_absence(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_profile(created="first").save(a / "h100-sxm.json")
    make_profile(created="second").save(b / "h100-sxm.json")
    assert load_profile("h100-sxm", search=[a, b]).created == "first"
    assert load_profile("h100-sxm", search=[b, a]).created == "second"
    assert load_profile("rtx4090", search=[a, b]) is None
    monkeypatch.setenv("VRAMPLAN_PROFILES", str(b))
    monkeypatch.chdir(tmp_path)
    assert find_profile("h100-sxm") == (b / "h100-sxm.json").resolve()
    assert load_profile("H100-SXM").created == "second"


def test_default_lookup_without_profiles_is_none(tmp_path, monkeypatch):
    monkeypatch.delenv("VRAMPLAN_PROFILES", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_profile("no-such-card-anywhere") is None


def test_residual_of():
    r = Residual.of([110, 95, 100], [100, 100, 100])
    assert r.n == 3
    assert r.median_rel == pytest.approx(0.0)
    assert r.max_under_rel == pytest.approx(0.05)
    assert r.max_over_rel == pytest.approx(0.10)
    assert Residual.of([], []).n == 0
    assert Residual.of([None], [1]).n == 0


# -- hostile input: every corruption is one ProfileError line, never a traceback ------------------

def _good_doc():
    return make_profile().to_json()


def _hostile(tmp_path, name, raw: bytes):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d["throughput"]["lora"].__setitem__("knots", [[0, 100.0]]), "positive tokens"),
    (lambda d: d["throughput"]["lora"]["residual"].__setitem__("max_over_rel", 1e12), "implausible"),
    (lambda d: d["holdout"]["reserved"].__setitem__("p90_abs_rel", -0.1), "non-negative"),
    (lambda d: d["allocator"].__setitem__("margin", -0.05), "margin"),
    (lambda d: d["context"].__setitem__("bytes", 1e300), "implausible"),
    (lambda d: d["device"].__setitem__("total_bytes", -1), "total_bytes"),
    (lambda d: d.__setitem__("stack", "../../etc"), "stack"),
    (lambda d: d["throughput"]["lora"].__setitem__("coef", [1e9, 0, 0, 0]), "implausible step time"),
])
def test_values_are_validated_not_only_shapes(tmp_path, mutate, words):
    doc = _good_doc()
    mutate(doc)
    p = _hostile(tmp_path, "h100-sxm.json", json.dumps(doc).encode())
    with pytest.raises(ProfileError, match=words) as e:
        read_profile(p)
    assert "\n" not in str(e.value)


def test_infinite_step_time_is_refused(tmp_path):
    text = json.dumps(_good_doc()).replace('"coef": [0.0001', '"coef": [Infinity')
    assert "Infinity" in text
    with pytest.raises(ProfileError, match="finite"):
        read_profile(_hostile(tmp_path, "h100-sxm.json", text.encode()))


@pytest.mark.parametrize("raw,words", [
    (lambda: json.dumps(_good_doc()).encode("utf-16"), "UTF-8"),
    (lambda: b"[" * 100_000 + b"]" * 100_000, "corrupt"),
    (lambda: b'{"schema": "vramplan.profile", "version": 1, "gpu": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "corrupt"),
    (lambda: b"\xff\xfe\x00garbage", "UTF-8"),
])
def test_corrupt_files_are_one_line(tmp_path, raw, words):
    with pytest.raises(ProfileError, match=words) as e:
        read_profile(_hostile(tmp_path, "h100-sxm.json", raw()))
    assert "\n" not in str(e.value)


def test_a_cpu_profile_renamed_for_a_card_is_refused(tmp_path):
    cpu = make_profile(gpu="cpu", device={"kind": "cpu", "name": "x86_64"}, allocated_source="dryrun",
                       context=None, workspace=None, allocator=None)
    cpu.save(tmp_path / "rtx4090.json")
    with pytest.raises(ProfileError, match="measured on 'cpu', not on 'rtx4090'"):
        load_profile("rtx4090", search=[tmp_path])
    # renamed inside too: still not a GPU measurement
    doc = cpu.to_json()
    doc["gpu"] = "rtx4090"
    (tmp_path / "rtx4090.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="not measured on a GPU"):
        load_profile("rtx4090", search=[tmp_path])


def test_a_profile_of_another_catalogue_card_is_refused(tmp_path):
    doc = make_profile().to_json()  # device: NVIDIA H100 80GB HBM3
    doc["gpu"] = "a100-80gb"
    (tmp_path / "a100-80gb.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="not on 'a100-80gb'"):
        load_profile("a100-80gb", search=[tmp_path])


def test_a_calibrated_card_outside_the_catalogue_is_usable(tmp_path, monkeypatch):
    from vramplan.gpus import get_gpu

    monkeypatch.setenv("VRAMPLAN_PROFILES", str(tmp_path))
    with pytest.raises(VramplanError):
        get_gpu("nvidia-rtx-pro-4500-blackwell")
    make_profile(gpu="nvidia-rtx-pro-4500-blackwell",
                 device={"kind": "cuda", "name": "NVIDIA RTX PRO 4500 Blackwell",
                         "nvml_name": "NVIDIA RTX PRO 4500 Blackwell", "total_bytes": 32 * 10**9,
                         "nvml_total_bytes": 34190917632}).save(tmp_path / "nvidia-rtx-pro-4500-blackwell.json")
    g = get_gpu("NVIDIA RTX PRO 4500 Blackwell")
    assert g.name == "nvidia-rtx-pro-4500-blackwell" and not g.custom
    # planned in what PyTorch can use (torch total_memory), not NVML's larger total (issue 12: usable capacity)
    assert g.memory_bytes == 32 * 10**9 < 34190917632 and g.display_name == "NVIDIA RTX PRO 4500 Blackwell"
    assert "usable" in g.sources["memory_bytes"]
    import vramplan

    e = vramplan.estimate("qwen2.5-0.5b", "lora", gpu=g.name, batch=1, seq=512)
    assert e.overheads.calibrated and e.overheads.is_calibrated("context")


def test_an_integer_beyond_float_range_is_one_line(tmp_path):
    text = json.dumps(_good_doc()).replace('"slope": 1.05', '"slope": 1' + "0" * 400)
    assert "0" * 400 in text
    with pytest.raises(ProfileError, match="finite number"):
        read_profile(_hostile(tmp_path, "h100-sxm.json", text.encode()))


def test_stack_figures_are_keyed_by_stack():
    prof = make_profile()
    feats = step_features(flops=1e12, layers=24, hidden=1024)
    assert prof.stack == "hf" and prof.applies_to(None) and prof.applies_to("HF") and not prof.applies_to("torchtune")
    assert prof.step_seconds("lora", feats) is not None and prof.step_seconds("lora", feats, stack="hf") is not None
    assert prof.step_seconds("lora", feats, stack="torchtune") is None
    assert prof.achieved_tflops("lora", 1024, stack="litgpt") is None and prof.achieved_tflops("lora", 1024) == 100.0
    doc = prof.to_json()
    assert doc["stack"] == "hf" and doc["scope"]["card"] == ["context", "workspace"]

"""Runtime overheads with and without a card's calibration profile (vramplan.overheads).

Profiles are built here (or fitted from a run of the CPU suite) into a temporary directory
named by $VRAMPLAN_PROFILES; the checkout's and the package's profile folders are swapped for
an empty one, so a profile shipped later does not change what these tests see.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import vramplan
from vramplan import overheads as overheads_mod
from vramplan import throughput as throughput_mod
from vramplan import profiles as profiles_mod
from vramplan.errors import ProfileError
from vramplan.cli import main as cli_main
from vramplan.config import make_config
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.overheads import (ACTIVATION_COMPONENTS, DEFAULT_CONTEXT_BYTES, DEFAULT_RESERVE_FRACTION, LOADED_COMPONENTS,
                                DEFAULT_UNCERTAINTY_FRACTION, device_total, runtime_overheads)
from vramplan.plan import device_totals as _total, estimate_config
from vramplan.profiles import AllocatorModel, Fitted, Profile, Residual, Throughput, read_profile
from vramplan.taxonomy import Component

MIB = 1 << 20
CARD = "a100-80gb"  # compute capability 8.0: default workspaces 2 x 8 MiB


@pytest.fixture
def profdir(tmp_path, monkeypatch):
    """An empty profile directory first in the lookup, and no other profile anywhere."""
    d = tmp_path / "profiles"
    d.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("VRAMPLAN_PROFILES", str(d))
    monkeypatch.chdir(empty)
    monkeypatch.setattr(profiles_mod, "REPO_DIR", empty)
    monkeypatch.setattr(profiles_mod, "PACKAGE_DIR", empty)
    return d


def bare_profile(**over) -> Profile:
    """A profile of CARD that calibrates nothing of the memory chain (every memory field None)."""
    kw = dict(gpu=CARD, device={"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
              versions={"driver": "580.159.04", "cuda": "13.0", "torch": "2.11.0+cu130"},
              created="2026-11-23T00:00:00Z", source=f"{CARD}.jsonl", source_info={}, allocated_source="torch.cuda",
              throughput={"lora": Throughput((1e-4, 0.0, 1 / 200e12, 0.0), ((4096, 150.0),), 4)})
    kw.update(over)
    return Profile(**kw)


def save(prof: Profile, d, name: str = CARD):
    return prof.save(d / f"{name}.json")


def est(method="lora", optimizer="adamw", model="qwen2.5-0.5b", batch=2, seq=1024, gpu=CARD):
    return vramplan.estimate(model, method, gpu=gpu, batch=batch, seq=seq, optimizer=optimizer)


def loaded(e) -> int:
    """The loaded-once state (weights, quantisation state, adapters, master weights): no default reserve."""
    return sum(e.components.get(c, 0) for c in LOADED_COMPONENTS)


def act_bytes(e) -> int:
    return sum(e.components.get(c, 0) for c in ACTIVATION_COMPONENTS)


def overheads_line(e) -> str:
    return next(a for a in e.assumptions if a.startswith("runtime overheads:"))


# -- defaults -----------------------------------------------------------------------------

def test_without_a_profile_every_figure_is_a_default(profdir):
    e = est()
    t = e.tensor_peak_bytes
    assert e.components[Component.CUDA_CONTEXT] == DEFAULT_CONTEXT_BYTES
    assert e.components[Component.WORKSPACE] == 16 * MIB
    assert e.components[Component.ALLOCATOR_RESERVE] == int(DEFAULT_RESERVE_FRACTION * (t - loaded(e)))
    assert 0 < loaded(e) < t
    assert e.peak_bytes == t + DEFAULT_CONTEXT_BYTES + 16 * MIB + int(DEFAULT_RESERVE_FRACTION * (t - loaded(e)))
    assert e.uncertainty_bytes == int(DEFAULT_UNCERTAINTY_FRACTION * t)
    assert not e.calibrated and not e.overheads.calibrated
    assert set(e.overheads.figures.values()) == {"default"}
    line = overheads_line(e)
    assert line.startswith(f"runtime overheads: defaults (no calibration profile for {CARD})")
    assert "+/-10% of the tensor peak (default)" in line
    j = e.to_json()["overheads"]
    assert j["calibrated"] is False and j["profile"] is None and j["uncertainty_fraction"] == 0.1


def test_none_fields_fall_back_to_defaults_and_say_so(profdir):
    base = est()
    path = save(bare_profile(), profdir)
    e = est()
    assert e.peak_bytes == base.peak_bytes and e.components == base.components
    assert e.uncertainty_bytes == base.uncertainty_bytes
    assert set(e.overheads.figures.values()) == {"default"} and not e.calibrated
    line = overheads_line(e)
    assert "defaults (profile without memory figures" in line and str(path) in line
    assert "CUDA context 512 MiB (default)" in line and "(default)" in line.split("allocator reserve")[1]
    # the throughput part of the same profile is used (vramplan.throughput reads profiles itself)
    assert e.throughput.calibrated and any("calibration profile" in a for a in e.assumptions if a.startswith("throughput"))


# -- calibrated figures change the estimate by exactly their difference -------------------

def test_calibrated_context_changes_the_total_by_exactly_its_difference(profdir):
    base = est()
    save(bare_profile(context=Fitted(300 * MIB, 6)), profdir)
    e = est()
    assert e.peak_bytes - base.peak_bytes == 300 * MIB - DEFAULT_CONTEXT_BYTES
    assert e.tensor_peak_bytes == base.tensor_peak_bytes
    assert e.overheads.figures == {"context": "calibrated", "workspace": "default", "allocator": "default",
                                   "activation_factor": "default"}
    assert e.calibrated
    # no allocator residuals: the default band, labelled so
    assert e.uncertainty_bytes == base.uncertainty_bytes and "(default)" in e.overheads.band_source
    line = overheads_line(e)
    assert "calibrated from profile" in line and "NVIDIA A100-SXM4-80GB" in line
    assert "driver 580.159.04" in line and "torch 2.11.0+cu130" in line and "CUDA 13.0" in line
    assert "CUDA context 300 MiB (calibrated)" in line
    j = e.to_json()["overheads"]
    assert j["profile_versions"]["driver"] == "580.159.04" and j["figures"]["context"] == "calibrated"


def test_calibrated_allocator_and_workspace_replace_the_reserve(profdir):
    alloc = AllocatorModel(1.05, 200 * MIB, n=9, by_method={"lora": 1.02},
                           residual=Residual(n=9, p90_abs_rel=0.01, max_under_rel=0.005))
    held = Residual(n=5, median_rel=0.0, median_abs_rel=0.01, p90_abs_rel=0.02, max_under_rel=0.015, max_over_rel=0.02)
    prof = bare_profile(workspace=Fitted(24 * MIB, 2), allocator=alloc, holdout={"reserved": held})
    path = save(prof, profdir)
    base = est()
    e = est()
    t = base.tensor_peak_bytes
    reserved = prof.reserved_bytes(t + 24 * MIB, "lora")
    assert reserved == int(alloc.reserve(t + 24 * MIB, 1.02)) and reserved % (2 * MIB) == 0
    assert e.peak_bytes == DEFAULT_CONTEXT_BYTES + reserved
    assert e.components[Component.WORKSPACE] == 24 * MIB
    assert e.components[Component.ALLOCATOR_RESERVE] == reserved - (t + 24 * MIB)
    assert e.overheads.figures["allocator"] == "calibrated" and e.overheads.figures["workspace"] == "calibrated"
    # the band: the held-out reserved residual (larger of p90 and worst under-prediction) of the reserved peak
    assert e.uncertainty_bytes == int(0.02 * reserved)
    assert "calibrated: residuals of the held-out peak reserved, n=5" in e.overheads.band_source
    assert "x 1.02 for lora" in overheads_line(e) and str(path) in overheads_line(e)
    # a method without its own correction uses the plain model
    f = est("full")
    assert f.peak_bytes == DEFAULT_CONTEXT_BYTES + prof.reserved_bytes(f.tensor_peak_bytes + 24 * MIB)


def test_activation_factor_scales_the_activation_components(profdir):
    base = est()
    save(bare_profile(activation_factors={"lora": Fitted(1.25, 4)}), profdir)
    e = est()
    corr = int(np.rint(0.25 * act_bytes(base)))
    assert corr > 0
    assert e.overheads.activation_correction_bytes == corr
    assert act_bytes(e) - act_bytes(base) == corr
    assert e.tensor_peak_bytes == base.tensor_peak_bytes + corr
    t = e.tensor_peak_bytes
    assert e.peak_bytes == t + DEFAULT_CONTEXT_BYTES + 16 * MIB + int(DEFAULT_RESERVE_FRACTION * (t - loaded(e)))
    assert e.overheads.figures["activation_factor"] == "calibrated"
    other = est("full")  # another method keeps factor 1, labelled default
    assert other.overheads.activation_factor == 1.0 and other.overheads.figures["activation_factor"] == "default"


# -- paged optimiser states -------------------------------------------------------------------

def test_paged_optimizer_states_get_no_allocator_reserve(profdir):
    plain = est("full", "adamw_8bit")
    paged = est("full", "paged_adamw_8bit")
    s = paged.components[Component.OPTIMIZER_STATES]
    assert s > 0 and s == plain.components[Component.OPTIMIZER_STATES]  # same 8-bit states, other memory
    t = paged.tensor_peak_bytes
    assert t == plain.tensor_peak_bytes
    assert plain.components[Component.ALLOCATOR_RESERVE] == int(DEFAULT_RESERVE_FRACTION * (t - loaded(plain)))
    assert paged.components[Component.ALLOCATOR_RESERVE] == int(DEFAULT_RESERVE_FRACTION * (t - s - loaded(paged)))
    assert paged.overheads.paged_bytes == s and "paged optimizer states" in overheads_line(paged)
    # with a calibrated allocator: reserved from the allocator's tensors only, the states added once
    prof = bare_profile(context=Fitted(400 * MIB, 3), workspace=Fitted(16 * MIB, 2), allocator=AllocatorModel(1.1, 64 * MIB))
    save(prof, profdir)
    cal = est("full", "paged_adamw_8bit")
    assert cal.peak_bytes == 400 * MIB + prof.reserved_bytes(t - s + 16 * MIB, "full") + s


# -- one implementation -------------------------------------------------------------------------

def full_profile() -> Profile:
    return bare_profile(context=Fitted(450 * MIB, 5), workspace=Fitted(16 * MIB, 2),
                        allocator=AllocatorModel(1.07, 96 * MIB, by_method={"full": 1.03}),
                        activation_factors={"full": Fitted(0.9, 3), "lora": Fitted(1.2, 3)})


@pytest.mark.parametrize("method, optimizer", [("lora", "adamw"), ("full", "paged_adamw_8bit"), ("full", "adamw")])
def test_planner_grid_and_calibration_chain_agree(profdir, method, optimizer):
    """estimate_config, the vectorised grid (planner.limits.device_totals) and calibration.predict.calibrated: the same bytes."""
    from vramplan.calibration.predict import analytic, calibrated

    prof = full_profile()
    save(prof, profdir)
    spec, card = get_model("qwen2.5-0.5b"), get_gpu(CARD)
    batches = np.array([1, 2, 4])
    cfg = make_config(spec, method, batch=1, seq=512, optimizer=optimizer)
    grid = _total(spec, cfg, card, batch=batches)
    for b, g in zip(batches, grid):
        c = cfg.with_(batch=int(b))
        e = estimate_config(spec, c, card)
        assert e.peak_bytes == g
        cal = calibrated(analytic(spec, c), spec, c, prof)
        assert cal.device_bytes == e.peak_bytes
        assert cal.allocated_bytes == e.overheads.allocated_bytes and cal.reserved_bytes == e.overheads.reserved_bytes
    # and the scalar and array entry points of overheads
    o = runtime_overheads(10 << 30, card, method=method, activation_bytes=3 << 30, paged_bytes=1 << 28)
    assert o.device_bytes == device_total(np.array([10 << 30]), card, method=method, activation_bytes=3 << 30,
                                          paged_bytes=1 << 28)[0]


def test_matrix_grid_and_fit_search_run_the_same_chain(profdir):
    """The vectorised callers (vramplan.matrix, vramplan.recommend) with every figure calibrated on one
    card and defaults on the others, paged 8-bit AdamW among the settings: each total is estimate's to the byte."""
    from vramplan.distributed import SINGLE, make_parallel
    from vramplan.matrix import SETTINGS_LADDER, feasibility_matrix, peak_grid
    from vramplan.plan import largest_batch
    from vramplan.recommend import search

    save(full_profile(), profdir)
    model, gpus = "qwen2.5-0.5b", f"{CARD},h100,rtx3080"
    g = peak_grid(model, "full,lora", gpus, [512, 1024], [1, 4], settings=SETTINGS_LADDER)
    for j, k, gi, si, bi in np.ndindex(g.peaks.shape[1:]):
        gc, opt = g.settings[k]
        e = vramplan.estimate(model, g.methods[j], gpu=g.gpus[gi], seq=g.seqs[si], batch=g.batches[bi],
                              grad_ckpt=gc, optimizer=opt)
        assert e.overheads.calibrated == (g.gpus[gi] == CARD)
        assert e.peak_bytes == g.peaks[0, j, k, gi, si, bi], (g.methods[j], g.settings[k], g.gpus[gi])
    paged = 0
    for ladder in (SETTINGS_LADDER, [(False, "paged_adamw_8bit")]):
        mx = feasibility_matrix(model, "full,lora", gpus, [512, 1024], ladder=ladder)
        for c in mx.cells:
            e = vramplan.estimate(c.model, c.method, gpu=c.gpu, seq=c.seq, batch=c.batch, grad_ckpt=c.grad_ckpt,
                                  optimizer=c.optimizer)
            assert (e.peak_bytes, e.tensor_peak_bytes) == (c.peak_bytes, c.tensor_peak_bytes), c
            assert largest_batch(get_model(model), e.config, get_gpu(c.gpu)) == c.max_batch, c
            paged += c.optimizer == "paged_adamw_8bit"
    assert paged >= 6
    spec, card = get_model(model), get_gpu(CARD)
    for method in ("full", "lora"):
        plans = search(spec, method, card, seq=512, rank=8, attn="sdpa",
                       parallels=[SINGLE, make_parallel(2, "zero3")]).plans
        assert {p.config.optimizer for p in plans} >= {"adamw_8bit", "paged_adamw_8bit"}
        for p in plans:
            assert p.peak_bytes == estimate_config(spec, p.config, card, parallel=p.parallel).peak_bytes, p.config


def test_band_prefers_held_out_device_totals_and_a_rewritten_profile_is_reread(profdir):
    held = {"device_total": Residual(n=4, p90_abs_rel=0.01, max_under_rel=0.03),
            "reserved": Residual(n=4, p90_abs_rel=0.02, max_under_rel=0.0)}
    prof = full_profile()
    save(dataclasses.replace(prof, holdout=held), profdir)
    e = est()
    assert e.uncertainty_bytes == int(0.03 * e.peak_bytes)
    assert "of the device total (calibrated: residuals of the held-out device total, n=4)" in e.overheads.band_source
    save(dataclasses.replace(prof, context=Fitted(prof.context.value + 10 * MIB, 5)), profdir)
    assert est().peak_bytes == e.peak_bytes + 10 * MIB


# -- bad profiles ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ('{"schema": "vramplan.profile", "version": 1,', "corrupt"),
    (None, "version 99"),
])
def test_bad_profile_is_one_line_and_exit_2(profdir, capsys, text, words):
    if text is None:
        doc = bare_profile().to_json()
        doc["version"] = 99
        text = json.dumps(doc)
    (profdir / f"{CARD}.json").write_text(text)
    rc = cli_main(["estimate", "--model", "qwen2.5-0.5b", "--method", "lora", "--gpu", CARD])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and words in err and f"{CARD}.json" in err


# -- a profile fitted from a real (CPU) calibration run -----------------------------------------

@pytest.mark.torch
@pytest.mark.slow
def test_profile_fitted_from_the_cpu_suite(profdir, tmp_path, monkeypatch):
    """The CPU suite's LoRA points, run for real (tiny models) and fitted: activation factor and
    throughput calibrated, nothing of the memory overheads measurable on a CPU -> defaults."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from vramplan.calibration import load_suite, run_calibration

    st = load_suite("cpu")
    pts = tuple(p for p in st.points if p.model == "tiny-llama" and p.method_key == "lora")
    assert len(pts) >= 2
    res = run_calibration(gpu="auto", suite=dataclasses.replace(st, points=pts), out=tmp_path / "run", device="cpu",
                          progress=False, report_dir=None, dryrun="all")
    prof = read_profile(res.profile_path)  # as the planner reads it (factors rounded to 6 digits in the file)
    assert prof.allocated_source == "dryrun" and prof.context is None and prof.allocator is None
    assert prof.is_calibrated("activation:lora")
    # plan with it as if it were the card's profile
    base = est()
    # a profile measured on the CPU, copied under a card's name, is refused for that card: one line
    (profdir / f"{CARD}.json").write_text(res.profile_path.read_text())
    with pytest.raises(ProfileError, match="measured on 'cpu', not on 'a100-80gb'"):
        est()
    (profdir / f"{CARD}.json").unlink()
    # handed to the planner as the card's profile, its activation factor applies
    monkeypatch.setattr(overheads_mod, "card_profile", lambda gpu: prof if gpu is not None else None)
    monkeypatch.setattr(throughput_mod, "_profile", lambda gpu: prof if gpu is not None else None)
    e = est()
    f = prof.activation_factor("lora")
    corr = int(np.rint((f - 1) * act_bytes(base)))
    assert e.overheads.figures == {"context": "default", "workspace": "default", "allocator": "default",
                                   "activation_factor": "calibrated"}
    assert e.tensor_peak_bytes == base.tensor_peak_bytes + corr
    t = e.tensor_peak_bytes
    assert e.peak_bytes == t + DEFAULT_CONTEXT_BYTES + 16 * MIB + int(DEFAULT_RESERVE_FRACTION * (t - loaded(e)))
    assert e.uncertainty_bytes == int(DEFAULT_UNCERTAINTY_FRACTION * t)  # no allocator residuals: default band
    assert "calibrated from profile" in overheads_line(e) and "+/-10% of the tensor peak (default)" in overheads_line(e)
    assert e.throughput.calibrated


def test_stack_figures_apply_only_to_the_stack_that_measured_them():
    """Card figures (context, workspace) apply to every stack; the allocator model and per-method
    factors only to the stack the profile measured (hf), and the planner says which it used."""
    from vramplan.overheads import runtime_overheads

    prof = Profile(gpu=CARD, device={"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, versions={}, created="t",
                   source="x.jsonl", source_info={}, allocated_source="torch.cuda",
                   context=Fitted(700 * MIB, 3), workspace=Fitted(24 * MIB, 2),
                   allocator=AllocatorModel(1.2, 0, n=5), activation_factors={"lora": Fitted(1.5, 4)})
    card = get_gpu(CARD)
    own = runtime_overheads(10 << 30, card, method="lora", activation_bytes=4 << 30, profile=prof, stack="hf")
    other = runtime_overheads(10 << 30, card, method="lora", activation_bytes=4 << 30, profile=prof, stack="torchtune")
    assert own.figures == dict.fromkeys(own.figures, "calibrated")
    assert other.figures == {"context": "calibrated", "workspace": "calibrated", "allocator": "default",
                             "activation_factor": "default"}
    assert other.components[Component.CUDA_CONTEXT] == 700 * MIB and other.activation_factor == 1.0
    assert own.activation_factor == 1.5 and own.reserved_bytes > other.reserved_bytes
    assert "measured with the hf stack, not torchtune" in other.source
    assert "card figures and hf stack figures" in own.source

"""The search's lower bound (``search.least_total``, ``DeviceTotals.floor``) never exceeds a plan it bounds.

``other_setups`` skips a stack or precision whose bound is above the card: the bound must be at or
below the device total of every plan the search would rank, on every card, stack and method.
"""

import pytest
from conftest import save_calibrated_a100

import vramplan
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.planner.checks import check_card
from vramplan.planner.limits import DeviceTotals
from vramplan.planner.search import least_total, search
from vramplan.stacks import stacks

CASES = [("llama-3.2-1b", "rtx3080"), ("llama-2-7b", "l4"), ("llama-2-13b", "rtx4000ada"), ("qwen2.5-0.5b", "t4")]


@pytest.mark.parametrize("model,gpu", CASES)
@pytest.mark.parametrize("method", ["full", "lora", "dora", "ia3", "dpo", "ppo"])
def test_least_total_is_at_or_below_every_plan(model, gpu, method):
    spec, card = get_model(model), get_gpu(gpu)
    checked = 0
    for fw in stacks():
        try:
            prec = check_card(None, method, None, "sdpa", card, fw)
        except vramplan.VramplanError:
            continue
        totals = DeviceTotals()
        least = least_total(spec, method, card, dict(framework=fw, precision=prec, seq=1024, totals=totals))
        mp = search(spec, method, card, framework=fw, precision=prec, seq=1024, totals=totals)
        if least is None:
            continue
        checked += 1
        assert least <= min(p.peak_bytes for p in mp.plans), (fw, least)
        assert least > 0
    assert checked  # the bound applied on at least one stack


def test_no_bound_on_several_gpus():
    from vramplan.distributed import make_parallel

    spec, card = get_model("llama-2-7b"), get_gpu("l4")
    assert least_total(spec, "full", card, dict(parallels=[make_parallel(2, "zero3")])) is None


def test_fit_still_lists_the_setups_that_fit():
    # the 13B model's PPO fits on none; full fine-tuning of a 3B on a 24 GiB card fits in pure bf16
    rep = vramplan.fit("3b", "rtx3090", methods=["full"])
    assert {s.detail["framework"] for s in rep.rows[0].alternatives} >= {"torchtune", "hf"}


@pytest.mark.parametrize("gpu", ["rtx4000ada", "a100-80gb", "t4"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora", "ia3", "dpo", "ppo"])
def test_estimate_peaks_equal_estimate_config(gpu, method):
    """The light peaks the technique advice compares are the estimate's, to the byte (one GPU and sharded)."""
    from vramplan.config import make_config
    from vramplan.distributed import make_parallel
    from vramplan.planner.estimating import estimate_config, estimate_peaks

    spec, card = get_model("llama-3.2-1b"), get_gpu(gpu)
    prec = check_card(None, method, None, "sdpa", card, "hf")
    for fw, techs, par in [("hf", (), None), ("hf", ("liger_ce", "act_offload"), None), ("torchtune", (), None),
                           ("hf", (), make_parallel(4, "zero3"))]:
        p = prec if fw == "hf" else check_card(None, method, None, "sdpa", card, fw)
        cfg = make_config(spec, method, batch=4, seq=1024, precision=p, framework=fw, techniques=techs)
        est = estimate_config(spec, cfg, card, parallel=par, with_time=False)
        peaks = estimate_peaks(spec, cfg, card, parallel=par)
        assert (peaks.peak_bytes, peaks.tensor_peak_bytes) == (est.peak_bytes, est.tensor_peak_bytes), (fw, techs, par)


@pytest.fixture
def calibrated_card(tmp_path, monkeypatch):
    """An a100-80gb profile with an allocator model, a method correction and activation factors 0.9 (full), 1.2 (lora)."""
    from vramplan.profiles import AllocatorModel, Fitted

    return save_calibrated_a100(tmp_path, monkeypatch, AllocatorModel(1.07, 96 << 20, by_method={"full": 1.03}),
                                {"full": Fitted(0.9, 3), "lora": Fitted(1.2, 3)})


def test_peaks_and_floor_with_a_calibrated_profile(calibrated_card):
    from vramplan.config import make_config
    from vramplan.overheads import card_profile
    from vramplan.planner.estimating import estimate_config, estimate_peaks

    card = calibrated_card
    assert card_profile(card) is not None
    spec = get_model("qwen2.5-0.5b")
    for method, optimizer in [("lora", "adamw"), ("full", "paged_adamw_8bit"), ("full", "adamw")]:
        cfg = make_config(spec, method, batch=2, seq=512, optimizer=optimizer)
        est = estimate_config(spec, cfg, card, with_time=False)
        peaks = estimate_peaks(spec, cfg, card)
        assert (peaks.peak_bytes, peaks.tensor_peak_bytes) == (est.peak_bytes, est.tensor_peak_bytes)
        assert est.overheads.calibrated
    # an activation factor below 1 shrinks the activations: no bound; above 1, a bound below every plan
    assert least_total(spec, "full", card, dict(seq=512)) is None
    least = least_total(spec, "lora", card, dict(seq=512))
    assert least is not None and least <= min(p.peak_bytes for p in search(spec, "lora", card, seq=512).plans)


@pytest.mark.parametrize("model,gpu", CASES)
@pytest.mark.parametrize("method", ["full", "lora", "dora", "ppo"])
def test_the_bound_for_every_optimiser_is_below_each_optimisers(model, gpu, method):
    from vramplan.config import make_config

    spec, card = get_model(model), get_gpu(gpu)
    totals = DeviceTotals()
    for opt in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        cfg = make_config(spec, method, optimizer=opt, seq=1024)
        any_opt = totals.floor(spec, cfg, card, any_optimizer=True)
        if any_opt is None:
            continue
        assert any_opt <= totals.floor(spec, cfg, card)
        assert any_opt == totals.floor(spec, cfg.with_(optimizer="adamw"), card, any_optimizer=True)
    # and stop_below answers the same question as the full bound
    full = least_total(spec, method, card, dict(seq=1024))
    for below in (full - 1, full + 1, card.memory_bytes + 1):
        quick = least_total(spec, method, card, dict(seq=1024), stop_below=below)
        assert (quick >= below) == (full >= below)

"""The search's lower bound (``search.least_total``, ``DeviceTotals.floor``) never exceeds a plan it bounds.

``other_setups`` skips a stack or precision whose bound is above the card: the bound must be at or
below the device total of every plan the search would rank, on every card, stack and method.
"""

import pytest

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
        least = least_total(spec, method, card, framework=fw, precision=prec, seq=1024, totals=totals)
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
    assert least_total(spec, "full", card, parallels=[make_parallel(2, "zero3")]) is None


def test_fit_still_lists_the_setups_that_fit():
    # the 13B model's PPO fits on none; full fine-tuning of a 3B on a 24 GiB card fits in pure bf16
    rep = vramplan.fit("3b", "rtx3090", methods=["full"])
    assert {s.detail["framework"] for s in rep.rows[0].alternatives} >= {"torchtune", "hf"}

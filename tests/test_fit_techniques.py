"""`vramplan fit` recommends memory-saving techniques: the cheapest set that makes a plan fit, each with its saving.

Every saving is checked against the estimate itself (with and without the technique), and every
recommended set against the estimate with the set on: nothing here trusts the recommender's own
bookkeeping.
"""

import json

import pytest

import vramplan
from vramplan.cli import main
from vramplan.config import make_config
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.plan import estimate_config, resolve_gpu
from vramplan.recommend import MIN_SAVING_BYTES, recommend_techniques
from vramplan.stacks import techniques

M = get_model("llama-3-8b")
GIB = 1 << 30


def peak(cfg, card, techs=None):
    c = cfg if techs is None else cfg.with_techniques(tuple(cfg.techniques) + tuple(techs))
    return estimate_config(M, c, card).peak_bytes


@pytest.fixture(scope="module")
def long_lora():
    """LoRA at 4 x 4096 tokens with GC on a 28 GiB card: does not fit as is (HF's fp32 logits)."""
    card = resolve_gpu(None, "28GiB")
    cfg = make_config(M, "lora", batch=4, seq=4096, grad_ckpt=True)
    return cfg, card, recommend_techniques(M, cfg, card, margin=0.1)


def test_recommended_set_makes_it_fit_and_is_minimal(long_lora):
    cfg, card, adv = long_lora
    usable = int(card.memory_bytes * 0.9)
    assert adv.needed and peak(cfg, card) > card.memory_bytes           # without: does not fit at all
    assert adv.recommended and adv.comfortable and adv.fits
    with_set = peak(cfg, card, adv.techniques)
    assert with_set == adv.peak_with_bytes and with_set <= usable       # with: fits with the margin
    for name in adv.techniques:                                         # minimal: none can be dropped
        assert peak(cfg, card, [t for t in adv.techniques if t != name]) > usable


def test_savings_are_positive_and_equal_the_estimate_difference(long_lora):
    cfg, card, adv = long_lora
    base = peak(cfg, card)
    assert adv.peak_bytes == base
    assert adv.savings
    for s in adv.savings:                                               # each technique alone
        assert s.saving_bytes >= MIN_SAVING_BYTES
        assert s.saving_bytes == base - peak(cfg, card, [s.technique])
        assert s.cost == techniques()[s.technique].cost_for(cfg)
    # in the set the savings are marginal: they add up to the difference with the whole set on
    assert all(s.saving_bytes > 0 for s in adv.recommended)
    assert sum(s.saving_bytes for s in adv.recommended) == base - adv.peak_with_bytes == adv.saving_bytes
    # listed cheapest first, then largest saving
    keys = [(s.cost, -s.saving_bytes) for s in adv.savings]
    assert keys == sorted(keys)


def test_inapplicable_techniques_are_not_listed():
    card = get_gpu("rtx4090")
    tt = recommend_techniques(M, make_config(M, "lora", seq=4096, framework="torchtune"), card)
    assert "chunked_ce" not in {s.technique for s in tt.savings}       # torchtune's loss is already chunked
    us = recommend_techniques(M, make_config(M, "lora", seq=4096, framework="unsloth"), card)
    assert not {"chunked_ce", "liger_ce"} & {s.technique for s in us.savings}  # already a fused loss
    lora = recommend_techniques(M, make_config(M, "lora", seq=4096, grad_ckpt=True), card)
    names = {s.technique for s in lora.savings}
    assert not {"opt_offload", "opt_in_bwd", "padding", "selective_ckpt"} & names  # few MiB of adapter state; GC on
    on = recommend_techniques(M, make_config(M, "lora", seq=4096, techniques="liger_ce"), card)
    assert not {"liger_ce", "chunked_ce"} & {s.technique for s in on.savings}  # on already / excluded by it


def test_a_comfortable_config_lists_savings_and_recommends_nothing():
    card = get_gpu("a100-80gb")
    adv = recommend_techniques(M, make_config(M, "lora", batch=2, seq=2048), card)
    assert not adv.needed and adv.recommended == [] and adv.peak_with_bytes == adv.peak_bytes
    assert {"liger_ce", "chunked_ce"} <= {s.technique for s in adv.savings}


def test_full_needs_optimizer_techniques_and_says_when_they_are_not_enough():
    adv = recommend_techniques(M, make_config(M, "full", grad_ckpt=True, optimizer="adamw_8bit"), get_gpu("rtx4090"))
    assert {"opt_in_bwd", "opt_offload"} <= {s.technique for s in adv.savings}
    assert adv.needed and not adv.fits and adv.peak_with_bytes > adv.capacity_bytes
    assert peak(adv.config, get_gpu("rtx4090"), adv.techniques) == adv.peak_with_bytes


def test_fit_row_recommends_techniques_that_make_it_fit():
    rep = vramplan.fit("llama-3-8b", "rtx4090", seq=8192, methods=["qlora"])
    row = rep.rows[0]
    adv = row.techniques
    usable = int(rep.capacity_bytes * (1 - rep.margin))
    assert row.best is None and not row.fits                             # nothing fits as is
    assert adv.config == row.estimate.config and adv.recommended
    card = get_gpu("rtx4090")
    assert peak(adv.config, card) > rep.capacity_bytes
    assert peak(adv.config, card, adv.techniques) <= usable
    # and the fastest plan with them: it fits, and uses them
    assert adv.plan is not None and adv.plan.fits
    assert set(adv.techniques) <= set(adv.plan.config.techniques)
    assert estimate_config(M, adv.plan.config, card).peak_bytes <= usable


def test_fit_with_techniques_uses_them_on_every_plan():
    rep = vramplan.fit("llama-3-8b", "rtx4090", seq=4096, methods=["lora"], techniques="liger_ce")
    assert rep.techniques == ("liger_ce",)
    assert all(p.config.techniques == ("liger_ce",) for p in rep.rows[0].plans)
    assert "liger_ce" not in {s.technique for s in rep.rows[0].techniques.savings}
    assert any("Liger" in a for a in rep.assumptions)


def test_fit_json_serialises_the_advice(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--gpu", "rtx4090", "--seq", "8192", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["framework"] == "hf" and d["techniques"] == []
    adv = {r["method"]: r["techniques"] for r in d["rows"]}["qlora"]
    assert adv["needed"] and adv["recommended_techniques"] and adv["comfortable"]
    for s in adv["savings"] + adv["recommended"]:
        assert isinstance(s["saving_bytes"], int) and s["saving_bytes"] > 0 and "cost_source" in s
    assert adv["plan"]["fits"]


def test_cli_fit_prints_the_techniques(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--gpu", "rtx4090", "--seq", "8192"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "memory-saving techniques" in out and "--techniques" in out and "GiB" in out and "makes it fit" in out


@pytest.mark.parametrize("argv, needle", [
    (["fit", "--model", "8b", "--gpu", "rtx4090", "--framework", "torchtun"], "did you mean torchtune"),
    (["fit", "--model", "8b", "--gpu", "rtx4090", "--techniques", "chunked_cee"], "did you mean chunked_ce"),
    (["fit", "--model", "8b", "--gpu", "rtx4090", "--techniques", "chunked_ce,liger_ce"], "choose one"),
    (["matrix", "--models", "8b", "--gpus", "rtx4090", "--framework", "unslot"], "did you mean unsloth"),
    (["matrix", "--models", "8b", "--gpus", "rtx4090", "--techniques", "liger"], "did you mean liger_ce"),
    (["estimate", "--model", "8b", "--gpu", "rtx4090", "--framework", "lit"], "unknown framework"),
])
def test_unknown_framework_or_technique_is_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_technique_advice_for_grpo_with_colocated_vllm_judges_the_steps_share_of_the_card():
    """GRPO with vLLM colocated: the step has the card less vLLM's share (``estimate_config``'s capacity), so the
    technique advice judges its savings and its "fits" against that share, not the whole card, and the plan fit
    shows with the techniques on stays within it."""
    opts = {"generation": "vllm-colocate", "vllm_gpu_memory_utilization": 0.3}
    spec, card = get_model("1b"), get_gpu("rtx4090")
    cfg = make_config(spec, "grpo", seq=1024, method_options=opts)
    est = estimate_config(spec, cfg, card)
    assert est.capacity_bytes == int(card.memory_bytes * 0.7) < card.memory_bytes
    advice = recommend_techniques(spec, cfg, card, base=est)
    assert advice.capacity_bytes == est.capacity_bytes
    assert advice.fits == (advice.peak_with_bytes <= est.capacity_bytes)
    plain = recommend_techniques(spec, make_config(spec, "grpo", seq=1024), card)
    assert plain.capacity_bytes == card.memory_bytes  # no colocated engine: the whole card
    for row in vramplan.fit("13b", "rtx4000ada", methods=["grpo"], method_options=opts).rows:
        adv = row.techniques
        assert adv is not None and adv.capacity_bytes == row.estimate.capacity_bytes < get_gpu("rtx4000ada").memory_bytes
        if adv.plan is not None:
            assert adv.plan.capacity_bytes == adv.capacity_bytes and adv.plan.peak_bytes <= adv.plan.capacity_bytes

"""`vramplan fit` as a recommender: the fastest plan that fits with its margin, the ranking, what would fit."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import vramplan
from vramplan.config import make_config
from vramplan.distributed import make_parallel, parallel_step_memory
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.plan import estimate_config
from vramplan.recommend import search, what_would_fit
from vramplan.verdict import Verdict

METHODS = ["full", "lora", "qlora", "dora", "ia3", "dpo", "ppo"]


@settings(max_examples=25, deadline=None)
@given(model=st.sampled_from(["qwen2.5-0.5b", "llama-3.2-1b", "llama-2-7b", "llama-2-13b"]),
       gpu=st.sampled_from(["rtx3080", "rtx4090", "l4", "a100-80gb", "rtx4000ada"]),
       seq=st.sampled_from([512, 2048, 4096]), margin=st.sampled_from([0.0, 0.1, 0.15, 0.3]),
       method=st.sampled_from(METHODS))
def test_recommended_plan_always_fits_with_its_margin(model, gpu, seq, margin, method):
    rep = vramplan.fit(model, gpu, seq=seq, margin=margin, methods=[method])
    row = rep.rows[0]
    usable = rep.capacity_bytes * (1 - margin)
    if row.best is not None:
        assert row.best.peak_bytes <= usable
        # the exact estimate of the recommended configuration, not only the search's grid value
        assert row.estimate.peak_bytes <= usable
        assert row.estimate.config == row.best.config
        assert row.fits
    for p in row.plans:
        assert p.fits == (p.peak_bytes <= p.usable_bytes)


@settings(max_examples=15, deadline=None)
@given(gpus=st.sampled_from([2, 4, 8]), strategy=st.sampled_from(["ddp", "zero1", "zero2", "zero3", "fsdp"]),
       method=st.sampled_from(["full", "lora", "dpo"]), global_batch=st.sampled_from([None, 16, 64]))
def test_multi_gpu_recommendation_fits_per_gpu(gpus, strategy, method, global_batch):
    rep = vramplan.fit("llama-2-7b", "a100-40gb", gpus=gpus, strategy=strategy, methods=[method],
                       global_batch=global_batch)
    row = rep.rows[0]
    if row.best is not None:
        assert row.estimate.peak_bytes <= rep.capacity_bytes * (1 - rep.margin)
        assert row.estimate.gpus == gpus and row.estimate.strategy == strategy
    for p in row.plans:
        if global_batch is not None:
            assert p.config.batch * p.config.grad_accum * gpus == global_batch


def test_default_margin_means_comfortable():
    """The best plan keeps the 15% margin: comfortable, or tight only because its published band
    reaches the card (vramplan.bands)."""
    from vramplan.bands import band_for_config

    rep = vramplan.fit("llama-2-7b", "rtx4090")
    for r in rep.rows:
        if r.best is not None:
            est = r.estimate
            assert est.peak_bytes <= 0.85 * rep.capacity_bytes
            hi = band_for_config(est.config).hi
            want = Verdict.TIGHT if est.peak_bytes * (1 + hi) > rep.capacity_bytes else Verdict.COMFORTABLE
            assert r.verdict is want


def test_ranking_is_by_tokens_per_second_among_plans_that_fit():
    mp = search(get_model("llama-3.2-1b"), "lora", get_gpu("rtx4090"), seq=2048)
    fits = [p for p in mp.plans if p.fits]
    assert fits and mp.best is fits[0]
    own = [p for p in fits if p.fallback is None]
    assert fits[:len(own)] == own  # the QLoRA fallback ranks after every LoRA plan that fits
    for group in (own, fits[len(own):]):
        tps = [p.tokens_per_s for p in group]
        assert tps == sorted(tps, reverse=True)
    assert all(not p.fits for p in mp.plans[len(fits):])
    assert [p.rank for p in mp.plans] == list(range(1, len(mp.plans) + 1))
    assert mp.best.reason.startswith("best")
    assert all(p.reason for p in mp.plans)


def test_best_is_the_fastest_by_brute_force():
    """Re-evaluate every (settings, micro-batch) one by one: no faster configuration fits (under the
    search's own comfortable limit: the margin, and the band's upper end)."""
    from vramplan.bands import band_for_config
    from vramplan.throughput import step_time
    from vramplan.verdict import comfortable_limit

    spec, card = get_model("qwen2.5-0.5b"), get_gpu("rtx3080")
    mp = search(spec, "full", card, seq=1024, margin=0.15)
    best = 0.0
    for gc in (False, True):
        for opt in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
            for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
                cfg = make_config(spec, "full", batch=b, seq=1024, grad_ckpt=gc, optimizer=opt)
                usable = comfortable_limit(card.memory_bytes, band_for_config(cfg).hi, 0.15)
                if estimate_config(spec, cfg, card).peak_bytes <= usable:
                    best = max(best, float(step_time(spec, cfg, card).tokens_per_s))
    assert mp.best.tokens_per_s >= best * (1 - 1e-9)


def test_gradient_checkpointing_and_8bit_lose_when_not_needed():
    mp = search(get_model("llama-3.2-1b"), "lora", get_gpu("a100-80gb"), seq=1024)
    assert not mp.best.config.grad_ckpt and mp.best.config.optimizer == "adamw"
    gc = next(p for p in mp.plans if p.config.grad_ckpt and p.fits)
    assert "gradient checkpointing" in gc.reason


# (mistral-7b's DPO LoRA is only "tight" on a 24 GB card since the HF band holds the published DPO rows: a 32 GB card)
@pytest.mark.parametrize("model,gpu,kw", [("7b", "rtx4090", {}), ("mistral-7b", "rtx5090", {}),
                                          ("3b", "rtx3090", {"framework": "torchtune"})])
def test_lora_that_fits_is_never_replaced_by_its_qlora_fallback(model, gpu, kw):
    rep = vramplan.fit(model, gpu, methods=["lora", "dpo"], **kw)
    for r in rep.rows:
        own = [p for p in r.plans if p.fallback is None and p.fits]
        assert own, "the 16-bit LoRA fits on this card"
        assert r.best is own[0] and r.adapter == "lora" and r.method == r.requested
        assert not any("does not fit" in n for n in r.notes)
        assert r.label == r.requested


def test_fallback_row_is_named_for_what_it_runs():
    rep = vramplan.fit("13b", "rtx4090", methods=["lora"])
    r = rep.rows[0]
    assert r.adapter == "qlora" and r.method == "qlora" and r.requested == "lora" and r.label == "lora → qlora"
    assert r.to_json()["recipe"] == "qlora"
    least = min(p.peak_bytes for p in r.plans if p.fallback is None)
    assert least > rep.capacity_bytes and any(f"{least / 2**30:.2f} GiB" in n for n in r.notes)


def test_lora_falls_back_to_qlora_and_says_why():
    rep = vramplan.fit("13b", "rtx4000ada", methods=["lora", "dpo"])
    for r in rep.rows:
        # the plan shown: recommended (comfortable) or tight (DPO, whose HF band is wide)
        assert r.chosen is not None and r.chosen.adapter == "qlora" and r.fits
        assert (r.best is r.chosen) == (r.verdict.value == "comfortable")
        assert any("QLoRA fallback" in n for n in r.notes)
        lora_plans = [p for p in r.plans if p.adapter == "lora"]
        assert lora_plans and all(not p.fits for p in lora_plans)
        for p in lora_plans:  # "does not fit" only when it does not fit the card at all; else "tight"
            assert ("does not fit" in p.reason) == (p.peak_bytes > p.capacity_bytes)
            assert p.peak_bytes > p.capacity_bytes or p.reason.startswith("tight")


def test_nothing_fits_says_what_would():
    # (DoRA on this card now falls back to QDoRA, which fits: tests/test_four_bit_adapters.py; full does not)
    # (7b: a 13b full fine-tune on one card is over every card's comfortable limit with the HF band)
    rep = vramplan.fit("7b", "rtx4000ada", methods=["full"])
    full = rep.rows[0]
    assert full.best is None and not full.fits
    assert "gpus" in {s.kind for s in full.suggestions}
    assert full.notes and "would fit" in full.notes[-1]
    card = next(s for s in full.suggestions if s.kind == "gpu")
    # the suggested card really fits the least-memory settings, with the margin
    spec = get_model("7b")
    cfg = make_config(spec, "full", grad_ckpt=True, optimizer="adamw_8bit", seq=2048)
    est = estimate_config(spec, cfg, get_gpu(card.detail["gpu"]))
    assert est.peak_bytes <= est.capacity_bytes * (1 - rep.margin)
    assert est.capacity_bytes > rep.capacity_bytes
    n = next(s for s in full.suggestions if s.kind == "gpus")
    for strategy in n.detail["strategies"]:
        par = make_parallel(n.detail["gpus"], strategy)
        assert estimate_config(spec, cfg, get_gpu("rtx4000ada"), parallel=par).peak_bytes <= est.capacity_bytes


def test_nothing_fits_after_the_four_bit_fallback_suggests_for_it():
    rep = vramplan.fit("70b", "rtx4000ada", methods=["dora"])
    dora = rep.rows[0]
    assert dora.best is None and not dora.fits and dora.recipe == "qdora"
    assert "as qdora" in dora.notes[-1]
    card = next(s for s in dora.suggestions if s.kind == "gpu")
    spec = get_model("70b")
    cfg = make_config(spec, "qdora", grad_ckpt=True, optimizer="adamw_8bit", seq=2048)
    est = estimate_config(spec, cfg, get_gpu(card.detail["gpu"]))
    assert est.peak_bytes <= est.capacity_bytes * (1 - rep.margin)


def test_shorter_sequence_suggestion_fits():
    spec, card = get_model("llama-2-7b"), get_gpu("rtx4090")
    out = what_would_fit(spec, "dora", card, seq=8192)
    seq = next(s for s in out if s.kind == "seq").detail["seq"]
    cfg = make_config(spec, "dora", grad_ckpt=True, optimizer="adamw_8bit", seq=seq)
    assert estimate_config(spec, cfg, card).peak_bytes <= card.memory_bytes * 0.85
    assert seq < 8192


def test_several_gpus_search_the_strategy():
    rep = vramplan.fit("llama-2-7b", "a100-40gb", gpus=8, methods=["full"])
    row = rep.rows[0]
    assert row.best is not None and row.best.parallel.strategy in ("zero1", "zero2", "zero3", "fsdp")
    assert {p.parallel.strategy for p in row.plans} == {"ddp", "zero1", "zero2", "zero3", "fsdp"}
    assert rep.strategy is None and rep.gpus == 8


def test_fixed_settings_are_not_searched():
    rep = vramplan.fit("llama-3.2-1b", "rtx4090", methods=["lora"], optimizer="adamw_8bit", grad_ckpt=True, rank=16,
                       attn="sdpa", batch=2)
    for p in rep.rows[0].plans:
        c = p.config
        assert (c.optimizer, c.grad_ckpt, c.rank, c.attn, c.batch) == ("adamw_8bit", True, 16, "sdpa", 2)


def test_tokens_give_time_to_train():
    rep = vramplan.fit("llama-3.2-1b", "a100-80gb", methods=["lora"], tokens="50M", epochs=2)
    r = rep.rows[0]
    assert r.time_to_train_s == pytest.approx(1e8 / r.tokens_per_s, rel=1e-6)
    assert r.gpu_hours == pytest.approx(r.time_to_train_s / 3600, rel=1e-6)
    assert r.best.time_to_train_s == pytest.approx(1e8 / r.best.tokens_per_s, rel=1e-6)


def test_json_has_ranked_plans_and_keeps_the_old_keys():
    rep = vramplan.fit("13b", "rtx4000ada", top=5)
    j = json.loads(json.dumps(rep.to_json()))
    for row in j["rows"]:
        for k in ("method", "adapter", "fits", "peak_bytes", "capacity_bytes", "max_batch", "max_seq", "settings",
                  "notes", "estimate", "tokens_per_s", "plans", "suggestions", "recommended"):
            assert k in row
        assert len(row["plans"]) <= 5 and [p["rank"] for p in row["plans"]] == list(range(1, len(row["plans"]) + 1))
        assert all(isinstance(p["peak_bytes"], int) for p in row["plans"])


def test_cli_fit_top_prints_reasons(capsys):
    from vramplan.cli import main

    assert main(["fit", "--model", "1b", "--gpu", "rtx4090", "--top", "3", "--tokens", "10M"]) == 0
    out = capsys.readouterr().out
    assert "why not first" in out and "slower" in out and "tok/s" in out and "time" in out


def test_bad_input():
    with pytest.raises(vramplan.VramplanError, match="--gpus must be a positive integer"):
        vramplan.fit("7b", "l4", gpus=0)
    with pytest.raises(vramplan.VramplanError, match="unknown strategy"):
        vramplan.fit("7b", "l4", gpus=2, strategy="tp")
    with pytest.raises(vramplan.VramplanError, match="margin"):
        vramplan.fit("7b", "l4", margin=1.5)
    with pytest.raises(vramplan.VramplanError, match="not a multiple"):
        vramplan.fit("7b", "l4", gpus=4, global_batch=6)
    with pytest.raises(vramplan.VramplanError, match="--global-batch must be a positive integer"):
        vramplan.fit("7b", "l4", global_batch=0)


def test_per_gpu_memory_never_grows_with_gpus_under_zero3_in_fit():
    spec = get_model("llama-2-13b")
    cfg = make_config(spec, "full", grad_ckpt=True)
    peaks = [float(parallel_step_memory(spec, cfg, make_parallel(n, "zero3"), batch=np.array([1, 4])).peak[1])
             for n in (1, 2, 4, 8, 16)]
    assert peaks == sorted(peaks, reverse=True)


def test_fit_suggests_other_stacks_and_precisions_that_turn_a_no_into_a_fit():
    rep = vramplan.fit("3b", "rtx3090", methods=["full"])
    r = rep.rows[0]
    assert r.best is None and not r.fits
    by = {(s.detail["framework"], s.detail["precision"]): s for s in r.alternatives}
    assert ("torchtune", "bf16") in by and ("hf", "bf16") in by
    for s in r.alternatives:  # each really fits on the card with that setup
        assert s.detail["peak_bytes"] <= rep.capacity_bytes
        again = vramplan.fit("3b", "rtx3090", methods=["full"], framework=s.detail["framework"],
                             precision=s.detail["precision"])
        assert again.rows[0].fits
    assert r.to_json()["alternatives"]
    # liger_ce and the other techniques are suggested too (TechniqueAdvice)
    assert r.techniques.recommended and r.techniques.fits


def test_nothing_else_is_suggested_when_the_plan_is_comfortable():
    rep = vramplan.fit("1b", "a100-80gb", methods=["lora"])
    assert rep.rows[0].best is not None and rep.rows[0].alternatives == []

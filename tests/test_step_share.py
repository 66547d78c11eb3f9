"""A method whose step has only part of the card (GRPO with vLLM colocated: vLLM holds
``vllm_gpu_memory_utilization`` of whichever card it runs on): what would fit and the cards
command judge each card on the step's part of it (planner.estimating.step_capacity), and never
offer a card on which vLLM's own weights do not load into its part."""

import pytest

import vramplan
from vramplan.bands import band_for_config
from vramplan.config import make_config
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.planner.estimating import estimate_config, step_capacity
from vramplan.planner.fitting import fit_cards
from vramplan.planner.search import what_would_fit
from vramplan.verdict import DEFAULT_MARGIN, Verdict, comfortable_limit

OPTS = {"generation": "vllm-colocate", "vllm_gpu_memory_utilization": 0.3}


def _frugal(spec, seq):
    """what_would_fit's least-memory GRPO configuration (GC, 8-bit AdamW, the QLoRA fallback, batch 1, sdpa)."""
    return make_config(spec, "grpo", adapter="qlora", batch=1, grad_ckpt=True, optimizer="adamw_8bit", attn="sdpa",
                       rank=8, seq=seq, method_options=OPTS)


def _comfortable_on_the_steps_share(spec, cfg, card) -> bool:
    est = estimate_config(spec, cfg, card)
    assert est.capacity_bytes == step_capacity(card, cfg) == int(card.memory_bytes * 0.7)
    hard_met = all(c.met for c in est.constraints if c.hard)
    return hard_met and est.peak_bytes <= comfortable_limit(est.capacity_bytes, band_for_config(cfg).hi,
                                                            DEFAULT_MARGIN)


@pytest.mark.parametrize("model,gpu,seq", [("8b", "t4", 4096), ("8b", "rtx4000ada", 2048),
                                           ("13b", "rtx4000ada", 2048), ("70b", "a100-80gb", 2048)])
def test_what_would_fit_judges_each_card_on_the_steps_share(model, gpu, seq):
    """Each suggested card, and the shorter sequence on this card, fit comfortably in what the step has there
    (the card less vLLM's 30%), vLLM's weights load in its 30%, and the suggested card is the smallest such."""
    from vramplan.gpus import catalogue

    spec, card = get_model(model), get_gpu(gpu)
    out = what_would_fit(spec, "grpo", card, seq=seq, method_options=OPTS)
    assert out, "the case must suggest something"
    cfg = _frugal(spec, seq)
    for s in out:
        if s.kind == "gpu":
            g = get_gpu(s.detail["gpu"])
            assert _comfortable_on_the_steps_share(spec, cfg, g), s.text
            assert s.detail.get("step_capacity_bytes") == step_capacity(g, cfg) < g.memory_bytes
            smaller = [c for c in catalogue().values() if card.memory_bytes < c.memory_bytes < g.memory_bytes
                       and c.bf16 and c.name != g.name]
            for c in smaller:  # none of the cards between this one and the suggestion would do
                assert not _comfortable_on_the_steps_share(spec, cfg, c), c.name
        elif s.kind == "seq":
            c = make_config(spec, "grpo", adapter="qlora", batch=1, grad_ckpt=True, optimizer="adamw_8bit",
                            attn="sdpa", rank=8, seq=s.detail["seq"], method_options=OPTS)
            assert _comfortable_on_the_steps_share(spec, c, card), s.text
    if not all(c.met for c in estimate_config(spec, cfg, card).constraints if c.hard):
        assert [s.kind for s in out] == ["gpu"]  # vLLM does not load here: nothing on this card helps


def test_what_would_fit_without_a_colocated_engine_uses_the_whole_card():
    spec, card = get_model("8b"), get_gpu("t4")
    for s in what_would_fit(spec, "grpo", card, seq=4096):
        assert "step_capacity_bytes" not in s.detail and "of it the step's" not in s.text


def test_cards_lists_only_cards_where_the_step_and_vllm_both_fit():
    """`fit --gpu all` ("cards where grpo fits with the margin") with vLLM colocated: every card listed is
    comfortable on the step's share and vLLM's weights load in the rest; an 8B LoRA policy's 16-bit weights
    (~15 GiB) do not load into 30% of a 40 or 48 GB card, so those cards are not listed although the step fits."""
    names = ["rtx4090", "a10g", "l40s", "a100-40gb", "a100-80gb"]
    rep = fit_cards("8b", methods=["grpo"], method_options=OPTS, cards=names, seq=1024)
    assert rep.rows
    for r in rep.rows:
        card = get_gpu(r.gpu)
        est = r.row.estimate
        assert est.capacity_bytes == step_capacity(card, est.config) == int(card.memory_bytes * 0.7)
        assert all(c.met for c in est.constraints) and r.row.fits
        assert r.row.verdict is Verdict.COMFORTABLE
    listed = {r.gpu for r in rep.rows}
    assert set(rep.no_fit) == set(names) - listed
    full = vramplan.fit("8b", "a100-40gb", methods=["grpo"], method_options=OPTS, seq=1024).rows[0]
    if not all(c.met for c in full.estimate.constraints if c.hard):
        assert "a100-40gb" not in listed


def test_the_search_leaves_out_a_recipe_whose_engine_cannot_start_and_falls_back():
    """8B GRPO with vLLM colocated on a 40 GB card: vLLM's 16-bit weights (16 GB) do not load in its 30% (11.9 GB),
    its 4-bit ones do. The search lists only grpo+qlora plans and the row fits comfortably as grpo+qlora, saying why
    (before: the 16-bit plan was chosen and the row said "no")."""
    report = vramplan.fit("8b", "a100-40gb", methods=["grpo"], method_options=OPTS)
    row = report.rows[0]
    assert {p.config.adapter for p in row.plans} == {"qlora"}
    assert row.fits and row.best is not None and row.estimate.config.adapter == "qlora"
    assert all(c.met for c in row.estimate.constraints if c.hard)
    assert any("16-bit weights" in n and "do not load" in n for n in row.notes), row.notes


def test_nothing_is_advised_to_fit_where_the_engine_cannot_start():
    """8B GRPO with vLLM colocated on a T4: vLLM's 4-bit weights (5.6 GiB) do not load in its 30% (4.4 GiB) either.
    No technique, stack or precision can change that: none is offered as making it fit."""
    report = vramplan.fit("8b", "t4", seq=4096, methods=["grpo"], method_options=OPTS)
    row = report.rows[0]
    assert not row.fits
    assert row.alternatives == []
    assert row.techniques is not None and not row.techniques.fits and not row.techniques.comfortable

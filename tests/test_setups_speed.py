"""What ``fit`` works out beside a row's own search when nothing is comfortable (``search.other_setups``) gives the
answers of the long way, with less work.

* ``DeviceTotals.floor(..., batch=grid)``: for a recipe that generates (GRPO, PPO) the floor over the searched
  micro-batches also holds the rollout phase (resident bytes, optimiser states, the least KV cache of the grid):
  it stays at or below the device total of every candidate at every micro-batch of the grid, whatever its
  checkpointing, optimiser and attention;
* ``DeviceTotals._least_kv`` (one KV cache per configuration but its checkpointing, optimiser, attention, rank and
  targets) equals the configuration's own ``step_terms`` KV cache, for every such variant;
* ``search._setup_best`` with that bound lists what the full search lists (``search._best_of`` of it), and on the
  benchmark case (13b on an RTX 4000 Ada) settles GRPO's setups without one device total.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import vramplan
from vramplan.config import make_config
from vramplan.gpus import get_gpu
from vramplan.memory import step_memory, step_terms
from vramplan.methods import registry, resolve
from vramplan.models import get_model
from vramplan.planner import search as search_mod
from vramplan.planner.checks import check_card
from vramplan.planner.limits import DeviceTotals
from vramplan.request import SearchRequest
from vramplan.stacks import stacks

GENERATING = [m for m in registry() if resolve(m, None).behaviour.generates]


def test_some_method_generates():
    assert {"grpo", "ppo"} <= set(GENERATING)


def _setups(spec, method, card):
    """(stack, precision) of every setup other_setups could try for ``method`` on ``card``."""
    for fw in stacks():
        for precision in (None, "bf16"):
            try:
                yield fw, check_card(precision, method, None, "sdpa", card, fw)
            except vramplan.VramplanError:
                continue


@pytest.mark.parametrize("model,gpu", [("llama-2-13b", "rtx4000ada"), ("7b", "rtx4090"), ("3b", "rtx3080"),
                                       ("llama-3.2-1b", "t4")])
@pytest.mark.parametrize("method", GENERATING)
def test_grid_floor_is_at_or_below_every_candidate_on_the_grid(model, gpu, method):
    """The floor over the grid (own optimiser, and every optimiser's) never exceeds a candidate's device total at
    any micro-batch of the grid, the search's own totals (``step_memory`` at the grid and its accumulation); and
    it is the tighter bound the listing filter needs: above the plain floor, and close to the least total."""
    spec, card = get_model(model), get_gpu(gpu)
    checked, raised, closest = 0, 0, 0.0
    for fw, prec in _setups(spec, method, card):
        for kw in (dict(seq=2048), dict(seq=1024, global_batch=16)):
            req = SearchRequest.build(framework=fw, precision=prec, **kw)
            try:
                cands = search_mod._candidates(spec, method, card, req)
            except vramplan.VramplanError:
                continue
            b, a = search_mod._grid_for(req.global_batch, None, search_mod.SINGLE,
                                        resolve(method, None).behaviour.min_batch())
            totals = DeviceTotals()
            for cfg, _ in cands:
                least = float(np.min(DeviceTotals()(step_memory(spec, cfg, batch=b, grad_accum=a), cfg, card)))
                key = cfg.with_(grad_ckpt=False, attn="sdpa")  # the listing filter's key
                own = totals.floor(spec, key, card, batch=b)
                every = totals.floor(spec, key.with_(optimizer="adamw"), card, any_optimizer=True, batch=b)
                if own is None:
                    assert every is None
                    continue
                assert every <= least and own <= least, (fw, prec, kw, cfg)
                plain = totals.floor(spec, key, card)
                assert own >= plain
                raised += own > plain
                closest = max(closest, own / least)
                checked += 1
    assert checked
    assert raised  # the KV cache raised the floor somewhere
    assert closest > 0.85  # and the bound is near the least total somewhere (a loose bound would settle nothing)


@pytest.mark.parametrize("model", ["llama-2-13b", "llama-3.2-1b", "qwen2.5-7b"])
@pytest.mark.parametrize("method", GENERATING)
def test_kept_least_kv_equals_each_configurations_own(model, method):
    """One KV cache per configuration but its checkpointing, optimiser, attention, rank and targets: every variant's
    own ``step_terms`` KV cache has the same least value over the grid (one instance answers them all, kept)."""
    spec = get_model(model)
    grid = np.array([1, 2, 3, 5, 8, 16, 64, 256])
    checked = 0
    totals = DeviceTotals()  # one instance for every configuration: a key that left out what the cache reads would fail
    for fw, ad, prec, seq in itertools.product(stacks(), (None, "qlora", "dora", "full"), (None, "bf16"), (512, 1024)):
        for gc, attn, opt, rank, targets in itertools.product((False, True), ("sdpa", "eager", "flash"),
                                                              ("adamw", "adamw_8bit"), (8, 64), (None, "all-linear")):
            try:
                cfg = make_config(spec, method, adapter=None if ad == "full" else ad, framework=fw, precision=prec,
                                  grad_ckpt=gc, attn=attn, optimizer=opt, rank=rank, targets=targets, seq=seq)
            except vramplan.VramplanError:
                continue
            own = step_terms(spec, cfg, batch=grid)
            assert (own.rollout_logits >= 0).all()  # the floor leaves the rollout's other bytes out
            assert totals._least_kv(spec, cfg, grid) == float(np.min(own.kv)), (fw, ad, prec, cfg)
            checked += 1
    assert checked


def _listed_json(listed):
    if listed is None:
        return None
    plan, verdict = listed
    out = plan.to_json()
    out.pop("rank"), out.pop("reason")
    return out, plan.summary(), verdict


@pytest.mark.parametrize("model,gpu", [("7b", "rtx4090"), ("llama-2-13b", "l40s"), ("3b", "rtx3080")])
@pytest.mark.parametrize("method", GENERATING)
def test_setup_best_with_the_grid_floor_equals_the_search(model, gpu, method):
    """Where a generating method's setups are listed (comfortable or tight) or not, ``_setup_best`` lists what the
    whole search would."""
    spec, card = get_model(model), get_gpu(gpu)
    checked, listed = 0, 0
    for fw, prec in _setups(spec, method, card):
        for kw in (dict(seq=2048), dict(seq=1024, global_batch=16)):
            kw = dict(kw, framework=fw, precision=prec, totals=DeviceTotals())
            try:
                mp = search_mod.search(spec, method, card, **kw)
            except vramplan.VramplanError:
                continue
            for current_fits in (False, True):
                want = _listed_json(search_mod._best_of(mp, current_fits))
                got = _listed_json(search_mod._setup_best(spec, method, card, current_fits, SearchRequest.build(**kw)))
                assert got == want, (fw, prec, kw, current_fits)
                listed += want is not None
            checked += 1
    assert checked and listed


def test_grpo_setups_on_the_benchmark_case_need_no_device_total(monkeypatch):
    """13b on an RTX 4000 Ada: no GRPO setup fits (the KV cache of its generation batch alone is over the card with
    every stack), and the grid floor says so before any device total; the long way lists the same nothing."""
    spec, card = get_model("13b"), get_gpu("rtx4000ada")
    calls: list = []
    real = search_mod._single_totals
    monkeypatch.setattr(search_mod, "_single_totals", lambda *a, **k: calls.append(1) or real(*a, **k))
    prec = check_card(None, "grpo", None, "sdpa", card, "hf")
    out = search_mod.other_setups(spec, "grpo", card, framework="hf", precision=prec, seq=2048, totals=DeviceTotals())
    assert out == [] and not calls
    for fw, p in _setups(spec, "grpo", card):
        mp = search_mod.search(spec, "grpo", card, framework=fw, precision=p, seq=2048)
        assert search_mod._best_of(mp, False) is None

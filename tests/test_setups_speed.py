"""What ``fit`` works out beside a row's own search when nothing is comfortable (``search.other_setups``) gives the
answers of the long way, with less work.

* ``DeviceTotals.floor(..., batch=grid)``: for a recipe that generates (GRPO, PPO) the floor over the searched
  micro-batches also holds the rollout phase (resident bytes, optimiser states, the least KV cache of the grid):
  it stays at or below the device total of every candidate at every micro-batch of the grid, whatever its
  checkpointing, optimiser and attention;
* ``DeviceTotals._least_kv`` (one KV cache per configuration but its checkpointing, optimiser, attention, rank and
  targets) equals the configuration's own ``step_terms`` KV cache, for every such variant;
* ``search._setup_best`` with that bound lists what the full search lists (``search._best_of`` of it), and on the
  benchmark case (13b on an RTX 4000 Ada) settles GRPO's setups without one device total;
* ``DeviceTotals.at_least`` (context + workspace + the tensors) is at or below the device total of every layout
  (one GPU, ZeRO-3, FSDP, CPU offload), default figures or a profile's allocator model, and the rollout's KV cache
  at or below every layout's per-GPU peak: ``what_would_fit`` skipping a strategy on it suggests what working out
  every layout suggests, and on the benchmark case works out no layout for GRPO.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import check_setup_best_as_search, listed_json, save_calibrated_a100, setups_of

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


@pytest.mark.parametrize("model,gpu", [("llama-2-13b", "rtx4000ada"), ("7b", "rtx4090"), ("3b", "rtx3080"),
                                       ("llama-3.2-1b", "t4")])
@pytest.mark.parametrize("method", GENERATING)
def test_grid_floor_is_at_or_below_every_candidate_on_the_grid(model, gpu, method):
    """The floor over the grid (own optimiser, and every optimiser's) never exceeds a candidate's device total at
    any micro-batch of the grid, the search's own totals (``step_memory`` at the grid and its accumulation); and
    it is the tighter bound the listing filter needs: above the plain floor, and close to the least total."""
    spec, card = get_model(model), get_gpu(gpu)
    checked, raised, closest = 0, 0, 0.0
    for fw, prec in setups_of(spec, method, card):
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


@pytest.mark.parametrize("model,gpu", [("7b", "rtx4090"), ("llama-2-13b", "l40s"), ("3b", "rtx3080")])
@pytest.mark.parametrize("method", GENERATING)
def test_setup_best_with_the_grid_floor_equals_the_search(model, gpu, method):
    """Where a generating method's setups are listed (comfortable or tight) or not, ``_setup_best`` lists what the
    whole search would."""
    spec, card = get_model(model), get_gpu(gpu)
    checked, listed = check_setup_best_as_search(spec, method, card, (dict(seq=2048), dict(seq=1024, global_batch=16)))
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
    for fw, p in setups_of(spec, "grpo", card):
        mp = search_mod.search(spec, "grpo", card, framework=fw, precision=p, seq=2048)
        assert search_mod._best_of(mp, False) is None


@pytest.fixture
def profiled_card(tmp_path, monkeypatch):
    """An a100-80gb profile with an allocator model (a method correction for GRPO) and activation factors 1.1
    (GRPO), 0.9 (PPO with LoRA: the bound does not apply)."""
    from vramplan.profiles import AllocatorModel, Fitted

    return save_calibrated_a100(tmp_path, monkeypatch, AllocatorModel(1.05, 64 << 20, by_method={"grpo+lora": 1.02}),
                                {"grpo+lora": Fitted(1.1, 3), "grpo+qlora": Fitted(1.1, 3), "ppo+lora": Fitted(0.9, 3)})


def _layouts():
    from vramplan.distributed import SINGLE, make_parallel

    return [SINGLE, make_parallel(2, "zero3"), make_parallel(8, "zero3"), make_parallel(2, "fsdp"),
            make_parallel(16, "fsdp"), make_parallel(1, "zero3", "cpu"), make_parallel(1, "fsdp", "cpu")]


def _check_at_least(spec, card, configs) -> int:
    """``DeviceTotals.at_least`` of a step's tensor peak, and of its rollout's KV cache, is at or below its device
    total on every layout (the KV cache at or below the per-GPU peak where the engine runs the config as is)."""
    from vramplan.distributed import deepspeed_cast
    from vramplan.planner.limits import step_memory_for

    checked = 0
    for cfg in configs:
        kv = float(np.min(step_terms(spec, cfg).kv))
        for par in _layouts():
            totals = DeviceTotals()
            try:
                mem = step_memory_for(spec, cfg, par)
            except vramplan.VramplanError:
                continue
            device = float(np.min(totals(mem, cfg, card, par)))
            least = totals.at_least(cfg, card, float(np.min(mem.peak)))
            if least is None:
                continue
            assert least <= device, (cfg, par)
            if deepspeed_cast(cfg, par) is cfg:
                assert kv <= float(np.min(mem.peak)), (cfg, par)
                assert totals.at_least(cfg, card, kv) <= device
            checked += 1
    return checked


def _generating_configs(spec, card):
    for method in GENERATING:
        for fw, prec in setups_of(spec, method, card):
            for ad in (None, "qlora", "full"):
                for gc, opt in ((True, "adamw_8bit"), (False, "adamw")):
                    try:
                        yield make_config(spec, method, adapter=None if ad == "full" else ad, framework=fw,
                                          precision=prec, grad_ckpt=gc, optimizer=opt, seq=1024)
                    except vramplan.VramplanError:
                        continue


@pytest.mark.parametrize("model,gpu", [("llama-3.2-1b", "rtx4000ada"), ("llama-2-7b", "t4")])
def test_at_least_is_at_or_below_every_layouts_device_total(model, gpu):
    spec, card = get_model(model), get_gpu(gpu)
    assert _check_at_least(spec, card, _generating_configs(spec, card))


def test_at_least_with_a_calibrated_allocator_and_factors(profiled_card):
    """With a profile's allocator model the bound still holds; an activation factor below 1 gives none."""
    spec = get_model("llama-3.2-1b")
    assert _check_at_least(spec, profiled_card, _generating_configs(spec, profiled_card))
    ppo = make_config(spec, "ppo", seq=1024)
    assert DeviceTotals().at_least(ppo, profiled_card, 1e9) is None
    grpo = make_config(spec, "grpo", seq=1024)
    assert DeviceTotals()._factor(grpo, profiled_card) == 1.1  # the profile applies
    assert DeviceTotals().at_least(grpo, profiled_card, 1e9) is not None


@pytest.mark.parametrize("model,gpu", [("13b", "rtx4000ada"), ("llama-2-7b", "t4"), ("llama-3.2-1b", "rtx3080"),
                                       ("qwen2.5-7b", "rtx4090")])
def test_what_would_fit_equals_the_long_way(monkeypatch, model, gpu):
    """The suggestions with strategies skipped on the rollout's KV cache are those of working out every layout;
    on the benchmark case (13b GRPO on an RTX 4000 Ada) no layout is worked out at all."""
    from vramplan.distributed import parallel_step_memory

    spec, card = get_model(model), get_gpu(gpu)
    calls: list = []
    monkeypatch.setattr(search_mod, "parallel_step_memory",
                        lambda *a, **k: calls.append(a[2]) or parallel_step_memory(*a, **k))

    def run() -> tuple[list, int]:
        calls.clear()
        out = []
        for method in GENERATING + ["full", "lora"]:
            for kw in (dict(seq=2048), dict(seq=1024, gpus=2)):
                out.append([x.to_json() for x in search_mod.what_would_fit(spec, method, card, **kw)])
        return out, len(calls)

    fast, fast_calls = run()
    grpo_calls = 0
    if model == "13b":
        calls.clear()
        search_mod.what_would_fit(spec, "grpo", card, seq=2048)
        grpo_calls = len(calls)
    monkeypatch.setattr(DeviceTotals, "at_least", lambda self, cfg, card, tensors: None)  # never skip
    slow, slow_calls = run()
    assert fast == slow
    assert any(fast)
    assert fast_calls <= slow_calls
    if model == "13b":
        assert grpo_calls == 0 < fast_calls < slow_calls


def test_setup_best_times_only_the_contenders(monkeypatch):
    """ORPO on the benchmark case: its setups list their best plans (the long way's), and each works out the step
    times of the shared configurations of the candidates that fit at some micro-batch only, not of all of them."""
    spec, card = get_model("13b"), get_gpu("rtx4000ada")
    timed, built = [], []
    real_rows, real_shared = search_mod.step_time_rows, search_mod._shared_rows
    monkeypatch.setattr(search_mod, "step_time_rows", lambda s, cfgs, *a, **k: timed.append(len(cfgs)) or
                        real_rows(s, cfgs, *a, **k))
    monkeypatch.setattr(search_mod, "_shared_rows", lambda *a: (lambda out: built.append(len(out[0])) or out)(
        real_shared(*a)))
    checked = 0
    for fw, prec in setups_of(spec, "orpo", card):
        kw = dict(framework=fw, precision=prec, seq=2048)
        timed.clear(), built.clear()
        got = search_mod._setup_best(spec, "orpo", card, False, SearchRequest.build(**kw, totals=DeviceTotals()))
        if got is None:
            continue
        assert len(timed) == len(built) == 1 and timed[0] < built[0], (fw, prec, timed, built)
        monkeypatch.setattr(search_mod, "step_time_rows", real_rows)
        want = search_mod._best_of(search_mod.search(spec, "orpo", card, **kw), False)
        monkeypatch.setattr(search_mod, "step_time_rows", lambda s, cfgs, *a, **k: timed.append(len(cfgs)) or
                            real_rows(s, cfgs, *a, **k))
        assert listed_json(got) == listed_json(want)
        checked += 1
    assert checked >= 4

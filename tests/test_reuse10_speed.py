"""Shortcuts of a fit's repeated and per-configuration work (session 10, reuse10) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``search._listing_filter`` asks its every-optimiser floors (plain, and over the micro-batch grid for a recipe that
  generates) once per base configuration, not once per (base, optimiser): it answers what asking them per
  optimiser answers (the filter as it was, written out below), for every base and optimiser of every setup;
* ``memory.resident_floor`` reads the optimiser states, the step's temporary and the gradients of the optimiser
  step from the model state directly: the floor that ``memory.state_terms``' values give.
"""

from __future__ import annotations

import pytest

from conftest import setups_of

import vramplan
from vramplan.config import make_config
from vramplan.gpus import get_gpu
from vramplan.memory import RESIDENT_COMPONENTS, model_state, resident_floor, state_terms
from vramplan.methods import registry
from vramplan.models import get_model
from vramplan.planner import search as search_mod
from vramplan.planner.limits import DeviceTotals
from vramplan.request import DEFAULT_ATTENTION, SearchRequest


def _long_listing_filter(spec, card, margin, current_fits, totals, batch=None):
    """``search._listing_filter`` the long way: every floor looked up again for each (base, optimiser)."""
    capacity = card.memory_bytes

    def shut(floor, limit):
        return floor is not None and floor > limit and (current_fits or floor >= capacity + 1)

    def can_list(base, optimizer):
        key = base.with_(grad_ckpt=False, optimizer=optimizer, attn=DEFAULT_ATTENTION)
        limit = search_mod._limits([(key, None)], capacity, margin, False)[0][1]
        any_key = key.with_(optimizer="adamw")
        if shut(totals.floor(spec, any_key, card, any_optimizer=True), limit):
            return False
        grid = batch if batch is not None and key.recipe.behaviour.generates else None
        return not ((grid is not None and shut(totals.floor(spec, any_key, card, any_optimizer=True, batch=grid), limit))
                    or shut(totals.floor(spec, key, card, batch=grid), limit))
    return can_list


@pytest.mark.parametrize("model,gpu", [("llama-2-13b", "rtx4000ada"), ("llama-3.2-1b", "t4"), ("7b", "rtx4090")])
def test_listing_filter_answers_as_asking_per_optimiser(model, gpu):
    spec, card = get_model(model), get_gpu(gpu)
    answers = {True: 0, False: 0}
    for method in registry():
        for fw, prec in setups_of(spec, method, card):
            req = SearchRequest.build(framework=fw, precision=prec, seq=2048)
            try:
                cands = search_mod._candidates(spec, method, card, req)
            except vramplan.VramplanError:
                continue
            grid = search_mod._grid_for(None, None, search_mod.SINGLE, 1)[0]
            bases = list(dict.fromkeys(c.with_(grad_ckpt=False, optimizer="adamw", attn="sdpa") for c, _ in cands))
            for margin in (0.15, 0.6):
                for current_fits in (False, True):
                    fast = search_mod._listing_filter(spec, card, margin, current_fits, DeviceTotals(), grid)
                    slow = _long_listing_filter(spec, card, margin, current_fits, DeviceTotals(), grid)
                    for base in bases:
                        for opt in search_mod.OPTIMIZERS:
                            got = fast(base, opt)
                            assert got == slow(base, opt), (method, fw, prec, margin, current_fits, base, opt)
                            answers[got] += 1
    assert answers[True] and answers[False]  # both answers were checked


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "dpo", "ppo", "grpo"])
def test_resident_floor_equals_the_state_terms_floor(method):
    spec = get_model("llama-2-7b")
    checked = 0
    for fw in ("hf", "torchtune", "unsloth", "litgpt"):
        for opt in search_mod.OPTIMIZERS:
            for techniques in ((), ("opt_in_bwd",), ("opt_offload",)):
                try:
                    cfg = make_config(spec, method, framework=fw, optimizer=opt, techniques=techniques)
                except vramplan.VramplanError:
                    continue
                st = model_state(spec, cfg)
                a = state_terms(st, cfg)
                static = sum(st.bytes.get(c, 0) for c in RESIDENT_COMPONENTS)
                assert resident_floor(spec, cfg, st) == int(static + max(0, a.states + a.step_temporary + a.grads_opt))
                assert resident_floor(spec, cfg, st, optimizer=False) == int(static + max(0, a.grads_opt))
                checked += 1
    assert checked > 8


@pytest.mark.parametrize("model,gpu,kw", [("13b", "rtx4000ada", {}), ("llama-3.2-1b", "t4", {}),
                                          ("7b", "rtx4090", dict(global_batch=16)), ("3b", "rtx3080", {}),
                                          ("70b", "h100-sxm", dict(seq=1024)), ("7b", "a100-80gb", dict(seq=512))])
def test_band_limits_from_the_searched_row_equal_the_whole_grid(monkeypatch, model, gpu, kw):
    """``band_limits(..., searched=plan._totals)`` (the search's device totals of the plan's configuration, their
    prefix shared with the batch grid when it settles both limits) equals ``band_limits`` working the grid out, for
    every plan of every method's search; the prefix settles it somewhere (the shortcut is taken)."""
    from vramplan.planner import limits as limits_mod
    from vramplan.planner.checks import check_card

    spec, card = get_model(model), get_gpu(gpu)
    taken = checked = 0
    for method in registry():
        try:
            prec = check_card(None, method, None, "sdpa", card, "hf")
            mp = search_mod.search(spec, method, card, totals=DeviceTotals(), **kw)
        except vramplan.VramplanError:
            continue
        totals = DeviceTotals()
        for plan in mp.plans[:: max(1, len(mp.plans) // 12)] + [mp.best or mp.smallest]:
            assert plan._totals is not None
            want = limits_mod.band_limits(spec, plan.config, card, plan.parallel, totals=totals, margin=0.15)
            curves = []
            with monkeypatch.context() as m:
                real = limits_mod._batch_curve
                m.setattr(limits_mod, "_batch_curve", lambda *a: curves.append(1) or real(*a))
                got = limits_mod.band_limits(spec, plan.config, card, plan.parallel, totals=totals, margin=0.15,
                                             searched=plan._totals)
            assert got == want, (method, prec, plan.summary())
            taken += not curves
            checked += 1
    assert checked
    if "global_batch" not in kw:
        assert taken  # the search's row settled the limits somewhere


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "dpo", "ppo", "grpo"])
def test_sharded_step_memory_of_some_components_equals_the_whole(method):
    """``parallel_step_memory`` / ``accumulation_step_memory`` asked for a set of components (what the device chain
    reads) give the phases, peak and each of those components as the whole breakdown has them, and the same device
    totals, for every strategy, offload and GPU count (FSDP2's unit walk, DeepSpeed's ZeRO stages, DDP)."""
    import numpy as np

    from vramplan.distributed import STRATEGIES, accumulation_step_memory, make_parallel, parallel_step_memory
    from vramplan.planner.estimating import DEVICE_CHAIN_READS

    spec, card = get_model("llama-2-7b"), get_gpu("a100-80gb")
    totals = DeviceTotals()
    b, a = np.array([1, 2, 4, 8]), np.array([1, 1, 2, 4])
    checked = 0
    for strategy in STRATEGIES:
        for n, offload in ((2, "none"), (8, "none"), (4, "cpu")):
            try:
                par = make_parallel(n, strategy, offload)
                cfg = make_config(spec, method, seq=1024)
                whole = parallel_step_memory(spec, cfg, par, batch=b)
                part = parallel_step_memory(spec, cfg, par, batch=b, components=DEVICE_CHAIN_READS)
            except vramplan.VramplanError:
                continue
            for got, want in ((part, whole), (accumulation_step_memory(spec, cfg, par, b, a, components=DEVICE_CHAIN_READS),
                                              accumulation_step_memory(spec, cfg, par, b, a))):
                assert np.array_equal(got.peak, want.peak) and np.array_equal(got.peak_phase, want.peak_phase)
                assert all(np.array_equal(got.phases[p], want.phases[p]) for p in want.phases)
                assert set(got.components) <= DEVICE_CHAIN_READS
                for c in DEVICE_CHAIN_READS:
                    assert (c in got.components) == (c in want.components)
                    if c in want.components:
                        assert np.array_equal(got.components[c], want.components[c]), (strategy, n, offload, c)
                assert np.array_equal(totals(got, cfg, card, par), totals(want, cfg, card, par))
                checked += 1
    assert checked >= 6


@pytest.mark.parametrize("model,gpu", [("13b", "rtx4000ada"), ("llama-3.2-1b", "t4"), ("7b", "a100-80gb")])
def test_step_work_sharing_passes_equals_its_own(model, gpu):
    """``throughput._step_work`` reading the passes of the model copies (``_pass_work``) kept for another rank, targets
    or optimiser equals the configuration's own ``step_work`` field by field, for every candidate of every method's
    search (both adapters, checkpointing, attention, methods that generate); ``step_time_rows`` equals ``step_time``."""
    import dataclasses

    import numpy as np

    from vramplan import throughput

    spec, card = get_model(model), get_gpu(gpu)
    b = search_mod.MICRO_BATCHES[:12]
    shared = 0
    for method in registry():
        for fw in ("hf", "torchtune"):
            try:
                cands = [c for c, _ in search_mod._candidates(spec, method, card, SearchRequest.build(seq=1024, framework=fw))]
            except vramplan.VramplanError:
                continue
            kept: dict = {}
            for cfg in cands:
                got, want = throughput._step_work(spec, cfg, b, passes=kept), throughput.step_work(spec, cfg, b)
                for f in dataclasses.fields(want):
                    assert np.array_equal(getattr(got, f.name), getattr(want, f.name)), (method, fw, cfg, f.name)
            shared += len(cands) - len(kept)
            rows = throughput.step_time_rows(spec, cands[::7], card, batch=b)
            for cfg, t in zip(cands[::7], rows):
                assert t.json_at(3) == throughput.step_time(spec, cfg, card, batch=b).json_at(3)
    assert shared > 0


def test_with_techniques_carries_what_a_fresh_config_resolves():
    """``TrainConfig.with_techniques`` (``with_``: the resolved recipe, stack, regime and attention carried) equals
    ``dataclasses.replace`` of the techniques, hashes as it, and what it carries is what the fresh one resolves,
    for every method, stack and memory-saving technique."""
    import dataclasses

    from vramplan.config import _RESOLVED_FROM
    from vramplan.planner.techniques import technique_names

    spec = get_model("llama-2-7b")
    checked = 0
    for method in registry():
        for fw in ("hf", "torchtune", "unsloth", "litgpt"):
            try:
                cfg = make_config(spec, method, framework=fw)
            except vramplan.VramplanError:
                continue
            [getattr(cfg, name) for name in _RESOLVED_FROM]  # resolved and kept on cfg
            for name in technique_names():
                try:
                    got = cfg.with_techniques(cfg.techniques + (name,))
                except vramplan.VramplanError:
                    continue
                fresh = dataclasses.replace(cfg, techniques=got.techniques)
                assert got == fresh and hash(got) == hash(fresh)
                for kept in _RESOLVED_FROM:
                    assert kept in got.__dict__  # carried, not resolved again
                    assert getattr(got, kept) == getattr(fresh, kept), (method, fw, name, kept)
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "dpo", "ppo", "grpo", "kto"])
def test_phase_floor_is_at_or_below_every_layouts_peak(method):
    """``search._phase_floor`` (the forward's and the rollout's phases from the sharded state and the terms) never
    exceeds the per-GPU tensor peak of ``parallel_step_memory``, for every strategy, GPU count and offload, with and
    without checkpointing, over micro-batches and accumulation."""
    import numpy as np

    from vramplan.distributed import STRATEGIES, deepspeed_cast, make_parallel, parallel_step_memory, shard_state
    from vramplan.memory import step_terms

    spec = get_model("llama-2-7b")
    b = np.array([1, 2, 4, 16])
    checked = raised = 0
    for gc in (False, True):
        for accum in (1, 4):
            cfg = make_config(spec, method, seq=1024, grad_ckpt=gc, grad_accum=accum, optimizer="adamw_8bit")
            t = step_terms(spec, cfg, batch=b)
            for strategy in STRATEGIES:
                for n, offload in ((2, "none"), (8, "none"), (64, "none"), (2, "cpu")):
                    try:
                        par = make_parallel(n, strategy, offload)
                        if deepspeed_cast(cfg, par) is not cfg:
                            continue
                        mem = parallel_step_memory(spec, cfg, par, batch=b)
                    except vramplan.VramplanError:
                        continue
                    floor = search_mod._phase_floor(shard_state(spec, cfg, par), t, cfg.recipe.behaviour.generates)
                    assert floor <= float(np.min(mem.peak)), (strategy, n, offload, gc, accum)
                    raised += floor > 0.5 * float(np.min(mem.peak))
                    checked += 1
    assert checked > 20 and raised


@pytest.mark.parametrize("model,gpu", [("13b", "rtx4000ada"), ("70b", "a100-80gb"), ("7b", "t4"), ("3b", "rtx3080")])
def test_what_would_fit_with_the_phase_floor_suggests_what_every_layout_does(monkeypatch, model, gpu):
    """``what_would_fit`` skipping a sharded layout whose phase floor is over the limit suggests what working out every
    layout suggests, and skips some."""
    from vramplan.planner.checks import check_card

    spec, card = get_model(model), get_gpu(gpu)
    calls: list = []
    real = search_mod.parallel_step_memory
    monkeypatch.setattr(search_mod, "parallel_step_memory", lambda *a, **k: calls.append(1) or real(*a, **k))

    def suggest(method, gpus):
        prec = check_card(None, method, None, "sdpa", card, "hf")
        return [x.to_json() for x in search_mod.what_would_fit(spec, method, card, gpus=gpus, seq=2048, precision=prec,
                                                              totals=DeviceTotals())]
    fast, slow = {}, {}
    for method in registry():
        for gpus in (1, 4):
            try:
                fast[method, gpus] = suggest(method, gpus)
            except vramplan.VramplanError:
                continue
    n_fast = len(calls)
    monkeypatch.setattr(search_mod, "_phase_floor", lambda *a: 0.0)
    for key in fast:
        slow[key] = suggest(*key)
    assert fast == slow
    assert any(any(s["kind"] in ("gpus", "offload") for s in v) for v in fast.values())
    assert n_fast < len(calls) - n_fast  # layouts were skipped


@pytest.mark.parametrize("model,gpu", [("13b", "rtx4000ada"), ("llama-3.2-1b", "t4"), ("gemma-2-2b", "a100-80gb")])
def test_shared_rows_key_candidates_as_shared_key(model, gpu):
    """``search._shared_rows`` (each candidate's fields taken once, the optimisers' and attentions' look-ups once per
    name) groups the candidates as ``search._shared_key`` of each does, in the same order."""
    import numpy as np

    from vramplan.memory import ties_stand_in

    spec, card = get_model(model), get_gpu(gpu)
    grouped = 0
    for method in registry():
        try:
            cands = search_mod._candidates(spec, method, card, SearchRequest.build(seq=1024))
        except vramplan.VramplanError:
            continue
        reps, which = search_mod._shared_rows(spec, cands, {})
        keys = [search_mod._shared_key(c, c.attention.same_as is not None and ties_stand_in(spec, c)) for c, _ in cands]
        first: dict = {}
        want = [first.setdefault(k, len(first)) for k in keys]
        assert np.array_equal(which, want) and list(reps) == list(first)
        assert [reps[k] for k in first] == [cands[keys.index(k)][0] for k in first]
        grouped += len(cands) - len(reps)
    assert grouped


@pytest.mark.parametrize("kw", [dict(seq=2048), dict(seq=1024, global_batch=16)])
def test_plan_configs_are_the_candidates_at_their_micro_batch(kw):
    """``search._plan_at`` (the candidate itself where its chosen micro-batch and accumulation are its own) gives every
    plan the configuration of its candidate at the chosen grid point: that micro-batch and accumulation, every other
    field the candidate's; some plans reuse their candidate, others are built."""
    import dataclasses

    spec, card = get_model("13b"), get_gpu("rtx4000ada")
    reused = built = 0
    for method in ("lora", "full", "dpo", "kto", "grpo"):
        req = SearchRequest.build(**kw)
        cands = {dataclasses.replace(c, batch=1, grad_accum=1): c for c, _ in search_mod._candidates(spec, method, card, req)}
        mp = search_mod.search(spec, method, card, req)
        for plan in mp.plans:
            _, i = plan._grid
            b, a, _ = plan._totals
            c = plan.config
            assert (c.batch, c.grad_accum) == (int(b[i]), int(a[i]))
            cand = cands[dataclasses.replace(c, batch=1, grad_accum=1)]
            assert c == dataclasses.replace(cand, batch=int(b[i]), grad_accum=int(a[i]))
            own = (c.batch, c.grad_accum) == (cand.batch, cand.grad_accum)  # the candidate itself (no with_)
            reused += own
            built += not own
    assert built and ("global_batch" in kw or reused)


@pytest.mark.parametrize("calibrated", [False, True])
def test_floor_tensors_are_at_or_below_the_floor(tmp_path, monkeypatch, calibrated):
    """``DeviceTotals.floor_tensors`` (what the listing filter settles a floor with before its chain) is None exactly
    where the floor is, and at or below it everywhere: default figures and a profile's allocator model and activation
    factors, paged and unpaged optimisers, every optimiser's floor and the floor over a micro-batch grid."""
    from conftest import save_calibrated_a100

    from vramplan.profiles import AllocatorModel, Fitted

    card = save_calibrated_a100(tmp_path, monkeypatch, AllocatorModel(1.07, 96 << 20, by_method={"full": 1.03}),
                                {"full": Fitted(0.9, 3), "lora": Fitted(1.2, 3)}) if calibrated else get_gpu("a100-80gb")
    spec = get_model("llama-2-13b")
    totals = DeviceTotals()
    grid = search_mod.MICRO_BATCHES
    checked = nones = 0
    for method in ("lora", "qlora", "full", "dpo", "ppo", "grpo"):
        for fw in ("hf", "torchtune"):
            for opt in search_mod.OPTIMIZERS:
                try:
                    cfg = make_config(spec, method, framework=fw, optimizer=opt)
                except vramplan.VramplanError:
                    continue
                for any_opt in (False, True):
                    for batch in (None, grid):
                        floor = totals.floor(spec, cfg, card, any_optimizer=any_opt, batch=batch)
                        tensors = totals.floor_tensors(spec, cfg, card, any_optimizer=any_opt, batch=batch)
                        assert (tensors is None) == (floor is None)
                        if floor is None:
                            nones += 1
                            continue
                        assert tensors <= floor, (method, fw, opt, any_opt, batch is None)
                        checked += 1
    assert checked > 50 and (nones or not calibrated)


def test_step_memory_rows_given_the_states_equal_its_own():
    """``memory.step_memory_rows_shared(..., states=...)`` (the search hands over the model states it already has)
    equals working them out; states that are not the configurations' change the answer (they are the ones used)."""
    import numpy as np

    from vramplan.memory import step_memory_rows_shared

    spec, card = get_model("13b"), get_gpu("rtx4000ada")
    cands = search_mod._candidates(spec, "lora", card, SearchRequest.build(seq=1024))
    reps, _ = search_mod._shared_rows(spec, cands, {})
    cfgs = list(reps.values())
    b = search_mod.MICRO_BATCHES[:8]
    want, want_st = step_memory_rows_shared(spec, cfgs, batch=b, grad_accum=np.ones_like(b))
    states = [model_state(spec, c) for c in cfgs]
    got, got_st = step_memory_rows_shared(spec, cfgs, batch=b, grad_accum=np.ones_like(b), states=states)
    assert np.array_equal(got.peak, want.peak) and got_st == want_st
    assert all(np.array_equal(got.components[c], v) for c, v in want.components.items())
    wrong, _ = step_memory_rows_shared(spec, cfgs, batch=b, grad_accum=np.ones_like(b), states=states[::-1])
    assert not np.array_equal(wrong.peak, want.peak)

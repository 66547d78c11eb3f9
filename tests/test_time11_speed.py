"""Shortcuts of session 11's step times and candidate rows (helper time11) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``throughput.step_time_rows`` on one GPU without a calibration profile times the configurations equal but in
  their optimiser, rank and targets together (``throughput._group_times``: the adapter FLOPs one row per
  configuration, the optimiser's seconds a column): every StepTime equals ``step_time`` of its configuration, field
  by field (values, types, dtypes, shapes, the parts and their order), for the candidates of every method's search
  on several cards and stacks, with techniques on and off;
* ``throughput._adapter_work`` given the ranks and adapted sums as columns (``throughput._adapted_rows``) gives, row
  by row, each configuration's own adapter FLOPs and DoRA parameters; a sum beyond int64 is timed one by one alike;
* ``search._shared_rows`` (each candidate's fields but its optimiser and attention looked up once, the key's other
  two parts under them) groups candidates, repeated ones and those of several recipes, as ``search._shared_key``;
* ``search._choices`` stacks step times already on the grid as they are (``phases.filled`` only for any other):
  the same picks as broadcasting each.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import vramplan
from vramplan import throughput
from vramplan.config import make_config
from vramplan.gpus import get_gpu
from vramplan.memory import ties_stand_in
from vramplan.methods import registry
from vramplan.models import get_model
from vramplan.planner import search as search_mod
from vramplan.request import SearchRequest


def _same_time(got, want, what) -> None:
    """Two StepTimes equal field by field: values, types, shapes and dtypes; the parts in the same order."""
    for f in dataclasses.fields(want):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if f.name == "parts":
            assert list(g) == list(w), what
            g, w = list(g.values()), list(w.values())
            for a, b in zip(g, w):
                assert type(a) is type(b) and np.shape(a) == np.shape(b), (what, f.name)
                assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b), (what, f.name)
            continue
        assert type(g) is type(w) and np.shape(g) == np.shape(w), (what, f.name)
        assert np.asarray(g).dtype == np.asarray(w).dtype and np.array_equal(g, w), (what, f.name)
    assert got.json_at(3) == want.json_at(3), what


def _candidates(spec, card, method, **kw):
    try:
        return [c for c, _ in search_mod._candidates(spec, method, card, SearchRequest.build(**kw))]
    except vramplan.VramplanError:
        return []


@pytest.mark.parametrize("model,gpu,kw", [("13b", "rtx4000ada", dict(seq=1024)),
                                          ("llama-3.2-1b", "t4", dict(seq=2048, framework="torchtune")),
                                          ("7b", "a100-80gb", dict(seq=512, techniques="chunked_ce"))])
def test_grouped_step_time_rows_equal_step_time(model, gpu, kw):
    """Every candidate of every method's search (both adapters, every rank, targets, optimiser, checkpointing and
    attention), timed by ``step_time_rows`` in one call, equals its own ``step_time``; some groups hold several ranks."""
    spec, card = get_model(model), get_gpu(gpu)
    assert throughput._profile(card) is None  # the grouped path (no calibration profile)
    b = search_mod.MICRO_BATCHES[:11]
    a = np.where(b > 3, 1, 4)
    grouped = 0
    for method in registry():
        cands = _candidates(spec, card, method, **kw)
        if not cands:
            continue
        rows = throughput.step_time_rows(spec, cands, card, batch=b, grad_accum=a)
        for cfg, t in zip(cands, rows):
            _same_time(t, throughput.step_time(spec, cfg, card, batch=b, grad_accum=a), (method, cfg))
        groups = {vramplan.config.fields_but(c, *throughput._NOT_IN_GROUP) for c in cands}
        grouped += len({vramplan.config.fields_but(c, "optimizer") for c in cands}) - len(groups)
    assert grouped > 0  # groups of several ranks or targets were timed together


def test_grouped_rows_without_accumulation_and_mixed_inputs_equal_step_time():
    """``grad_accum`` None (each configuration's own), inputs that ignore the profile and ones with the model state
    given, configurations of several recipes and accumulations in one call: each equals ``step_time``."""
    spec, card = get_model("7b"), get_gpu("rtx4090")
    b = search_mod.MICRO_BATCHES[:6]
    cfgs = []
    for method in ("lora", "dora", "qlora", "full", "ia3", "grpo", "dpo"):
        base = make_config(spec, method, seq=1024)
        for rank in (8, 64):
            for accum in (1, 3):
                cfgs.append(base.with_(rank=rank, alpha=float(rank), grad_accum=accum, optimizer="adamw_8bit"))
                cfgs.append(base.with_(rank=rank, alpha=float(rank), grad_accum=accum))
    inputs = [throughput.StepTimeInputs(use_profile=bool(i % 3), state=vramplan.memory.model_state(spec, c) if i % 2
                                        else None) for i, c in enumerate(cfgs)]
    for cfg, x, t in zip(cfgs, inputs, throughput.step_time_rows(spec, cfgs, card, batch=b, inputs=inputs)):
        _same_time(t, throughput.step_time(spec, cfg, card, batch=b, inputs=x), cfg)


def test_adapter_work_of_rank_columns_equals_each_configurations():
    """``_adapter_work`` given ``_adapted_rows``' columns: row ``i`` is configuration ``i``'s own adapter FLOPs (and
    DoRA's parameters its float), for every low-rank method, checkpointing, rank and target set."""
    spec = get_model("13b")
    tokens = np.array([1.0, 7.0, 2048.0, 65536.0, 3e6])
    zeros = np.zeros(tokens.shape)
    compared = 0
    for method in ("lora", "qlora", "dora", "ppo", "grpo", "dpo"):
        base = make_config(spec, method)
        for gc in (False, True):
            cfgs = [base.with_(grad_ckpt=gc, rank=r, alpha=float(r), targets=t) for r in (8, 16, 64, 3)
                    for t in (base.targets, vramplan.config.resolve_targets(spec, "all-linear"))]
            adapted = throughput._adapted_rows(spec, cfgs)
            rows, dora = throughput._adapter_work(spec, cfgs[0], tokens, zeros, adapted)
            assert rows.shape == (len(cfgs), len(tokens))
            for i, cfg in enumerate(cfgs):
                one, one_dora = throughput._adapter_work(spec, cfg, tokens, zeros)
                assert one.dtype == rows.dtype and np.array_equal(rows[i], one), (method, cfg)
                if cfg.recipe.adapter.dora:
                    assert type(one_dora) is float and dora.dtype == np.float64 and dora[i, 0] == one_dora
                else:
                    assert dora == one_dora == 0.0
                compared += 1
    assert compared == 96


def test_sums_beyond_int64_are_timed_one_by_one(monkeypatch):
    """Where ``_adapted_rows`` cannot keep the products inside int64 (None), ``step_time_rows`` times each
    configuration of the group on its own: the same answers."""
    spec, card = get_model("7b"), get_gpu("rtx4090")
    base = make_config(spec, "dora", seq=512)
    cfgs = [base.with_(rank=r, alpha=float(r), optimizer=o) for r in (8, 16) for o in ("adamw", "adamw_8bit")]
    b = search_mod.MICRO_BATCHES[:5]
    want = throughput.step_time_rows(spec, cfgs, card, batch=b)
    monkeypatch.setattr(throughput, "_adapted_rows", lambda spec, cfgs: None)
    for cfg, t, w in zip(cfgs, throughput.step_time_rows(spec, cfgs, card, batch=b), want):
        one = throughput.step_time(spec, cfg, card, batch=b)
        _same_time(t, one, cfg)
        _same_time(w, one, cfg)
    huge = dataclasses.replace(base, rank=2 ** 50)
    assert throughput._adapted_rows(spec, [base, huge]) is None


@pytest.mark.parametrize("model,gpu", [("13b", "rtx4000ada"), ("7b", "a100-80gb"), ("llama-3.2-1b", "v100-32gb")])
def test_shared_rows_of_repeated_and_mixed_candidates_equal_shared_key(model, gpu):
    """``_shared_rows`` over the candidates of several methods at once, repeated and reversed: the representatives
    (in order of first appearance, each the first candidate with its key) and rows of ``_shared_key`` of each."""
    spec, card = get_model(model), get_gpu(gpu)
    cands = []
    for method in ("lora", "qlora", "dpo", "grpo", "full"):
        cands += [(c, None) for c in _candidates(spec, card, method, seq=1024)]
    cands = cands + cands[::-1][::5]
    ties: dict = {}
    reps, which = search_mod._shared_rows(spec, cands, ties)
    keys = [search_mod._shared_key(c, c.attention.same_as is not None and ties_stand_in(spec, c)) for c, _ in cands]
    first: dict = {}
    for k, (c, _) in zip(keys, cands):
        first.setdefault(k, c)
    row = {k: j for j, k in enumerate(first)}
    assert list(reps) == list(first) and all(reps[k] is first[k] for k in first)
    assert which.dtype == np.intp and which.tolist() == [row[k] for k in keys]
    assert len(reps) == len(set(keys)) < len(cands)
    for (_, rest), tie in ties.items():  # whether flash ties sdpa: asked of a candidate of that rest with flash
        cfg = next(c for c, _ in cands if c.attention.same_as is not None
                   and vramplan.config.fields_but(c, "optimizer", "attn") == rest)
        assert tie == ties_stand_in(spec, cfg)


def _long_choices(total, times, which, usable):
    """``search._choices`` as it was: every step time's arrays broadcast to the grid (``phases.filled``) and stacked."""
    from vramplan.phases import filled

    shape = total.shape[1:]

    def grid(values):
        return np.array([filled(v, shape) for v in values])[which]
    tps, step = grid([t.tokens_per_s for t in times]), grid([t.step_s for t in times])
    ok = total <= np.asarray(usable, dtype=np.int64).reshape((-1,) + (1,) * len(shape))
    best = np.where(ok.any(axis=-1), np.argmax(np.where(ok, tps, -np.inf), axis=-1), np.argmin(total, axis=-1))
    at = (np.arange(total.shape[0]), best)
    return best.tolist(), total[at].tolist(), ok[at].tolist(), tps[at].tolist(), step[at].tolist()


@pytest.mark.parametrize("method", ["lora", "full", "grpo", "ia3"])
def test_choices_of_grid_shaped_times_equal_the_long_way(method):
    """``search._choices`` stacking step times already on the grid as they are (and broadcasting any other) picks
    what broadcasting each to the grid picks: the same indices, peaks, fits, tokens/s and step seconds."""
    spec, card = get_model("13b"), get_gpu("rtx4000ada")
    b = search_mod.MICRO_BATCHES[:9]
    cands = [(c, None) for c in _candidates(spec, card, method, seq=1024)]
    reps, which = search_mod._shared_rows(spec, cands, {})
    times = throughput.step_time_rows(spec, list(reps.values()), card, batch=b)
    rng = np.random.default_rng(11)
    total = rng.uniform(1e9, 3e10, size=(len(cands), len(b)))
    usable = [int(u) for u in rng.uniform(5e9, 2e10, size=len(cands))]
    assert search_mod._choices(total, times, which, usable) == _long_choices(total, times, which, usable)
    odd = [dataclasses.replace(t, tokens_per_s=t.tokens_per_s[:1]) for t in times]  # not grid-shaped: broadcast
    assert search_mod._choices(total, odd, which, usable) == _long_choices(total, odd, which, usable)

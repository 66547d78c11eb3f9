"""Shortcuts of the memory rows machinery (session 11, rows11) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``phases.combine_phases`` works out each sub-expression it uses more than once once (the casts saved but the
  heads', the MLP block's casts, the attention end's gradients, the layer branch, backward's last state, the sum of
  the resident bytes and the optimiser states, the forward's saved activations): every phase, the peak, its phase
  and every component equal the formulas written out (below), and one call over stacked rows equals one per row;
* ``phases._at_peak`` keeps each ``idx == k`` between the components of one peak and starts from ``zeros`` itself;
* ``combine_phases(components=...)`` works out only the components asked for (each equal to the whole breakdown's);
* no head cast (``StateTerms.head_grad_cast`` the int 0, as a stack keeps a column of zeros): no head-cast end worked
  out, every output what zeros give;
* ``phases._resident`` keeps the states, casts and held gradients as given (not filled to the grid as float64);
* ``StepTerms.stack`` with an order: one ``np.array`` of every term and one ``np.take`` (the long way: one array per
  term, then one index per term), values, dtype, shape, each term C-contiguous; rows of mixed dtypes the long way;
* ``memory._stack_state_terms`` / ``memory._columns``: the int64 columns of one ``np.fromiter`` (the long way: one
  ``np.asarray`` per field);
* ``DeviceTotals.rows`` with paged bytes 0.0 where no row is paged, reading only :meth:`DeviceTotals.reads`'
  components, and one group's chain returned as it is: each row's chain alone.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from vramplan import memory as mem
from vramplan import phases as ph
from vramplan.config import make_config
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.phases import (PHASE_ORDER, TERM_NAMES, BackwardCasts, Gathering, StateTerms, StepTerms, _at_peak,
                             combine_phases)
from vramplan.planner.limits import DeviceTotals
from vramplan.taxonomy import Component, Phase

SPEC = get_model("llama-3.2-1b")


def _configs(spec=SPEC):
    """Configurations that exercise every branch of the phase walk: checkpointing, eager attention, QLoRA's and
    DoRA's temporaries, a reference copy, a rollout, full fine-tuning's gradients, accumulation, the step in backward."""
    out = []
    for method in ("lora", "qlora", "dora", "full", "dpo", "grpo", "ppo"):
        for kw in ({}, {"grad_ckpt": True}, {"attn": "eager"}, {"optimizer": "paged_adamw_8bit", "grad_accum": 4}):
            out.append(make_config(spec, method, seq=1024, **kw))
    out.append(make_config(spec, "full", seq=1024, techniques=("opt_in_bwd",)))
    return out


def _long_backward(t, s, g, r):
    """The fields of ``phases._backward_walk`` whose shared sub-expressions are now worked out once, written out
    (its head-cast end where there is one; without: :func:`test_no_head_cast_as_the_int_0_gives_what_a_zero_column_or_array_gives`)."""
    c = s.casts
    grads_before = np.maximum(s.grads_bwd - s.grads_tail, 0)
    saved_side = (t.acts - t.head_acts + np.maximum(r.cache_bwd - c.head_cache, 0) + t.recompute
                  + c.recompute_cache + r.held)
    grads_side = np.maximum(np.maximum(grads_before - s.layer_grad, 0) + t.layer + c.layer_cache,
                            grads_before + t.layer_attn + c.attn_cache)
    attn_side_cache = np.maximum(r.cache_bwd - c.head_cache, 0) + c.recompute_cache - (c.layer_cache - c.attn_cache)
    saved_attn = (saved_side - t.layer + t.layer_attn + s.head_grad + s.layer_grad
                  - (c.layer_cache - c.attn_cache))
    grads_attn = grads_before + t.layer_attn + c.attn_cache
    out = dict(saved_side=saved_side, grads_side=grads_side, attn_side_cache=attn_side_cache, saved_attn=saved_attn,
               grads_attn=grads_attn)
    if not ph._no_bytes(s.head_grad_cast):
        out["head_end"] = np.where(s.head_grad_cast > 0, t.acts + np.maximum(r.cache_bwd - c.head_cache, 0) + r.held
                                   + s.head_grad + s.head_grad_cast + t.logits_kept + g.at(g.bwd_start), 0)
    return out


def _long_phases(t, s, r, fw, bw, g):
    """``combine_phases``' phases with every sum written out from the resident bytes."""
    return {Phase.ROLLOUT: r.static + r.states + t.kv + t.rollout_logits + g.rollout_gather,
            Phase.FORWARD: r.static + r.states + r.cache + r.held + np.maximum(fw.peak, fw.mid),
            Phase.BACKWARD: r.static + r.states + np.maximum(bw.acts_end, bw.grads_end),
            Phase.OPTIMIZER_STEP: r.static + r.states + s.grads_opt + s.step_temporary}


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("gathering", [ph.ONE_DEVICE, Gathering(comm=3 << 20, gathered=5 << 20, bwd_work=7 << 20,
                                                                  fwd_mid=2 << 20, rollout_gather=1 << 20)])
def test_combine_phases_shared_sub_expressions_equal_the_formulas_written_out(gathering):
    b, heads = np.arange(1, 9), 0
    for cfg in _configs():
        st = mem.model_state(SPEC, cfg)
        t, s = mem.step_terms(SPEC, cfg, batch=b), mem.state_terms(st, cfg, mem.held_gradients(st, cfg))
        r = ph._resident(t, st.bytes, s, gathering)
        fw = ph._forward_walk(t, gathering, np.minimum(s.casts.head_cache, r.cache))
        bw = ph._backward_walk(t, s, gathering, r)
        long = _long_backward(t, s, gathering, r)
        heads += "head_end" in long and bool(np.any(long["head_end"]))
        for name, want in long.items():
            assert _same(getattr(bw, name), want), (cfg.method, name)
        assert _same(bw.head_saved, np.maximum(r.cache_bwd - s.casts.head_cache, 0))
        assert _same(bw.layer_branch, np.maximum(bw.mlp_work, bw.attn_work))
        assert _same(bw.all_grads, s.grads_bwd + s.grads_end_extra + gathering.at(gathering.bwd_end))
        assert _same(fw.saved, t.acts + t.last_graph)
        phases = combine_phases(t, st.bytes, s, gathering)[0]
        for p, want in _long_phases(t, s, r, fw, bw, gathering).items():
            if p is not Phase.ROLLOUT or s.rollout_on:
                assert _same(phases[p], want), (cfg.method, p)
    assert heads  # some configuration has a head-cast end


def test_at_peak_with_masks_kept_between_components_equals_the_where_chain():
    rng = np.random.default_rng(11)
    for trial in range(30):
        shape = [(7,), (3, 7), ()][trial % 3]
        zeros = np.zeros(shape)
        idx = rng.integers(0, len(PHASE_ORDER), size=shape)
        masks: dict = {}
        for _ in range(4):  # several components of one peak share the masks
            by_phase = {p: (rng.integers(0, 10 ** 12, size=shape) if rng.random() < 0.5 else rng.random(shape) * 1e9)
                        for p in PHASE_ORDER if rng.random() < 0.5}
            long = zeros.copy()
            for k, p in enumerate(PHASE_ORDER):
                long = np.where(idx == k, by_phase.get(p, zeros), long)
            got = _at_peak(idx, zeros, by_phase, masks)
            assert _same(got, long) and got is not zeros


def test_stacked_rows_and_component_subsets_equal_one_call_per_row_and_the_whole_breakdown():
    """``memory.step_memory_rows_shared`` (stacked terms, columns, one combine_phases) equals ``step_memory`` of each
    row; a set of components equals those of the whole breakdown, in its order."""
    cfgs = [c for c in _configs() if not c.recipe.behaviour.generates]
    b, a = np.arange(1, 7), np.array([1, 2, 1, 4, 1, 3])
    wanted = frozenset({Component.ACTIVATIONS, Component.LOGITS, Component.KV_CACHE})
    for comps in (True, wanted, wanted | {Component.OPTIMIZER_STATES}, frozenset({Component.WEIGHTS})):
        rows, _ = mem.step_memory_rows_shared(SPEC, cfgs, batch=b, grad_accum=a, components=comps)
        whole, _ = mem.step_memory_rows_shared(SPEC, cfgs, batch=b, grad_accum=a)
        assert list(rows.components) == [c for c in whole.components if comps is True or c in comps]
        for c, v in rows.components.items():
            assert _same(v, whole.components[c]), c
        for j, cfg in enumerate(cfgs):
            one = mem.step_memory(SPEC, cfg, batch=b, grad_accum=a)
            assert _same(rows.peak[j], one.peak) and _same(rows.peak_phase[j], one.peak_phase)
            for p in PHASE_ORDER:
                assert np.array_equal(rows.phases[p][j], np.broadcast_to(one.phases[p], b.shape)), (cfg.method, p)
            for c, v in rows.components.items():
                assert np.array_equal(v[j], np.broadcast_to(one.components.get(c, 0.0), b.shape)), (cfg.method, c)


def _long_stack(rows, order):
    stacked = {name: np.array([getattr(r, name) for r in rows]) for name in TERM_NAMES}
    return {name: v if order is None else v[order] for name, v in stacked.items()}


@pytest.mark.parametrize("batch", [np.arange(1, 12), None])
def test_stack_with_an_order_equals_one_array_and_one_index_per_term(batch):
    rows = []
    for cfg in _configs()[::3]:
        t = mem.step_terms(SPEC, cfg, batch)
        rows.append(t.broadcast(t.zeros.shape))
    for order in (None, np.array([2, 0, 0, 3, 1, 2, 2, 5, 4], dtype=np.intp)):
        got = StepTerms.stack(rows, order)
        for name, want in _long_stack(rows, order).items():
            have = getattr(got, name)
            assert _same(have, want) and have.flags.c_contiguous, name
    # rows whose terms differ in dtype: each term promoted among its own rows only, as the long way
    odd = rows[1].with_(kv=np.zeros(rows[1].zeros.shape, dtype=np.int64))
    mixed = [rows[0], odd, rows[2]]
    order = np.array([1, 1, 0, 2], dtype=np.intp)
    got = StepTerms.stack(mixed, order)
    for name, want in _long_stack(mixed, order).items():
        assert _same(getattr(got, name), want), name


def test_state_columns_from_one_table_equal_one_column_per_field():
    cfgs = _configs()
    states = [mem.model_state(SPEC, c) for c in cfgs]
    rows = [mem.state_terms(st, c) for st, c in zip(states, cfgs)]
    extra = (1, 1)

    def column(values):
        return np.asarray(values, dtype=np.int64).reshape((len(rows),) + extra)

    for part in (rows, [r for r in rows if not r.head_grad_cast]):
        got = mem._stack_state_terms(part, extra, "held")
        assert got.grads_held == "held" and got.rollout_on == part[0].rollout_on
        for f in fields(StateTerms):
            if f.name not in ("casts", "rollout_on", "grads_held"):
                want = np.asarray([getattr(r, f.name) for r in part], dtype=np.int64).reshape((len(part),) + extra)
                if f.name == "head_grad_cast" and not want.any():  # no row has one: the int 0
                    assert type(got.head_grad_cast) is int and got.head_grad_cast == 0
                    continue
                assert _same(getattr(got, f.name), want), f.name
    assert any(r.head_grad_cast for r in rows)
    got = mem._stack_state_terms(rows, extra, "held")
    for f in fields(BackwardCasts):
        assert _same(getattr(got.casts, f.name), column([getattr(r.casts, f.name) for r in rows])), f.name
    table = [[st.bytes.get(c, 0) for c in Component] for st in states]
    cols = mem._columns([v for row in table for v in row], len(Component), (1,))
    for i, c in enumerate(Component):
        want = np.asarray([row[i] for row in table], dtype=np.int64).reshape(-1, 1)
        assert _same(cols[i], want) and cols[i].flags.c_contiguous, c


@pytest.mark.parametrize("mixed", [False, True])
def test_device_totals_rows_reading_only_what_reads_names_equal_each_rows_chain(mixed):
    """Rows none of whose optimisers is paged (paged bytes 0.0, no optimiser states worked out), some paged, one
    recipe (the chain's result returned as it is) and two: each row equals its own chain."""
    card = get_gpu("rtx4090")
    base = make_config(SPEC, "lora", seq=1024)
    b, a = np.arange(1, 9), np.where(np.arange(1, 9) < 3, 2, 1)
    for optimizers in (("adamw", "adamw_8bit"), ("adamw", "paged_adamw_8bit")):
        cfgs = [base.with_(optimizer=o, grad_ckpt=g) for o in optimizers for g in (False, True)]
        if mixed:
            cfgs.insert(1, make_config(SPEC, "qlora", seq=1024))
        read = DeviceTotals.reads(cfgs)
        assert (Component.OPTIMIZER_STATES in read) == ("paged_adamw_8bit" in optimizers)
        assert read >= {Component.ACTIVATIONS, Component.LOGITS, Component.KV_CACHE}
        memory, states = mem.step_memory_rows_shared(SPEC, cfgs, batch=b, grad_accum=a, components=read)
        got = DeviceTotals().rows(memory, states, cfgs, card)
        assert got.dtype == np.float64 and got.shape == (len(cfgs), len(b))
        alone = DeviceTotals()
        for j, cfg in enumerate(cfgs):
            assert np.array_equal(got[j], alone(mem.step_memory(SPEC, cfg, batch=b, grad_accum=a), cfg, card)), j


@pytest.mark.parametrize("gathering", [ph.ONE_DEVICE, Gathering(gathered=5 << 20, bwd_start=3 << 20)])
def test_no_head_cast_as_the_int_0_gives_what_a_zero_column_or_array_gives(gathering):
    """``combine_phases`` with ``head_grad_cast`` the int 0 (no head-cast end worked out) equals it with zeros -- a
    column of a stack, an array of the grid, a float 0.0 (the long way's ``np.where``) -- every phase, the peak, its
    phase and every component: values, dtype and shape; stacked rows and one configuration, an accumulation grid."""
    from dataclasses import replace

    b = np.arange(1, 7)
    cfgs = [c for c in _configs() if not c.recipe.behaviour.generates]
    for a in (None, np.array([1, 2, 1, 4, 1, 3])):
        for cfg in cfgs:
            st = mem.model_state(SPEC, cfg)
            t, s = mem.step_terms(SPEC, cfg, batch=b), mem.state_terms(st, cfg, mem.held_gradients(st, cfg, a))
            if s.head_grad_cast:
                continue
            s = replace(s, head_grad_cast=0)
            got = combine_phases(t, st.bytes, s, gathering)
            for zero in (np.zeros(b.shape, dtype=np.int64), 0.0, np.int64(0)):
                want = combine_phases(t, st.bytes, replace(s, head_grad_cast=zero), gathering)
                for p in PHASE_ORDER:
                    assert _same(got[0][p], want[0][p]), (cfg.method, p)
                assert _same(got[1], want[1]) and _same(got[2], want[2])
                assert list(got[3]) == list(want[3])
                for c, v in got[3].items():
                    assert _same(v, want[3][c]), (cfg.method, c)
    rows = [c for c in cfgs if c.method in ("lora", "dpo")]
    stacked, _ = mem.step_memory_rows_shared(SPEC, rows, batch=b)
    for j, cfg in enumerate(rows):
        one = mem.step_memory(SPEC, cfg, batch=b)
        assert _same(stacked.peak[j], one.peak) and _same(stacked.peak_phase[j], one.peak_phase)
        for c, v in one.components.items():
            assert np.array_equal(stacked.components[c][j], v), c


def _long_resident(t, base, s, g):
    """``phases._resident`` as it was: the states, casts and held gradients filled to the grid as float64."""
    zeros = t.zeros
    static = sum(base.get(c, 0) for c in ph.RESIDENT_COMPONENTS) + zeros + g.comm
    return ph._Resident(static=static, states=s.states + zeros, cache=s.cache + zeros,
                        cache_bwd=s.casts.cache_bwd + zeros, held=s.grads_held + zeros)


@pytest.mark.parametrize("gathering", [ph.ONE_DEVICE, Gathering(comm=3 << 20, gathered=5 << 20, bwd_work=7 << 20,
                                                                  fwd_mid=2 << 20, rollout_gather=1 << 20)])
def test_resident_terms_as_given_equal_them_filled_to_the_grid(monkeypatch, gathering):
    """``combine_phases`` with the states, casts and held gradients as ``StateTerms`` has them (ints, int64 columns)
    equals it with them filled to the grid as float64 (the long way): every phase, the peak, its phase and every
    component, values, dtype and shape -- one configuration (scalars) and stacked rows (columns), accumulation."""
    b, a = np.arange(1, 7), np.array([1, 2, 1, 4, 1, 3])
    cases = []
    for cfg in _configs():
        st = mem.model_state(SPEC, cfg)
        for acc in (None, a):
            cases.append((mem.step_terms(SPEC, cfg, batch=b), st.bytes,
                          mem.state_terms(st, cfg, mem.held_gradients(st, cfg, acc))))
    got = [combine_phases(t, base, s, gathering) for t, base, s in cases]
    cfgs = [c for c in _configs() if not c.recipe.behaviour.generates]
    rows = mem.step_memory_rows_shared(SPEC, cfgs, batch=b, grad_accum=a)[0]
    monkeypatch.setattr(ph, "_resident", _long_resident)
    want = [combine_phases(t, base, s, gathering) for t, base, s in cases]
    long_rows = mem.step_memory_rows_shared(SPEC, cfgs, batch=b, grad_accum=a)[0]
    pairs = list(zip(got, want)) + [((rows.phases, rows.peak, rows.peak_phase, rows.components),
                                     (long_rows.phases, long_rows.peak, long_rows.peak_phase, long_rows.components))]
    for g_, w_ in pairs:
        assert all(_same(g_[0][p], w_[0][p]) for p in PHASE_ORDER)
        assert _same(g_[1], w_[1]) and _same(g_[2], w_[2]) and list(g_[3]) == list(w_[3])
        for c, v in g_[3].items():
            assert _same(v, w_[3][c]), c

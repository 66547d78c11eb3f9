"""Shortcuts of session 9's per-configuration evaluation (helper core8) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``throughput._adapter_work`` reading the adapted linears' sums kept per (spec, targets)
  (``throughput._adapted_sums``) equals the per-shape sums worked out anew, for every catalogue model, low-rank
  method, target set, rank and checkpointing; a spec with list fields (unhashable) is summed each time alike;
* ``throughput._pass_work`` skipping eager score bytes without eager attention, and forwards a role does not run,
  equals adding them all;
* ``activations.attention_mask_bytes`` of SDPA without a mask (no padding, no window) equals the long way's zeros;
* ``phases.StepTerms.broadcast`` (itself when every term has the shape) equals broadcasting every term;
* ``activations.copy_dtypes`` (and ``_layer_sums``) kept by the copy's and the regime's field values tell apart a copy
  or regime differing in any one field;
* ``memory.step_memory_rows`` (components gathered once, held gradients in one ``np.where``) equals ``step_memory``
  of each row; ``throughput._default_micro`` without a prefill equals the long way; ``search._shared_rows`` (one
  look-up per candidate) equals looking every key up again; ``StepTerms.take`` of a stack equals stacking those rows;
* ``memory.step_terms`` adding no zeros (kept logits of a loss that keeps none, a chunked head's casts where there
  are none) equals adding them; ``_head_terms`` and ``_stack_activations`` equal the long way;
* ``throughput._optimizer_free`` counts the techniques on (and none otherwise); ``DeviceTotals.rows`` of one recipe
  (the whole arrays, no rows picked) equals each row's chain.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vramplan import throughput
from vramplan.config import make_config
from vramplan.methods import LOW_RANK, Forward
from vramplan.models import catalogue, get_model


def _long_adapter_work(spec, cfg, tokens, zeros):
    """``_adapter_work`` as it was: every sum over the adapted shapes, the rank inside."""
    recipe = cfg.recipe
    adapter = zeros.copy()
    shapes = throughput._adapted_shapes(spec, cfg)
    if not shapes:
        return adapter, 0.0
    gc = 1 if cfg.grad_ckpt else 0
    lora_per_token = sum(6 * cfg.rank * (i + o) * n for i, o, n in shapes)
    fwd_per_token = sum(2 * cfg.rank * (i + o) * n for i, o, n in shapes)
    grad_copies = [c for c in recipe.copies if c.forward is Forward.GRAD and c.adapter in LOW_RANK]
    forwards = 1 + gc + (1 if recipe.behaviour.generates else 0)
    adapter += len(grad_copies) * tokens * (lora_per_token + gc * fwd_per_token)
    if recipe.behaviour.generates:
        adapter += tokens * fwd_per_token
    dora = 0.0
    if recipe.adapter.dora:
        dora = float(sum(i * o * n for i, o, n in shapes) * forwards)
        adapter += sum(2 * cfg.rank * i * o * n for i, o, n in shapes) * forwards
    return adapter, dora


def _same(got, want) -> None:
    assert type(got[1]) is type(want[1]) and got[1] == want[1]
    assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
    assert np.array_equal(got[0], want[0])


def test_kept_adapted_sums_equal_the_long_way():
    specs = list(catalogue().values())
    tokens = np.array([1.0, 3.0, 512.0, 4096.0, 65536.0, 1e6])
    zeros = np.zeros(tokens.shape)
    compared = 0
    for spec in specs:
        for method in ("lora", "qlora", "dora", "ppo", "grpo", "full", "ia3"):
            for targets in (None, "all-linear"):
                for rank in (8, 16, 64):
                    try:
                        base = make_config(spec, method, rank=rank, targets=targets)
                    except Exception:  # noqa: BLE001 - a rank or targets this model refuses: nothing to compare
                        continue
                    for gc in (False, True):
                        cfg = base.with_(grad_ckpt=gc)
                        _same(throughput._adapter_work(spec, cfg, tokens * 2, zeros),
                              _long_adapter_work(spec, cfg, tokens * 2, zeros))
                        compared += 1
    assert compared > 1000
    # kept per (spec, targets): another spec or other targets never read a kept sum of a different one
    spec = get_model("llama-2-13b")
    cfg = make_config(spec, "lora")
    wider = dataclasses.replace(spec, hidden_size=spec.hidden_size + 128)
    for s, c in ((spec, cfg), (wider, cfg), (spec, cfg.with_(targets=("q_proj",))), (wider, cfg.with_(targets=()))):
        _same(throughput._adapter_work(s, c, tokens, zeros), _long_adapter_work(s, c, tokens, zeros))
    listed = dataclasses.replace(spec, aliases=list(spec.aliases) or ["x"])
    with pytest.raises(TypeError):
        hash(listed)
    _same(throughput._adapter_work(listed, cfg, tokens, zeros), _long_adapter_work(spec, cfg, tokens, zeros))


def _long_pass_work(spec, cfg, tokens, s, zeros):
    """``throughput._pass_work`` as it was: eager attention's score bytes added (zeros without eager attention)
    and every extra forward added, none of them skipped."""
    from vramplan.throughput import EAGER_BWD_BYTES, EAGER_FWD_BYTES, _body_params

    recipe = cfg.recipe
    body, h, L = _body_params(spec), spec.hidden_size, spec.num_layers
    attn_fwd = 4 * s * spec.q_dim * L
    gc = 1 if cfg.grad_ckpt else 0
    quant_linear = spec.linear_params / 1e9
    score = s * spec.num_heads * L if cfg.attention.materialises_scores else zeros
    extra = dict(recipe.behaviour.extra_forwards)
    flops, eager, passes, dequant = zeros.copy(), zeros.copy(), 0, 0.0

    def forward(n, fwd, q):
        nonlocal flops, eager, passes, dequant
        flops = flops + n * fwd
        passes += n
        eager = eager + n * tokens * score * EAGER_FWD_BYTES
        dequant += n * q

    for c in recipe.copies:
        head = spec.vocab_size * h if c.head == "lm" else h
        fwd_mm = 2 * (body + head)
        fwd = (fwd_mm + attn_fwd) * tokens
        q = quant_linear if c.quantized else 0.0
        if c.forward is Forward.GRAD:
            bwd = ((2 * fwd_mm if c.adapter is throughput.Adapter.FULL else fwd_mm) + 2 * attn_fwd) * tokens
            flops = flops + (fwd * (1 + gc) + bwd)
            passes += 2 + gc
            eager = eager + tokens * score * (EAGER_FWD_BYTES * (1 + gc) + EAGER_BWD_BYTES)
            dequant += q * (2 + gc)
            if recipe.behaviour.generates:
                forward(1, fwd, q)
        elif c.forward is Forward.NO_GRAD:
            forward(1, fwd, q)
        forward(extra.get(c.role.value, 0), fwd, quant_linear * c.quantized)
    shared_q = quant_linear if recipe.adapter.quantized_base else 0.0
    for role in recipe.shared_roles:
        n = 1 + extra.get(role.value, 0)
        flops = flops + n * (2 * (body + spec.vocab_size * h) + attn_fwd) * tokens
        passes += n
        eager = eager + n * tokens * score * EAGER_FWD_BYTES
        dequant += n * shared_q
    return flops, eager, passes, dequant


@pytest.mark.parametrize("model", ["llama-2-13b", "gemma-2-2b", "qwen3-30b-a3b"])
def test_pass_work_skipping_what_adds_nothing_equals_the_long_way(model):
    """``throughput._pass_work`` (no eager score bytes added without eager attention, no extra forward added when a
    role has none) equals adding them all: every method, attention, checkpointing, micro-batch grid and sequence."""
    from vramplan.planner.fitting import default_methods

    spec = get_model(model)
    compared = 0
    for method in default_methods():
        for attn in ("sdpa", "eager", "flash"):
            for gc in (False, True):
                try:
                    cfg = make_config(spec, method, attn=attn, grad_ckpt=gc)
                except Exception:  # noqa: BLE001 - a kernel this model refuses
                    continue
                for b, seq in ((np.arange(1, 9.0), 1024.0), (np.array(3.0), np.array([512.0, 4096.0]))):
                    zeros = np.zeros(np.broadcast(b, seq).shape)
                    tokens = b * seq * cfg.recipe.sequences_per_example + zeros
                    got = throughput._pass_work(spec, cfg, tokens, np.asarray(seq), zeros)
                    flops, eager, passes, dequant = _long_pass_work(spec, cfg, tokens, np.asarray(seq), zeros)
                    assert got.passes == passes and got.dequant == dequant, (method, attn, gc)
                    for g, w in ((got.flops, flops), (got.eager, eager)):
                        assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), (method, attn, gc)
                    compared += 1
    assert compared > 100


def test_sdpa_mask_without_a_mask_equals_the_long_way():
    """``activations.attention_mask_bytes`` of SDPA with nothing that makes a mask (no padding, no sliding window)
    is zeros of the grid, as the long way (``b s^2`` times whether ``sdpa_masked_fraction`` is positive) has it;
    with padding or a window shorter than the sequence the mask is counted."""
    from vramplan import activations as act

    grids = [(np.arange(1, 9.0), 1024.0), (np.array(2.0), np.array([512.0, 4096.0, 8192.0])), (3.0, 2048.0)]
    seen = set()
    for model in ("llama-2-13b", "mistral-7b-v0.1", "gemma-2-2b", "gemma-3-1b"):
        spec = get_model(model)
        for method in ("lora", "dpo", "kto"):
            for techniques in ((), ("padding",)):
                cfg = make_config(spec, method, attn="sdpa", techniques=techniques)
                for b, s in grids:
                    got = act.attention_mask_bytes(spec, cfg, cfg.regime, b, s)
                    bb = np.asarray(b, dtype=np.float64) * cfg.recipe.sequences_per_example
                    ss = np.asarray(s, dtype=np.float64)
                    want = bb * ss * ss * np.where(act.sdpa_masked_fraction(spec, cfg, ss) > 0, 1.0, 0.0)
                    assert type(got) is type(want) and np.shape(got) == np.shape(want)
                    assert np.asarray(got).dtype == np.asarray(want).dtype and np.array_equal(got, want)
                    seen.add(bool(np.any(want > 0)))
    assert seen == {True, False}


def test_broadcast_terms_equal_the_long_way():
    """``StepTerms.broadcast`` (the terms themselves when every one already has the shape) equals broadcasting every
    term anew, value, dtype and shape; a term of another shape is filled."""
    from vramplan.memory import step_terms
    from vramplan.phases import TERM_NAMES, StepTerms, filled

    spec = get_model("llama-2-13b")
    for method in ("lora", "grpo", "dpo", "full"):
        t = step_terms(spec, make_config(spec, method), np.arange(1, 12))
        for terms in (t, StepTerms(**{**t.__dict__, "head_acts": 0.0}), StepTerms(**{**t.__dict__, "kv": np.float64(3)})):
            shape = terms.zeros.shape
            got = terms.broadcast(shape)
            for name in TERM_NAMES:
                v = getattr(terms, name)
                want = v if np.shape(v) == shape else filled(v, shape)
                g = getattr(got, name)
                assert g.shape == shape and g.dtype == np.asarray(want).dtype and np.array_equal(g, want), name
            assert (got is terms) == all(np.shape(getattr(terms, n)) == shape for n in TERM_NAMES)
        assert t.broadcast(t.zeros.shape) is t


def test_kept_copy_dtypes_tell_apart_copies_and_regimes_differing_in_one_field():
    """``activations.copy_dtypes`` kept by the copy's and the regime's field values: a copy or regime changed in any
    one field gets its own dtypes (``_new_dtypes`` of it), an equal one built anew the kept ones."""
    from dataclasses import fields, replace

    from vramplan import activations as act
    from vramplan.methods import Adapter, resolve
    from vramplan.precision import DTYPE_BYTES, get_regime

    dtypes = list(DTYPE_BYTES)
    for name in ("bf16-mixed", "bf16", "fp32", "fp16-mixed"):
        regime = get_regime(name)
        variants = [replace(regime)]
        for f in fields(regime):
            if f.name.endswith("dtype"):
                variants += [replace(regime, **{f.name: d}) for d in dtypes if d != getattr(regime, f.name)]
        variants.append(replace(regime, autocast=None if regime.autocast else "bfloat16"))
        for method, adapter in (("lora", None), ("qlora", None), ("full", None), ("dpo", "qlora"), ("ppo", "lora")):
            for copy in resolve(method, adapter).copies:
                copies = [copy, replace(copy), replace(copy, quantized=not copy.quantized),
                          replace(copy, adapter=None if copy.adapter else Adapter.LORA)]
                for c in copies:
                    for r in variants:
                        for kbit in (True, False):
                            assert act.copy_dtypes(c, r, kbit) == act._new_dtypes(c, r, kbit), (c, r, kbit)


def test_step_memory_rows_equal_step_memory_of_each_row():
    """``memory.step_memory_rows`` (the components some row has gathered once; the held gradients of every row in one
    ``np.where`` over an accumulation grid) equals ``step_memory`` of each configuration: peak, phase and every
    component, value and dtype -- accumulation grids with and without steps above 1, the configurations' own
    accumulation, the optimiser step inside backward (no gradients held), paged and full states."""
    from vramplan.memory import step_memory, step_memory_rows

    spec = get_model("llama-3.2-1b")
    cfgs = [make_config(spec, m, seq=1024, optimizer=o) for m in ("lora", "qlora", "full")
            for o in ("adamw", "paged_adamw_8bit")]
    cfgs += [make_config(spec, "full", seq=1024, techniques=("opt_in_bwd",)), make_config(spec, "lora", grad_accum=4)]
    b = np.arange(1, 9)
    for a in (np.ones_like(b), np.array([1, 2, 1, 4, 8, 1, 2, 3]), None):
        mem, _ = step_memory_rows(spec, cfgs, batch=b, grad_accum=a)
        seen = set()
        for i, cfg in enumerate(cfgs):
            one = step_memory(spec, cfg, batch=b, grad_accum=a)
            assert np.array_equal(mem.peak[i], one.peak) and np.array_equal(mem.peak_phase[i], one.peak_phase)
            assert set(mem.components) >= set(one.components)
            for c, v in mem.components.items():
                want = one.components.get(c, np.zeros(b.shape))
                assert np.array_equal(v[i], np.broadcast_to(want, b.shape)), (cfg.method, c)
            for p, v in one.phases.items():
                assert np.array_equal(mem.phases[p][i], np.broadcast_to(v, b.shape)), (cfg.method, p)
            seen.add(bool(np.any(one.components.get(vramplan_component("GRADIENTS"), 0))))
        assert True in seen


def vramplan_component(name):
    from vramplan.taxonomy import Component

    return Component[name]


def _long_default_micro(spec, gpu, w, prof, eff, peak):
    """``throughput._default_micro`` as it was: the prefill's ``np.where`` always worked out."""
    from vramplan.throughput import (DECODE_LAUNCH_S_PER_LAYER, DEQUANT_BYTES_PER_PARAM, DORA_BYTES_PER_PARAM,
                                     LAUNCH_S_PER_LAYER_PASS, TOKENS_HALF, WIDTH_HALF)

    bw = gpu.bandwidth_gbs * 1e9 * eff.bandwidth
    width = spec.hidden_size / (spec.hidden_size + WIDTH_HALF)

    def rate(tokens):
        t = np.asarray(tokens, dtype=np.float64)
        return peak * eff.matmul * eff.stack * width * t / (t + TOKENS_HALF)

    train_flops = w.model_flops - w.rollout_flops + w.adapter_flops
    train_passes = w.layer_passes - (1 if w.gen_tokens else 0)
    compute = np.maximum(train_flops / rate(w.tokens), train_passes * w.layers * LAUNCH_S_PER_LAYER_PASS)
    dequant = w.train_dequant_gparams * 1e9 * DEQUANT_BYTES_PER_PARAM / bw + 0 * compute
    dora = w.dora_params * DORA_BYTES_PER_PARAM / bw + 0 * compute
    eager = w.eager_bytes / bw
    prefill = np.where(w.prefill_tokens > 0, w.prefill_flops / rate(np.maximum(w.prefill_tokens, 1)), 0.0)
    decode = 0 * compute
    if w.gen_tokens:
        decode = (np.maximum(w.decode_bytes / bw, w.decode_flops / (peak * eff.matmul * eff.stack * width))
                  + w.gen_tokens * w.layers * DECODE_LAUNCH_S_PER_LAYER)
    parts = dict(compute_s=compute, dequant_s=dequant, dora_s=dora, eager_attention_s=eager, rollout_s=prefill + decode)
    return compute + dequant + dora + eager + prefill + decode, parts


@pytest.mark.parametrize("method", ["lora", "ppo", "grpo", "dpo", "full", "qdora"])
def test_default_micro_without_a_prefill_equals_the_long_way(method):
    """``throughput._default_micro`` (the prefill's rate not worked out when no prompt is prefilled) gives the
    seconds and every part of the long way, value, dtype and shape, on grids of micro-batches and sequences, for
    methods that generate (a prefill) and that do not."""
    from vramplan.gpus import get_gpu

    spec, card = get_model("llama-3.2-1b"), get_gpu("a100-80gb")
    cfg = make_config(spec, method, seq=1024)
    eff = throughput.card_efficiency(card)
    peak = card.tensor_tflops(cfg.regime.compute_dtype) * 1e12
    for b, s in ((np.arange(1, 9), None), (np.array(2), np.array([512, 2048])), (3, None)):
        w = throughput.step_work(spec, cfg, b, s)
        got, want = (way(spec, card, w, None, eff, peak) for way in (throughput._default_micro, _long_default_micro))
        assert list(got[1]) == list(want[1])
        for g, v in [(got[0], want[0])] + [(got[1][k], want[1][k]) for k in want[1]]:
            assert type(g) is type(v) and np.shape(g) == np.shape(v) and np.asarray(g).dtype == np.asarray(v).dtype
            assert np.array_equal(g, v), method


def test_shared_rows_equal_the_long_way():
    """``search._shared_rows`` (one look-up per candidate) gives the representatives, in order, and each candidate's
    row of the long way (every key looked up again): the candidates of searches over methods, cards and stacks."""
    from vramplan.gpus import get_gpu
    from vramplan.planner import search as search_mod
    from vramplan.planner.limits import DeviceTotals
    from vramplan.request import SearchRequest

    spec = get_model("llama-3.2-1b")
    compared = 0
    for card in (get_gpu("a100-80gb"), get_gpu("v100-32gb")):
        for method in ("lora", "qlora", "dpo", "full", "grpo"):
            cands = search_mod._candidates(spec, method, card, SearchRequest.build(seq=1024))
            cands = cands + cands[::3]  # repeats of earlier candidates
            reps, which = search_mod._shared_rows(spec, cands, DeviceTotals().ties)
            keys = []
            for cfg, _ in cands:
                tie = cfg.attention.same_as is not None and search_mod.ties_stand_in(spec, cfg)
                keys.append(search_mod._shared_key(cfg, tie))
            want: dict = {}
            for k, (cfg, _) in zip(keys, cands):
                want.setdefault(k, cfg)
            row = {k: j for j, k in enumerate(want)}
            assert list(reps) == list(want) and all(reps[k] is want[k] for k in want)
            assert which.dtype == np.intp and which.tolist() == [row[k] for k in keys]
            assert len(reps) < len(cands)
            compared += len(cands)
    assert compared > 300


def test_take_of_a_stack_equals_the_stack_of_those_rows():
    """``StepTerms.take`` of a :meth:`stack` equals stacking the rows it picks (repeats and any order): what
    ``memory.step_memory_rows`` does with the terms of configurations differing in their optimiser only."""
    from vramplan.memory import step_terms
    from vramplan.phases import TERM_NAMES, StepTerms

    spec = get_model("llama-3.2-1b")
    grid = np.arange(1, 12)
    rows = []
    for method in ("lora", "qlora", "grpo", "full"):
        t = step_terms(spec, make_config(spec, method), grid)
        rows.append(t.broadcast(t.zeros.shape))
    pick = [2, 0, 0, 3, 1, 2, 2]
    got = StepTerms.stack(rows).take(np.array(pick, dtype=np.intp))
    want = StepTerms.stack([rows[j] for j in pick])
    for name in TERM_NAMES:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.shape == w.shape == (len(pick),) + grid.shape and np.array_equal(g, w), name


def test_step_terms_adding_no_zeros_equal_adding_them(monkeypatch):
    """``memory.step_terms`` adds no kept logits for a loss that keeps none and no chunked-head casts where there are
    none (and reads a layer's checkpointed input only where it is kept): every term equals the long way's, which
    adds those zeros -- across methods (PPO keeps its logits), stacks (litgpt's chunked head), checkpointing,
    selective checkpointing and attention kernels, value, dtype and shape."""
    from vramplan import memory
    from vramplan.phases import TERM_NAMES

    real_kept, real_hc = memory._kept_logits, memory.frozen_head_chunk_casts

    def long_kept(model, cfg, T):
        got = real_kept(model, cfg, T)
        return 0.0 * T if got is None else got

    casts = []

    def long_hc(*a):
        got = real_hc(*a)
        casts.append(bool(np.any(got)))
        return np.float64(0.0) if type(got) is int and got == 0 else got

    spec = get_model("llama-3.2-1b")
    cfgs = []
    for method in ("lora", "qlora", "ppo", "dpo", "full", "grpo", "kto"):
        for fw in ("hf", "litgpt", "torchtune"):
            for kw in ({}, {"grad_ckpt": True}, {"techniques": ("selective_ckpt",)}, {"attn": "eager"},
                       {"precision": "bf16-mixed"}):
                try:
                    cfgs.append(make_config(spec, method, framework=fw, seq=1024, **kw))
                except Exception:  # noqa: BLE001 - a combination the stack refuses
                    pass
    assert len(cfgs) > 40
    grid = np.arange(1, 7)
    kept_some = 0
    for cfg in cfgs:
        got = memory.step_terms(spec, cfg, grid)
        with monkeypatch.context() as mp:
            mp.setattr(memory, "_kept_logits", long_kept)
            mp.setattr(memory, "frozen_head_chunk_casts", long_hc)
            want = memory.step_terms(spec, cfg, grid)
        for name in TERM_NAMES:
            g, w = getattr(got, name), getattr(want, name)
            assert np.shape(g) == np.shape(w) and np.asarray(g).dtype == np.asarray(w).dtype, (cfg.method, name)
            assert np.array_equal(g, w), (cfg.method, cfg.framework, name)
        kept_some += bool(np.any(got.logits_kept))
    assert kept_some and any(casts) and not all(casts)


def _long_stack_activations(model, cfg, copy, regime, T, s, layer=None):
    """``memory._stack_activations`` as it was: the checkpointed input worked out in every branch."""
    from vramplan import activations as act
    from vramplan.memory import fused_layer_applies, fused_layer_bytes
    from vramplan.methods import Adapter

    L = model.num_layers
    full_layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s) if layer is None else layer
    if fused_layer_applies(cfg, copy, model):
        full_layer = fused_layer_bytes(model, regime, T)
    ckpt_in = act.checkpoint_input_bytes(model, copy, regime, T, cfg.stack.kbit_upcast)
    offload = cfg.uses("act_offload")
    if cfg.grad_ckpt:
        gc_offload = cfg.stack.gc_offload and not cfg.behaves("unsloth_gc_on_gpu")
        return (ckpt_in if (gc_offload or offload) else L * ckpt_in), full_layer
    if cfg.uses("selective_ckpt"):
        ck = L // 2
        return (L - ck) * full_layer + ck * ckpt_in, full_layer
    first = act.layer_activation_bytes(model, cfg, copy, regime, T, s, input_requires_grad=copy.adapter is Adapter.FULL)
    if offload:
        return 2 * full_layer, 0 * full_layer
    return (L - 1) * full_layer + first, 0 * full_layer


def test_head_and_stack_terms_equal_the_long_way():
    """``memory._head_terms`` adding a chunked head's casts only where there are some equals adding them always
    (litgpt bf16-mixed has some, the rest none); ``memory._stack_activations`` reading a layer's checkpointed input
    only where it is kept equals the long way, under checkpointing, selective checkpointing, offload and neither."""
    from vramplan import memory
    from vramplan.methods import Forward

    spec = get_model("llama-3.2-1b")
    T, rows = np.arange(1, 7) * 1024.0, np.arange(1, 7) * 1.0
    stack_saved = T * 1000.0
    with_casts = 0
    for method in ("lora", "dpo", "full", "dora", "qlora"):
        for fw in ("hf", "litgpt", "unsloth", "torchtune"):
            for kw in ({}, {"grad_ckpt": True}, {"techniques": ("selective_ckpt",)}, {"techniques": ("act_offload",)},
                       {"precision": "bf16-mixed"}):
                try:
                    cfg = make_config(spec, method, framework=fw, seq=1024, **kw)
                except Exception:  # noqa: BLE001 - a combination the stack refuses
                    continue
                for copy in cfg.recipe.copies:
                    if copy.forward is not Forward.GRAD:
                        continue
                    s = np.asarray(1024.0)
                    got = memory._stack_activations(spec, cfg, copy, cfg.regime, T, s)
                    want = _long_stack_activations(spec, cfg, copy, cfg.regime, T, s)
                    for g, w in zip(got, want):
                        assert np.shape(g) == np.shape(w) and np.array_equal(g, w), (method, fw, kw)
                    hc = memory.frozen_head_chunk_casts(spec, cfg, copy, cfg.regime, T, rows)
                    saved, f, bw = memory._head_terms(spec, cfg, copy, T, rows, stack_saved)
                    real = memory.frozen_head_chunk_casts
                    memory.frozen_head_chunk_casts = lambda *a: 0
                    try:
                        saved0, f0, bw0 = memory._head_terms(spec, cfg, copy, T, rows, stack_saved)
                    finally:
                        memory.frozen_head_chunk_casts = real
                    assert np.array_equal(saved, saved0)
                    for g, w in ((f, f0 + hc), (bw, bw0 + hc)):
                        assert np.asarray(g).dtype == np.asarray(w).dtype and np.array_equal(g, w), (method, fw, kw)
                    with_casts += bool(np.any(hc))
    assert with_casts


def test_step_time_counts_the_techniques_on_and_none_otherwise():
    """``throughput._optimizer_free`` looks the techniques' costs up only when some is on (the config's or its
    stack's): with one on, the micro-step gains its cost (``techniques_s``, the long way's sum); with none, no part."""
    from vramplan.gpus import get_gpu
    from vramplan.stacks import techniques

    spec, card = get_model("llama-3.2-1b"), get_gpu("a100-80gb")
    grid = np.arange(1, 5)
    for method in ("lora", "full"):
        for techs in ((), ("act_offload",), ("chunked_ce", "selective_ckpt"), ("padding",)):
            for gc in (False, True):
                cfg = make_config(spec, method, techniques=techs, grad_ckpt=gc)
                t = throughput.step_time(spec, cfg, card, batch=grid)
                cost = sum(x.cost_for(cfg) for name, x in techniques().items() if cfg.uses(name))
                base = throughput.step_time(spec, make_config(spec, method, grad_ckpt=gc), card, batch=grid)
                if cost:
                    assert np.array_equal(t.parts["techniques_s"], base.micro_s * cost)
                    assert np.array_equal(t.micro_s, base.micro_s * (1.0 + cost))
                else:
                    assert "techniques_s" not in t.parts and np.array_equal(t.micro_s, base.micro_s)


@pytest.mark.parametrize("method", ["lora", "full", "dpo"])
def test_device_totals_rows_of_one_recipe_equal_each_rows_chain(method):
    """``DeviceTotals.rows`` of rows that are all one recipe and stack (one chain over the whole arrays, no rows
    picked) equals each row's chain alone (``DeviceTotals.__call__`` of its ``step_memory``), to the byte, dtype
    float64; rows of two recipes (each group picked) alike."""
    from vramplan.gpus import get_gpu
    from vramplan.memory import step_memory, step_memory_rows
    from vramplan.planner.limits import DeviceTotals
    from vramplan.profiles import Fitted, Profile

    spec, card = get_model("llama-3.2-1b"), get_gpu("rtx4090")
    base = make_config(spec, method, seq=1024)
    for other in (None, "qlora"):
        cfgs = [base.with_(optimizer=o, grad_ckpt=g) for o in ("adamw", "paged_adamw_8bit") for g in (False, True)]
        if other is not None:
            cfgs.insert(1, make_config(spec, other, seq=1024))
        b = np.arange(1, 9)
        a = np.where(b < 3, 2, 1)
        mem, states = step_memory_rows(spec, cfgs, batch=b, grad_accum=a)
        # a profile whose activation factors differ by recipe: each recipe's chain its own
        prof = Profile(gpu=card.name, device={"kind": "cuda", "name": card.name}, versions={}, created="t", source="t",
                       source_info={}, allocated_source="torch.cuda",
                       activation_factors={"lora": Fitted(1.25, 4), "qlora": Fitted(1.1, 4), "dpo": Fitted(1.4, 4),
                                           "full": Fitted(1.05, 4)})
        totals, alone = DeviceTotals(), DeviceTotals()
        totals._profiles[card.name] = alone._profiles[card.name] = prof
        got = totals.rows(mem, states, cfgs, card)
        assert got.dtype == np.float64 and got.shape == (len(cfgs), len(b))
        for j, cfg in enumerate(cfgs):
            want = alone(step_memory(spec, cfg, batch=b, grad_accum=a), cfg, card)
            assert np.array_equal(got[j], want), (j, cfg.method, cfg.optimizer)

"""Shortcuts of session 10's first-call costs of a ``fit`` (helper first10) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``memory._state_without_optimizer`` summing each held copy's share (``memory._copy_share``, kept on the fields the
  share reads: the spec, the copy's adapter, quantisation and head, the stack, the regime's dtypes, and double
  quantisation, rank and targets where they are read) equals adding every copy into one state the long way --
  every field of the state, the order of its components and the optimiser groups -- for configurations differing
  in one field at a time, asked in a row so that a key missing a field it reads returns another's share;
* ``memory._adapter_groups`` (an adapter's optimiser groups and parameters kept by spec, adapter, rank, targets, head
  and bytes) equals them worked out anew, in the same comparisons;
* ``memory._model_state`` keeping that state without ``techniques`` in its key (no technique changes what is held;
  the optimiser offload is read on top) equals the long way for configurations differing only in techniques;
* ``memory._optimizer_bytes`` kept by optimiser, runner and groups equals the optimiser's own figures for every
  optimiser and runner over the same groups;
* ``memory.model_state`` kept by the techniques of ``memory.STATE_TECHNIQUES`` alone: no other technique changes
  a configuration's model state (worked out the long way), the optimiser's offload does;
* ``overheads._kept_figures`` without a profile kept by the card alone: every method and stack gets the card's
  figures;
* ``activations._layer_sums`` kept by the techniques of ``activations.LAYER_TECHNIQUES`` alone: every other technique
  leaves every part of every copy's layer as it is without it (worked out with nothing kept), and padding does not;
  kept sums asked in a row for configurations differing in techniques equal fresh ones;
* ``quant.nf4_bytes`` kept per matrix equals the layout worked out anew, and refuses bad input every time;
* ``models.get_model`` resolves a name, alias or Hugging Face id from ``models.json``'s entries and builds the one
  spec asked for; ``catalogue()`` hands out those very specs, each equal to ``from_hf_config`` of its entry, and
  the alias table equals the one read from every built spec.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from vramplan import memory, models
from vramplan.config import make_config
from vramplan.errors import VramplanError
from vramplan.memory import ModelState
from vramplan.models import get_model
from vramplan.optimizers import get_optimizer
from vramplan.taxonomy import Component


def _long_state_without_optimizer(model, cfg):
    """Every copy added into one state, nothing kept (the long way of ``_state_without_optimizer``; an adapter's
    groups worked out anew, not ``_adapter_groups``' kept ones)."""
    kept, memory._adapter_groups = memory._adapter_groups, memory._new_adapter_groups
    try:
        model = cfg.stack.as_built(model)
        st = ModelState(params=model.params)
        for comp in (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS,
                     Component.GRADIENTS, Component.OPTIMIZER_STATES, Component.AUTOCAST_CACHE):
            st.bytes[comp] = 0
        groups: list = []
        for copy in cfg.recipe.copies:
            groups += memory._add_copy(st, model, copy, cfg, cfg.regime)
        st.largest_grad = max((math.prod(shape) * pb for shape, _c, pb in groups), default=0)
        return st, groups
    finally:
        memory._adapter_groups = kept


def _long_model_state(model, cfg):
    """``_model_state``'s optimiser part over the long way's state."""
    st, groups = _long_state_without_optimizer(model, cfg)
    opt = get_optimizer(cfg.optimizer)
    offload = cfg.uses("opt_offload")
    st.add(Component.OPTIMIZER_STATES, 0 if offload else opt._total_state_bytes(tuple(groups)))
    st.step_temporary = 0 if offload else opt.step_temporary_bytes(groups, cfg.regime.runner)
    if cfg.recipe.adapter.quantized_base and cfg.behaves("torchao_nf4_unchunked_load"):
        from vramplan.loadreserve import nf4_unchunked_load_reserved

        st.load_reserved = nf4_unchunked_load_reserved(cfg.stack.as_built(model), cfg)
    return st


def _fields(st: ModelState) -> dict:
    out = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
    out["bytes"] = list(st.bytes.items())  # the components' order too
    return out


def _same_state(got, want) -> None:
    (st, groups), (wst, wgroups) = got, want
    assert _fields(st) == _fields(wst)
    assert all(type(v) is int for v in st.bytes.values())
    assert list(groups) == list(wgroups)


#: Specs of every kind the shares read differently: untied and tied heads, MoE expert banks, a Falcon
#: FalconLinear (left 16-bit by a 4-bit conversion of exact nn.Linear), a head with a bias, LayerNorm.
SPECS = ("llama-2-7b", "llama-3.2-1b", "qwen3-30b-a3b", "falcon-7b", "phi-2", "gemma-2-2b", "qwen2.5-0.5b")
#: (method, adapter, framework): one-copy and several-copy recipes over every stack that builds them.
RECIPES = [("full", None, "hf"), ("lora", None, "hf"), ("qlora", None, "hf"), ("dora", None, "hf"),
           ("ia3", None, "hf"), ("qdora", None, "hf"), ("qia3", None, "hf"), ("dpo", "qlora", "hf"),
           ("dpo", "full", "hf"), ("ppo", "lora", "hf"), ("ppo", "full", "hf"), ("ppo", "qlora", "hf"),
           ("reward", "lora", "hf"), ("grpo", "full", "hf"), ("lora", None, "torchtune"), ("qlora", None, "torchtune"),
           ("full", None, "torchtune"), ("ppo", "qlora", "torchtune"), ("lora", None, "litgpt"), ("qlora", None, "litgpt"), ("full", None, "litgpt"),
           ("lora", None, "unsloth"), ("qlora", None, "unsloth"), ("qlora", None, "fsdp_qlora")]


def _configs(spec_name: str) -> list:
    """Configurations of ``spec_name`` differing from their neighbours in one field at a time (every field a
    share reads: method and adapter, framework, precision, rank, targets, double quantisation, versions, method
    options; and techniques and the optimiser, which it does not)."""
    out = []
    for method, adapter, framework in RECIPES:
        for precision in (None, "bf16", "fp32", "fp16-mixed"):
            try:
                cfg = make_config(spec_name, method, adapter=adapter, framework=framework, precision=precision)
            except VramplanError:  # a stack that does not run this method or precision
                continue
            out.append(cfg)
            out += [cfg.with_(rank=16), cfg.with_(rank=64), cfg.with_(double_quant=False),
                    cfg.with_(techniques=("opt_offload",)), cfg.with_(optimizer="adamw_8bit"),
                    cfg.with_(techniques=("chunked_ce", "act_offload"))]
            for targets in ("all-linear", "k_proj,v_proj,down_proj"):
                try:
                    out.append(make_config(spec_name, method, adapter=adapter, framework=framework,
                                           precision=precision, targets=targets, rank=16))
                except VramplanError:  # targets the model does not have
                    pass
    old = {"hf": "peft=0.11.0", "torchtune": "torchtune=0.1.1"}
    for method, adapter, framework in (("lora", None, "hf"), ("qlora", None, "hf"), ("qlora", None, "torchtune")):
        for precision in (None, "bf16"):  # PEFT < 0.12 gives the adapters a 16-bit base's dtype (no autocast)
            out.append(make_config(spec_name, method, adapter=adapter, framework=framework, precision=precision,
                                   versions=old[framework]))
    out.append(make_config(spec_name, "grpo", adapter="full", method_options={"grpo_beta": 0.04}))
    return out


@pytest.mark.parametrize("spec_name", SPECS)
def test_copy_shares_equal_adding_every_copy_the_long_way(spec_name):
    spec = get_model(spec_name)
    memory._STATE_CACHE.clear()
    memory._BASE_CACHE.clear()
    memory._SHARE_CACHE.clear()
    configs = _configs(spec_name)
    assert len(configs) > 150
    several = 0
    for cfg in configs:
        _same_state(memory._state_without_optimizer(spec, cfg), _long_state_without_optimizer(spec, cfg))
        assert _fields(memory.model_state(spec, cfg)) == _fields(_long_model_state(spec, cfg)), cfg
        several += len(cfg.recipe.copies) > 1
    assert several > 20
    assert 0 < len(memory._SHARE_CACHE) < len(configs)  # shares were kept and reused


def test_a_stack_differing_in_one_field_gets_its_own_share():
    """A share keeps the stack it was worked out for: a stack changed in any one field a share reads (a config
    holding it in place of its framework's) gets its own, equal to the long way's."""
    from vramplan.stacks import get_stack, torchtune_builder

    hf = get_stack("hf")
    changed = 0
    for spec_name in ("llama-2-7b", "falcon-7b"):
        spec = get_model(spec_name)
        variants = [dataclasses.replace(hf, kbit_upcast=not hf.kbit_upcast),
                    dataclasses.replace(hf, quantizes_head=not hf.quantizes_head),
                    dataclasses.replace(hf, bnb_exact_linear=not hf.bnb_exact_linear),
                    dataclasses.replace(hf, nf4_adapted_only=(torchtune_builder(spec, True),)),
                    dataclasses.replace(hf, rope_cache=((spec.model_type, 1),))]
        for method, adapter in (("qlora", None), ("ppo", "qlora"), ("lora", None), ("full", None)):
            for targets in (None, "all-linear"):
                cfg = make_config(spec, method, adapter=adapter, targets=targets)
                want = _long_state_without_optimizer(spec, cfg)
                _same_state(memory._state_without_optimizer(spec, cfg), want)
                for stack in variants:
                    other = cfg.with_(rank=cfg.rank)
                    other.__dict__["stack"] = stack  # what cfg.stack resolves to, kept in the config
                    long = _long_state_without_optimizer(spec, other)
                    _same_state(memory._state_without_optimizer(spec, other), long)
                    changed += _fields(long[0]) != _fields(want[0])
    assert changed > 20


def test_a_regime_differing_in_one_field_gets_its_own_share():
    """A share is kept by the regime's dtypes and autocast: a regime changed in any one of them (a config holding
    it in place of its precision's) gets its own share, equal to the long way's."""
    from vramplan.precision import DTYPE_BYTES

    spec = get_model("llama-2-7b")
    changed = 0
    for method, adapter in (("qlora", None), ("ppo", "qlora"), ("lora", None), ("full", None), ("dpo", "full")):
        for precision in ("bf16-mixed", "bf16"):
            cfg = make_config(spec, method, adapter=adapter, precision=precision)
            regime = cfg.regime
            want = _long_state_without_optimizer(spec, cfg)
            _same_state(memory._state_without_optimizer(spec, cfg), want)
            variants = [dataclasses.replace(regime, autocast=None if regime.autocast else "bfloat16")]
            for f in ("trainable_dtype", "frozen_dtype", "adapter_dtype", "compute_dtype"):
                variants += [dataclasses.replace(regime, **{f: d}) for d in ("float32", "bfloat16", "float16")
                             if DTYPE_BYTES[d] != DTYPE_BYTES[getattr(regime, f)]]
            for r in variants:
                other = cfg.with_(rank=cfg.rank)
                other.__dict__["regime"] = r  # what cfg.regime resolves to, kept in the config
                long = _long_state_without_optimizer(spec, other)
                _same_state(memory._state_without_optimizer(spec, other), long)
                changed += _fields(long[0]) != _fields(want[0])
    assert changed > 30


def test_a_spec_with_list_fields_is_worked_out_each_time():
    """An unhashable spec (a log's JSON gives lists) keeps nothing and gives the hashable spec's state."""
    spec = get_model("llama-3.2-1b")
    listed = dataclasses.replace(spec, lora_targets=list(spec.lora_targets))
    with pytest.raises(TypeError):
        hash(listed)
    for method in ("lora", "qlora", "full", "ppo"):
        cfg = make_config(spec, method)
        kept = len(memory._SHARE_CACHE)
        _same_state(memory._state_without_optimizer(listed, cfg), _long_state_without_optimizer(spec, cfg))
        assert len(memory._SHARE_CACHE) == kept


def test_the_state_without_the_optimiser_does_not_read_techniques():
    """What ``_BASE_CACHE`` leaves out of its key: configurations differing only in techniques hold the same."""
    from vramplan.stacks import techniques

    spec = get_model("llama-2-7b")
    for method, adapter in (("lora", None), ("qlora", None), ("full", None), ("ppo", "lora"), ("dpo", "qlora")):
        cfg = make_config(spec, method, adapter=adapter)
        want = _long_state_without_optimizer(spec, cfg)
        for name in techniques():
            try:
                other = cfg.with_techniques((name,))
            except VramplanError:
                continue
            _same_state(_long_state_without_optimizer(spec, other), want)


def test_kept_optimizer_bytes_are_the_optimizers_for_each_optimizer_and_runner():
    from vramplan.optimizers import OPTIMIZERS
    from vramplan.precision import RUNNERS

    spec = get_model("llama-2-7b")
    memory._OPTIMIZER_CACHE.clear()
    differ = set()
    for method, adapter in (("lora", None), ("full", None), ("ppo", "lora")):
        cfg = make_config(spec, method, adapter=adapter)
        groups = tuple(_long_state_without_optimizer(spec, cfg)[1])
        for name, opt in OPTIMIZERS.items():
            for runner in RUNNERS:
                other = cfg.with_(optimizer=name)
                other.__dict__["regime"] = dataclasses.replace(cfg.regime, runner=runner)
                want = (opt.total_state_bytes(groups), opt.step_temporary_bytes(list(groups), runner))
                assert memory._optimizer_bytes(other, groups) == want, (method, name, runner)
                differ.add((method, want))
    assert len(differ) > 12


def test_only_the_state_techniques_change_a_model_state():
    from vramplan.stacks import techniques

    differs = set()
    for spec_name, method, adapter, framework in (("llama-2-7b", "lora", None, "hf"), ("llama-2-7b", "qlora", None, "hf"),
                                                  ("llama-3.2-1b", "full", None, "hf"), ("llama-2-7b", "ppo", "lora", "hf"),
                                                  ("llama-2-7b", "full", None, "torchtune")):
        spec = get_model(spec_name)
        cfg = make_config(spec, method, adapter=adapter, framework=framework)
        want = _fields(_long_model_state(spec, cfg))
        for name in techniques():
            try:
                other = cfg.with_techniques((name,))
            except VramplanError:
                continue
            if _fields(_long_model_state(spec, other)) != want:
                differs.add(name)
    assert differs == set(memory.STATE_TECHNIQUES)


def test_figures_without_a_profile_are_the_cards_for_every_method_and_stack():
    from vramplan import overheads
    from vramplan.gpus import catalogue as gpus
    from vramplan.methods import registry
    from vramplan.stacks import stacks

    def same(a, b):
        return {f.name: getattr(a, f.name) for f in dataclasses.fields(a)} == \
            {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}

    overheads._FIGURES_CACHE.clear()
    for gpu in list(gpus().values()) + [None]:
        want = overheads._figures(gpu, None, None, None)
        for method in [None, *registry()]:
            for stack in [None, *stacks()]:
                assert same(overheads._figures(gpu, None, method, stack), want)
                assert same(overheads._kept_figures(gpu, None, method, stack), want)
    assert len(overheads._FIGURES_CACHE) == len(gpus()) + 1


def _layer_parts(spec, cfg, seq=2048.0):
    from vramplan import activations as act

    built = cfg.stack.as_built(spec)
    return [act.layer_activation_bytes(built, cfg, copy, cfg.regime, np.array([512.0, 4096.0]), seq,
                                       input_requires_grad=irg, part=part)
            for copy in cfg.recipe.copies for part in act.LAYER_PARTS for irg in (True, False)]


def _same_parts(got, want) -> bool:
    return len(got) == len(want) and all(np.asarray(g).dtype == np.asarray(w).dtype and np.array_equal(g, w)
                                         for g, w in zip(got, want))


def test_only_the_layer_techniques_change_a_layers_saved_tensors():
    """What ``_layer_sums`` leaves out of its key: a technique outside ``LAYER_TECHNIQUES`` changes no part of any
    copy's layer (nothing kept); padding, in it, does (an SDPA mask)."""
    from vramplan import activations as act
    from vramplan.stacks import techniques

    differs = set()
    cases = [("llama-2-7b", "lora", None, "hf"), ("llama-2-7b", "qlora", None, "hf"), ("gemma-2-2b", "full", None, "hf"),
             ("llama-2-7b", "dpo", "qlora", "hf"), ("qwen2.5-0.5b", "ppo", "lora", "hf"),
             ("llama-2-7b", "lora", None, "torchtune"), ("falcon-7b", "dora", None, "hf"), ("phi-2", "ia3", None, "hf")]
    for spec_name, method, adapter, framework in cases:
        spec = get_model(spec_name)
        cfg = make_config(spec, method, adapter=adapter, framework=framework, seq=2048)
        act._SUMS.clear()
        want = _layer_parts(spec, cfg)
        for name in techniques():
            try:
                other = cfg.with_techniques((name,))
            except VramplanError:
                continue
            act._SUMS.clear()
            if not _same_parts(_layer_parts(spec, other), want):
                differs.add(name)
    act._SUMS.clear()
    assert differs == set(act.LAYER_TECHNIQUES)


def test_kept_layer_sums_of_other_technique_sets_equal_fresh_ones():
    from vramplan import activations as act
    from vramplan.stacks import techniques

    spec = get_model("gemma-2-2b")
    configs = []
    for method, adapter in (("lora", None), ("qlora", None), ("full", None), ("dpo", "lora")):
        cfg = make_config(spec, method, adapter=adapter, seq=8192)
        for name in [None, *techniques()]:
            try:
                configs.append(cfg if name is None else cfg.with_techniques((name,)))
            except VramplanError:
                pass
    fresh = []
    for cfg in configs:
        act._SUMS.clear()
        fresh.append(_layer_parts(spec, cfg, 8192.0))
    act._SUMS.clear()
    for cfg, want in zip(configs, fresh):
        assert _same_parts(_layer_parts(spec, cfg, 8192.0), want), cfg
    assert 0 < len(act._SUMS) < len(configs) * 6


def test_kept_nf4_bytes_equal_the_layout_worked_out():
    from vramplan.quant import nf4_bytes

    fresh = nf4_bytes.__wrapped__
    for numel in (0, 1, 63, 64, 65, 4095, 4096 * 4096, 5120 * 13824, 32000 * 5120, 2**40 + 3):
        for dq in (True, False):
            for block in (32, 64, 4096):
                assert nf4_bytes(numel, dq, block) == fresh(numel, dq, block)
                assert nf4_bytes(numel, dq, block) == fresh(numel, dq, block)  # kept
    for bad in ((-1, True, 64), (64, True, 100)):
        for _ in range(2):
            with pytest.raises(ValueError):
                nf4_bytes(*bad)


def test_a_name_builds_only_its_own_spec():
    models._catalogue_spec.cache_clear()
    models.catalogue.cache_clear()
    spec = get_model("13b")
    assert models._catalogue_spec.cache_info().currsize == 1
    assert get_model("LLaMA-2-13B") is spec and get_model(spec.hf_id) is spec
    assert models.catalogue()["llama-2-13b"] is spec


def test_the_catalogue_and_its_aliases_equal_the_long_way():
    """Each spec equals ``from_hf_config`` of its entry; the alias table equals the one read from the built specs."""
    raw = models.load_data("models.json")["models"]
    cat = models.catalogue()
    assert list(cat) == [e["name"] for e in raw]
    for entry in raw:
        want = models.from_hf_config(entry["config"], name=entry["name"], hf_id=entry.get("hf_id"),
                                     source=entry["source"], published_params=entry.get("params"),
                                     aliases=tuple(entry.get("aliases", ())))
        assert cat[entry["name"]] == want and cat[entry["name"]].hf_config == want.hf_config
        assert get_model(entry["name"]) is cat[entry["name"]]
    table: dict[str, str] = {}
    for spec in cat.values():
        for key in [spec.name, *spec.aliases, *([spec.hf_id] if spec.hf_id else [])]:
            table[key.lower()] = spec.name
    assert models._aliases() == table


def test_a_broken_entry_is_refused_in_one_line(monkeypatch):
    raw = models.load_data("models.json")
    first = raw["models"][0]
    cases = [({"models": [{k: v for k, v in first.items() if k != "source"}]}, "lacks 'source'"),
             ({"models": [first, dict(first)]}, "duplicate model"),
             ({"models": [first, {**first, "name": "other", "aliases": [first["name"]]}]}, "names both")]
    try:
        for data, message in cases:
            monkeypatch.setattr(models, "load_data", lambda name, d=data: d)
            models._entries.cache_clear()
            models._aliases.cache_clear()
            with pytest.raises(VramplanError, match=message):
                models._aliases()
    finally:
        monkeypatch.undo()
        models._entries.cache_clear()
        models._aliases.cache_clear()
        models._catalogue_spec.cache_clear()
        models.catalogue.cache_clear()

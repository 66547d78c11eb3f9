"""The rank axis of the activation terms (session 11, rank11) gives the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what the shortcut must preserve:

* ``memory.step_terms(..., ranks=...)`` evaluates the terms of several LoRA ranks in one pass (the rank a column
  through the layer's sums, ``activations.rank_column``): each rank's row (``StepTerms.rank_rows``) equals, field by
  field and dtype, the terms of the configuration with that rank, for one-copy and several-copy recipes, eager and
  SDPA attention, with and without checkpointing, Unsloth's fused layers, padding, dropout, every kind of layer
  (gated, plain, MoE, parallel, soft-capped) and over a scalar, a micro-batch and a micro-batch x sequence grid;
* ``memory.step_memory_rows_shared`` evaluates the low-rank configurations equal but in rank, alpha and optimiser in
  one such pass, keeping each rank's row under its own configuration's key: every row it returns equals
  ``step_memory`` of that configuration, and the kept terms equal each configuration's own;
* a whole fit (one GPU, and two, whose sharded search fills its terms through ``memory.fill_step_terms`` too)
  answers as one ``step_terms`` call per configuration.
"""

from __future__ import annotations

import numpy as np
import pytest

from vramplan import memory
from vramplan.config import make_config
from vramplan.errors import VramplanError
from vramplan.memory import step_memory, step_memory_rows_shared, step_terms
from vramplan.models import get_model
from vramplan.phases import TERM_NAMES

RANKS = (8, 16, 64)
#: gated, soft-capped (eager by hand, four norms), plain MLP with a parallel block (gelu_new), MoE, Falcon
SPECS = ("llama-2-13b", "gemma-2-2b", "phi-2", "qwen3-30b-a3b", "falcon-7b")
#: (method, adapter, framework, settings): low-rank recipes of one and several copies, over the stacks
RECIPES = [("lora", None, "hf", {}), ("lora", None, "hf", dict(grad_ckpt=True)),
           ("lora", None, "hf", dict(attn="eager")), ("lora", None, "hf", dict(attn="eager", grad_ckpt=True)),
           ("lora", None, "hf", dict(techniques="padding")), ("lora", None, "hf", dict(dropout=0.05)),
           ("lora", None, "hf", dict(targets="all-linear", precision="fp32")),
           ("qlora", None, "hf", {}), ("qlora", None, "hf", dict(grad_ckpt=False, attn="eager")),
           ("qlora", None, "hf", dict(versions="bitsandbytes=0.42.0")),
           ("dora", None, "hf", dict(grad_ckpt=True)), ("dora", None, "hf", dict(targets="all-linear")),
           ("qdora", None, "hf", {}), ("dpo", "lora", "hf", {}), ("dpo", "qlora", "hf", dict(attn="eager")),
           ("orpo", "lora", "hf", {}), ("kto", "lora", "hf", {}), ("ppo", "lora", "hf", {}),
           ("reward", "lora", "hf", {}), ("grpo", "lora", "hf", {}), ("grpo", "qlora", "hf", dict(attn="eager")),
           ("lora", None, "unsloth", {}), ("qlora", None, "unsloth", dict(grad_ckpt=False)),
           ("lora", None, "torchtune", {}), ("lora", None, "litgpt", dict(targets="q_proj,v_proj"))]
#: (batch, seq): the config's own, a micro-batch grid, a micro-batch x sequence grid
GRIDS = [(None, None), (np.array([1, 2, 3, 4, 8]), None), (np.array([[1], [2], [4]]), np.array([512, 1024, 4096]))]


def _configs(spec_name: str) -> list:
    out = []
    for method, adapter, framework, settings in RECIPES:
        try:
            out.append(make_config(spec_name, method, adapter=adapter, framework=framework, **settings))
        except VramplanError:  # a stack, method or target the model does not take
            pass
    return out


def _equal(a, b) -> bool:
    return np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype


@pytest.mark.parametrize("spec_name", SPECS)
def test_rank_axis_rows_equal_each_ranks_own_terms(spec_name):
    spec = get_model(spec_name)
    cfgs = _configs(spec_name)
    assert len(cfgs) >= 15
    axis = 0  # configurations whose terms read the rank (a rank axis seen)
    for cfg in cfgs:
        for batch, seq in GRIDS:
            t = step_terms(spec, cfg, batch, seq, ranks=RANKS)
            shape = t.zeros.shape
            axis += any(np.ndim(getattr(t, n)) == len(shape) + 1 for n in TERM_NAMES)
            rows = t.rank_rows(len(RANKS), shape)
            for row, r in zip(rows, RANKS):
                own = step_terms(spec, cfg.with_(rank=r, alpha=float(r)), batch, seq).broadcast(shape)
                for n in TERM_NAMES:
                    assert _equal(getattr(row, n), getattr(own, n)), (cfg, batch, seq, r, n)
    assert axis >= len(cfgs)  # the rank does reach the terms: the rows are not one value repeated


def _search_like(spec_name: str, generates: bool) -> list:
    """A search's configurations: every rank (alpha = rank) x optimiser x checkpointing of low-rank recipes, beside
    a rank alone and configurations without a rank (full, IA3) -- those that generate, or those that do not."""
    recipes = ([("grpo", "lora", {}), ("ppo", "lora", {}), ("ppo", "qlora", dict(attn="eager"))] if generates
               else [("lora", None, {}), ("qlora", None, dict(attn="eager")), ("dora", None, {}), ("dpo", "lora", {}),
                     ("lora", None, dict(techniques="padding")), ("reward", "lora", {})])
    out = []
    for method, adapter, settings in recipes:
        base = make_config(spec_name, method, adapter=adapter, **settings)
        for gc in (False, True):
            for r in RANKS:
                for opt in ("adamw", "adamw_8bit"):
                    out.append(base.with_(grad_ckpt=gc, rank=r, alpha=float(r), optimizer=opt))
    method = "grpo" if generates else "lora"
    adapter = "lora" if generates else None
    out.append(make_config(spec_name, method, adapter=adapter, rank=32, alpha=32.0, attn="eager"))  # a rank alone
    out += [make_config(spec_name, "grpo" if generates else "full", adapter="full" if generates else None),
            make_config(spec_name, "ppo" if generates else "ia3", adapter="ia3" if generates else None, grad_ckpt=True)]
    return out, 2 * len(recipes)


def _counting(real):
    """``(calls, step_terms)``: ``real`` (``memory.step_terms``) recording each call's ``ranks`` in ``calls``."""
    calls: list = []

    def counted(model, cfg, batch=None, seq=None, ranks=None):
        calls.append(ranks)
        return real(model, cfg, batch, seq, ranks)
    return calls, counted


@pytest.mark.parametrize("spec_name,generates", [("llama-2-13b", False), ("gemma-2-2b", False), ("qwen3-1.7b", True)])
def test_step_memory_rows_shared_rows_equal_step_memory(spec_name, generates, monkeypatch):
    spec = get_model(spec_name)
    real = memory.step_terms
    calls, counted = _counting(real)
    monkeypatch.setattr(memory, "step_terms", counted)
    batch = np.array([1, 2, 4, 8])
    cfgs, groups = _search_like(spec_name, generates)
    kept: dict = {}
    mem, states = step_memory_rows_shared(spec, cfgs, batch=batch, terms=kept)
    # one pass per group of ranks (each recipe x checkpointing), one call per configuration of a rank alone or none
    assert sum(r is not None for r in calls) == groups and all(r == RANKS for r in calls if r is not None)
    assert sum(r is None for r in calls) == 3
    monkeypatch.setattr(memory, "step_terms", real)
    for i, cfg in enumerate(cfgs):
        one = step_memory(spec, cfg, batch=batch)
        assert _equal(mem.peak[i], one.peak) and _equal(mem.peak_phase[i], one.peak_phase), cfg
        assert mem.phases.keys() == one.phases.keys() and mem.components.keys() == one.components.keys()
        for ph, v in one.phases.items():
            assert _equal(mem.phases[ph][i], v), (cfg, ph)
        for comp, v in one.components.items():
            assert _equal(mem.components[comp][i], v), (cfg, comp)
        t = kept[(spec, memory.terms_fields(cfg), (memory._grid_key(batch), memory._grid_key(None)))]
        own = real(spec, cfg, batch).broadcast(t.zeros.shape)
        for n in TERM_NAMES:
            assert _equal(getattr(t, n), getattr(own, n)), (cfg, n)
    # a later call finds every configuration kept: no terms worked out again
    calls.clear()
    monkeypatch.setattr(memory, "step_terms", counted)
    again, _ = step_memory_rows_shared(spec, cfgs, batch=batch, terms=kept)
    assert calls == [] and _equal(again.peak, mem.peak)


def _fill_one_at_a_time(model, cfgs, keys, batch, seq, by_terms):
    """``memory.fill_step_terms`` the long way: one ``step_terms`` call per configuration not kept."""
    for c, k in zip(cfgs, keys):
        if k not in by_terms:
            t = memory.step_terms(model, c, batch, seq)
            by_terms[k] = t.broadcast(t.zeros.shape)


@pytest.mark.parametrize("model,gpu,gpus", [("llama-2-13b", "rtx4000ada", 1), ("llama-2-7b", "rtx4090", 2)])
def test_fit_with_the_rank_axis_equals_one_terms_call_per_configuration(monkeypatch, model, gpu, gpus):
    """A whole fit (every method; on two GPUs the sharded search's terms too) answers as one call per configuration."""
    import vramplan
    from vramplan.planner import search as search_mod

    passes, counted = _counting(memory.step_terms)
    monkeypatch.setattr(memory, "step_terms", counted)
    got = vramplan.fit(model, gpu, gpus=gpus).to_json()
    assert sum(r is not None for r in passes) >= 10  # the rank axis was taken
    monkeypatch.setattr(memory, "fill_step_terms", _fill_one_at_a_time)
    monkeypatch.setattr(search_mod, "fill_step_terms", _fill_one_at_a_time)
    passes.clear()
    want = vramplan.fit(model, gpu, gpus=gpus).to_json()
    assert all(r is None for r in passes)
    assert got == want

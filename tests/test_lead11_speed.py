"""The activation terms kept without the techniques they do not read (session 11, lead) give the long way's answers.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what the shortcut must preserve:

* ``memory.step_memory_rows_shared`` keys the activation terms it keeps on ``memory.terms_fields``: a configuration's
  fields but its optimiser, with the techniques of ``memory.TERMS_BLIND_TECHNIQUES`` left out. Those are exactly the
  techniques that change no term of ``step_terms`` (each technique tried alone on configurations where the others
  do change a term), and two configurations share a key exactly when they differ only in those;
* ``recommend_techniques`` keeping those terms between its rounds gives the same advice as with nothing kept.
"""

from __future__ import annotations

import numpy as np
import pytest

from vramplan import memory
from vramplan.config import make_config
from vramplan.errors import VramplanError
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.phases import TERM_NAMES

CASES = [("llama-2-7b", "lora", None, "hf", False), ("llama-2-7b", "qlora", None, "hf", True),
         ("llama-3.2-1b", "full", None, "hf", False), ("llama-2-7b", "dpo", "qlora", "hf", False),
         ("qwen2.5-0.5b", "grpo", "lora", "hf", False), ("llama-2-7b", "full", None, "torchtune", False)]


def _terms(spec, cfg) -> list:
    t = memory.step_terms(spec, cfg, batch=np.array([1.0, 4.0]))
    return [getattr(t, name) for name in TERM_NAMES]


def _same(a: list, b: list) -> bool:
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(a, b))


def test_the_blind_techniques_are_exactly_those_that_change_no_activation_term():
    from vramplan.stacks import techniques

    differs, tried = set(), set()
    for spec_name, method, adapter, framework, gc in CASES:
        spec = get_model(spec_name)
        cfg = make_config(spec, method, adapter=adapter, framework=framework, seq=2048, grad_ckpt=gc)
        want = _terms(spec, cfg)
        for name in techniques():
            try:
                other = cfg.with_techniques((name,))
            except VramplanError:
                continue
            tried.add(name)
            if not _same(_terms(spec, other), want):
                differs.add(name)
    assert memory.TERMS_BLIND_TECHNIQUES <= tried
    assert differs == tried - memory.TERMS_BLIND_TECHNIQUES


def test_terms_fields_tell_apart_exactly_what_the_terms_read():
    spec = get_model("llama-2-7b")
    cfg = make_config(spec, "lora", seq=2048)
    key = memory.terms_fields(cfg)
    assert memory.terms_fields(cfg.with_(optimizer="adamw_8bit")) == key
    for blind in memory.TERMS_BLIND_TECHNIQUES:
        assert memory.terms_fields(cfg.with_techniques((blind,))) == key
        assert memory.terms_fields(cfg.with_techniques(("chunked_ce", blind))) == \
            memory.terms_fields(cfg.with_techniques(("chunked_ce",)))
    assert memory.terms_fields(cfg.with_techniques(("chunked_ce",))) != key
    for change in ({"batch": 2}, {"seq": 1024}, {"rank": 16}, {"grad_ckpt": True}, {"attn": "eager"}):
        assert memory.terms_fields(cfg.with_(**change)) != key, change


@pytest.mark.parametrize("spec_name,method,adapter,gpu", [("llama-2-13b", "orpo", None, "rtx4000ada"),
                                                          ("llama-2-13b", "full", None, "rtx4000ada"),
                                                          ("llama-2-7b", "lora", None, "rtx3080")])
def test_rows_with_kept_terms_equal_each_configuration_alone(spec_name, method, adapter, gpu):
    """One terms dict kept across calls whose configurations differ in blind techniques: every row equals
    ``step_memory`` of its configuration (nothing kept)."""
    spec = get_model(spec_name)
    cfg = make_config(spec, method, adapter=adapter, seq=2048, grad_ckpt=True, optimizer="adamw_8bit")
    kept: dict = {}
    groups = [[cfg, cfg.with_techniques(("chunked_ce",))],
              [cfg.with_techniques(("opt_in_bwd",)), cfg.with_techniques(("chunked_ce", "opt_offload"))],
              [cfg.with_techniques(("opt_offload",)), cfg.with_techniques(("act_offload", "opt_in_bwd"))]]
    for group in groups:
        mem, _ = memory.step_memory_rows_shared(spec, group, terms=kept)
        for i, c in enumerate(group):
            one = memory.step_memory(spec, c)
            assert int(mem.peak[i]) == int(one.peak), c.techniques
            for comp, v in one.components.items():
                assert int(mem.components[comp][i]) == int(v), (c.techniques, comp)
    assert len(kept) == 3  # the base, chunked_ce and act_offload: the blind techniques added none


def test_technique_advice_equals_the_advice_with_nothing_kept(monkeypatch):
    from vramplan.planner import techniques as tech

    spec, card = get_model("llama-2-13b"), get_gpu("rtx4000ada")
    cfgs = [make_config(spec, "orpo", adapter="qlora", seq=2048, grad_ckpt=True, batch=1),
            make_config(spec, "full", seq=2048, grad_ckpt=True, optimizer="adamw_8bit")]
    got = [tech.recommend_techniques(spec, c, card).to_json() for c in cfgs]
    real = tech.estimate_peaks_rows
    monkeypatch.setattr(tech, "estimate_peaks_rows", lambda *a, terms=None, **k: real(*a, terms=None, **k))
    assert [tech.recommend_techniques(spec, c, card).to_json() for c in cfgs] == got

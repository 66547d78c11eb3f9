"""Shortcuts of session 9's per-configuration evaluation (helper core8) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``throughput._adapter_work`` reading the adapted linears' sums kept per (spec, targets)
  (``throughput._adapted_sums``) equals the per-shape sums worked out anew, for every catalogue model, low-rank
  method, target set, rank and checkpointing; a spec with list fields (unhashable) is summed each time alike.
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

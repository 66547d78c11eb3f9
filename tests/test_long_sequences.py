"""Eager attention's per-score bytes at long sequences (numpy only; the dry-run comparison is
tests/test_dryrun_vs_analytic.py's LONGSEQ_GRID)."""

from __future__ import annotations

import numpy as np
import pytest

from vramplan import activations as act
from vramplan.config import make_config
from vramplan.models import get_model


@pytest.mark.parametrize("attn,residual,compute,expected", [
    (2, 2, "bfloat16", 10.0),  # 16-bit scores: scores + fp32 conversion + fp32 softmax output
    (2, 4, "bfloat16", 8.0),   # fp32 scores (an fp32 residual stream): no conversion, .to(q.dtype) a no-op
    (4, 4, "float32", 8.0),
    (2, 2, "float16", 8.0),    # CUDA fp16: _softmax(half_to_float) skips the conversion; .to(fp16) beside the scores
])
def test_eager_softmax_peak_per_score(attn, residual, compute, expected):
    assert act.eager_softmax_peak(attn, residual, compute) == expected


def test_softcapping_tanh_is_held_at_the_softmax_backward():
    gemma = get_model("gemma-2-2b")
    cfg = make_config(gemma, "lora", batch=1, seq=8192, attn="eager", grad_ckpt=True)
    ea = act.eager_attention(gemma, cfg, cfg.recipe.copies[0], cfg.regime)
    assert ea.capped == 2.0 and ea.bwd_peak == 14.0  # saved fp32 output, its gradient, the input's, tanh's output
    llama = get_model("llama-3-8b")
    cfg = make_config(llama, "lora", batch=1, seq=8192, attn="eager", grad_ckpt=True)
    ea = act.eager_attention(llama, cfg, cfg.recipe.copies[0], cfg.regime)
    assert ea.capped == 0.0 and ea.bwd_peak == 12.0


def test_grpo_eager_rollout_holds_the_prefill_scores():
    import vramplan

    spec = get_model("llama-3-8b").with_layers(2)
    eager = vramplan.estimate(spec, "grpo", batch=1, seq=8192, attn="eager", grad_ckpt=True)
    sdpa = vramplan.estimate(spec, "grpo", batch=1, seq=8192, attn="sdpa", grad_ckpt=True)
    # generation batch 8 x prompt 7680: 32 heads x 7680^2 scores per sequence at 10 bytes each
    scores = 8 * 32 * 7680 ** 2 * 10
    assert eager.tensor_peak_bytes - sdpa.tensor_peak_bytes > 0.95 * scores
    assert np.isfinite(eager.tensor_peak_bytes)

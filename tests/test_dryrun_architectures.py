"""The non-Llama layouts held to the dry run: LayerNorm, parallel attention + MLP blocks, plain MLPs.

Phi-2 (one shared LayerNorm, separate q/k/v with biases, transformers' Python ``gelu_new`` whose
saved tensors are fp32 under autocast, lm_head bias), StableLM-alpha (GPT-NeoX: two LayerNorms of
the same input, fused query_key_value) and Falcon-7B (multi-query fused qkv, one norm, FalconLinear
left unquantised by transformers >= 5 bitsandbytes, SDPA with unequal head counts run by the math
backend, which the planner plans as eager attention) and Llama-4 Scout (transformers runs all 16
experts on every token; QLoRA's fp32 banks are cast for bmm and the casts saved) and BLOOMZ-7B1 (a LayerNorm
after the embedding, fused query_key_value with biases, its own ALiBi attention that materialises the scores
whatever attn_implementation says: planned as eager). Two layers at their real widths, like
tests/test_dryrun_vs_analytic.py.
"""

from __future__ import annotations

import pytest
from conftest import load_benchmark

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

bench = load_benchmark("dryrun_vs_analytic")

LAYERS = 2
EXACT = ([("phi-2", m, gc, "1k") for m in ("full", "lora", "qlora", "dora", "ia3") for gc in (False, True)]
         + [("stablelm-base-alpha-3b", m, gc, "1k") for m in ("full", "lora", "qlora") for gc in (False, True)]
         + [("falcon-7b", m, gc, "1k") for m in ("full", "qlora") for gc in (False, True)]
         + [("falcon-7b", "lora", True, "1k")]
         + [("llama-4-scout-17b-16e", m, gc, "1k") for m, gc in (("lora", False), ("lora", True), ("qlora", False),
                                                                 ("full", False))]
         + [("bloomz-7b1", m, gc, "1k") for m, gc in (("lora", False), ("lora", True), ("qlora", False), ("ia3", True))]
         + [("bloomz-7b1", "full", False, "4x1k")])


@pytest.mark.parametrize("arch,method,gc,shape", EXACT, ids=lambda v: str(v))
def test_layouts_within_tolerance_of_dryrun(arch, method, gc, shape):
    row = bench.run_row(arch, method, gc, shape, layers=LAYERS)
    assert not row.error_text and not row.skipped, row.error_text or row.skipped
    # GPT-NeoX without checkpointing: its second LayerNorm's and the fused qkv's saved tensors are counted
    # on the safe side (+2..4% at 2 layers)
    hi = 0.045 if (arch == "stablelm-base-alpha-3b" and not gc) else 0.025
    if arch == "phi-2" and method in ("dora", "ia3"):
        hi = 0.09  # over-predicted (the safe side): the analytic activations at the peak exceed the dry run's (cause not traced)
    assert -0.02 <= row.error <= hi, (
        f"{arch} {method} gc={gc} {shape}: estimate {row.estimate} vs dry run {row.dryrun} B "
        f"({100 * row.error:+.2f}%); largest component difference {row.worst} {row.worst_bytes:+d} B")


def test_falcon_math_sdpa_is_planned_on_the_safe_side():
    """Falcon's multi-query SDPA materialises its scores (math backend): planned as eager attention, whose
    fp32 softmax the math backend does not keep -- above the dry run, never below it."""
    row = bench.run_row("falcon-7b", "lora", False, "1k", layers=LAYERS)
    assert not row.error_text, row.error_text
    assert 0.0 <= row.error <= 0.15, f"{row.estimate} vs {row.dryrun} ({100 * row.error:+.2f}%)"
    flash = bench.run_row("falcon-7b", "lora", False, "1k", layers=LAYERS, attn="eager")
    assert flash.dryrun > row.dryrun * 0.9  # the dry run's sdpa is close to its eager: scores materialised


def test_falcon_qlora_leaves_falconlinear_unquantised_and_says_so():
    import vramplan

    est = vramplan.estimate("falcon-7b", "qlora", seq=512)
    lora = vramplan.estimate("falcon-7b", "lora", seq=512)
    assert est.components["weights"] > lora.components["weights"]  # fp32 after prepare_model_for_kbit_training
    assert any("FalconLinear" in a for a in est.assumptions)
    lit = vramplan.estimate("falcon-7b", "qlora", seq=512, framework="litgpt")
    assert lit.components["weights"] < lora.components["weights"] / 2  # litgpt quantises every nn.Linear
    assert not any("FalconLinear" in a for a in lit.assumptions)
    assert any("math backend" in a for a in lora.assumptions)
    assert not any("math backend" in a for a in vramplan.estimate("falcon-7b", "lora", seq=512,
                                                                  framework="litgpt").assumptions)


def test_bloom_runs_its_own_attention_planned_as_eager_and_says_so():
    import vramplan
    from vramplan.models import get_model

    spec = get_model("bigscience/bloomz-7b1")
    assert spec.params == spec.published_params  # the embedding LayerNorm counted (transformers on meta)
    sdpa = vramplan.estimate(spec, "lora", seq=512, attn="sdpa")
    eager = vramplan.estimate(spec, "lora", seq=512, attn="eager")
    assert sdpa.tensor_peak_bytes == eager.tensor_peak_bytes
    assert any("ALiBi" in a for a in sdpa.assumptions) and not any("ALiBi" in a for a in eager.assumptions)
    row = bench.run_row("bloomz-7b1", "lora", False, "1k", layers=LAYERS, attn="sdpa")  # the dry run builds eager
    assert not row.error_text and -0.02 <= row.error <= 0.025, row.error_text or row.error

"""QDoRA and 4-bit IA³ (issue 15): the 4-bit twins of DoRA and IA³, as QLoRA is LoRA's.

PEFT runs DoRA (``use_dora=True``) and IA³ over bitsandbytes ``Linear4bit``
(peft/tuners/lora/bnb.py, peft/tuners/ia3/bnb.py); DoRA's weight norm dequantises the 4-bit
weight every forward (peft/tuners/lora/dora.py ``DoraLinearLayer.forward``:
``dequantize_module_weight(base_layer).to(x.dtype)``). The analytic model is held to the dry
run, which builds exactly that on ``meta``.
"""

from __future__ import annotations

import pytest

import vramplan
from vramplan.methods import Adapter, resolve
from vramplan.planner.search import adapters_for


def test_adapter_attributes():
    assert Adapter.LORA.four_bit is Adapter.QLORA
    assert Adapter.DORA.four_bit is Adapter.QDORA and Adapter.IA3.four_bit is Adapter.QIA3
    assert Adapter.QLORA.four_bit is None and Adapter.FULL.four_bit is None
    assert all(a.quantized_base for a in (Adapter.QLORA, Adapter.QDORA, Adapter.QIA3))
    assert not any(a.quantized_base for a in (Adapter.LORA, Adapter.DORA, Adapter.IA3, Adapter.FULL))
    assert Adapter.QDORA.dora and Adapter.QDORA.low_rank and not Adapter.QDORA.ia3
    assert Adapter.QIA3.ia3 and not Adapter.QIA3.low_rank
    assert resolve("qdora").adapter is Adapter.QDORA and resolve("qia3").adapter is Adapter.QIA3


@pytest.mark.parametrize("method,fallback,label", [("lora", "qlora", "QLoRA fallback"),
                                                   ("dora", "qdora", "QDoRA fallback"),
                                                   ("ia3", "qia3", "4-bit IA³ fallback")])
def test_fit_searches_the_four_bit_twin(method, fallback, label):
    assert adapters_for(method, None) == [(method, None, None), (fallback, None, label)]
    assert adapters_for(method, method) == [(method, method, None)]  # an explicit adapter: no fallback


def test_dpo_falls_back_to_qlora_only():
    assert adapters_for("dpo", None)[1] == ("dpo", "qlora", "QLoRA fallback")


def test_four_bit_twins_quantise_the_base_and_train_the_same_vectors():
    for plain, four in (("dora", "qdora"), ("ia3", "qia3"), ("lora", "qlora")):
        a = vramplan.estimate("llama-3.1-8b", plain, seq=1024, grad_ckpt=True)
        b = vramplan.estimate("llama-3.1-8b", four, seq=1024, grad_ckpt=True)
        assert a.trainable_params == b.trainable_params
        assert b.components["weights"] < a.components["weights"] / 2  # NF4 decoder linears
        assert b.components.get("quant_state", 0) > 0
    assert vramplan.estimate("llama-3.1-8b", "qdora", seq=1024).config.grad_ckpt  # as QLoRA: GC by default


def test_fit_row_says_what_dora_became():
    report = vramplan.fit("llama-3.1-8b", "rtx3090", methods=["dora", "ia3"], seq=5120)
    by = {r.requested: r for r in report.rows}
    assert by["dora"].recipe == "qdora" and by["dora"].label == "dora → qdora"
    assert by["ia3"].recipe == "qia3"
    assert any(n.startswith("QDoRA fallback: dora over a 16-bit base does not fit") for n in by["dora"].notes)
    assert not any("not modelled" in n for r in report.rows for n in r.notes)


def _needs_dryrun():
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        pytest.importorskip(pkg)


@pytest.mark.parametrize("arch,method,gc,shape", [(a, m, gc, "1k") for a in ("smollm2-360m", "qwen3-8b")
                                                  for m in ("qdora", "qia3") for gc in (False, True)])
def test_four_bit_twins_within_two_percent_of_dryrun(arch, method, gc, shape):
    _needs_dryrun()
    from conftest import load_benchmark

    bench = load_benchmark("dryrun_vs_analytic")
    row = bench.run_row(arch, method, gc, shape, layers=2)
    assert not row.error_text and not row.skipped, row.error_text or row.skipped
    assert abs(row.error) <= 0.02, f"{arch} {method} gc={gc}: {row.estimate} vs {row.dryrun} ({100 * row.error:+.2f}%)"


def test_qdora_all_linear_is_never_under_the_dryrun():
    """All-linear QDoRA at a short sequence: the analytic forward adds the 4-bit matmul's dequantised weight to
    DoRA's weight-norm buffers, which the dry run never holds together -- over, never under."""
    _needs_dryrun()
    from vramplan.models import get_model

    spec = get_model("llama-3.2-1b").with_layers(2)
    for shape in ((1, 256), (2, 1024)):
        kw = dict(batch=shape[0], seq=shape[1], targets="all-linear", rank=16, grad_ckpt=False)
        est, dry = vramplan.estimate(spec, "qdora", **kw), vramplan.dry_run(spec, "qdora", **kw)
        assert 0.98 * dry.tensor_peak_bytes <= est.tensor_peak_bytes <= 1.10 * dry.tensor_peak_bytes

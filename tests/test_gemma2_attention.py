"""Gemma-2's attention as the stack really runs it.

transformers >= 5.21 refuses SDPA for Gemma-2 (``Gemma2PreTrainedModel._supports_sdpa = False``: SDPA cannot
apply the attention softcap): an explicit request raises, the default falls back to eager. The planner plans an
SDPA request as eager there (architectures.toml ``sdpa_unsupported``), and as SDPA before 5.21 (stacks.toml
[behaviours.sdpa_drops_softcap]); flash (flash-attn >= 2.6 takes the softcap) is unaffected. torchtune and litgpt
run their own Gemma-2 attention, which computes the soft-capped scores by hand whatever kernel is asked
(stacks.toml softcap_by_hand): planned as eager there. The dry run builds what transformers builds.
"""

from __future__ import annotations

import pytest

import vramplan

NEW, OLD = "transformers=5.24.0", "transformers=5.20.0"


def _peak(attn: str, versions: str, **kw) -> vramplan.Estimate:
    return vramplan.estimate("gemma-2-2b", kw.pop("method", "lora"), seq=2048, attn=attn, versions=versions, **kw)


@pytest.mark.parametrize("framework", ["hf", "fsdp_qlora"])
def test_sdpa_is_planned_as_eager_where_transformers_refuses_it(framework):
    method = "qlora" if framework == "fsdp_qlora" else "lora"
    sdpa = _peak("sdpa", NEW, method=method, framework=framework)
    eager = _peak("eager", NEW, method=method, framework=framework)
    flash = _peak("flash", NEW, method=method, framework=framework)
    assert sdpa.tensor_peak_bytes == eager.tensor_peak_bytes > flash.tensor_peak_bytes
    assert any("refuses SDPA for Gemma2" in a for a in sdpa.assumptions)
    assert not any("refuses SDPA for Gemma2" in a for a in eager.assumptions + flash.assumptions)


def test_before_5_21_sdpa_runs_with_the_softcap_dropped():
    sdpa = _peak("sdpa", OLD)
    assert sdpa.tensor_peak_bytes == _peak("flash", OLD).tensor_peak_bytes < _peak("eager", OLD).tensor_peak_bytes
    assert not any("refuses SDPA for Gemma2" in a for a in sdpa.assumptions)
    assert any("sdpa_drops_softcap applies" in a for a in sdpa.assumptions)


@pytest.mark.parametrize("framework", ["torchtune", "litgpt"])
def test_stacks_with_their_own_attention_compute_softcapped_scores_by_hand(framework):
    """torchtune's Gemma2Attention and litgpt's softcapping branch materialise the scores whatever is asked;
    a model without an attention softcap keeps the kernel asked for."""
    eager = _peak("eager", NEW, framework=framework)
    for attn in ("sdpa", "flash"):
        est = _peak(attn, NEW, framework=framework)
        assert est.tensor_peak_bytes == eager.tensor_peak_bytes
        assert any("by hand" in a for a in est.assumptions) and not any("refuses SDPA" in a for a in est.assumptions)
    assert not any("by hand" in a for a in eager.assumptions)
    llama = [vramplan.estimate("llama-3-8b", "lora", seq=2048, attn=a, framework=framework) for a in ("sdpa", "eager")]
    assert llama[0].tensor_peak_bytes < llama[1].tensor_peak_bytes


def test_only_gemma2_is_marked():
    from vramplan.models import get_model

    assert get_model("gemma-2-2b").sdpa_unsupported
    assert not any(get_model(m).sdpa_unsupported for m in ("gemma-7b", "gemma-3-1b", "llama-3-8b"))


def test_dry_run_builds_what_transformers_builds():
    """SDPA and flash (emulated through SDPA, the softcap dropped as the kernel keeps it in-kernel) both run."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from conftest import load_benchmark

    bench = load_benchmark("dryrun_vs_analytic")
    for attn in ("sdpa", "flash"):
        row = bench.run_row("gemma-2-2b", "lora", False, "1k", layers=2, attn=attn)
        assert not row.error_text and not row.skipped, row.error_text or row.skipped
        assert -0.02 <= row.error <= 0.025, f"{attn}: {100 * row.error:+.2f}%"
    from vramplan.stacks import release

    if release(transformers.__version__) >= (5, 21):
        eager = bench.run_row("gemma-2-2b", "lora", False, "1k", layers=2, attn="eager")
        sdpa = bench.run_row("gemma-2-2b", "lora", False, "1k", layers=2, attn="sdpa")
        assert sdpa.dryrun == eager.dryrun  # built eager, as transformers' default falls back to


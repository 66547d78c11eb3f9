"""The analytic planner: literature facts, parameter counts, monotonicity, API contract."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import vramplan
from vramplan.config import make_config
from vramplan.memory import model_state, step_memory
from vramplan.models import get_model
from vramplan.taxonomy import Component

STATE = (Component.WEIGHTS, Component.GRADIENTS, Component.OPTIMIZER_STATES)


def _state_bytes_per_param(model, precision):
    spec = get_model(model)
    cfg = make_config(spec, "full", precision=precision)
    st_ = model_state(spec, cfg)
    return sum(st_.bytes[c] for c in STATE) / spec.params


@pytest.mark.parametrize("model", ["llama-2-7b", "qwen2.5-0.5b", "mixtral-8x7b"])
def test_full_sft_bf16_mixed_is_16_bytes_per_param(model):
    # fp32 weights (4) + fp32 grads (4) + AdamW exp_avg and exp_avg_sq (8); the scalar step per tensor is noise
    assert _state_bytes_per_param(model, "bf16-mixed") == pytest.approx(16.0, rel=1e-6)


def test_pure_bf16_is_8_bytes_per_param():
    assert _state_bytes_per_param("llama-2-7b", "bf16") == pytest.approx(8.0, rel=1e-6)


def test_regime_is_stated():
    est = vramplan.estimate("llama-2-7b", "full", precision="bf16")
    assert any("precision bf16" in a for a in est.assumptions)
    assert any("quantity" in a for a in est.assumptions)
    assert any("stack" in a for a in est.assumptions)


def test_llama2_7b_lora_r8_qv_trainable_params():
    est = vramplan.estimate("llama-2-7b", "lora", rank=8, targets="q_proj,v_proj")
    assert est.trainable_params == 4_194_304


def test_default_targets_are_peft_defaults():
    assert vramplan.estimate("llama-2-7b", "lora").trainable_params == 4_194_304


def test_size_alias_resolves_and_says_so():
    est = vramplan.estimate("13b", "lora")
    assert est.model == "llama-2-13b"
    assert est.model_resolved_from == "13b -> llama-2-13b"


def test_activations_linear_in_batch():
    spec = get_model("llama-2-7b")
    cfg = make_config(spec, "lora")
    a = [float(step_memory(spec, cfg, batch=b).components[Component.ACTIVATIONS]) for b in (1, 2, 3, 4)]
    d = np.diff(a)
    assert np.allclose(d, d[0], rtol=1e-9) and d[0] > 0


@pytest.mark.parametrize("attn", ["sdpa", "flash"])
def test_activations_about_linear_in_seq_with_flash(attn):
    spec = get_model("llama-2-7b")
    cfg = make_config(spec, "lora", attn=attn)
    a1 = float(step_memory(spec, cfg, seq=1024).components[Component.ACTIVATIONS])
    a4 = float(step_memory(spec, cfg, seq=4096).components[Component.ACTIVATIONS])
    assert a4 / a1 == pytest.approx(4.0, rel=0.01)


def test_eager_attention_is_quadratic():
    spec = get_model("llama-2-7b")
    cfg = make_config(spec, "lora", attn="eager")
    a1 = float(step_memory(spec, cfg, seq=1024).components[Component.ACTIVATIONS])
    a4 = float(step_memory(spec, cfg, seq=4096).components[Component.ACTIVATIONS])
    assert a4 / a1 > 5


def test_grad_ckpt_lowers_activations():
    on = vramplan.estimate("llama-3.1-8b", "lora", grad_ckpt=True, seq=4096)
    off = vramplan.estimate("llama-3.1-8b", "lora", grad_ckpt=False, seq=4096)
    assert on.components[Component.ACTIVATIONS] < off.components[Component.ACTIVATIONS] / 4


def test_qlora_weights_are_about_half_a_byte_per_linear_param():
    spec = get_model("llama-2-13b")
    cfg = make_config(spec, "qlora")
    st_ = model_state(spec, cfg)
    q = st_.bytes[Component.QUANT_STATE] / spec.linear_params
    assert q == pytest.approx(0.127 / 8, rel=0.05)  # double quantisation: ~0.127 bit per parameter
    nodq = model_state(spec, make_config(spec, "qlora", double_quant=False)).bytes[Component.QUANT_STATE]
    assert nodq / spec.linear_params == pytest.approx(0.5 / 8, rel=1e-3)


def test_peak_orders_methods_sensibly():
    peaks = {m: vramplan.estimate("llama-2-7b", m).peak_bytes for m in ("full", "lora", "qlora", "dpo", "ppo")}
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]
    assert peaks["lora"] < peaks["dpo"] < peaks["ppo"]


def test_json_contract_keys():
    est = vramplan.estimate("7b", "qlora", gpu="rtx4000ada")
    j = est.to_json()
    for k in ("model", "params", "trainable_params", "peak_bytes", "peak_gib", "tensor_peak_bytes", "components",
              "capacity_bytes", "fits"):
        assert k in j
    assert j["peak_bytes"] == j["tensor_peak_bytes"] + j["components"]["cuda_context"] + \
        j["components"]["workspace"] + j["components"]["allocator_reserve"]
    tensor_sum = sum(v for k, v in j["components"].items() if Component(k).is_tensor)
    assert tensor_sum == pytest.approx(j["tensor_peak_bytes"], abs=16)


def test_fits_matches_capacity():
    est = vramplan.estimate("7b", "full", gpu="rtx3080")
    assert est.fits is False and est.peak_bytes > est.capacity_bytes
    est = vramplan.estimate("tinyllama-1.1b", "qlora", gpu="h100-sxm")
    assert est.fits is True


def test_fit_every_method_present():
    rep = vramplan.fit("13b", "rtx4000ada")
    from vramplan.methods import default_methods

    assert [r.requested for r in rep.rows] == default_methods()  # every listed method, in catalogue order
    assert {"full", "lora", "qlora", "dora", "ia3", "dpo", "ppo", "grpo"} <= set(default_methods())
    for r in rep.rows:
        if r.fits:
            assert r.estimate.peak_bytes <= rep.capacity_bytes
            assert r.max_batch_tight >= 1 and r.max_seq_tight >= 128
        if r.verdict.value == "comfortable":  # fit's max b/seq are the comfortable limits
            assert r.max_batch >= 1 and r.max_seq >= 128


def test_no_bf16_card_falls_back_to_fp16():
    est = vramplan.estimate("7b", "qlora", gpu="t4")
    assert est.config.precision == "fp16-mixed"
    with pytest.raises(vramplan.VramplanError, match="bf16"):
        vramplan.estimate("7b", "qlora", gpu="t4", precision="bf16-mixed")


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(["full", "lora", "qlora", "dora", "ia3", "dpo", "ppo"]),
       batch=st.integers(1, 16), seq=st.integers(256, 8192), gc=st.booleans(),
       attn=st.sampled_from(["eager", "sdpa"]))
def test_more_batch_or_seq_never_uses_less_memory(method, batch, seq, gc, attn):
    spec = get_model("qwen2.5-0.5b")
    cfg = make_config(spec, method, batch=batch, seq=seq, grad_ckpt=gc, attn=attn)
    base = float(step_memory(spec, cfg).peak)
    assert float(step_memory(spec, cfg, batch=batch + 1).peak) >= base
    assert float(step_memory(spec, cfg, seq=seq + 128).peak) >= base


def test_vectorised_equals_scalar():
    spec = get_model("llama-3.2-1b")
    cfg = make_config(spec, "dpo")
    b = np.array([1, 2, 4])[:, None]
    s = np.array([512, 2048])[None, :]
    grid = step_memory(spec, cfg, batch=b, seq=s).peak
    for i, bb in enumerate((1, 2, 4)):
        for j, ss in enumerate((512, 2048)):
            assert grid[i, j] == float(step_memory(spec, cfg, batch=bb, seq=ss).peak)


@pytest.mark.parametrize("terminal", [True, False])
def test_models_and_gpus_listings_never_truncate_a_name(terminal):
    import io

    from rich.console import Console

    from vramplan.gpus import catalogue as gpu_catalogue
    from vramplan.models import catalogue
    from vramplan.render import render_gpus, render_models

    buf = io.StringIO()
    c = Console(file=buf, width=80, force_terminal=terminal, color_system=None)
    render_models(list(catalogue().values()), c)
    render_gpus(list(gpu_catalogue().values()), c)
    words = set(buf.getvalue().replace(",", " ").split())
    assert "…" not in buf.getvalue()
    for m in catalogue().values():
        assert {m.name, *m.aliases} <= words, m.name
    for g in gpu_catalogue().values():
        assert {g.name, *g.aliases} <= words, g.name


def test_moe_qlora_says_the_fused_experts_stay_16_bit_with_its_sources():
    est = vramplan.estimate("mixtral-8x7b", "qlora", grad_ckpt=True)
    lora = vramplan.estimate("mixtral-8x7b", "lora", grad_ckpt=True)
    assert est.peak_bytes > lora.peak_bytes  # what the note explains
    note = next(a for a in est.assumptions if a.startswith("MoE QLoRA"))
    assert "transformers >= 5" in note and "#1849" in note and "fp32" in note and "Unsloth" in note
    assert not any(a.startswith("MoE QLoRA") for a in lora.assumptions)
    assert not any(a.startswith("MoE QLoRA") for a in vramplan.estimate("7b", "qlora").assumptions)
    rep = vramplan.fit("mixtral-8x7b", "h200", methods=["lora", "qlora"])
    assert not any("MoE QLoRA" in n for n in rep.rows[0].notes)
    assert any("MoE QLoRA" in n and "#1849" in n for n in rep.rows[1].notes)


def test_paged_adamw_32bit_keeps_two_fp32_states_in_paged_memory():
    from vramplan.optimizers import get_optimizer
    from vramplan.taxonomy import Component

    opt = get_optimizer("paged_adamw_32bit")
    assert opt.paged and opt.state_bytes((4096, 4096), 2) == 2 * 4096 * 4096 * 4 + 4
    est = vramplan.estimate("1b", "full", optimizer="paged_adamw_32bit", precision="bf16")
    assert est.components[Component.OPTIMIZER_STATES] >= 8 * est.trainable_params
    assert est.tokens_per_s is None or est.tokens_per_s > 0

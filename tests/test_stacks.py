"""Training stacks and memory-saving techniques move the estimate in the documented direction."""

import pytest

from vramplan.config import make_config
from vramplan.errors import VramplanError
from vramplan.memory import model_state, step_memory
from vramplan.models import get_model
from vramplan.stacks import get_stack, stacks, techniques
from vramplan.taxonomy import Component as C

M = get_model("llama-3.1-8b")


def comp(cfg, c, **kw):
    return float(step_memory(M, cfg, **kw).components[c])


def peak(cfg, **kw):
    return float(step_memory(M, cfg, **kw).peak)


def test_catalogue_validates_and_cites():
    assert set(stacks()) == {"hf", "torchtune", "unsloth", "litgpt", "fsdp_qlora"}
    for st in stacks().values():
        assert st.sources, st.name
    for t in techniques().values():
        assert t.source and t.cost >= 0


def test_unknown_framework_and_technique():
    with pytest.raises(VramplanError, match="did you mean torchtune"):
        make_config(M, "lora", framework="torchtun")
    with pytest.raises(VramplanError, match="unknown technique"):
        make_config(M, "lora", techniques="magic")
    with pytest.raises(VramplanError, match="choose one"):
        make_config(M, "lora", techniques="chunked_ce,liger_ce")
    with pytest.raises(VramplanError, match="accumulate"):
        make_config(M, "full", techniques="opt_in_bwd", grad_accum=4)


def test_torchtune_is_pure_bf16_adapters_too():
    hf = model_state(M, make_config(M, "lora"))
    tt = model_state(M, make_config(M, "lora", framework="torchtune"))
    assert tt.bytes[C.ADAPTERS] * 2 == hf.bytes[C.ADAPTERS]
    assert make_config(M, "lora", framework="torchtune").precision == "bf16"


def test_chunked_and_fused_loss_shrink_logits():
    hf = make_config(M, "lora", batch=2, seq=2048, grad_ckpt=True)
    chunked = make_config(M, "lora", batch=2, seq=2048, grad_ckpt=True, techniques="chunked_ce")
    liger = make_config(M, "lora", batch=2, seq=2048, grad_ckpt=True, techniques="liger_ce")
    assert comp(chunked, C.LOGITS) < 0.6 * comp(hf, C.LOGITS)
    assert comp(liger, C.LOGITS) < 0.1 * comp(hf, C.LOGITS)
    assert peak(liger) < peak(chunked) < peak(hf)


def test_qlora_without_kbit_upcast_is_smaller():
    hf = model_state(M, make_config(M, "qlora"))
    tt = model_state(M, make_config(M, "qlora", framework="torchtune"))
    # beside torchtune's fp32 RoPE caches (one per layer in lora_llama3: the catalogue's Llama 3.1 has no rope_scaling)
    rope = get_stack("torchtune").rope_cache_bytes(M, peft=True)
    assert rope > 0
    assert tt.bytes[C.WEIGHTS] - rope < hf.bytes[C.WEIGHTS]


def test_unsloth_offloads_checkpoints():
    hf = make_config(M, "qlora", seq=8192, grad_ckpt=True)
    us = make_config(M, "qlora", seq=8192, grad_ckpt=True, framework="unsloth")
    assert comp(us, C.ACTIVATIONS) < comp(hf, C.ACTIVATIONS) / 3


def test_unsloth_fused_layer_saves_its_kernels_inputs():
    """Unsloth @3c789bc8 (fast_lora / rms_layernorm / rope / flash attention): per token, one recomputed
    layer saves 2 B x (norm input, QKV input, q, k, v, attention output, post-norm input, MLP input,
    gate e, up g) plus fp32 lse per head and two fp32 1/rms -- counted here independently of the model."""
    from vramplan.memory import step_terms

    T = 8192
    h, i, kv, q, nh = 4096, 14336, 1024, 4096, 32
    per_token = 2 * (h + h + q + 2 * kv + q + h + h + 2 * i) + 4 * nh + 2 * 4
    us = make_config(M, "qlora", rank=32, targets="all-linear", seq=T, grad_ckpt=True, framework="unsloth")
    t = step_terms(M, us)
    assert float(t.recompute) == pytest.approx(T * per_token)
    hf = step_terms(M, make_config(M, "qlora", rank=32, targets="all-linear", seq=T, grad_ckpt=True))
    assert float(t.recompute) < float(hf.recompute)
    # LoRA dropout sends PEFT's own forward (fast_lora is not patched in): the HF layer accounting
    drop = step_terms(M, make_config(M, "qlora", rank=32, targets="all-linear", seq=T, grad_ckpt=True,
                                     framework="unsloth", dropout=0.05))
    assert float(drop.recompute) > float(t.recompute)


@pytest.mark.parametrize("tech", ["act_offload", "selective_ckpt"])
def test_activation_techniques_lower_activations(tech):
    base = make_config(M, "lora", seq=4096)
    on = make_config(M, "lora", seq=4096, techniques=tech)
    assert comp(on, C.ACTIVATIONS) < comp(base, C.ACTIVATIONS)


def test_optimizer_techniques():
    base = make_config(M, "full", precision="bf16")
    assert peak(make_config(M, "full", precision="bf16", techniques="opt_offload")) < peak(base)
    assert peak(make_config(M, "full", precision="bf16", techniques="opt_in_bwd")) < peak(base)
    st = model_state(M, make_config(M, "full", precision="bf16", techniques="opt_offload"))
    assert st.bytes[C.OPTIMIZER_STATES] == 0


def test_padding_disables_gqa_and_materialises_the_mask():
    packed = make_config(M, "lora", batch=4, seq=4096)
    padded = make_config(M, "lora", batch=4, seq=4096, techniques="padding")
    extra = comp(padded, C.ACTIVATIONS) - comp(packed, C.ACTIVATIONS)
    T = 4 * 4096
    repeat = M.num_layers * 2 * (M.q_dim - M.kv_dim) * 2 * T  # k and v expanded to every head, bf16
    bias = M.num_layers * T * 4096 * 2  # each layer's SDPA saves the mask as a bf16 additive bias
    mask = 4 * 4096 * 4096  # the shared boolean mask
    # (the same mechanics as a sliding-window mask, which the dry run traces: Phi-3 at 8k tokens)
    assert extra == pytest.approx(repeat + bias + mask, rel=0.05)


def test_stack_summary_in_catalogue():
    assert "PEFT" in get_stack("hf").summary


# -- --framework on fit and matrix; the stack's default precision; technique step-time cost ----------

L3 = get_model("llama-3-8b")
FIXED = dict(seq=2048, batch=2, grad_ckpt=True, optimizer="adamw", attn="sdpa", rank=8, targets="q_proj,v_proj")


def test_fit_framework_torchtune_lora_peak_is_below_hf():
    """Chunked loss, no fp32 logits, bf16 adapters: torchtune's LoRA step holds less than HF's."""
    import vramplan

    rows = {fw: vramplan.fit(L3, "a100-80gb", methods=["lora"], framework=fw, **FIXED).rows[0]
            for fw in ("hf", "torchtune")}
    hf, tt = rows["hf"].estimate, rows["torchtune"].estimate
    assert hf.config.framework == "hf" and tt.config.framework == "torchtune"
    assert tt.tensor_peak_bytes < hf.tensor_peak_bytes
    assert tt.components[C.LOGITS] < hf.components[C.LOGITS]
    assert tt.config.precision == "bf16"   # the stack's default precision, not HF's bf16-mixed


def test_matrix_framework_changes_the_cells_and_says_which_stack():
    import io

    from vramplan.matrix import feasibility_matrix, write_markdown

    cells = {fw: feasibility_matrix(L3, "lora", "a100-80gb", 2048, batch=2, framework=fw).cells[0]
             for fw in ("hf", "torchtune", "unsloth")}
    assert cells["torchtune"].tensor_peak_bytes < cells["hf"].tensor_peak_bytes
    assert cells["unsloth"].tensor_peak_bytes < cells["hf"].tensor_peak_bytes
    assert cells["torchtune"].precision == "bf16" and cells["hf"].precision == "bf16-mixed"
    mx = feasibility_matrix(L3, "lora", "a100-80gb", 2048, framework="torchtune", techniques="act_offload")
    buf = io.StringIO()
    write_markdown(mx, buf)
    assert "Stack: torchtune" in buf.getvalue() and "act_offload" in buf.getvalue()
    assert mx.to_json()["framework"] == "torchtune" and mx.to_json()["techniques"] == ["act_offload"]
    gc = [(True, "adamw")]  # the same settings for both (else the matrix may drop GC once it fits)
    with_t = feasibility_matrix(L3, "lora", "a100-80gb", 4096, batch=2, techniques="liger_ce", ladder=gc).cells[0]
    without = feasibility_matrix(L3, "lora", "a100-80gb", 4096, batch=2, ladder=gc).cells[0]
    assert with_t.tensor_peak_bytes < without.tensor_peak_bytes


def test_stack_default_precision_with_a_gpu():
    """_check_card used HF's default even for torchtune when a GPU was given (issue #7)."""
    import vramplan

    assert vramplan.estimate(L3, "lora", gpu="rtx4090", framework="torchtune").config.precision == "bf16"
    assert vramplan.estimate(L3, "lora", gpu="rtx4090", framework="litgpt").config.precision == "bf16"
    assert vramplan.estimate(L3, "lora", gpu="rtx4090").config.precision == "bf16-mixed"
    assert vramplan.estimate(L3, "lora", gpu="t4", framework="torchtune").config.precision == "fp16-mixed"  # no bf16
    assert vramplan.estimate(L3, "lora", gpu="rtx4090", framework="torchtune",
                             precision="bf16-mixed").config.precision == "bf16-mixed"  # asked for wins


def test_technique_cost_is_applied_to_the_step_time():
    import vramplan

    def micro(**kw):
        return float(vramplan.estimate(L3, "lora", gpu="a100-80gb", seq=2048, batch=2, **kw).throughput.micro_s)

    t = techniques()
    assert micro(grad_ckpt=True, techniques="act_offload") == pytest.approx(
        micro(grad_ckpt=True) * (1 + t["act_offload"].cost_with_ckpt))
    assert micro(grad_ckpt=False, techniques="act_offload") == pytest.approx(
        micro(grad_ckpt=False) * (1 + t["act_offload"].cost))
    # selective checkpointing under full checkpointing changes nothing, in memory or time
    assert micro(grad_ckpt=True, techniques="selective_ckpt") == pytest.approx(micro(grad_ckpt=True))
    for tech in t.values():
        assert tech.label and tech.cost_source, tech.name


def test_torchtune_accounting_fields_are_validated_and_hf_keeps_defaults(monkeypatch):
    """The torchtune-only fields (stacks.toml header) load with their sources; the HF stack keeps the defaults."""
    from vramplan import stacks as stacks_mod

    hf, tt = get_stack("hf"), get_stack("torchtune")
    assert (hf.gqa_expand_kv, hf.rope_cache, hf.dequant_temp, hf.chunked_output, hf.norm_fp32) == (False, (), (0, 1), False, False)
    assert hf.rope_cache_bytes(M, peft=True) == 0
    assert tt.gqa_expand_kv and tt.chunked_output and tt.norm_fp32 and tt.dequant_temp == (8, 3)
    for field in ("gqa_expand_kv", "rope_cache", "rope_cache_per_layer", "nf4_adapted_only", "dequant_temp",
                  "chunked_output", "norm_fp32"):
        assert any(s.startswith(field + ":") for s in tt.sources), field
    raw = stacks_mod._raw()
    for bad in ({"gqa_expand_kv": "yes"}, {"dequant_temp": [8]}, {"rope_cache": {"llama": 0}},
                {"nf4_adapted_only": "lora_qwen2"}):
        broken = {**raw, "torchtune": {**raw["torchtune"], **bad}}
        monkeypatch.setattr(stacks_mod, "_raw", lambda b=broken: b)
        stacks_mod.stacks.cache_clear()
        with pytest.raises(VramplanError, match="torchtune"):
            stacks_mod.stacks()
    monkeypatch.undo()
    stacks_mod.stacks.cache_clear()


def test_torchtune_builder_matches_the_families():
    from vramplan.stacks import torchtune_builder

    assert torchtune_builder(get_model("llama-3-8b"), True) == "lora_llama3"
    assert torchtune_builder(get_model("llama-3.2-3b"), False) == "llama3_2"
    assert torchtune_builder(get_model("qwen2.5-7b"), True) == "lora_qwen2"
    # one cache per layer in lora_qwen2 ([131072, 2 x 128] fp32 each), one shared by the base model
    q = get_model("qwen2.5-7b")
    assert get_stack("torchtune").rope_cache_bytes(q, True) == q.num_layers * get_stack("torchtune").rope_cache_bytes(q, False)


def test_chunked_ce_is_a_no_op_over_a_stack_that_chunks_its_loss():
    """litgpt (128-token chunks) and torchtune (8 chunks) already chunk the loss; over a grid too."""
    import numpy as np

    for fw in ("litgpt", "torchtune"):
        plain = make_config(L3, "lora", seq=2048, framework=fw)
        asked = make_config(L3, "lora", seq=2048, framework=fw, techniques="chunked_ce")
        seqs = np.array([512, 2048, 8192])
        assert np.array_equal(step_memory(L3, plain, seq=seqs).peak, step_memory(L3, asked, seq=seqs).peak)

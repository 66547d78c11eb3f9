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
    assert set(stacks()) == {"hf", "torchtune", "unsloth", "litgpt"}
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
    assert tt.bytes[C.WEIGHTS] < hf.bytes[C.WEIGHTS]


def test_unsloth_offloads_checkpoints():
    hf = make_config(M, "qlora", seq=8192, grad_ckpt=True)
    us = make_config(M, "qlora", seq=8192, grad_ckpt=True, framework="unsloth")
    assert comp(us, C.ACTIVATIONS) < comp(hf, C.ACTIVATIONS) / 3


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
    repeat = (M.num_layers - 1) * 2 * (M.q_dim - M.kv_dim) * 2 * T  # k and v expanded, bf16
    mask = 4 * 4096 * 4096
    assert extra == pytest.approx(repeat + mask, rel=0.05)


def test_stack_summary_in_catalogue():
    assert "PEFT" in get_stack("hf").summary

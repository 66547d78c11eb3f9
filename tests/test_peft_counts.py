"""LoRA/DoRA/IA³ trainable-parameter counts equal PEFT's, on the meta device (no weights)."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from vramplan.adapters import adapter_params  # noqa: E402
from vramplan.config import make_config  # noqa: E402
from vramplan.methods import Adapter  # noqa: E402
from vramplan.models import get_model  # noqa: E402

CASES = [
    ("llama-2-7b", "lora", 8, None),
    ("llama-2-7b", "lora", 16, "all-linear"),
    ("llama-3.2-1b", "dora", 8, "q_proj,k_proj,v_proj,o_proj"),
    ("llama-3.2-1b", "ia3", 8, None),
    ("qwen2.5-0.5b", "lora", 32, "all-linear"),
    ("qwen2.5-0.5b", "ia3", 8, None),
    ("gemma-2-2b", "dora", 4, "all-linear"),
    ("phi-3-mini-4k", "lora", 8, None),
    ("mixtral-8x7b", "lora", 8, "all-linear"),
    ("qwen1.5-moe-a2.7b", "lora", 8, "all-linear"),
]


def _peft_model(spec, cfg):
    hf_cfg = transformers.AutoConfig.for_model(**spec.hf_config)
    hf_cfg.num_hidden_layers = 2  # counts are per layer; two layers keep meta construction fast
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    kind = Adapter(cfg.adapter)
    if kind is Adapter.IA3:
        pc = peft.IA3Config(target_modules=list(cfg.targets), feedforward_modules=[t for t in cfg.targets if t in spec.ia3_feedforward])
    else:
        pc = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), use_dora=kind is Adapter.DORA)
    pm = peft.get_peft_model(model, pc)
    return pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("name, method, rank, targets", CASES, ids=[f"{c[0]}-{c[1]}-r{c[2]}-{c[3]}" for c in CASES])
def test_trainable_params_equal_peft(name, method, rank, targets):
    import dataclasses

    spec = get_model(name)
    cfg = make_config(spec, method, rank=rank, targets=targets)
    small = dataclasses.replace(spec, num_layers=2)
    ours = adapter_params(small, Adapter(cfg.adapter), cfg.rank, cfg.targets)
    assert ours == _peft_model(spec, cfg)
    # and the full-size count scales by layers
    assert adapter_params(spec, Adapter(cfg.adapter), cfg.rank, cfg.targets) == ours * spec.num_layers // 2

"""vramplan.runtime: real construction and real training steps on CPU (tiny configs built in code)."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import TINY_LLAMA  # noqa: E402
from vramplan.config import make_config  # noqa: E402
from vramplan.methods import Role  # noqa: E402
from vramplan.models import from_hf_config  # noqa: E402
from vramplan.runtime import build  # noqa: E402

TINY = dict(TINY_LLAMA, max_position_embeddings=256)


@pytest.fixture(scope="module")
def spec():
    return from_hf_config(TINY, name="tiny-llama")


def _snapshot(params):
    return [p.detach().float().clone() for p in params]


METHODS = [("full", None), ("lora", None), ("qlora", None), ("dora", None), ("ia3", None), ("dpo", "lora"),
           ("dpo", "full"), ("ppo", "lora"), ("ppo", "full"), ("ppo", "qlora")]


@pytest.mark.parametrize("method,adapter", METHODS, ids=lambda x: str(x))
def test_real_cpu_step_trains_every_method(spec, method, adapter):
    if adapter == "qlora" or method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = make_config(spec, method, adapter=adapter, batch=2, seq=24, precision="fp32", optimizer="sgd")
    tr = build(spec, cfg, "cpu")
    params = tr.trainable_parameters()
    before = _snapshot(params)
    tr.optimizer.param_groups[0]["lr"] = 0.1
    out = tr.step()
    assert math.isfinite(float(out["loss"]))
    changed = [not torch.equal(b, p.detach().float()) for b, p in zip(before, params)]
    assert any(changed), "an optimiser step must move some trainable parameter"
    assert all(p.grad is None for p in params), "zero_grad(set_to_none=True) after the step"


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed", "fp32"])
def test_regime_dtypes_full(spec, precision):
    tr = build(spec, make_config(spec, "full", batch=1, seq=8, precision=precision), "meta", fake=True)
    want = {"bf16": torch.bfloat16, "bf16-mixed": torch.float32, "fp32": torch.float32}[precision]
    assert {p.dtype for p in tr.policy.parameters()} == {want}
    assert all(p.requires_grad for p in tr.policy.parameters())


@pytest.mark.parametrize("precision,base", [("bf16", torch.bfloat16), ("bf16-mixed", torch.bfloat16),
                                            ("fp16-mixed", torch.float16), ("fp32", torch.float32)])
def test_regime_dtypes_lora(spec, precision, base):
    tr = build(spec, make_config(spec, "lora", batch=1, seq=8, precision=precision), "meta", fake=True)
    frozen = {p.dtype for p in tr.policy.parameters() if not p.requires_grad}
    adapters = {p.dtype for p in tr.policy.parameters() if p.requires_grad}
    assert frozen == {base}
    assert adapters == {torch.float32}  # PEFT keeps adapters fp32 (autocast_adapter_dtype=True)


@pytest.mark.parametrize("rank,targets", [(8, None), (4, "all-linear"), (16, "q_proj,k_proj,v_proj,o_proj")])
def test_lora_trainable_params_equal_peft(spec, rank, targets):
    cfg = make_config(spec, "lora", rank=rank, targets=targets, batch=1, seq=8)
    tr = build(spec, cfg, "meta", fake=True)
    params, trainable = tr.counts()
    assert trainable == tr.policy.get_nb_trainable_parameters()[0]
    shapes = {l.name: l for l in spec.layer_linears()}
    expected = spec.num_layers * sum(rank * (shapes[t].in_features + shapes[t].out_features) for t in cfg.targets)
    assert trainable == expected
    assert params == spec.params + trainable


def test_qlora_is_nf4_plus_prepare_model_for_kbit_training(spec):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cfg = make_config(spec, "qlora", batch=1, seq=8, precision="bf16-mixed")
    assert cfg.grad_ckpt, "QLoRA defaults to gradient checkpointing (prepare_model_for_kbit_training)"
    tr = build(spec, cfg, "meta", fake=True)
    inner = tr.copies[Role.POLICY].inner
    n4 = [m for m in inner.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(n4) == 7 * spec.num_layers  # q k v o gate up down per layer
    assert not isinstance(inner.lm_head, bnb.nn.Linear4bit)
    for name, p in inner.named_parameters():
        if getattr(p, "quant_state", None) is not None:
            assert p.dtype == torch.uint8 and not p.requires_grad
        else:  # embeddings, norms, lm_head, adapters: upcast to fp32
            assert p.dtype == torch.float32, name
    layer = inner.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func is not None


def test_optimizer_kinds(spec):
    tr = build(spec, make_config(spec, "full", batch=1, seq=8, precision="bf16"), "cpu")
    assert isinstance(tr.optimizer, torch.optim.AdamW) and tr.optimizer.param_groups[0]["foreach"]
    tr = build(spec, make_config(spec, "full", batch=1, seq=8, precision="fp32"), "cpu")
    assert tr.optimizer.param_groups[0]["fused"]
    from transformers.optimization import Adafactor

    tr = build(spec, make_config(spec, "lora", batch=1, seq=8, optimizer="adafactor"), "cpu")
    assert isinstance(tr.optimizer, Adafactor)
    tr = build(spec, make_config(spec, "lora", batch=1, seq=8, optimizer="sgd"), "cpu")
    assert type(tr.optimizer) is torch.optim.SGD


def test_recipes_decide_the_copies(spec):
    tr = build(spec, make_config(spec, "dpo", adapter="lora", batch=1, seq=8), "meta", fake=True)
    assert set(tr.copies) == {Role.POLICY}  # the reference is the policy with its adapter disabled
    tr = build(spec, make_config(spec, "dpo", adapter="full", batch=1, seq=8), "meta", fake=True)
    assert set(tr.copies) == {Role.POLICY, Role.REFERENCE}
    ref = tr.copies[Role.REFERENCE].module
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    tr = build(spec, make_config(spec, "ppo", adapter="lora", batch=1, seq=8), "meta", fake=True)
    assert set(tr.copies) == {Role.POLICY, Role.REWARD, Role.VALUE}
    assert tr.copies[Role.VALUE].trains and not tr.copies[Role.REWARD].trains
    assert tr.copies[Role.REWARD].inner.score.out_features == 1


def test_gradient_accumulation_runs_micro_batches(spec):
    cfg = make_config(spec, "lora", batch=1, seq=8, grad_accum=3, precision="fp32")
    tr = build(spec, cfg, "cpu")
    calls = []
    tr.policy.register_forward_hook(lambda *a: calls.append(1))
    tr.step()
    assert len(calls) == 3

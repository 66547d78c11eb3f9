"""Defects of the runner's real-device half, caught on CPU: the PPO rollout must run (and so
time) every decode step, and a QLoRA base must be quantised one layer at a time, never
held whole in 16 bits (issue 13, items 1 and 2)."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import TINY_LLAMA  # noqa: E402
from torch import nn  # noqa: E402

from vramplan.config import make_config  # noqa: E402
from vramplan.models import from_hf_config  # noqa: E402
from vramplan.runtime import build  # noqa: E402
from vramplan.runtime import nf4  # noqa: E402

TINY = dict(TINY_LLAMA, num_hidden_layers=3, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def spec():
    return from_hf_config(TINY, name="tiny-llama")


@pytest.mark.parametrize("seq,resp", [(24, 12), (40, 20)])
def test_ppo_rollout_runs_every_decode_step_on_a_real_device(spec, seq, resp):
    cfg = make_config(spec, "ppo", adapter="lora", batch=1, seq=seq, precision="fp32", optimizer="sgd",
                      ppo_response=resp)
    tr = build(spec, cfg, "cpu")
    calls = []
    hook = tr.policy.register_forward_hook(lambda m, a, k, out: calls.append(k.get("input_ids").shape[1]),
                                           with_kwargs=True)
    out = tr.step()
    hook.remove()
    assert math.isfinite(float(out["loss"]))
    assert tr.decode_steps == resp - 1
    # the one-token forwards of the rollout: every generated token after the prefill's
    assert sum(1 for n in calls if n == 1) == resp - 1


def test_ppo_dry_run_keeps_its_two_step_shortcut(spec):
    cfg = make_config(spec, "ppo", adapter="lora", batch=1, seq=40, ppo_response=20)
    tr = build(spec, cfg, "meta", fake=True)
    tr.step()
    assert tr.decode_steps == 2


def _dense_linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if type(m) is nn.Linear and not m.weight.is_meta and m.weight.dim() == 2)


QWEN_TIED = dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.mark.parametrize("conf", [TINY, QWEN_TIED], ids=["llama-untied", "qwen2-tied-biases"])
def test_qlora_build_quantises_layer_by_layer(conf, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    spec = from_hf_config(conf, name="tiny")
    models, peaks = [], []
    real_q, real_quant = nf4.quantize_linears, bnb.functional.quantize_4bit

    def spy_q(model, **kw):
        models.append(model)
        return real_q(model, **kw)

    def spy_quant(A, *a, **kw):
        # at the moment a layer is quantised: the dense linear weights alive in the model being built
        peaks.append((_dense_linear_bytes(models[-1]), A.numel() * A.element_size()))
        return real_quant(A, *a, **kw)

    monkeypatch.setattr(nf4, "quantize_linears", spy_q)
    monkeypatch.setattr(bnb.functional, "quantize_4bit", spy_quant)
    cfg = make_config(spec, "qlora", batch=1, seq=16, precision="bf16-mixed", optimizer="sgd")
    tr = build(spec, cfg, "cpu")
    n_linear = 3 * 7  # q k v o gate up down per layer
    assert len(peaks) == n_linear
    biggest = max(b for _, b in peaks)
    # never more than the lm_head (not quantised) plus the layer in hand: the old build held all 21
    head = conf["vocab_size"] * conf["hidden_size"] * 2
    assert max(d for d, _ in peaks) <= head + biggest
    model = models[-1]
    assert not any(p.is_meta for p in model.parameters())
    if conf.get("tie_word_embeddings"):  # the head still shares the embedding's storage
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == n_linear
    out = tr.step()
    assert math.isfinite(float(out["loss"]))

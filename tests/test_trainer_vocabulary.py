"""How trainer configs name methods, adapters and optimizers: reached through the catalogues' attributes
(vramplan.methods, optimizers.toml), not name tuples in the readers (issue 11)."""

from __future__ import annotations

import pytest

from vramplan.errors import VramplanError
from vramplan.integrations.from_model import request_from_model
from vramplan.integrations.request import map_optimizer
from vramplan.methods import (LOSS_KINDS, Adapter, names_its_adapter, registry, supervised_word,
                              takes_adapter_choice)

LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False)
LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}


class _Config(dict):
    def to_dict(self):
        return dict(self)


class _Model:
    """A stand-in for a transformers model: what request_from_model reads (``config``, ``dtype``)."""

    def __init__(self, dtype="torch.bfloat16", **flags):
        self.config = _Config(LLAMA)
        self.dtype = dtype
        for k, v in flags.items():
            setattr(self, k, v)


def _args(class_name: str, **values):
    """An object whose class is named like a trainer config (matched by class name, as TRL's are)."""
    base = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=512, bf16=True)
    return type(class_name, (), {**base, **values})()


@pytest.mark.parametrize("class_name", ["SFTConfig", "TrainingArguments", "Seq2SeqTrainingArguments"])
def test_a_supervised_trainer_config_plans_the_peft_adapter_it_loads(class_name):
    """SFTConfig with a LoRA model is LoRA (it was planned as full fine-tuning: SFT's trainer names resolved
    to the first SFT-behaviour method, "full")."""
    req = request_from_model(_Model(), LORA, _args(class_name))
    assert req.method == "lora"
    assert not any(n.startswith("method ") for n in req.notes)
    four = request_from_model(_Model(is_loaded_in_4bit=True), LORA, _args(class_name))
    assert four.method == "qlora" and four.options["double_quant"] is True
    assert request_from_model(_Model(), None, _args(class_name)).method == "full"


def test_a_config_method_word_sft_means_the_loaded_adapter():
    assert supervised_word("sft") and supervised_word("SFT") and not supervised_word("dpo")
    assert not supervised_word(None) and not supervised_word("rloo")
    assert request_from_model(_Model(), {**LORA, "use_dora": True}, {"method": "sft"}).method == "dora"
    dpo = request_from_model(_Model(), LORA, _args("DPOConfig"))
    assert (dpo.method, dpo.options["adapter"]) == ("dpo", "lora")
    with pytest.raises(VramplanError, match="not modelled"):
        request_from_model(_Model(), LORA, _args("RLOOConfig"))


def test_names_its_adapter_is_the_supervised_family():
    for name, md in registry().items():
        assert names_its_adapter(name) == (not takes_adapter_choice(name))
        if names_its_adapter(name):  # a supervised method's name is its one adapter
            assert [a.value for a in md.adapters] == [name]
    assert not names_its_adapter("no-such-method") and not names_its_adapter(None)


def test_adapter_of_reads_peft_type_dora_and_the_4bit_base():
    for ad in Adapter:
        assert Adapter.of(ad.peft_type, dora=ad.dora, four_bit=ad.quantized_base) is ad
    assert Adapter.of("lora", dora=True, four_bit=True) is Adapter.QDORA
    assert Adapter.of("IA3", dora=True) is Adapter.IA3  # use_dora is LoRA's
    assert Adapter.of(None, four_bit=True) is None  # no full training over a 4-bit base
    assert Adapter.of("PREFIX_TUNING") is None
    with pytest.raises(VramplanError, match="PEFT type PREFIX_TUNING"):
        request_from_model(_Model(), {"peft_type": "PREFIX_TUNING"})
    ia3 = request_from_model(_Model(is_loaded_in_4bit=True), {"peft_type": "IA3", "target_modules": ["k_proj"]})
    assert ia3.method == "qia3" and "rank" not in ia3.options and ia3.options["targets"] == "k_proj"


def test_the_fp32_base_note_follows_the_regime_attributes():
    note = "the frozen base is fp32"
    fp32_bf16 = request_from_model(_Model(dtype="torch.float32"), LORA, _args("SFTConfig"))
    assert any(n.startswith(note) for n in fp32_bf16.notes)
    plain = request_from_model(_Model(dtype="torch.float32"), LORA, _args("SFTConfig", bf16=False))
    assert plain.options["precision"] == "fp32" and not any(n.startswith(note) for n in plain.notes)
    four = request_from_model(_Model(dtype="torch.float32", is_loaded_in_4bit=True), LORA, _args("SFTConfig"))
    assert not any(n.startswith(note) for n in four.notes)


def test_an_optimizer_trainer_note_is_catalogue_data():
    notes: list[str] = []
    assert map_optimizer("adamw_torch", notes) == "adamw" and len(notes) == 1 and "foreach" in notes[0]
    assert map_optimizer("adamw_torch_fused", notes) == "adamw" and len(notes) == 1


def test_loss_kinds_are_attribute_bearing():
    for md in registry().values():
        assert md.loss_kind is LOSS_KINDS[md.loss]
    assert not LOSS_KINDS["causal_lm"].per_token_logps
    assert LOSS_KINDS["sequence_logps"].per_token_logps and not LOSS_KINDS["sequence_logps"].response_only
    assert LOSS_KINDS["response_logps"].per_token_logps and LOSS_KINDS["response_logps"].response_only


def test_a_config_file_takes_every_estimate_setting_as_an_override(tmp_path):
    """``estimate --config FILE --gpus 2 --strategy ddp`` / ``--framework`` were refused ("unknown planning
    option"): the overrides a file's plan takes are EstimateRequest's fields, not a second list of them."""
    import vramplan
    from vramplan.cli import main
    from vramplan.integrations.config_files import estimate_file, read_training_file

    path = tmp_path / "axolotl.yaml"
    path.write_text("base_model: meta-llama/Llama-3.2-1B\nadapter: qlora\nload_in_4bit: true\nlora_r: 16\n"
                    "lora_target_linear: true\nsequence_len: 1024\nmicro_batch_size: 2\n")
    req = read_training_file(path)
    est = estimate_file(path, gpu="rtx4090", gpus=2, strategy="zero3", framework="unsloth")
    direct = vramplan.estimate(req.model, req.method, gpu="rtx4090", gpus=2, strategy="zero3", framework="unsloth",
                               **req.options)
    assert est.peak_bytes == direct.peak_bytes and est.config.framework == "unsloth"
    assert main(["estimate", "--config", str(path), "--gpu", "rtx4090", "--gpus", "2", "--strategy", "ddp"]) == 0
    with pytest.raises(VramplanError, match="unknown planning option 'gpu_count'"):
        estimate_file(path, gpu_count=2)

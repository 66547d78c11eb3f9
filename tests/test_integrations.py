"""Trainer integrations: the HF callback in a real Trainer, from_model, and config files."""

import json
import subprocess
import sys
import warnings

import pytest

import vramplan
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.integrations.config_files import estimate_file, read_training_file
from vramplan.integrations.request import normalise_targets


def test_import_vramplan_needs_no_transformers():
    code = ("import sys, vramplan, vramplan.integrations; assert callable(vramplan.from_model); "
            "print(','.join(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- config files (no torch needed) ---------------------------------------------------------

AXOLOTL = """\
base_model: meta-llama/Llama-2-7b-hf
load_in_4bit: true
adapter: qlora
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_linear: true
sequence_len: 1024
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 4
gradient_checkpointing: true
optimizer: paged_adamw_8bit
bf16: auto
flash_attention: true
datasets:
  - path: some/dataset
    type: alpaca
"""


@pytest.fixture
def axolotl(tmp_path):
    pytest.importorskip("yaml")
    p = tmp_path / "qlora.yml"
    p.write_text(AXOLOTL)
    return p


def test_axolotl_yaml_is_read(axolotl):
    req = read_training_file(axolotl)
    assert req.model.name == "llama-2-7b" and req.method == "qlora"
    assert req.options == {"rank": 16, "alpha": 32.0, "dropout": 0.05, "targets": "all-linear", "seq": 1024,
                           "batch": 2, "grad_accum": 4, "grad_ckpt": True, "optimizer": "paged_adamw_8bit",
                           "attn": "flash"}
    est = estimate_file(axolotl, gpu="rtx4000ada")
    direct = vramplan.estimate("llama-2-7b", "qlora", rank=16, alpha=32, dropout=0.05, targets="all-linear", seq=1024,
                               batch=2, grad_accum=4, grad_ckpt=True, optimizer="paged_adamw_8bit", attn="flash",
                               gpu="rtx4000ada")
    assert est.peak_bytes == direct.peak_bytes
    assert any("Axolotl config qlora.yml" in a for a in est.assumptions)


def test_axolotl_dpo_and_unknown_model(tmp_path):
    pytest.importorskip("yaml")
    p = tmp_path / "dpo.yaml"
    p.write_text("base_model: Qwen/Qwen2.5-7B\nadapter: lora\nrl: dpo\nsequence_len: 512\nmicro_batch_size: 1\n")
    req = read_training_file(p)
    assert (req.method, req.options["adapter"]) == ("dpo", "lora")
    p.write_text("base_model: someone/not-in-the-catalogue-7b\nadapter: lora\n")
    with pytest.raises(VramplanError, match="not in the catalogue"):
        read_training_file(p)
    # a local config.json next to the file works, and --model replaces the reference
    assert read_training_file(p, model="13b").model.name == "llama-2-13b"


def test_trl_arguments_json(tmp_path):
    p = tmp_path / "args.json"
    p.write_text(json.dumps({
        "model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "use_peft": True, "load_in_4bit": True,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"], "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8, "gradient_checkpointing": True, "optim": "adamw_torch_fused",
        "bf16": True, "max_length": 1024, "beta": 0.1, "max_prompt_length": 512, "output_dir": "out"}))
    req = read_training_file(p)
    assert req.model.name == "qwen2.5-7b" and req.method == "dpo"
    o = req.options
    assert (o["adapter"], o["rank"], o["alpha"], o["seq"], o["optimizer"], o["precision"]) == (
        "qlora", 16, 32.0, 1024, "adamw", "bf16-mixed")
    assert o["targets"] == "q_proj,k_proj,v_proj,o_proj"
    assert any("lm_head" in n and "ignored" in n for n in req.notes)
    assert estimate_file(p).config.targets == ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("content,match", [
    ({"model_name_or_path": "7b", "per_device_train_batch_size": 1, "optim": "lion_32bit"}, "not modelled"),
    ({"model_name_or_path": "7b", "per_device_train_batch_size": 0}, "positive integer"),
    ({"model_name_or_path": "7b", "per_device_train_batch_size": 1, "load_in_8bit": True}, "load_in_8bit"),
    ({"learning_rate": 1e-4}, "neither an Axolotl config nor training arguments"),
    ({"per_device_train_batch_size": 2}, "names no model"),
])
def test_bad_training_files(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(content))
    with pytest.raises(VramplanError, match=match):
        read_training_file(p)


def test_cli_estimate_config_flags_win(axolotl, capsys):
    assert main(["estimate", "--config", str(axolotl), "--gpu", "rtx3080", "--batch", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["batch"] == 4 and d["config"]["seq"] == 1024 and d["config"]["rank"] == 16
    assert d["gpu"] == "rtx3080" and any("overridden: batch=4" in a for a in d["assumptions"])


@pytest.mark.parametrize("argv", [["estimate", "--config", "/nonexistent.yml"], ["estimate"]])
def test_cli_estimate_config_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vramplan: error:") and "\n" not in err


def test_cli_malformed_yaml(tmp_path, capsys):
    pytest.importorskip("yaml")
    p = tmp_path / "broken.yml"
    p.write_text("base_model: [unclosed\n")
    assert main(["estimate", "--config", str(p)]) == 2
    assert "malformed broken.yml" in capsys.readouterr().err


def test_target_normalisation():
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    notes = []
    assert normalise_targets(["model.layers.0.self_attn.q_proj", "v_proj", "embed_tokens"], names, notes) == "q_proj,v_proj"
    assert "embed_tokens" in notes[0]
    assert normalise_targets(r".*\.(gate|up)_proj", names, []) == "gate_proj,up_proj"
    assert normalise_targets("all-linear", names, []) == "all-linear"
    assert normalise_targets(None, names, []) is None
    with pytest.raises(VramplanError):
        normalise_targets(["lm_head"], names, [])


# -- live models (torch, transformers, peft) -----------------------------------------------

try:
    import peft
    import torch
    import transformers
except ImportError:  # pragma: no cover - the dryrun extra is not installed
    torch = transformers = peft = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch, transformers and peft (the dryrun extra)")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def VramplanWarning():
    from vramplan.integrations.hf import VramplanWarning as warning_class

    return warning_class


def trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("peft_config", [
    lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    lambda: peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"),
    lambda: peft.IA3Config(task_type="CAUSAL_LM"),
    lambda: peft.LoraConfig(r=2, target_modules=r".*\.(q_proj|k_proj)", task_type="CAUSAL_LM"),
], ids=["lora", "dora-all-linear", "ia3", "lora-regex"])
@needs_torch
@pytest.mark.torch
def test_from_model_reads_the_live_peft_model(peft_config):
    model = peft.get_peft_model(tiny_llama(), peft_config())
    est = vramplan.from_model(model, seq=32)
    assert est.trainable_params == trainable(model)
    assert est.params == sum(p.numel() for p in model.get_base_model().parameters()) - trainable(model)


@needs_torch
@pytest.mark.torch
def test_from_model_full_and_training_arguments(tmp_path):
    model = tiny_llama()
    import dataclasses

    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3,
                                          gradient_accumulation_steps=2, optim="adamw_bnb_8bit", report_to=[],
                                          use_cpu=True, **{ckpt: True})
    est = vramplan.from_model(model, training_args=args, seq=64)
    cfg = est.config
    assert (est.method, cfg.batch, cfg.grad_accum, cfg.grad_ckpt, cfg.optimizer, cfg.seq, cfg.precision) == (
        "full", 3, 2, True, "adamw_8bit", 64, "fp32")
    assert est.trainable_params == sum(p.numel() for p in model.parameters())


@needs_torch
@pytest.mark.torch
def test_from_model_dict_arguments_dpo_and_overrides():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, task_type="CAUSAL_LM"))
    est = vramplan.from_model(model, training_args={"method": "dpo", "per_device_train_batch_size": 2, "bf16": True,
                                                   "max_length": 48, "optim": "paged_adamw_8bit"}, gpu="rtx3080")
    assert (est.method, est.adapter, est.config.seq, est.config.precision, est.config.optimizer) == (
        "dpo", "lora", 48, "bf16-mixed", "paged_adamw_8bit")
    assert est.capacity_bytes is not None and est.fits
    assert vramplan.from_model(model, seq=16, batch=5).config.batch == 5
    with pytest.raises(VramplanError, match="unknown planning option"):
        vramplan.from_model(model, sequence=16)


@needs_torch
@pytest.mark.torch
def test_trl_config_class_names_select_the_method():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, task_type="CAUSAL_LM"))

    class DPOConfig:  # stands in for trl.DPOConfig (matched by class name)
        per_device_train_batch_size = 1
        max_length = 64

    class GRPOConfig:
        per_device_train_batch_size = 1

    class RLOOConfig:
        per_device_train_batch_size = 1

    assert vramplan.from_model(model, training_args=DPOConfig()).method == "dpo"
    assert vramplan.from_model(model, training_args=GRPOConfig(), seq=256).method == "grpo"
    with pytest.raises(VramplanError, match="not modelled"):
        vramplan.from_model(model, training_args=RLOOConfig())


@needs_torch
@pytest.mark.torch
def test_from_model_quantisation_is_read():
    class FourBit(torch.nn.Module):  # a stand-in: bitsandbytes needs a GPU to really load 4-bit
        def __init__(self, inner, **flags):
            super().__init__()
            self.inner = inner
            self.config = inner.config
            for k, v in flags.items():
                setattr(self, k, v)

    lora = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    est = vramplan.from_model(FourBit(tiny_llama(), is_loaded_in_4bit=True), peft_config=lora, seq=32)
    assert est.adapter == "qlora" and est.config.double_quant is True
    with pytest.raises(VramplanError, match="8-bit"):
        vramplan.from_model(FourBit(tiny_llama(), is_loaded_in_8bit=True), peft_config=lora)
    with pytest.raises(VramplanError, match="without a PEFT adapter"):
        vramplan.from_model(FourBit(tiny_llama(), is_loaded_in_4bit=True))


# -- the callback in a real Trainer -----------------------------------------------------------

def random_tokens(n=12, seq=32):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in data]


def run_trainer(tmp_path, callback, steps=3, batch=2):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch,
                                          max_steps=steps, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, learning_rate=1e-3, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=random_tokens(), callbacks=[callback])
    trainer.train()
    return trainer, model


@needs_torch
@pytest.mark.torch
def test_callback_plans_and_compares_in_a_real_trainer(tmp_path, capfd):
    fake = {"max_allocated_bytes": 2_000_000, "max_reserved_bytes": 4_194_304, "process_bytes": 600 * 2**20}
    log = tmp_path / "user-calibration.jsonl"
    cb = vramplan.VramplanCallback(gpu="rtx3080", measure=lambda: dict(fake), calibration_log=str(log))
    trainer, model = run_trainer(tmp_path, cb)
    assert trainer.state.global_step == 3
    # planned at train begin from the live model, PEFT config and arguments
    assert cb.estimate.trainable_params == trainable(model)
    assert cb.estimate.config.batch == 2 and cb.estimate.config.precision == "fp32"
    assert cb.verdict is vramplan.verdict.Verdict.COMFORTABLE
    assert "seq 2048 (assumed" in cb.messages[0]
    # re-planned at the observed shape and compared after step 2
    c = cb.comparison
    assert (c.step, c.batch, c.seq) == (2, 2, 32)
    assert c.predicted_tensor_peak_bytes == cb.measured_estimate.tensor_peak_bytes
    assert c.tensor_ratio == pytest.approx(c.predicted_tensor_peak_bytes / 2_000_000)
    assert "predicted/measured" in cb.messages[1]
    # ... and both lines reached the user in a default run (no logging configured: stderr)
    err = capfd.readouterr().err
    assert cb.messages[0] in err and cb.messages[1] in err
    # the point went to the user's calibration log, readable by the calibration tools
    from vramplan.calibration.log import LogState, read_log

    recs = read_log(log)
    assert len(recs) == 1 and recs[0]["kind"] == "point" and recs[0]["split"] == "fit"
    # the runner's field names, which the calibration fit reads
    assert recs[0]["memory"] == {"max_allocated": 2_000_000, "max_reserved": 4_194_304,
                                 "nvml_process_bytes": 600 * 2**20}
    assert recs[0]["config"]["seq"] == 32
    assert LogState.load(log).done(recs[0]["id"])
    # ... and the same point as measurement records (one per quantity), valid on load
    from vramplan.measurements.record import MeasurementRecord, from_log

    kinds = {r["measurement"]["quantity"]: r["measurement"]["bytes"] for r in recs[0]["records"]}
    assert kinds == {"max_allocated": 2_000_000, "max_reserved": 4_194_304, "device_total": 600 * 2**20}
    again = from_log(recs)
    assert [r.to_dict() for r in again] == recs[0]["records"]
    assert all(MeasurementRecord.from_dict(r).config.batch == 2 for r in recs[0]["records"])
    # the calibration fit reads the callback's point as a measured one
    from vramplan.calibration.fit import load_rows

    rows, source = load_rows(recs)
    assert source == "torch.cuda" and rows[0].allocated == 2_000_000 and rows[0].spec is not None


@needs_torch
@pytest.mark.torch
def test_callback_warns_when_it_will_not_fit(tmp_path):
    cb = vramplan.VramplanCallback(gpu_mem="256MiB", seq=32, stop_if_no_fit=True)
    with pytest.warns(VramplanWarning(), match="will not fit"):
        trainer, _ = run_trainer(tmp_path, cb)
    assert cb.verdict is vramplan.verdict.Verdict.NO
    assert "Try:" in cb.messages[0] and "gradient_checkpointing=True" in cb.messages[0]
    assert trainer.state.global_step <= 1  # stop_if_no_fit stopped the run


@needs_torch
@pytest.mark.torch
def test_callback_on_cpu_without_a_gpu(tmp_path):
    cb = vramplan.VramplanCallback(seq=32)  # no gpu given, no CUDA: predict only
    with warnings.catch_warnings():
        warnings.simplefilter("error", VramplanWarning())
        run_trainer(tmp_path, cb)
    assert cb.verdict is None and "no GPU to compare with" in cb.messages[0]
    assert cb.comparison.measured_allocated_bytes is None
    assert "not available" in cb.comparison.message()


@needs_torch
@pytest.mark.torch
def test_callback_survives_an_unplannable_model(tmp_path, caplog):
    cb = vramplan.VramplanCallback(gpu="rtx3080", optimizer="lion")  # bad override: warn, do not break training
    trainer, _ = run_trainer(tmp_path, cb, steps=2)
    assert trainer.state.global_step == 2
    assert cb.estimate is None and "cannot plan this run" in cb.messages[0]

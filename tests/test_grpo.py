"""GRPO (TRL GRPOTrainer semantics): options, the generation batch, vLLM's share, the G x completion limits,
trainer-config import, and the dry run's step (the sweep's rows are in tests/test_dryrun_vs_analytic.py)."""

from __future__ import annotations

import json

import pytest

import vramplan
from vramplan.config import make_config
from vramplan.errors import VramplanError
from vramplan.gpus import get_gpu
from vramplan.methods.grpo import generation_limits, settings, steps_per_generation
from vramplan.models import get_model
from vramplan.taxonomy import Component


@pytest.fixture(scope="module")
def spec8b():
    return get_model("llama-3.1-8b")


def test_trl_defaults(spec8b):
    cfg = make_config(spec8b, "grpo", batch=1, seq=2048)
    gs = settings(cfg)
    assert (gs.num_generations, gs.completion, gs.prompt) == (8, 512, 1536)
    assert gs.beta == 0.0 and gs.loss_type == "dapo" and gs.generation == "transformers"
    # TRL's steps_per_generation = grad_accum (1) would hold 1 completion: raised to one group of 8
    assert (gs.steps_per_generation, gs.generation_batch, gs.raised_from) == (8, 8, 1)
    assert gs.old_logps  # grad_accum 1 % steps_per_generation 8 != 0: TRL computes old log-probs
    text = " ".join(vramplan.estimate(spec8b, "grpo", seq=2048).assumptions)
    assert "beta 0" in text and "TRL v1.9.0" in text and "steps_per_generation" in text


def test_generation_batch_follows_trl():
    assert steps_per_generation(batch=8, grad_accum=1, num_generations=8) == (1, 0)
    assert steps_per_generation(batch=2, grad_accum=4, num_generations=8) == (4, 0)
    assert steps_per_generation(batch=3, grad_accum=2, num_generations=4) == (4, 2)
    with pytest.raises(VramplanError, match="whole"):
        steps_per_generation(batch=2, grad_accum=1, num_generations=8, given=3)
    spec = get_model("smollm2-360m")
    aligned = settings(make_config(spec, "grpo", batch=2, grad_accum=4, seq=512))
    assert not aligned.old_logps and aligned.buffers == 0  # generation every optimiser step: no old log-probs


def test_bad_options_are_one_clear_error(spec8b):
    with pytest.raises(VramplanError, match="completion"):
        make_config(spec8b, "grpo", seq=512, method_options={"completion": 512})
    with pytest.raises(VramplanError):
        make_config(spec8b, "grpo", seq=512, method_options={"num_generations": 1})
    with pytest.raises(VramplanError, match="generation"):
        make_config(spec8b, "grpo", seq=512, method_options={"generation": "sglang"})


def test_full_training_with_beta_holds_a_second_frozen_model_and_the_dry_run_traces_it():
    """TRL's GRPOTrainer loads the reference as a second model when beta > 0 and the policy is not a PEFT
    model: the plan holds a frozen copy (its weights in the frozen dtype) and the dry run builds and runs it
    for the reference log-probs; analytic within 2% of the dry run on two architectures. beta 0 holds none."""
    from vramplan.methods import Role
    from vramplan.precision import DTYPE_BYTES

    for name in ("llama-3-8b", "smollm2-360m"):
        spec = get_model(name).with_layers(2)
        kw = dict(adapter="full", batch=2, seq=256, method_options={"completion": 128, "num_generations": 4})
        e0 = vramplan.estimate(spec, "grpo", **kw)
        kw["method_options"] = {**kw["method_options"], "grpo_beta": 0.04}
        e1 = vramplan.estimate(spec, "grpo", **kw)
        assert [c.role for c in e0.config.recipe.copies] == [Role.POLICY]
        assert [c.role for c in e1.config.recipe.copies] == [Role.POLICY, Role.REFERENCE]
        frozen = DTYPE_BYTES[e1.config.regime.frozen_dtype]
        assert (e1.components[Component.WEIGHTS] - e0.components[Component.WEIGHTS]
                >= spec.params * frozen - spec.vocab_size * spec.hidden_size * frozen)
        assert any("second, frozen model" in a for a in e1.assumptions)
        d1 = vramplan.dry_run(spec, "grpo", **kw)
        assert abs(e1.tensor_peak_bytes / d1.tensor_peak_bytes - 1) <= 0.02
        assert d1.tensor_peak_bytes > vramplan.dry_run(spec, "grpo", **{**kw, "method_options": {
            "completion": 128, "num_generations": 4}}).tensor_peak_bytes


def test_more_generations_or_longer_completions_need_more_memory(spec8b):
    def peak(**opts):
        return vramplan.estimate(spec8b, "grpo", seq=1024 + opts.get("completion", 512),
                                 method_options=opts).tensor_peak_bytes
    assert peak(num_generations=16) > peak(num_generations=8)
    assert peak(completion=1024) > peak(completion=512)
    # beta > 0 with LoRA: the reference is the adapter disabled (no second copy), one more log-prob buffer
    est0 = vramplan.estimate(spec8b, "grpo", seq=1536, method_options={"completion": 512})
    est1 = vramplan.estimate(spec8b, "grpo", seq=1536, method_options={"completion": 512, "grpo_beta": 0.04})
    assert est1.components[Component.WEIGHTS] == est0.components[Component.WEIGHTS]
    assert est1.tensor_peak_bytes >= est0.tensor_peak_bytes
    # every loss type reduces [batch, completion] tensors: the same memory
    same = {vramplan.estimate(spec8b, "grpo", seq=1536, method_options={"grpo_loss_type": lt}).tensor_peak_bytes
            for lt in ("grpo", "dr_grpo", "bnpo", "dapo")}
    assert len(same) == 1


def test_vllm_modes(spec8b):
    card = get_gpu("a100-80gb")
    hf = vramplan.estimate(spec8b, "grpo", gpu=card, seq=2048)
    server = vramplan.estimate(spec8b, "grpo", gpu=card, seq=2048, method_options={"generation": "vllm-server"})
    colo = vramplan.estimate(spec8b, "grpo", gpu=card, seq=2048,
                             method_options={"generation": "vllm-colocate", "vllm_gpu_memory_utilization": 0.3})
    assert hf.components.get(Component.KV_CACHE, 0) >= 0 and server.components.get(Component.KV_CACHE, 0) == 0
    assert server.tensor_peak_bytes <= hf.tensor_peak_bytes
    assert hf.capacity_bytes == card.memory_bytes == server.capacity_bytes
    assert colo.capacity_bytes == int(card.memory_bytes * 0.7)
    assert colo.fits == (colo.peak_bytes <= colo.capacity_bytes)
    assert any("planned in the rest" in a for a in colo.assumptions)
    assert any("separate vLLM server" in a for a in server.assumptions)


def test_generation_limits_on_a_4090(spec8b):
    """The issue's question: the largest G x completion for LoRA and QLoRA, and what colocated vLLM leaves."""
    card = get_gpu("rtx4090")
    cfg = make_config(spec8b, "grpo", seq=2048, method_options={"num_generations": 8, "completion": 512})
    lim = generation_limits(spec8b, cfg, card)
    rows = {(r.adapter, r.generation): r for r in lim.rows}
    assert set(rows) == {(a, g) for a in ("lora", "qlora") for g in ("transformers", "vllm-colocate")}
    assert rows["qlora", "transformers"].max_completion >= rows["lora", "transformers"].max_completion > 0
    assert rows["lora", "vllm-colocate"].usable_bytes == int(card.memory_bytes * 0.7)
    # a 16-bit 8B model is 15 GiB: vLLM's 30% of a 24 GiB card cannot hold it
    assert rows["lora", "vllm-colocate"].vllm_bytes > 0.3 * card.memory_bytes and not rows["lora", "vllm-colocate"].fits
    for r in lim.rows:  # the frontier is monotone: more generations, shorter completions
        comps = [c for _, c in r.frontier]
        assert comps == sorted(comps, reverse=True)
        if r.fits:
            assert r.max_completion >= 512 and r.max_generations >= 8
    js = json.loads(json.dumps(lim.to_json()))
    assert js["rows"][0]["frontier"] and "longest completion at G 8" in "\n".join(lim.lines())


def test_fit_renders_the_limits(capsys):
    from vramplan.cli import main

    rc = main(["fit", "--model", "8b", "--gpu", "rtx4090", "--method", "grpo", "--num-generations", "8",
               "--completion", "512"])
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert rc in (0, None)
    assert "longest completion at G 8" in out and "vLLM colocated (30% of the card" in out
    assert "qlora" in out and "lora" in out
    rc = main(["fit", "--model", "8b", "--gpu", "rtx4090", "--method", "grpo", "--json"])
    js = json.loads(capsys.readouterr().out)
    assert js["rows"][0]["method_limits"]["rows"]


def test_generation_time_is_counted(spec8b):
    card = get_gpu("a100-80gb")
    est = vramplan.estimate(spec8b, "grpo", gpu=card, seq=2048)
    assert est.throughput.parts["rollout_s"] > 0
    # a generation batch shared by more micro-batches reads the weights fewer times per micro-batch
    few = vramplan.estimate(spec8b, "grpo", gpu=card, seq=2048, grad_accum=8, batch=1)
    assert few.throughput.parts["rollout_s"] <= est.throughput.parts["rollout_s"]


def test_trainer_configs(tmp_path):
    from vramplan.integrations.config_files import read_training_file

    trl = tmp_path / "grpo.json"
    trl.write_text(json.dumps({"model_name_or_path": "Qwen/Qwen2.5-7B", "num_generations": 16,
                               "max_completion_length": 1024, "max_prompt_length": 512, "loss_type": "dr_grpo",
                               "beta": 0.0, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
                               "use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.35,
                               "use_peft": True, "bf16": True, "output_dir": "out"}))
    req = read_training_file(trl)
    assert req.method == "grpo" and req.options["seq"] == 1536 and req.options["grad_ckpt"] is True
    mo = req.options["method_options"]
    assert mo["num_generations"] == 16 and mo["completion"] == 1024 and mo["generation"] == "vllm-colocate"
    assert mo["vllm_gpu_memory_utilization"] == 0.35 and mo["grpo_loss_type"] == "dr_grpo"
    axo = tmp_path / "axolotl.yml"
    axo.write_text("base_model: Qwen/Qwen2.5-7B\nadapter: qlora\nload_in_4bit: true\nrl: grpo\nmicro_batch_size: 2\n"
                   "sequence_len: 2048\ntrl:\n  num_generations: 4\n  max_completion_length: 256\n  beta: 0.001\n"
                   "datasets: []\n")
    req = read_training_file(axo)
    assert req.method == "grpo" and req.options["adapter"] == "qlora"
    assert req.options["method_options"] == {"num_generations": 4, "completion": 256, "grpo_beta": 0.001}
    dpo = tmp_path / "dpo.json"
    dpo.write_text(json.dumps({"model_name_or_path": "Qwen/Qwen2.5-7B", "loss_type": "sigmoid", "beta": 0.1,
                               "max_prompt_length": 512, "max_length": 1024, "output_dir": "out"}))
    assert read_training_file(dpo).method == "dpo"


def test_from_model_reads_a_grpo_config_object():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024))
    model = peft.get_peft_model(tiny, peft.LoraConfig(r=4, task_type="CAUSAL_LM"))

    class GRPOConfig:  # named like TRL's class (TRL is not installed here); its attributes are what's read
        per_device_train_batch_size = 4
        gradient_accumulation_steps = 2
        gradient_checkpointing = True
        bf16 = True
        num_generations = 8
        max_completion_length = 128
        beta = 0.0
        use_vllm = False

    est = vramplan.from_model(model, training_args=GRPOConfig(), seq=256)
    assert est.method == "grpo" and est.adapter == "lora"
    gs = settings(est.config)
    assert (gs.num_generations, gs.completion, gs.prompt, gs.generation) == (8, 128, 128, "transformers")
    assert gs.generation_batch == 8 and not gs.old_logps  # 4 x 2 completions: one group, one generation per step


def test_dry_run_traces_generation_and_the_update():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    spec = get_model("smollm2-360m").with_layers(2)
    kw = dict(batch=2, seq=256, method_options={"completion": 128, "num_generations": 4})
    d = vramplan.dry_run(spec, "grpo", **kw)
    e = vramplan.estimate(spec, "grpo", **kw)
    assert d.components.get(Component.KV_CACHE, 0) >= 0 and d.phases
    assert abs(e.tensor_peak_bytes / d.tensor_peak_bytes - 1) <= 0.02
    # beta > 0 under LoRA: the reference forward (adapter disabled) runs and its buffer is kept
    d1 = vramplan.dry_run(spec, "grpo", batch=2, seq=256,
                         method_options={"completion": 128, "num_generations": 4, "grpo_beta": 0.04})
    e1 = vramplan.estimate(spec, "grpo", batch=2, seq=256,
                           method_options={"completion": 128, "num_generations": 4, "grpo_beta": 0.04})
    assert abs(e1.tensor_peak_bytes / d1.tensor_peak_bytes - 1) <= 0.02


def test_estimate_checks_what_colocated_vllm_needs_in_its_share(spec8b):
    """`estimate` holds vLLM to its share as fit's limits do: 16-bit weights of an 8B model (~15 GiB) cannot
    load into 30% of a 24 GB card, so the plan is "no" whatever the training step's own peak; a 4-bit policy's
    weights load, and a generation batch whose cache overflows the share is at most "tight"."""
    from vramplan.methods.grpo import vllm_bytes
    from vramplan.verdict import Verdict

    opts = {"generation": "vllm-colocate", "vllm_gpu_memory_utilization": 0.3}
    card = get_gpu("rtx4090")
    lora = vramplan.estimate(spec8b, "grpo", adapter="lora", gpu="rtx4090", grad_ckpt=True, method_options=opts)
    engine = lora.extra["colocated_engine"]
    assert engine["share_bytes"] == int(card.memory_bytes * 0.3)
    assert engine["fixed_bytes"] == vllm_bytes(spec8b, "lora", 0, 0) > engine["share_bytes"]
    assert engine["wanted_bytes"] > engine["fixed_bytes"]
    assert not lora.fits and lora.verdict is Verdict.NO
    assert any("its weights do not fit its share" in a for a in lora.assumptions)
    qlora = vramplan.estimate(spec8b, "grpo", adapter="qlora", gpu="rtx4090", grad_ckpt=True, method_options=opts)
    q = qlora.extra["colocated_engine"]
    assert q["fixed_bytes"] <= q["share_bytes"]
    assert qlora.verdict is not Verdict.NO
    if q["wanted_bytes"] > q["share_bytes"]:
        assert not qlora.fits and qlora.verdict is Verdict.TIGHT
    plain = vramplan.estimate(spec8b, "grpo", adapter="lora", gpu="rtx4090", grad_ckpt=True)
    assert "colocated_engine" not in plain.extra and not plain.constraints
    # the same needs as the general constraints the verdict reads (hard: the weights; soft: the batch)
    hard, soft = lora.constraints
    assert (hard.hard, hard.needed_bytes, hard.available_bytes) == (True, engine["fixed_bytes"], engine["share_bytes"])
    assert (soft.hard, soft.needed_bytes) == (False, engine["wanted_bytes"])
    assert [c["name"] for c in lora.to_json()["constraints"]] == [hard.name, soft.name]


def test_fit_table_row_holds_colocated_vllm_to_its_share(spec8b):
    """fit's method row with vLLM colocated reads grpo.colocated_need as estimate does: QLoRA's 4-bit weights
    load in 30% of a 24 GB card but G = 8 completions of 512 tokens overflow it, so the row is at most "tight"
    and says why; the same row with transformers' generate has no such requirement."""
    from vramplan.methods.grpo import colocated_need
    from vramplan.verdict import Verdict

    opts = {"generation": "vllm-colocate", "vllm_gpu_memory_utilization": 0.3}
    rep = vramplan.fit(spec8b, "rtx4090", methods=["grpo"], method_options=opts)
    row = rep.rows[0]
    fixed, wanted = colocated_need(spec8b, row.estimate.config)
    room = int(get_gpu("rtx4090").memory_bytes * 0.3)
    assert [c.needed_bytes for c in row.estimate.constraints] == [fixed, wanted]
    assert wanted > room >= fixed  # the case this checks: the batch, not the weights, overflows
    assert row.verdict is not Verdict.COMFORTABLE and not row.fits
    assert any("for this generation batch" in n for n in row.notes)
    assert "for this generation batch" in row.verdict_text
    plain = vramplan.fit(spec8b, "rtx4090", methods=["grpo"]).rows[0]
    assert not plain.estimate.constraints

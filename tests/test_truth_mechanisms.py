"""Mechanisms found behind the published under-predictions (reports/published_accuracy.md): each moves the
estimate by the bytes its source says, and only where its source says it applies."""

import pytest

from vramplan.config import make_config
from vramplan.measurements.importers import import_csv
from vramplan.memory import bnb_ctx_input_bytes, model_state, step_memory
from vramplan.models import get_model
from vramplan.taxonomy import Component as C

M = get_model("llama-2-7b")
OLD_BNB = {"bitsandbytes": "0.42.0"}
NEW_BNB = {"bitsandbytes": "0.45.0"}


def peak(cfg, **kw):
    return int(step_memory(M, cfg, **kw).peak)


def _qlora(framework, versions, **kw):
    kw.setdefault("targets", "q_proj,v_proj")
    return make_config(M, "qlora", batch=2, seq=512, grad_ckpt=False, precision="bf16", framework=framework, rank=32,
                       dropout=0.05, versions=versions, **kw)


def test_bnb_ctx_inputs_are_every_4bit_linear_input():
    cfg = _qlora("litgpt", OLD_BNB)
    T = 2 * 512
    h, i, L = M.hidden_size, M.intermediate_size, M.num_layers
    copy = cfg.recipe.copies[0]
    # per layer: the attention input, the attention output (o_proj's input), the MLP input and the MLP
    # product, 2 bytes each (bf16); layer 0's attention input needs no gradient; + the 4-bit head's input
    want = T * 2 * (L * (h + M.q_dim + h + i) - h + h)
    assert int(bnb_ctx_input_bytes(M, cfg, copy, cfg.regime, T)) == want
    # bitsandbytes >= 0.43.2 keeps nothing on ctx
    new = _qlora("litgpt", NEW_BNB)
    assert int(bnb_ctx_input_bytes(M, new, new.recipe.copies[0], new.regime, T)) == 0


def test_litgpt_keeps_the_last_steps_ctx_inputs_beside_the_next_forward():
    old, new = _qlora("litgpt", OLD_BNB), _qlora("litgpt", NEW_BNB)
    copy = old.recipe.copies[0]
    kept = int(bnb_ctx_input_bytes(M, old, copy, old.regime, 2 * 512))
    # the forward phase carries the last step's graph on top of this step's (which itself keeps them too)
    from vramplan.taxonomy import Phase

    f_old = float(step_memory(M, old).phases[Phase.FORWARD])
    f_new = float(step_memory(M, new).phases[Phase.FORWARD])
    assert f_old - f_new >= kept
    # the HF stack's Trainer drops the graph with training_step's locals: no second copy
    hf_old, hf_new = _qlora("hf", OLD_BNB), _qlora("hf", NEW_BNB)
    assert peak(hf_old) - peak(hf_new) < kept


def test_old_bnb_keeps_a_frozen_down_proj_input():
    # q/v adapters only: down_proj is 4-bit and frozen, its input (the MLP product) has no other keeper
    old, new = _qlora("hf", OLD_BNB), _qlora("hf", NEW_BNB)
    T, i, L = 2 * 512, M.intermediate_size, M.num_layers
    d = float(step_memory(M, old).components[C.ACTIVATIONS]) - float(step_memory(M, new).components[C.ACTIVATIONS])
    assert d >= (L - 1) * T * 2 * i


def test_gradient_accumulation_holds_the_gradients():
    full1 = make_config(M, "full", batch=1, seq=512, precision="bf16", grad_ckpt=False)
    full4 = make_config(M, "full", batch=1, seq=512, precision="bf16", grad_ckpt=False, grad_accum=4)
    from vramplan.taxonomy import Phase

    grads = model_state(M, full1).bytes[C.GRADIENTS]
    fwd = lambda cfg, **kw: step_memory(M, cfg, **kw).phases[Phase.FORWARD]  # noqa: E731
    assert int(fwd(full4)) - int(fwd(full1)) == grads
    assert peak(full4) >= peak(full1)
    # where the activations dominate (a long sequence) the peak itself grows
    long1, long4 = full1.with_(seq=16384), full4.with_(seq=16384)
    assert grads * 0.5 < peak(long4) - peak(long1) <= grads
    # the planner's grid path: an accumulation array per batch
    import numpy as np

    arr = step_memory(M, long1, batch=np.array([1, 1]), grad_accum=np.array([1, 4])).peak
    assert int(arr[0]) == peak(long1) and int(arr[1]) == peak(long4)
    # adapters: only their own small gradients
    lora1 = make_config(M, "lora", batch=1, seq=512)
    lora4 = make_config(M, "lora", batch=1, seq=512, grad_accum=4)
    assert 0 <= peak(lora4) - peak(lora1) <= model_state(M, lora1).bytes[C.GRADIENTS]


def test_importer_reads_the_sources_global_batch(tmp_path):
    header = ("source,url_or_repo_path,model,params_b,method,lora_r,lora_targets,base_precision,optimizer,micro_batch,"
              "seq_len,grad_ckpt,attn_impl,gpu,peak_mem_gib,tokens_per_s,measured_or_estimated,notes\n")
    row = "s,x,TinyLlama-1.1B-intermediate-step-1431k-3T,1.1,full,n/a,n/a,bf16,AdamW,4,512,off,sdpa,1xA10G 24GB,14.1,,measured,\n"
    (tmp_path / "t.csv").write_text(header + row)
    toml = ('[models]\n"TinyLlama-1.1B-intermediate-step-1431k-3T" = { model = "tinyllama-1.1b" }\n'
            '[source.s]\nstack = "litgpt"\nunit = "GB"\nglobal_batch = { "tinyllama-1.1b/full" = 32 }\n')
    (tmp_path / "s.toml").write_text(toml)
    [rec] = import_csv(tmp_path / "t.csv", tmp_path / "s.toml")
    assert rec.config.grad_accum == 8
    bad = toml.replace("= 32", "= 30")
    (tmp_path / "s.toml").write_text(bad)
    with pytest.raises(Exception, match="not a multiple"):
        import_csv(tmp_path / "t.csv", tmp_path / "s.toml")


def test_fsdp_qlora_keeps_the_fp32_logits_through_backward():
    # train.py keeps `output` until after loss.backward(); transformers < 4.46 returns the fp32 upcast
    from vramplan.activations import logits_bytes

    kw = dict(batch=4, seq=2048, grad_ckpt=True, precision="bf16", framework="fsdp_qlora", rank=64)
    old = make_config(M, "lora", versions={"transformers": "4.38.2"}, **kw)
    new = make_config(M, "lora", versions={"transformers": "4.46.0"}, **kw)
    T = 4 * 2048
    copy = old.recipe.copies[0]
    _, bw_old = logits_bytes(M, copy, old.regime, T, copy.head, old, 4)
    _, bw_new = logits_bytes(M, copy, new.regime, T, copy.head, new, 4)
    assert float(bw_old) - float(bw_new) == pytest.approx(T * M.vocab_size * (4 - 2))
    # the HF Trainer drops the outputs before backward: nothing kept whatever the version
    hf = make_config(M, "lora", batch=4, seq=2048, grad_ckpt=True, precision="bf16", versions={"transformers": "4.38.2"})
    _, bw_hf = logits_bytes(M, hf.recipe.copies[0], hf.regime, T, "lm", hf, 4)
    hf_new = hf.with_(versions=(("transformers", "4.46.0"),))
    assert float(bw_hf) == float(logits_bytes(M, hf_new.recipe.copies[0], hf_new.regime, T, "lm", hf_new, 4)[1])


def test_float_quant_storage_gives_peft_lt_012_bf16_adapters():
    kw = dict(batch=1, seq=512, grad_ckpt=True, precision="bf16", rank=64)
    fq = make_config(M, "qlora", framework="fsdp_qlora", versions={"peft": "0.10.0"}, **kw)
    fq_new = make_config(M, "qlora", framework="fsdp_qlora", versions={"peft": "0.12.0"}, **kw)
    assert fq.regime.adapter_dtype == "bfloat16" and fq_new.regime.adapter_dtype == "float32"
    # a uint8-packed 4-bit base (the HF stack) keeps fp32 adapters under any PEFT
    hf = make_config(M, "qlora", versions={"peft": "0.10.0"}, **kw)
    assert hf.regime.adapter_dtype == "float32"


def test_torchtune_before_030_runs_the_whole_bf16_loss_and_keeps_the_logits():
    from vramplan.activations import logits_bytes

    kw = dict(batch=2, seq=1024, grad_ckpt=True, precision="bf16", framework="torchtune")
    old = make_config(M, "lora", versions={"torchtune": "0.2.1"}, **kw)
    new = make_config(M, "lora", versions={"torchtune": "0.3.0"}, **kw)
    T, V = 2 * 1024, M.vocab_size
    copy = old.recipe.copies[0]
    f_old, b_old = (float(x) for x in logits_bytes(M, copy, old.regime, T, copy.head, old, 2))
    f_new, b_new = (float(x) for x in logits_bytes(M, copy, new.regime, T, copy.head, new, 2))
    # the shifted 16-bit logits and log_softmax's 16-bit output; backward keeps both beside two 16-bit
    # gradients: 8 B per logit (0.3.0: fp32 chunks, logits deleted before backward)
    assert f_old == T * V * 4 and b_old == T * V * 8
    assert b_new < b_old


def test_torchtune_before_031_steps_foreach_adamw():
    kw = dict(batch=2, seq=1024, grad_ckpt=True, precision="bf16", framework="torchtune")
    old = make_config(M, "full", versions={"torchtune": "0.3.0"}, **kw)
    new = make_config(M, "full", versions={"torchtune": "0.3.1"}, **kw)
    assert old.regime.runner == "loop" and new.regime.runner == "trainer"
    # the foreach step's exp_avg_sq-sized temporary: one copy of the (bf16) trainable weights
    assert model_state(M, old).step_temporary == model_state(M, old).bytes[C.GRADIENTS]
    assert model_state(M, new).step_temporary == 0


def test_unsloth_before_2024_4_keeps_checkpointed_inputs_on_the_gpu():
    kw = dict(batch=4, seq=1024, grad_ckpt=True, framework="unsloth")
    old = make_config(M, "qlora", versions={"unsloth": "2023.12"}, **kw)
    new = make_config(M, "qlora", versions={"unsloth": "2024.4"}, **kw)
    a_old = float(step_memory(M, old).components[C.ACTIVATIONS])
    a_new = float(step_memory(M, new).components[C.ACTIVATIONS])
    # every layer but the one on the GPU anyway: its 16-bit input (4096 tokens x hidden)
    assert a_old - a_new == pytest.approx((M.num_layers - 1) * 4 * 1024 * M.hidden_size * 2, rel=0.01)


def test_gradient_accumulation_matches_the_dry_run():
    # the dry run steps grad_accum real micro-batches (zero_grad after the optimizer step): the analytic
    # model's held gradients match it where activations set the peak
    pytest.importorskip("torch")
    from vramplan.dryrun import dryrun
    from vramplan.models import from_hf_config
    from vramplan.plan import estimate

    tiny = from_hf_config(dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                               max_position_embeddings=4096), name="tiny-llama-accum")
    d1, d3 = (dryrun(tiny, "full", batch=2, seq=512, grad_accum=g, precision="bf16").tensor_peak_bytes for g in (1, 3))
    e1, e3 = (estimate(tiny, "full", batch=2, seq=512, grad_accum=g, precision="bf16").overheads.allocated_bytes
              for g in (1, 3))
    assert d3 > d1
    assert e3 - e1 == pytest.approx(d3 - d1, rel=0.05)


def test_caching_allocator_replay_best_fit_split_and_merge():
    """vramplan.allocsim follows CUDACachingAllocator's rules: sizes rounded to 512 B, a 20 MiB segment for a
    large request under 10 MiB, best fit, a split remainder kept cached, free neighbours merged."""
    from vramplan.allocsim import MIB, CachingAllocator

    a = CachingAllocator()
    x = a.malloc(3 * MIB)
    assert a.reserved == 20 * MIB and a.allocated == 3 * MIB
    y = a.malloc(100)
    assert a.reserved == 22 * MIB  # small pool: its own 2 MiB segment
    z = a.malloc(12 * MIB)  # fits the 17 MiB remainder of the first segment: no new segment
    assert a.reserved == 22 * MIB
    big = a.malloc(30 * MIB)
    assert a.reserved == 52 * MIB
    a.free(x), a.free(z)
    w = a.malloc(18 * MIB)  # x and z merged with the remainder: 20 MiB free in one block
    assert a.reserved == 52 * MIB and a.peak_allocated >= 45 * MIB
    a.free(w), a.free(big), a.free(y)
    assert a.allocated == 0 and a.reserved == 52 * MIB  # nothing goes back to the driver


def test_torchtune_before_020_qlora_load_leaves_its_quantisation_reserved():
    """torchtune 0.1 builds and quantises on the GPU with torchao 0.1's unchunked to_nf4: the replay gives the
    QLoRA tutorial's 'peak memory reserved, model init' (9.13 GB, Llama-2-7B, 7B_qlora_single_device), and
    the reserved peak is at least that; torchtune 0.2.0 (torchao 0.3.1, chunked) leaves no such floor."""
    from vramplan.gpus import get_gpu
    from vramplan.planner.estimating import estimate_config

    kw = dict(batch=2, seq=1024, grad_ckpt=True, precision="bf16", framework="torchtune",
              targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", dropout=0.05)
    old = make_config(M, "qlora", versions={"torchtune": "0.1.0"}, **kw)
    new = make_config(M, "qlora", versions={"torchtune": "0.2.0"}, **kw)
    floor = model_state(M, old).load_reserved
    assert abs(floor / 9.13e9 - 1) < 0.01
    assert model_state(M, new).load_reserved == 0
    card = get_gpu("rtx4090")
    e_old, e_new = estimate_config(M, old, card), estimate_config(M, new, card)
    assert e_old.overheads.reserved_bytes >= floor > e_new.overheads.reserved_bytes


def test_autocast_casts_of_a_wide_frozen_base_are_saved():
    """litgpt bf16-mixed keeps the frozen base fp32; autocast caches no cast of a frozen weight, so every
    linear's bf16 copy is saved by its matmul (all layers without checkpointing) and the head is cast for
    each 128-token chunk; litgpt bf16-true and the HF stack (a bf16 base) have none."""
    from vramplan.memory import frozen_head_chunk_casts

    spec = get_model("stablelm-base-alpha-3b")
    kw = dict(batch=1, seq=1034, grad_ckpt=False, rank=8, targets="query_key_value", framework="litgpt")
    mixed = make_config(spec, "lora", precision="bf16-mixed", **kw)
    true = make_config(spec, "lora", precision="bf16", **kw)
    layer = sum(l.params for l in spec.layer_linears() if l.is_linear)
    head = spec.vocab_size * spec.hidden_size
    adapters = 2 * model_state(spec, mixed).trainable_params  # the adapters' cached bf16 casts
    assert model_state(spec, mixed).bytes[C.AUTOCAST_CACHE] == 2 * (spec.num_layers * layer + head) + adapters
    assert model_state(spec, true).bytes.get(C.AUTOCAST_CACHE, 0) == 0
    copy = mixed.recipe.copies[0]
    assert int(frozen_head_chunk_casts(spec, mixed, copy, mixed.regime, 1034, 1)) == 8 * 2 * head  # 9 chunks
    assert int(frozen_head_chunk_casts(spec, mixed, copy, mixed.regime, 128, 1)) == 0
    # checkpointing: only the recomputed layer's casts are alive in backward
    gc = make_config(spec, "lora", precision="bf16-mixed", **{**kw, "grad_ckpt": True})
    assert step_memory(spec, gc).peak < step_memory(spec, mixed).peak - (spec.num_layers - 2) * 2 * layer
    hf = make_config(M, "lora", batch=1, seq=1024, precision="bf16-mixed", framework="hf")
    assert model_state(M, hf).bytes.get(C.AUTOCAST_CACHE, 0) == 2 * model_state(M, hf).trainable_params


def test_detected_card_plans_in_the_usable_capacity(monkeypatch):
    """A detected catalogue card keeps the catalogue's (usable) capacity, not NVML's larger total; less memory
    than the catalogue (ECC, MIG) is taken from NVML; an unknown card says it plans with NVML's total."""
    from vramplan import gpus, nvml

    def fake(name, total):
        return lambda index=0: nvml.DeviceInfo(index, name, total, 0, "550.00", 12040)

    t4 = gpus.get_gpu("t4")
    monkeypatch.setattr(nvml, "device_info", fake("Tesla T4", 15360 * 2**20))
    got = gpus.detect_gpu()
    assert got.memory_bytes == t4.memory_bytes < 15360 * 2**20
    assert "catalogue capacity (detected" in got.sources["memory_bytes"] and "usable" in gpus.capacity_note(got)
    monkeypatch.setattr(nvml, "device_info", fake("Tesla T4", 10 * 2**30))
    assert gpus.detect_gpu().memory_bytes == 10 * 2**30 and "below the catalogue" in gpus.detect_gpu().sources["memory_bytes"]
    monkeypatch.setattr(nvml, "device_info", fake("Some Future GPU", 48 * 2**30))
    odd = gpus.detect_gpu()
    assert odd.memory_bytes == 48 * 2**30 and "NVML total" in gpus.capacity_note(odd)

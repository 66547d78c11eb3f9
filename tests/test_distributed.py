"""Multi-GPU plans: DeepSpeed's estimator formulas, sharding monotonicity, communication, input errors."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import vramplan
from vramplan.config import make_config
from vramplan.distributed import (
    SINGLE, STRATEGIES, comm_volume, deepspeed_zero2_estimate, deepspeed_zero3_estimate, interconnect,
    largest_layer_params, make_parallel, parallel_step_memory, shard_state,
)
from vramplan.gpus import get_gpu
from vramplan.memory import PHASE_ORDER, step_memory
from vramplan.models import get_model

METHODS = ["full", "lora", "qlora", "dora", "ia3", "dpo", "ppo"]
GIB = 2**30


# -- DeepSpeed's published estimators ------------------------------------------------------

def test_estimator_functions_reproduce_deepspeed_printout_for_t5_small():
    """``estimate_zero3_model_states_mem_needs_all_live(t5-small)`` prints (GB = GiB, 2 decimals):
    offload param+optimizer: 1.52 CPU / 0.06 GPU; optimizer only: 1.35 / 0.17; none: 0.09 (zero_init=1) or
    0.34 (zero_init=0) / 1.08. t5-small: 60,506,624 parameters, largest module 16,449,536 (shared embedding)."""
    P, L = 60_506_624, 16_449_536
    rows = {
        (True, True, True): (1.52, 0.06), (True, True, False): (1.52, 0.06),
        (True, False, True): (1.35, 0.17), (True, False, False): (1.35, 0.17),
        (False, False, True): (0.09, 1.08), (False, False, False): (0.34, 1.08),
    }
    for (off, off_params, zi), (cpu, gpu) in rows.items():
        c, g, _ = deepspeed_zero3_estimate(P, L, 1, 1, cpu_offload=off, cpu_offload_params=off_params, zero_init=zi)
        assert round(c / GIB, 2) == cpu and round(g / GIB, 2) == gpu


@pytest.mark.parametrize("model", ["llama-2-7b", "qwen2.5-0.5b", "gemma-2-2b", "mixtral-8x7b"])
@pytest.mark.parametrize("gpus", [1, 2, 8, 16, 64])
def test_zero2_model_states_agree_with_deepspeed(model, gpus):
    """stage_1_and_2.py: 4 P + 16 P / N on the GPU (2 P with the optimiser offloaded)."""
    spec = get_model(model)
    cfg = make_config(spec, "full", precision="bf16-mixed", optimizer="adamw")
    P = spec.params
    nodes, per_node = max(1, gpus // 8), min(gpus, 8)
    for offload in ("none", "cpu"):
        ours = shard_state(spec, cfg, make_parallel(gpus, "zero2", offload)).model_state_bytes
        # the literal published formula, independent of vramplan's copy of it
        expected = 2 * P if offload == "cpu" else 4 * P + int(16 * P / gpus)
        assert ours == pytest.approx(expected, rel=1e-6)  # AdamW's scalar `step` per tensor is the only difference
        assert ours == pytest.approx(deepspeed_zero2_estimate(P, per_node, nodes, offload == "cpu")[1], rel=1e-6)


@pytest.mark.parametrize("model", ["llama-2-7b", "qwen2.5-0.5b", "gemma-2-2b", "mixtral-8x7b"])
@pytest.mark.parametrize("gpus", [1, 2, 8, 16, 64])
def test_zero3_model_states_agree_with_deepspeed(model, gpus):
    """stage3.py: the estimator's 18 P / N (16-bit parameter partition, fp32 master, gradient partition and
    Adam states) plus what the traced engine also holds: the 16-bit gradient partition (2 P / N) and, in
    place of the estimator's 4 L, the parameters kept gathered within stage3_max_reuse_distance (1e9
    elements: the trailing 5e8 parameters, plus the module at work)."""
    spec = get_model(model)
    cfg = make_config(spec, "full", precision="bf16-mixed", optimizer="adamw")
    P, L = spec.params, largest_layer_params(spec)
    nodes, per_node = max(1, gpus // 8), min(gpus, 8)
    kept = 2 * min(P, 500_000_000 + L)
    for offload in ("none", "cpu"):
        ours = shard_state(spec, cfg, make_parallel(gpus, "zero3", offload)).model_state_bytes
        expected = kept if offload == "cpu" else kept + int(18 * P / gpus) + 2 * (-(-P // gpus))
        assert ours == pytest.approx(expected, rel=1e-6)
        ds = deepspeed_zero3_estimate(P, L, per_node, nodes, cpu_offload=offload == "cpu",
                                      cpu_offload_params=offload == "cpu")[1]
        assert ours - kept == pytest.approx(ds - 4 * L + (0 if offload == "cpu" else 2 * (-(-P // gpus))), rel=1e-6)


def test_largest_layer_is_the_embedding_for_llama():
    spec = get_model("llama-2-7b")
    assert largest_layer_params(spec) == 32000 * 4096


# -- per-GPU step memory -------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gc", [False, True])
def test_single_process_reproduces_step_memory(method, gc):
    """The sharded planner's phase assembly equals memory.step_memory term by term without a strategy."""
    spec = get_model("llama-3.2-1b")
    for attn in ("eager", "sdpa"):
        cfg = make_config(spec, method, grad_ckpt=gc, attn=attn, seq=1024)
        b = np.array([1, 2, 5])
        a, p = step_memory(spec, cfg, batch=b), parallel_step_memory(spec, cfg, SINGLE, batch=b)
        for ph in PHASE_ORDER:
            np.testing.assert_allclose(a.phases[ph], p.phases[ph], rtol=0, atol=1)
        for c in a.components:
            np.testing.assert_allclose(a.components[c], p.components[c], rtol=0, atol=1)


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(METHODS), batch=st.integers(1, 8), seq=st.sampled_from([512, 1024, 2048]),
       gc=st.booleans(), offload=st.sampled_from(["none", "cpu"]), strategy=st.sampled_from(["zero3", "fsdp"]))
def test_more_gpus_never_use_more_memory_per_gpu_under_full_sharding(method, batch, seq, gc, offload, strategy):
    spec = get_model("qwen2.5-0.5b")
    cfg = make_config(spec, method, batch=batch, seq=seq, grad_ckpt=gc)
    peaks = [float(parallel_step_memory(spec, cfg, make_parallel(n, strategy, offload)).peak) for n in (1, 2, 3, 4, 8, 64)]
    assert all(b <= a + 1 for a, b in zip(peaks, peaks[1:])), peaks


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_estimate_per_gpu_peak_orders_strategies(strategy):
    """Full fine-tuning of a 7B on 8 GPUs: sharding more never costs more than DDP's replica."""
    ddp = vramplan.estimate("llama-2-7b", "full", gpu="a100-80gb", gpus=8, strategy="ddp", grad_ckpt=True)
    est = vramplan.estimate("llama-2-7b", "full", gpu="a100-80gb", gpus=8, strategy=strategy, grad_ckpt=True)
    assert est.peak_bytes <= ddp.peak_bytes
    assert est.gpus == 8 and est.strategy == strategy
    j = est.to_json()
    assert j["peak_bytes"] == est.peak_bytes and isinstance(j["peak_bytes"], int)
    assert j["tokens_per_s"] > 0 and j["step_time_s"] > 0


def test_zero3_eight_gpus_shrinks_a_7b_full_finetune():
    one = vramplan.estimate("llama-2-7b", "full", gpu="a100-80gb", grad_ckpt=True)
    z3 = vramplan.estimate("llama-2-7b", "full", gpu="a100-80gb", gpus=8, strategy="zero3", grad_ckpt=True)
    assert not one.fits and z3.fits
    assert z3.peak_bytes < one.peak_bytes / 3


def test_ddp_adds_gradient_buckets():
    spec = get_model("llama-3.2-1b")
    cfg = make_config(spec, "full")
    single = shard_state(spec, cfg, SINGLE)
    ddp = shard_state(spec, cfg, make_parallel(2, "ddp"))
    from vramplan.taxonomy import Component

    assert ddp.comm_buffer_bytes == single.bytes[Component.GRADIENTS]


# -- communication ---------------------------------------------------------------------------

def test_comm_volumes_follow_the_zero_paper():
    """ZeRO paper section 7: DDP and ZeRO-1/2 move 2 P x bytes per step, ZeRO-3 1.5x that (3 P)."""
    spec = get_model("llama-2-7b")
    gpu = get_gpu("h100-sxm")
    cfg = make_config(spec, "full", precision="bf16")  # 16-bit gradients everywhere, no recompute
    n = 8
    f = (n - 1) / n
    P = spec.params
    z1 = comm_volume(spec, cfg, make_parallel(n, "zero1"), gpu)
    z2 = comm_volume(spec, cfg, make_parallel(n, "zero2"), gpu)
    z3 = comm_volume(spec, cfg, make_parallel(n, "zero3"), gpu)
    assert z2.micro_bytes + z2.step_bytes == pytest.approx(2 * f * 2 * P, rel=1e-9)
    assert z3.micro_bytes == pytest.approx(3 * f * 2 * P, rel=1e-9)
    assert z1.step_bytes == pytest.approx(3 * f * 2 * P, rel=1e-9)  # all-reduce + all-gather of the update


def test_one_gpu_has_no_interconnect_traffic_time():
    spec = get_model("llama-2-7b")
    cfg = make_config(spec, "full")
    c = comm_volume(spec, cfg, make_parallel(1, "zero3"), get_gpu("h100-sxm"))
    assert c.seconds(4)[0] == 0.0


def test_interconnect_choice():
    h100, l4 = get_gpu("h100-sxm"), get_gpu("l4")
    assert interconnect(h100, make_parallel(8, "zero3"))[0] == "nvlink"
    assert interconnect(l4, make_parallel(4, "ddp"))[0] == "pcie"
    # two nodes: eight 400 Gb/s adapters per node (320 GB/s achieved) bound H100 rings below NVLink (360)
    assert interconnect(h100, make_parallel(16, "zero3"))[0] == "infiniband"
    assert interconnect(h100, make_parallel(16, "zero3"))[1] < interconnect(h100, make_parallel(8, "zero3"))[1]
    # PCIe cards: the host link stays the bottleneck across nodes too
    assert interconnect(l4, make_parallel(16, "ddp"))[0] == "pcie"


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(gpus=0), "--gpus must be a positive integer"),
    (dict(gpus=-2), "--gpus must be a positive integer"),
    (dict(gpus=2.5), "--gpus must be a positive integer"),
    (dict(gpus=2, strategy="zero4"), "unknown strategy"),
    (dict(gpus=2, strategy="ddp", offload="cpu"), "needs a sharding strategy"),
    (dict(gpus=2, strategy="zero3", offload="disk"), "unknown offload"),
])
def test_bad_parallel_input(kwargs, match):
    with pytest.raises(vramplan.VramplanError, match=match):
        vramplan.estimate("7b", "full", gpu="a100-80gb", **kwargs)


def test_gpus_without_strategy_means_ddp():
    assert make_parallel(4).strategy == "ddp"
    assert make_parallel(1).strategy is None


@pytest.mark.parametrize("argv, msg", [
    (["estimate", "--model", "7b", "--gpus", "0"], "--gpus must be a positive integer"),
    (["estimate", "--model", "7b", "--gpus", "2", "--strategy", "zer3"], "did you mean zero3"),
    (["fit", "--model", "7b", "--gpu", "l4", "--strategy", "ddp", "--offload", "cpu"], "needs a sharding strategy"),
    (["fit", "--model", "7b", "--gpu", "l4", "--gpus", "3", "--global-batch", "8"], "not a multiple"),
    (["estimate", "--model", "7b", "--gpu", "l4", "--tokens", "lots"], "cannot read --tokens"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, msg, capsys):
    from vramplan.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_strategy_is_planned_from_its_definition_not_its_name(strategy, monkeypatch):
    """A twin of each strategy under another name (vramplan.distributed.STRATEGY_DEFS: what it shards, its DeepSpeed
    stage, FSDP2's default resharding, the stack's FSDP) is planned to the byte as the original: sharded state,
    per-GPU step memory, communication, step time, label -- under each engine that runs it, with and without CPU
    offload and accumulation. It fails wherever a layer still compares the strategy's name."""
    from dataclasses import replace

    import vramplan.distributed as dist
    from vramplan.throughput import step_time

    twin = strategy + "_twin"
    monkeypatch.setitem(dist.STRATEGY_DEFS, twin, replace(dist.STRATEGY_DEFS[strategy], name=twin))
    spec, gpu = get_model("llama-3.2-1b"), get_gpu("a100-80gb")
    engines = ["auto", "torch"] + (["deepspeed"] if dist.STRATEGY_DEFS[strategy].deepspeed_stage else [])
    offloads = ["none"] + (["cpu"] if dist.STRATEGY_DEFS[strategy].shards_states else [])
    cfgs = [make_config(spec, m, batch=2, seq=256, grad_accum=a, grad_ckpt=gc)
            for m, a, gc in (("full", 1, False), ("lora", 4, True), ("qlora", 2, False), ("ppo", 1, True))]
    fsdp1 = make_config(spec, "lora", batch=2, seq=256, framework="torchtune") if strategy == "fsdp" else None
    for engine in engines:
        for off in offloads:
            a, b = (make_parallel(4, s, off, engine=engine, gpus_per_node=2) for s in (strategy, twin))
            assert a.label.replace(strategy, twin) == b.label and a.engine_name == b.engine_name
            for cfg in cfgs + ([fsdp1] if fsdp1 is not None and engine != "deepspeed" else []):
                sa, sb = shard_state(spec, cfg, a), shard_state(spec, cfg, b)
                assert sa == sb, (engine, off, cfg.method)
                ma, mb = parallel_step_memory(spec, cfg, a), parallel_step_memory(spec, cfg, b)
                assert ma.peak == mb.peak and ma.components == mb.components
                assert comm_volume(spec, cfg, a, gpu) == comm_volume(spec, cfg, b, gpu)
                assert step_time(spec, cfg, gpu, parallel=a).step_s == step_time(spec, cfg, gpu, parallel=b).step_s
    with pytest.raises(vramplan.VramplanError):
        make_parallel(4, "zero9")

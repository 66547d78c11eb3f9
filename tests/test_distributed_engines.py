"""The sharded planner's engine models (numpy only): options, the FSDP2 schedule, ZeRO-1's partition, per_gpu_peak."""

import numpy as np
import pytest

from vramplan.config import make_config
from vramplan.distributed import (
    ENGINE_OPTIONS, make_parallel, parallel_step_memory, shard_state,
)
from vramplan.errors import VramplanError
from vramplan.planner.estimating import PerGpuPeak, per_gpu_peak
from vramplan.models import get_model
from vramplan.taxonomy import Component


@pytest.fixture(scope="module")
def spec():
    return get_model("llama-2-7b")


def test_engine_defaults_and_options():
    assert make_parallel(2, "zero3").engine_name == "deepspeed"
    assert make_parallel(2, "fsdp").engine_name == "torch"
    assert make_parallel(2, "zero3", engine="torch").engine_name == "torch"
    assert make_parallel(2, "zero2", engine="torch").reshards_after_forward is False
    assert make_parallel(2, "fsdp", reshard_after_forward=False).reshards_after_forward is False
    p = make_parallel(2, "zero3", engine="deepspeed", reduce_bucket_size=5e8)
    assert p.reduce_bucket_size == 500_000_000 and p.to_json()["engine_options"] == {"reduce_bucket_size": 500_000_000}
    with pytest.raises(VramplanError, match="DeepSpeed runs zero1"):
        make_parallel(2, "fsdp", engine="deepspeed")
    with pytest.raises(VramplanError, match="unknown engine option"):
        make_parallel(2, "fsdp", prefetch=3)
    with pytest.raises(VramplanError, match="positive"):
        make_parallel(2, "ddp", bucket_cap_mb=-1)
    with pytest.raises(VramplanError, match="engine"):
        make_parallel(2, "ddp", engine="megatron")
    assert set(ENGINE_OPTIONS) >= {"reshard_after_forward", "bucket_cap_mb", "reduce_bucket_size"}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp2_schedule_shrinks_with_ranks_and_grows_without_resharding(spec, method):
    cfg = make_config(spec, method, precision="bf16", batch=1, seq=1024, grad_ckpt=True)
    peaks = [float(parallel_step_memory(spec, cfg, make_parallel(n, "fsdp")).peak) for n in (2, 4, 8)]
    assert peaks[0] > peaks[1] > peaks[2]
    keep = float(parallel_step_memory(spec, cfg, make_parallel(2, "fsdp", reshard_after_forward=False)).peak)
    assert keep > peaks[0]
    sm = parallel_step_memory(spec, cfg, make_parallel(2, "fsdp"))
    from vramplan.memory import PHASE_ORDER
    from vramplan.taxonomy import Phase

    at_step = PHASE_ORDER[int(sm.peak_phase)] is Phase.OPTIMIZER_STEP
    # the gathered units are named as such (the optimiser step runs on the shards alone)
    assert (sm.components[Component.ALLGATHER_BUFFERS] > 0) != at_step
    assert np.isclose(sum(float(v) for v in sm.components.values()), float(sm.peak))


def test_fsdp2_unit_sizes_follow_the_engine(spec):
    cfg = make_config(spec, "full", precision="bf16", batch=1, seq=1024)
    f = shard_state(spec, cfg, make_parallel(2, "fsdp")).fsdp2
    assert f["U"] == spec.layer_params * 2  # one decoder layer in bf16
    assert f["R"] == (spec.embedding_params + spec.lm_head_params + spec.hidden_size) * 2
    q = shard_state(spec, make_config(spec, "qlora", precision="bf16"), make_parallel(2, "fsdp"))
    assert q.fsdp2["U"] < f["U"] / 3  # NF4 codes (half a byte a weight) + adapters
    # quantisation constants are module attributes: every rank keeps them all
    full_qs = shard_state(spec, make_config(spec, "qlora", precision="bf16"), make_parallel(1, None)).bytes
    assert q.bytes[Component.QUANT_STATE] == full_qs[Component.QUANT_STATE]


def test_zero_redundancy_optimizer_partition_is_greedy_by_size(spec):
    cfg = make_config(spec, "full", precision="bf16", batch=1, seq=512)
    one = shard_state(spec, cfg, make_parallel(2, "ddp")).bytes[Component.OPTIMIZER_STATES]
    z1 = shard_state(spec, cfg, make_parallel(2, "zero1", engine="torch"))
    assert one / 2 <= z1.bytes[Component.OPTIMIZER_STATES] < one / 2 * 1.05  # largest rank, near half
    assert z1.comm_buffer_bytes == shard_state(spec, cfg, make_parallel(2, "ddp")).comm_buffer_bytes


def test_ddp_bucket_views_trade_the_second_gradient_copy(spec):
    cfg = make_config(spec, "full", precision="bf16", batch=1, seq=512)
    off = shard_state(spec, cfg, make_parallel(2, "ddp"))
    on = shard_state(spec, cfg, make_parallel(2, "ddp", gradient_as_bucket_view=True))
    assert off.comm_buffer_bytes == on.comm_buffer_bytes == off.bytes[Component.GRADIENTS]
    assert on.bytes[Component.GRADIENTS] == 0


def test_per_gpu_peak_is_the_estimate_per_gpu():
    r = per_gpu_peak("llama-2-7b", "qlora", gpus=2, strategy="fsdp", gpu="rtx3090", batch=1, seq=2048, rank=64,
                     grad_ckpt=True, precision="bf16")
    assert isinstance(r, PerGpuPeak)
    assert all(isinstance(x, int) for x in (r.tensor_peak_bytes, r.reserved_bytes, r.peak_bytes))
    assert r.tensor_peak_bytes <= r.reserved_bytes <= r.peak_bytes
    assert r.estimate.gpus == 2 and r.estimate.strategy == "fsdp"
    assert r.to_json()["parallel"]["engine"] == "torch"
    ds = per_gpu_peak("llama-2-7b", "full", gpus=4, strategy="zero3", batch=1, seq=512, precision="bf16-mixed")
    fs = per_gpu_peak("llama-2-7b", "full", gpus=4, strategy="zero3", engine="torch", batch=1, seq=512,
                      precision="bf16-mixed")
    assert ds.layout.startswith("DeepSpeed") and fs.layout.startswith("PyTorch FSDP2")
    with pytest.raises(VramplanError):
        per_gpu_peak("llama-2-7b", "lora", gpus=0, strategy="fsdp")


def test_accumulation_holds_the_gradients_each_engine_keeps(spec):
    """A micro-batch after the first runs beside the earlier ones' sums: DDP every gradient, FSDP2 its
    sharded sums, or every unsharded gradient when the sync is skipped (no_sync)."""
    from vramplan.distributed import _held_gradients

    one = make_config(spec, "full", precision="bf16", batch=1, seq=512)
    acc = make_config(spec, "full", precision="bf16", batch=1, seq=512, grad_accum=4)
    grads = 2 * spec.params  # bf16 gradients, unsharded
    for par, held in ((make_parallel(4, "ddp"), grads), (make_parallel(4, "fsdp", no_sync=True), grads),
                      (make_parallel(4, "fsdp", no_sync=False), -(-grads // 4))):
        sh = shard_state(spec, acc, par)
        full = __import__("vramplan.memory", fromlist=["model_state"]).model_state(spec, acc)
        assert _held_gradients(sh, full, acc, par) == pytest.approx(held, rel=0.01), par
        assert _held_gradients(shard_state(spec, one, par), full, one, par) == 0
        # the forward runs beside what is held
        from vramplan.taxonomy import Phase

        grow = (parallel_step_memory(spec, acc, par).phases[Phase.FORWARD]
                - parallel_step_memory(spec, one, par).phases[Phase.FORWARD])
        assert grow == pytest.approx(held, rel=0.01)
    # the stacks' loops: litgpt and the HF Trainer skip the sync while accumulating, torchtune does not
    assert make_parallel(2, "fsdp").skips_sync(make_config(spec, "full", framework="litgpt"))
    assert make_parallel(2, "fsdp").skips_sync(make_config(spec, "full", framework="hf"))
    assert not make_parallel(2, "fsdp").skips_sync(make_config(spec, "full", framework="torchtune"))


def test_accumulation_step_memory_picks_per_grid_point(spec):
    from vramplan.distributed import accumulation_step_memory

    cfg = make_config(spec, "full", precision="bf16", batch=1, seq=512)
    par = make_parallel(4, "fsdp", no_sync=True)
    b = np.array([1, 2, 1, 2])
    m = accumulation_step_memory(spec, cfg, par, b, np.array([1, 1, 4, 4]))
    one = parallel_step_memory(spec, cfg, par, batch=b).peak
    many = parallel_step_memory(spec, cfg.with_(grad_accum=4), par, batch=b).peak
    assert np.array_equal(m.peak, np.where([False, False, True, True], many, one))


def test_deepspeed_layout_in_time(spec):
    """Stages 1-2: 16-bit gradients in backward, the fp32 partition in step(); torch_adam two more partitions;
    the bf16 engine casts PEFT's fp32 adapters to 16 bit."""
    from vramplan.distributed import deepspeed_cast

    cfg = make_config(spec, "full", precision="bf16", batch=1, seq=512)
    P = spec.params
    sh = shard_state(spec, cfg, make_parallel(4, "zero2"))
    assert sh.bytes[Component.GRADIENTS] == 2 * P and sh.step_grad_bytes == 4 * P // 4 and sh.step_temporary == 0
    torch_adam = shard_state(spec, cfg, make_parallel(4, "zero2", torch_adam=True))
    assert torch_adam.step_temporary == 2 * 4 * (-(-P // 4))
    z3 = shard_state(spec, cfg, make_parallel(4, "zero3"))
    assert z3.bytes[Component.GRADIENTS] == 2 * (-(-P // 4)) and z3.comm_buffer_bytes == 2 * spec.hidden_size ** 2
    lora = make_config(spec, "lora", precision="bf16")
    assert lora.regime.adapter_dtype == "float32"
    cast = deepspeed_cast(lora, make_parallel(2, "zero2"))
    assert cast.regime.adapter_dtype == "bfloat16" and cast.options != lora.options
    assert deepspeed_cast(lora, make_parallel(2, "fsdp")) is lora
    assert deepspeed_cast(make_config(spec, "lora", precision="bf16-mixed"), make_parallel(2, "zero2")).regime.autocast


@pytest.mark.parametrize("strategy, divisor", [("zero1", 1), ("zero2", 4)])
def test_deepspeed_stages_1_2_hold_16bit_gradients_only_under_accumulation(spec, strategy, divisor):
    """Between micro-batches stage 1 keeps every 16-bit gradient in param.grad, stage 2 its 16-bit partition
    (traced: benchmarks/dryrun_distributed.py, DeepSpeed rows with grad_accum=2); one micro-batch holds none."""
    from vramplan.distributed import _held_gradients, shard_state
    from vramplan.memory import model_state

    par = make_parallel(4, strategy, engine="deepspeed")
    one = make_config(spec, "lora", batch=1, seq=512, grad_ckpt=True)
    two = one.with_(grad_accum=2)
    for cfg, want in ((one, 0), (two, 2 * shard_state(spec, two, par).trainable_params // divisor)):
        sh = shard_state(spec, cfg, par)
        assert _held_gradients(sh, model_state(spec, cfg), cfg, par) == want
    assert parallel_step_memory(spec, two, par).peak > parallel_step_memory(spec, one, par).peak


def test_zero3_places_a_quantised_model_whole_on_each_gpu_first(spec):
    """transformers builds a quantised model outside zero.Init, so DeepSpeed's engine moves the whole module to
    each GPU before ZeRO-3 partitions it: a reserved floor of the whole (NF4 + 16-bit rest + adapters), offload
    or not; a 16-bit base is built under zero.Init (no floor), and FSDP has none."""
    import vramplan

    cfg = make_config(spec, "qlora", batch=1, seq=512, grad_ckpt=True)
    whole = None
    for strategy, offload in (("zero3", None), ("zero3", "cpu")):
        par = make_parallel(2, strategy, offload)
        mem = parallel_step_memory(spec, cfg, par)
        whole = whole or mem.state.load_reserved
        assert mem.state.load_reserved == whole > 3 * 2**30  # 7B in NF4: about 3.9 GB
        est = vramplan.estimate(spec, "qlora", gpus=2, strategy=strategy, offload=offload, gpu="rtx4090",
                                batch=1, seq=512, grad_ckpt=True)
        assert est.overheads.reserved_bytes >= whole
    for method, strategy in (("lora", "zero3"), ("qlora", "fsdp"), ("qlora", "zero2")):
        mem = parallel_step_memory(spec, make_config(spec, method, batch=1, seq=512, grad_ckpt=True),
                                   make_parallel(2, strategy))
        assert mem.state.load_reserved == 0

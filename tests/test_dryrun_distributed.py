"""The distributed dry run (real engines, 2 CPU ranks, gloo) and the sharded planner held to it.

The reduced grid of benchmarks/dryrun_distributed.py: 2 ranks, a 2-layer llama config with hidden 128.
One spawned group per job (each a fresh pair of processes from a preloaded forkserver).
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from conftest import load_benchmark  # noqa: E402

from vramplan.distributed import make_parallel, parallel_step_memory  # noqa: E402
from vramplan.dryrun.distributed import Job, distributed_config, distributed_dryrun, run_jobs  # noqa: E402
from vramplan.errors import VramplanError  # noqa: E402
from vramplan.models import from_hf_config  # noqa: E402
from vramplan.taxonomy import Component  # noqa: E402

bench = load_benchmark("dryrun_distributed")
ROWS = [("ddp", "full", {}), ("zero1", "full", {}), ("fsdp", "full", {}),
        ("fsdp", "lora", {}),
        # gradient accumulation, 2 micro-batches, the first without the sync (no_sync): FSDP2 keeps its unsharded
        # gradients (the benchmark's grid also traces the synchronised flavour and DDP)
        ("fsdp", "full", {"grad_accum": 2, "no_sync": True})]


@pytest.fixture(scope="module")
def traced():
    spec = from_hf_config(bench.TINY_MODEL, name="tiny-grid")
    cfgs = {(m, o.get("grad_accum", 1)): distributed_config(spec, m, precision="bf16", batch=bench.BATCH,
                                                           seq=bench.SEQ, attn="eager", grad_ckpt=False,
                                                           grad_accum=o.get("grad_accum", 1))
            for _s, m, o in ROWS}
    jobs = [Job(spec, cfgs[(m, o.get("grad_accum", 1))], s, "torch", _engine(o)) for s, m, o in ROWS]
    return spec, cfgs, run_jobs(jobs, 2, timeout=240)


def _engine(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k != "grad_accum"}


@pytest.mark.parametrize("i", range(len(ROWS)))
def test_planner_within_two_percent_of_the_traced_engine(traced, i):
    spec, cfgs, results = traced
    strategy, method, opts = ROWS[i]
    cfg = cfgs[(method, opts.get("grad_accum", 1))]
    planned = parallel_step_memory(spec, cfg, make_parallel(2, strategy, engine="torch", **_engine(opts))).peak
    _assert_within_tolerance(planned, results[i], strategy, method)


def _assert_within_tolerance(planned: int, ranks, strategy: str, method: str) -> None:
    """Both ranks were traced and the planned per-GPU peak is within the benchmark's tolerance of the higher one."""
    assert not isinstance(ranks, str), ranks  # run_jobs gives the error text of a job that failed
    assert len(ranks) == 2
    traced_peak = max(r.peak_bytes for r in ranks)
    assert abs(planned - traced_peak) / traced_peak <= bench.TOLERANCE, (strategy, method, planned, traced_peak)


def test_communication_buffers_are_named_and_sharding_shrinks_the_state(traced):
    spec, cfgs, results = traced
    by = {(s, m): r for (s, m, o), r in zip(ROWS, results) if not o}
    ddp, fsdp, zero1 = by[("ddp", "full")][0], by[("fsdp", "full")][0], by[("zero1", "full")][0]
    # DDP's buckets: one gradient-sized copy (gradient_as_bucket_view=False), counted from construction
    grads = 2 * spec.params  # bf16 gradients of every parameter
    assert ddp.components[Component.REDUCE_BUFFERS] == pytest.approx(grads, rel=0.001)
    # FSDP2 at its backward peak holds gathered units, named as such; its weights are the shard
    assert fsdp.phase_components[fsdp.peak_phase].get(Component.ALLGATHER_BUFFERS, 0) > 0
    assert fsdp.components[Component.WEIGHTS] < ddp.components[Component.WEIGHTS] * 0.55
    # ZeRO-1: the optimiser states of one rank's partition
    assert zero1.components[Component.OPTIMIZER_STATES] < ddp.components[Component.OPTIMIZER_STATES] * 0.6
    # every rank trained: a finite loss
    assert all(r.loss == r.loss for r in by[("fsdp", "lora")])


def test_accumulation_without_sync_keeps_fsdps_unsharded_gradients(traced):
    spec, cfgs, results = traced
    by = {(s, m, tuple(sorted(o.items()))): r for (s, m, o), r in zip(ROWS, results)}
    one = by[("fsdp", "full", ())][0]
    skip = by[("fsdp", "full", (("grad_accum", 2), ("no_sync", True)))][0]
    grads = 2 * spec.params  # every bf16 gradient, unsharded
    # the second micro-batch runs beside the first's sums: every unsharded gradient without the sync
    # (with it, only this rank's shard: half of them here)
    assert 0.8 * grads < skip.peak_bytes - one.peak_bytes < 1.2 * grads


@pytest.mark.parametrize("kw, text", [
    (dict(gpus=1), "2 to 8 ranks"),
    (dict(gpus=2, offload="cpu", strategy="zero3"), "cannot be traced"),
    (dict(gpus=2, strategy="fsdp", engine="deepspeed"), "DeepSpeed runs zero1"),
    (dict(gpus=2, strategy="bogus"), "strategy"),
    (dict(gpus=2, strategy="fsdp", precision="bf16-mixed"), "bf16 or fp32"),
])
def test_bad_input_is_one_clear_error_without_spawning(kw, text):
    spec = from_hf_config(bench.TINY_MODEL, name="tiny-grid")
    with pytest.raises(VramplanError, match=text):
        distributed_dryrun(spec, "lora", **kw)


def test_a_model_too_large_for_the_host_is_refused_before_spawning():
    with pytest.raises(VramplanError, match="host memory"):
        distributed_dryrun("llama-2-7b", "full", gpus=2, strategy="ddp", layers=2)


# -- DeepSpeed (only where it is installed: CI's DeepSpeed job, .ci/run) -------------------------------------

#: (strategy, method, micro-batches per step): under accumulation stage 1 holds every 16-bit gradient between
#: micro-batches, stage 2 its 16-bit partition (vramplan.distributed._held_gradients)
DS_ROWS = (("zero1", "full", 1), ("zero2", "full", 1), ("zero3", "full", 1), ("zero3", "lora", 1),
           ("zero1", "lora", 2), ("zero2", "lora", 2))


@pytest.fixture(scope="module")
def deepspeed_traced():
    from vramplan.dryrun.distributed import deepspeed_available

    if not deepspeed_available():
        pytest.skip("DeepSpeed is not installed (CI runs these in its DeepSpeed venv: .ci/run)")
    # the benchmark's grid model (hidden 256): on the hidden-128 model ZeRO-3 LoRA is -2.2% (a fixed ~65 KiB the
    # planner does not place), on this one -0.1%
    spec = from_hf_config(bench.GRID_MODEL, name="grid")
    cfgs = {(m, ga): distributed_config(spec, m, precision="bf16", batch=bench.BATCH, seq=bench.SEQ, attn="eager",
                                        grad_ckpt=False, grad_accum=ga) for _s, m, ga in DS_ROWS}
    jobs = [Job(spec, cfgs[(m, ga)], s, "deepspeed", {}) for s, m, ga in DS_ROWS]
    return spec, cfgs, run_jobs(jobs, 2, timeout=300)


@pytest.mark.parametrize("i", range(len(DS_ROWS)))
def test_planner_within_two_percent_of_deepspeed(deepspeed_traced, i):
    """DeepSpeed ZeRO-1/2/3 traced on its CPU accelerator (gloo, torch AdamW: planned with ``torch_adam``)."""
    spec, cfgs, results = deepspeed_traced
    strategy, method, ga = DS_ROWS[i]
    par = make_parallel(2, strategy, engine="deepspeed", torch_adam=True)
    planned = parallel_step_memory(spec, cfgs[(method, ga)], par).peak
    _assert_within_tolerance(planned, results[i], strategy, method)


def test_the_request_carries_the_engine_options_and_methods_come_from_attributes():
    from vramplan.dryrun.distributed import DistributedDryRunRequest, EngineOptions, supervised_methods

    req = DistributedDryRunRequest.build("tiny", "lora", gpus=4, strategy="zero3", reduce_bucket_size=1000,
                                         no_sync=True)
    assert req.gpus == 4 and req.options == EngineOptions(reduce_bucket_size=1000, no_sync=True)
    assert req.options.given() == {"reduce_bucket_size": 1000, "no_sync": True}
    with pytest.raises(VramplanError, match="unknown setting"):
        DistributedDryRunRequest.build("tiny", "lora", bucket_size=3)
    # supervised steps: one policy copy, its own causal-LM loss, no rollout (DPO, PPO, GRPO, reward are not)
    assert supervised_methods() == ("full", "lora", "qlora", "dora", "ia3")
    with pytest.raises(VramplanError, match="supervised steps"):
        distributed_config(from_hf_config(bench.TINY_MODEL, name="tiny-grid"), "dpo")

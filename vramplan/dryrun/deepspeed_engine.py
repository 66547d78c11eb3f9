"""DeepSpeed ZeRO 1/2/3 inside a distributed dry-run rank (CPU accelerator, gloo).

The configuration is the one the HF Trainer writes for a DeepSpeed config left at ``"auto"``
(``transformers/integrations/deepspeed.py``, ``HfTrainerDeepSpeedConfig.trainer_config_finalize``):
``reduce_bucket_size = hidden^2``, ``stage3_prefetch_bucket_size = 0.9 hidden^2``,
``stage3_param_persistence_threshold = 10 hidden``; ``allgather_bucket_size`` and
``stage3_max_live_parameters`` keep DeepSpeed's defaults (``deepspeed/runtime/zero/config.py``:
5e8 and 1e9 elements). Options given to the dry run replace them. bf16 runs DeepSpeed's bf16 mode
(16-bit module, fp32 master partition and optimiser states); the optimiser is DeepSpeed's
``AdamW`` with ``torch_adam`` (torch's AdamW on the fp32 partition: the CPU build of FusedAdam
needs CUDA). ``overlap_comm`` and ``contiguous_gradients`` are left at DeepSpeed's defaults
for the stage (the HF Trainer's example configs turn both on; pass them in ``options`` to do so).
"""

from __future__ import annotations

from ..distributed import STRATEGY_DEFS
from ..precision import BF16
from ..taxonomy import Component, Phase


def ds_config(trainee, strategy: str, opts: dict) -> dict:
    h = int(trainee.spec.hidden_size)
    stage = STRATEGY_DEFS[strategy].deepspeed_stage
    zero = {"stage": stage, "reduce_bucket_size": int(opts.get("reduce_bucket_size") or h * h)}
    if opts.get("allgather_bucket_size"):
        zero["allgather_bucket_size"] = int(opts["allgather_bucket_size"])
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(opts.get("prefetch_bucket_size") or int(0.9 * h * h))
        zero["stage3_param_persistence_threshold"] = 10 * h
        if opts.get("max_live_parameters"):
            zero["stage3_max_live_parameters"] = int(opts["max_live_parameters"])
    for k in ("overlap_comm", "contiguous_gradients"):
        if k in opts:
            zero[k] = bool(opts[k])
    cfg = {"train_micro_batch_size_per_gpu": int(trainee.cfg.batch),
           "gradient_accumulation_steps": int(trainee.cfg.grad_accum),
           "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if trainee.regime.trainable_dtype == BF16 and trainee.regime.autocast is None:  # bf16 weights train: DS bf16
        cfg["bf16"] = {"enabled": True}
    if trainee.regime.training_loop.clips_gradients:
        cfg["gradient_clipping"] = 1.0
    return cfg


def wrap_deepspeed(trainee, strategy: str, opts: dict, tracker) -> None:
    import logging

    import deepspeed

    from ..methods import Role

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    pol = trainee.copies[Role.POLICY]
    params = [p for p in pol.module.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=pol.module, model_parameters=params,
                                                   config=ds_config(trainee, strategy, opts))
    trainee.extras["engine"] = engine
    trainee.optimizer = optimizer
    trainee.run = _ds_step
    trainee.extras["master_tensors"] = lambda: _master_tensors(optimizer)
    trainee.extras["grad_tensors"] = lambda: _grad_tensors(optimizer)
    trainee.notes.append(f"DeepSpeed ZeRO-{STRATEGY_DEFS[strategy].deepspeed_stage} {deepspeed.__version__} on its "
                         "CPU accelerator")


def _master_tensors(opt):
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(opt, name, None) or ():
            yield t


def _grad_tensors(opt):
    for name in ("averaged_gradients",):
        d = getattr(opt, name, None) or {}
        for v in (d.values() if isinstance(d, dict) else d):
            for t in (v if isinstance(v, (list, tuple)) else [v]):
                yield t


def _ds_step(t) -> dict:
    """One optimiser step through the DeepSpeed engine (the HF Trainer's DeepSpeed path): ``cfg.grad_accum``
    micro-batches, each ``engine(...)``, ``engine.backward``, ``engine.step()`` (DeepSpeed updates only at its
    gradient-accumulation boundary, ``gradient_accumulation_steps`` = ``cfg.grad_accum``)."""
    from ..runtime.steps import _ids

    engine = t.extras["engine"]
    cfg = t.cfg
    last = None
    for _micro in range(max(1, int(cfg.grad_accum))):
        t.hooks.phase(Phase.FORWARD)
        ids = _ids(t, cfg.batch, cfg.seq)
        labels = ids.clone()
        out = engine(input_ids=ids, labels=labels, use_cache=False)
        loss = out.loss
        del out, ids, labels
        t.logits_done()
        t.hooks.phase(Phase.BACKWARD)
        if t._head_grads_pending > 0:
            t._in_backward_logits = True
            t.hooks.enter(Component.LOGITS)
        try:
            engine.backward(loss)
        finally:
            if t._in_backward_logits:
                t._in_backward_logits = False
                t.hooks.exit(Component.LOGITS)
            t._head_grads_pending = 0
        last = loss.detach()
        del loss
        t.hooks.event("after_backward", t)
        t.hooks.phase(Phase.OPTIMIZER_STEP)
        engine.step()
    t.hooks.event("after_optimizer_step", t)
    t.hooks.event("step_end", t)
    return {"loss": last}

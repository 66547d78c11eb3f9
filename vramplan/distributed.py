"""Multi-GPU plans on paper: sharded model state per GPU, communication volume and time.

``--gpus N --strategy ddp|zero1|zero2|zero3|fsdp [--offload cpu|none]``. Each GPU runs the
micro-batch of the single-GPU model (activations do not shrink); what the strategy changes is
where the model state lives and what crosses the interconnect.

Layouts per GPU (P = trainable parameters, N = GPUs, Adam in mixed precision):

* **ddp** (PyTorch ``DistributedDataParallel`` under the HF Trainer): the single-GPU state
  (fp32 trainable weights, fp32 gradients, optimiser states, autocast's weight casts) plus
  DDP's gradient buckets, one more gradient-sized buffer: with the default
  ``gradient_as_bucket_view=False`` "the saved memory size will be equal to the total
  gradients size" when it is turned on (PyTorch DDP docs), i.e. it costs that much when off.
  Gradients are all-reduced once per optimiser step (accelerate's ``no_sync`` while accumulating).
* **zero1 / zero2 / zero3** (DeepSpeed, bf16/fp16 mode; Rajbhandari et al., "ZeRO", SC 2020):
  16-bit working weights (2 B) and gradients (2 B), an fp32 master copy (4 B), the optimiser
  states (8 B for AdamW) and an fp32 gradient partition (4 B) -- the K = 16 of DeepSpeed's
  estimators (``stage_1_and_2.py: estimate_zero2_model_states_mem_needs``: ``4 P + 16 P / N``;
  ``stage3.py: estimate_zero3_model_states_mem_needs``: ``18 P / N + 4 L``), laid out in time as
  the traced engine holds them (:func:`_deepspeed`): stages 1-2 free the 16-bit gradients before
  the fp32 gradient partition's step; stage 3 also keeps a 16-bit gradient partition and its
  contiguous-gradients bucket, and keeps gathered the parameters it will reuse within
  ``stage3_max_reuse_distance`` (all of a model under 5e8 parameters, where the estimator has 4 L).
  DeepSpeed's bf16/fp16 engine casts every parameter to 16 bit (:func:`deepspeed_cast`: PEFT's
  fp32 adapters and kbit upcasts included). Stage 2 differs from stage 1 in its communication
  (reduce-scatter every micro-step). Held to DeepSpeed 0.19.8 traced per rank
  (``reports/dryrun_distributed.txt``).
* **fsdp** (PyTorch FSDP ``FULL_SHARD`` via accelerate, ``MixedPrecision(param_dtype=bf16,
  reduce_dtype=bf16)``, decoder layers as wrap units): the single-GPU fp32 state sharded N
  ways, plus the unsharded 16-bit parameters of the root unit (embeddings, lm_head, final
  norm: kept gathered from forward to backward) and of two decoder layers (the one running
  and the prefetched one), and the unsharded gradients of the root and one layer in backward.
  Stacks that run FSDP1 (``FullyShardedDataParallel``; stacks.toml ``fsdp_engine = "fsdp1"``) keep that
  schedule and add a floor under the reserved total: the wrap's cached flatten copies plus the unshard
  stream's own pool of all-gather outputs (:func:`_fsdp1_floor`).
* **gradient accumulation**: a micro-batch after the first runs beside the earlier ones' summed
  gradients -- DDP's (every gradient), FSDP's sharded sums, or, when the loop skips the gradient sync
  on accumulating micro-batches (``no_sync``: litgpt, the HF Trainer; ``stacks.toml
  accumulation_no_sync``, :attr:`Parallel.no_sync`), every unsharded gradient (:func:`_held_gradients`).
* **--offload cpu**: DeepSpeed ZeRO-Offload / ZeRO-Infinity (stages 1-2: optimiser states,
  master weights and gradients on the host; stage 3: parameters too) or FSDP
  ``CPUOffload(offload_params=True)``; the optimiser then runs on the CPU.

PEFT methods shard the same way: the frozen base counts as parameters that are sharded
under zero3/fsdp (QLoRA-FSDP stores the NF4 weights in a 16-bit ``quant_storage``), the
adapters as the trainable part. PPO under zero3/fsdp gathers the whole policy for generation
(TRL's ``unwrap_model_for_generation``, ``ds3_gather_for_generation=True`` by default).

Communication (ring collectives, bytes each GPU sends; NCCL's bus-bandwidth convention):
all-reduce ``2 (N-1)/N V``, all-gather and reduce-scatter ``(N-1)/N V`` for a tensor of V bytes.
ZeRO-3/FSDP move 1.5x DDP's volume: parameters gathered in forward and again in backward
(and for the recompute under gradient checkpointing), gradients reduce-scattered (ZeRO
paper, section 7). The interconnect is NVLink when the catalogue lists it, else PCIe
(peer-to-peer or through the host); across nodes (more than ``gpus_per_node``) NCCL spreads
each ring over the node's network adapters (one channel per adapter), so the node's aggregate
inter-node bandwidth bounds the ring when it is below the intra-node link's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import memory as _mem
from .adapters import adapter_tensors, full_tensors
from .config import TrainConfig
from .errors import VramplanError, unknown
from .gpus import GPUSpec, card_class
from .memory import ModelState, StepMemory, model_state
from .methods import Adapter, Forward
from .models import ModelSpec
from .optimizers import get_optimizer
from .phases import Gathering, StateTerms, StepTerms, combine_phases
from .precision import DTYPE_BYTES, FP32
from .taxonomy import Component, Phase
from .units import MIB


@dataclass(frozen=True)
class Strategy:
    """What a ``--strategy`` shards and how its engines run it: every layer (the planner's state, communication
    and time, the distributed dry run) reads these attributes, never the strategy's name.

    Sources: the module docstring (ZeRO paper stages; DeepSpeed's ``stage_1_and_2.py``/``stage3.py``;
    PyTorch DDP, ZeroRedundancyOptimizer, FSDP2 ``fully_shard``).
    """

    name: str
    #: the DeepSpeed ZeRO stage that runs it (``--engine auto`` picks DeepSpeed then), or None: PyTorch only
    deepspeed_stage: int | None
    #: each GPU keeps 1/N of the optimiser states (ZeRO-1 and up, FSDP)
    shards_states: bool
    #: each GPU reduces into 1/N of the gradients every micro-batch (ZeRO-2 and up, FSDP: reduce-scatter)
    shards_gradients: bool
    #: each GPU keeps 1/N of the parameters, gathered per unit for each pass (ZeRO-3, FSDP)
    shards_params: bool
    #: FSDP2's default ``reshard_after_forward`` when PyTorch runs it (False: ZeRO-2-like, SHARD_GRAD_OP)
    reshard_after_forward: bool = True
    #: runs the stack's own FSDP wrapper (stacks.toml ``fsdp_engine``: FSDP1 or FSDP2); the other strategies
    #: PyTorch runs with FSDP2 ``fully_shard`` (or DDP, below ZeRO-2)
    stack_fsdp: bool = False
    #: what PyTorch runs it with (the distributed dry run's engine description)
    torch_title: str = ""

    @property
    def torch_replica(self) -> bool:
        """Under PyTorch, a full replica per GPU under DDP (ZeroRedundancyOptimizer shards the states on top)."""
        return not self.shards_gradients


#: Every strategy, in the order a search tries them (fewest moving parts first).
STRATEGY_DEFS: dict[str, Strategy] = {s.name: s for s in (
    Strategy("ddp", None, False, False, False, torch_title="PyTorch DDP"),
    Strategy("zero1", 1, True, False, False, torch_title="PyTorch DDP + ZeroRedundancyOptimizer (ZeRO-1)"),
    Strategy("zero2", 2, True, True, False, reshard_after_forward=False,
             torch_title="PyTorch FSDP2 fully_shard, reshard_after_forward=False (ZeRO-2-like, SHARD_GRAD_OP)"),
    Strategy("zero3", 3, True, True, True, torch_title="PyTorch FSDP2 fully_shard (ZeRO-3)"),
    Strategy("fsdp", None, True, True, True, stack_fsdp=True, torch_title="PyTorch FSDP2 fully_shard"),
)}
STRATEGIES = tuple(STRATEGY_DEFS)
OFFLOADS = ("none", "cpu")
SHARDED_PARAMS = tuple(n for n, s in STRATEGY_DEFS.items() if s.shards_params)
GPUS_PER_NODE = 8  # DGX/HGX nodes; PCIe boxes often hold 4-8 cards

#: NCCL communicator buffers per process (runtime, outside the caching allocator): ~4 MiB per
#: channel per peer connection by default, "hundreds of MB per communicator" (REFERENCE.md).
NCCL_BYTES = 256 * MIB
#: Achieved fraction of the link bandwidth by NCCL ring collectives (bus bandwidth / link
#: bandwidth; nccl-tests reach roughly 80% on NVLink and InfiniBand, less over PCIe). Assumption.
LINK_EFFICIENCY = {"nvlink": 0.80, "pcie": 0.70, "infiniband": 0.80}
#: Inter-node bandwidth per GPU, one direction, GB/s, when the catalogue has none: DGX H100 /
#: B200 nodes have one 400 Gb/s NDR adapter per GPU, DGX A100 one 200 Gb/s HDR adapter per
#: GPU; other cards are assumed on 100 Gb/s Ethernet. Assumptions (the catalogue has no
#: inter-node figure per card).
INTERNODE_GBS = {"hopper": 50.0, "blackwell": 50.0, "ampere-dc": 25.0, "other": 12.5}
#: Share of the shorter of compute and communication that overlaps with the other (DDP's
#: bucketed all-reduce during backward, Li et al., "PyTorch Distributed", VLDB 2020; FSDP and
#: ZeRO-3 prefetch the next unit's all-gather). Assumption.
OVERLAP = 0.8
#: DeepSpeed's CPU-Adam, parameters updated per second by one process's CPU share (assumption:
#: order of magnitude of the ZeRO-Offload paper's CPU-Adam, Ren et al., USENIX ATC 2021).
CPU_ADAM_PARAMS_PER_S = 1.0e9


@dataclass(frozen=True)
class EngineOptions:
    """The engines' own settings (None: the engine's default): what ``--fsdp-reshard-after-forward``,
    ``--bucket-cap-mb``, ... set, for the planner (:class:`Parallel` has them) and the distributed dry run
    (``vramplan.dryrun.distributed``, which passes them to the engines it runs)."""

    #: FSDP2 ``fully_shard(reshard_after_forward=...)``; None: the engine's default (True; zero2: False)
    reshard_after_forward: bool | None = None
    #: DDP ``bucket_cap_mb`` (default 25; the buckets hold every gradient whatever their size)
    bucket_cap_mb: float | None = None
    #: DeepSpeed ``reduce_bucket_size`` / ``allgather_bucket_size`` / ``stage3_prefetch_bucket_size`` /
    #: ``stage3_max_live_parameters`` in elements; None: DeepSpeed's defaults (``DS_DEFAULTS``)
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None
    prefetch_bucket_size: int | None = None
    max_live_parameters: int | None = None
    #: gradient accumulation skips the gradient sync on every micro-batch but the last (DDP ``no_sync()``,
    #: FSDP1 ``no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``); None: the stack's loop
    #: (``stacks.toml accumulation_no_sync``)
    no_sync: bool | None = None

    def given(self) -> dict:
        """The options set (not None), by name: what the ranks apply and the result records."""
        return {k: getattr(self, k) for k in EngineOptions.__dataclass_fields__ if getattr(self, k) is not None}


@dataclass(frozen=True)
class Parallel(EngineOptions):
    """How a run is spread over GPUs. ``strategy=None`` is one process without torch.distributed; the engine's
    settings are :class:`EngineOptions`' (inherited) and the switches below."""

    gpus: int = 1
    strategy: str | None = None
    offload: str = "none"
    gpus_per_node: int = GPUS_PER_NODE
    #: the engine that runs the strategy: ``auto`` (DeepSpeed for zero1/2/3, PyTorch for ddp/fsdp),
    #: ``torch`` (DDP; ZeroRedundancyOptimizer for zero1; FSDP2 for zero2/zero3/fsdp) or ``deepspeed``
    engine: str = "auto"
    #: DDP ``gradient_as_bucket_view`` (default False: the buckets are a second copy of the gradients)
    gradient_as_bucket_view: bool = False
    #: DeepSpeed's ``optimizer.params.torch_adam``: torch.optim.AdamW on the fp32 partition instead of
    #: FusedAdam (DeepSpeed's CPU accelerator has only this one; on CPU tensors torch runs its single-tensor
    #: path, whose ``(exp_avg_sq.sqrt() / bias_correction2_sqrt)`` makes two partition-sized temporaries)
    torch_adam: bool = False

    def skips_sync(self, cfg: TrainConfig) -> bool:
        """Whether ``cfg``'s accumulation micro-batches run without gradient sync under this plan."""
        if self.no_sync is not None:
            return bool(self.no_sync)
        return bool(getattr(cfg.stack, "accumulation_no_sync", False))

    @property
    def distributed(self) -> bool:
        return self.strategy is not None

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    @property
    def sharding(self) -> Strategy | None:
        """The :class:`Strategy` definition (None: one process)."""
        return None if self.strategy is None else STRATEGY_DEFS[self.strategy]

    @property
    def shards_params(self) -> bool:
        return self.strategy is not None and STRATEGY_DEFS[self.strategy].shards_params

    @property
    def shards_states(self) -> bool:
        """Each GPU keeps 1/N of the optimiser states (and steps only that part)."""
        return self.strategy is not None and STRATEGY_DEFS[self.strategy].shards_states

    @property
    def engine_name(self) -> str:
        """``torch`` or ``deepspeed``: the engine whose buffers the plan models."""
        if self.engine != "auto":
            return self.engine
        return "deepspeed" if self.strategy is not None and STRATEGY_DEFS[self.strategy].deepspeed_stage else "torch"

    @property
    def reshards_after_forward(self) -> bool:
        """FSDP2: whether a unit's parameters are freed after its forward (ZeRO-3) or kept to backward."""
        if self.reshard_after_forward is not None:
            return bool(self.reshard_after_forward)
        return self.strategy is None or STRATEGY_DEFS[self.strategy].reshard_after_forward

    @property
    def label(self) -> str:
        if self.strategy is None:
            return "1 GPU"
        off = ", offload cpu" if self.offload == "cpu" else ""
        eng = " (torch)" if self.engine == "torch" and self.sharding.deepspeed_stage else ""
        return f"{self.gpus}x {self.strategy}{eng}{off}"

    def to_json(self) -> dict:
        out = {"gpus": self.gpus, "strategy": self.strategy, "offload": self.offload, "nodes": self.nodes}
        if self.strategy is not None:
            out["engine"] = self.engine_name
            opts = {k: getattr(self, k) for k in ENGINE_OPTIONS if getattr(self, k) not in (None, False)}
            if opts:
                out["engine_options"] = opts
        return out


SINGLE = Parallel()
ENGINES = ("auto", "torch", "deepspeed")
ENGINE_OPTIONS = ("reshard_after_forward", "gradient_as_bucket_view", "bucket_cap_mb", "reduce_bucket_size",
                  "allgather_bucket_size", "prefetch_bucket_size", "max_live_parameters", "no_sync", "torch_adam")
#: the engine options that are switches (the rest are sizes)
_SWITCHES = ("reshard_after_forward", "gradient_as_bucket_view", "no_sync", "torch_adam")
#: DeepSpeed's ZeRO defaults, elements (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig field defaults;
#: the same figures in DeepSpeed's docs "ZeRO optimizations": reduce_bucket_size 5e8, allgather_bucket_size
#: 5e8, stage3_prefetch_bucket_size 5e7, stage3_max_live_parameters 1e9, stage3_param_persistence_threshold 1e5)
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
               "prefetch_bucket_size": 50_000_000, "max_live_parameters": 1_000_000_000,
               "param_persistence_threshold": 100_000, "max_reuse_distance": 1_000_000_000}


def make_parallel(gpus: int = 1, strategy: str | None = None, offload: str | None = None,
                  gpus_per_node: int = GPUS_PER_NODE, engine: str | None = None, **options) -> Parallel:
    """Validate ``--gpus/--strategy/--offload`` into a :class:`Parallel`.

    ``gpus > 1`` without a strategy means DDP. ``strategy`` on one GPU is allowed (ZeRO-3 with
    CPU offload on a single card is a real recipe). ``engine`` (``auto``, ``torch``,
    ``deepspeed``) and ``options`` (:data:`ENGINE_OPTIONS`: FSDP2's ``reshard_after_forward``,
    DDP's ``gradient_as_bucket_view`` / ``bucket_cap_mb``, DeepSpeed's bucket sizes in
    elements) select the engine whose buffers the plan models.

    Raises:
        VramplanError: ``gpus`` not a positive integer, an unknown strategy or offload, offload
            without a sharding strategy.
    """
    if isinstance(gpus, bool) or not isinstance(gpus, (int, np.integer)) or gpus < 1:
        raise VramplanError(f"--gpus must be a positive integer, got {gpus!r}", "use --gpus 1 for a single card")
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, (int, np.integer)) or gpus_per_node < 1:
        raise VramplanError(f"gpus per node must be a positive integer, got {gpus_per_node!r}")
    if strategy is not None:
        strategy = str(strategy).lower()
        if strategy in ("none", "single"):
            strategy = None
        elif strategy not in STRATEGY_DEFS:
            raise unknown("strategy", strategy, STRATEGY_DEFS)
    off = "none" if offload is None else str(offload).lower()
    if off not in OFFLOADS:
        raise unknown("offload", off, OFFLOADS)
    if strategy is None and int(gpus) > 1:
        strategy = "ddp"
    if off == "cpu" and (strategy is None or not STRATEGY_DEFS[strategy].shards_states):
        raise VramplanError(f"--offload cpu needs a sharding strategy, not {strategy or 'a single process'}",
                            "add --strategy zero2, zero3 or fsdp")
    eng = "auto" if engine is None else str(engine).lower()
    if eng not in ENGINES:
        raise unknown("engine", eng, ENGINES)
    if eng == "deepspeed" and (strategy is None or not STRATEGY_DEFS[strategy].deepspeed_stage):
        raise VramplanError(f"DeepSpeed runs zero1, zero2 or zero3, not {strategy or 'a single process'}",
                            "use --engine torch or --strategy zero1|zero2|zero3")
    return Parallel(gpus=int(gpus), strategy=strategy, offload=off, gpus_per_node=int(gpus_per_node), engine=eng,
                    **_engine_options(options))


def _engine_options(options: dict) -> dict:
    """:data:`ENGINE_OPTIONS` validated: switches as bools, sizes as positive numbers (None: the engine's default)."""
    bad = sorted(set(options) - set(ENGINE_OPTIONS))
    if bad:
        raise VramplanError(f"unknown engine option {bad[0]!r}", f"known: {', '.join(ENGINE_OPTIONS)}")
    opts = {}
    for k, v in options.items():
        if v is None:
            continue
        if k in _SWITCHES:
            opts[k] = bool(v)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
            raise VramplanError(f"{k.replace('_', '-')} must be a positive number, got {v!r}")
        opts[k] = float(v) if k == "bucket_cap_mb" else int(v)
    return opts


# -- the published estimators (for tests and the comparison in the output) ----------------

def deepspeed_zero2_estimate(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                             cpu_offload: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (stage_1_and_2.py): (cpu_mem, gpu_mem) bytes."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 4 * total_params + int(16 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                             num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = True,
                             zero_init: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int, int]:
    """DeepSpeed's ``estimate_zero3_model_states_mem_needs`` (stage3.py): (cpu_mem, gpu_mem, largest_layer_mem)."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            factor = 18 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 18 * gpus_factor)
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            factor = 16 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 16 * gpus_factor)
        cpu_mem = total_params * factor * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        cpu_mem = (largest_layer_params if zero_init else total_params) * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), int(largest_layer_memory)


def largest_layer_params(model: ModelSpec) -> int:
    """Parameters of the largest single module, as DeepSpeed's ``model_to_params`` counts them.

    (``sum(p.numel() for p in m.parameters(recurse=False))`` over modules): the embedding or
    lm_head (vocab x hidden) or the largest linear / fused expert bank of a decoder layer.
    """
    biggest = max(l.count * (l.in_features * l.out_features) + (l.out_features * l.count if l.bias else 0)
                  if not l.is_linear else l.in_features * l.out_features + (l.out_features if l.bias else 0)
                  for l in model.layer_linears())
    return max(model.vocab_size * model.hidden_size, biggest)


# -- sharded model state -------------------------------------------------------------------

@dataclass
class ShardedState:
    """Per-GPU bytes of the model state under a strategy, by component, and what else the strategy adds.

    ``bytes`` holds the persistent per-GPU shares; ``gathered_bytes`` parameters gathered for the
    unit(s) in flight during forward and backward (zero3/fsdp), ``inflight_grad_bytes`` their
    unsharded gradients in backward, ``comm_buffer_bytes`` persistent communication buffers (DDP
    buckets, DeepSpeed's reduce / all-gather buckets), ``rollout_gather_bytes`` the whole policy
    gathered for PPO generation, ``nccl_bytes`` NCCL's own buffers (runtime, outside the allocator),
    ``cpu_bytes`` host memory the offloaded state takes per GPU.
    """

    bytes: dict[Component, int]
    trainable_params: int
    step_temporary: int = 0
    gathered_bytes: int = 0
    inflight_grad_bytes: int = 0
    comm_buffer_bytes: int = 0
    rollout_gather_bytes: int = 0
    nccl_bytes: int = 0
    cpu_bytes: int = 0
    backward_grad_bytes: int | None = None  # gradients alive in backward/step if not all of them (optimizer in backward)
    #: gradients alive through the optimiser step when they differ from backward's (DeepSpeed: the fp32
    #: partition made from the 16-bit gradients, which are freed first); None: as in backward
    step_grad_bytes: int | None = None
    #: of those, DeepSpeed's fp32 gradient partition (built by ``step()``; its estimators count it)
    fp32_grad_bytes: int = 0
    #: engines whose gathered units change through the step (FSDP2): the bytes gathered (and the
    #: unsharded gradients and reduce-scatter buffers in flight) at each point of
    #: :func:`vramplan.phases.combine_phases`; None: ``gathered_bytes`` (+ ``inflight_grad_bytes``)
    gathered_fwd_mid: int | None = None
    gathered_bwd_start: int | None = None
    gathered_bwd_work: int | None = None
    gathered_bwd_end: int | None = None
    #: FSDP2's unit schedule (:func:`_fsdp2`): the terms :func:`_fsdp2_phases` walks through
    fsdp2: dict | None = None
    #: bytes the engine's initialisation leaves reserved in the caching allocator, a floor under every later
    #: reserved total (``ModelState.load_reserved``): DeepSpeed ZeRO-3 moving a module not built under
    #: ``zero.Init`` whole onto each GPU before partitioning it (:func:`_zero3_whole_module_bytes`); 0: none
    load_reserved_bytes: int = 0
    #: FSDP1's floor terms (:func:`_fsdp1_floor`): ``wrap_reserved`` and ``unshard_pool`` bytes; None: not FSDP1
    fsdp1: dict | None = None
    layout: str = "single process (HF Trainer / TRL)"
    notes: list[str] = field(default_factory=list)

    @property
    def model_state_bytes(self) -> int:
        """Weights + master + gradients + optimiser states + gathered units: what DeepSpeed's estimators count."""
        keys = (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS,
                Component.GRADIENTS, Component.OPTIMIZER_STATES)
        return (sum(self.bytes.get(k, 0) for k in keys) + self.gathered_bytes + self.inflight_grad_bytes
                + self.fp32_grad_bytes)


def _trainable_groups(model: ModelSpec, cfg: TrainConfig) -> list[tuple[tuple[int, ...], int]]:
    """(shape, count) of every trainable tensor of every training copy (as ``model_state`` builds them)."""
    out: list[tuple[tuple[int, ...], int]] = []
    for copy in cfg.recipe.copies:
        if copy.adapter is None:
            continue
        if copy.adapter is Adapter.FULL:
            out += full_tensors(model, copy.head)
            continue
        out += [(t.shape, t.count) for t in adapter_tensors(model, copy.adapter, cfg.rank, cfg.targets)]
        if copy.head == "scalar":
            out.append(((1, model.hidden_size), 1))
    return out


def _copy_params(model: ModelSpec, head: str) -> int:
    return model.params - model.lm_head_params + model.hidden_size if head == "scalar" else model.params


def _frozen_bytes_per_param(model: ModelSpec, cfg: TrainConfig, st) -> float:
    """Average stored bytes per frozen base parameter (bf16 2, NF4 about 0.5 plus constants)."""
    regime = cfg.regime
    frozen_params = sum(_copy_params(model, c.head) for c in cfg.recipe.copies if c.adapter is not Adapter.FULL)
    if frozen_params == 0:
        return float(DTYPE_BYTES[regime.frozen_dtype])
    frozen = _frozen_weight_bytes(model, cfg, st) + st.bytes.get(Component.QUANT_STATE, 0)
    return frozen / frozen_params


def _frozen_weight_bytes(model: ModelSpec, cfg: TrainConfig, st) -> int:
    """WEIGHTS bytes that do not train (frozen copies, PEFT bases)."""
    regime = cfg.regime
    full_trainable = sum(_copy_params(model, c.head) for c in cfg.recipe.copies if c.adapter is Adapter.FULL)
    return int(st.bytes.get(Component.WEIGHTS, 0) - full_trainable * DTYPE_BYTES[regime.trainable_dtype])


def _unit_params(model: ModelSpec) -> tuple[int, int]:
    """FSDP wrap units: (root unit = embeddings + lm_head + final norm, one decoder layer)."""
    return model.embedding_params + model.lm_head_params + model.final_norm_params, model.layer_params


def shard_state(model: ModelSpec, cfg: TrainConfig, par: Parallel = SINGLE, st=None) -> ShardedState:
    """Per-GPU model-state bytes of ``cfg`` on ``model`` under ``par`` (see the module docstring).

    ``st`` is ``model_state(model, cfg)`` when the caller has it already.
    """
    model = cfg.stack.as_built(model)  # litgpt: a separate lm_head even when the checkpoint ties it
    cast = deepspeed_cast(cfg, par)
    if cast is not cfg:
        cfg, st = cast, None
    st = st or model_state(model, cfg)
    base = {c: int(v) for c, v in st.bytes.items()}
    if par.strategy is None:
        out = ShardedState(bytes=base, trainable_params=st.trainable_params, step_temporary=st.step_temporary)
        if cfg.uses("opt_in_bwd"):  # each gradient is consumed and freed as soon as it is ready
            out.backward_grad_bytes = st.largest_grad
        return out
    out = ShardedState(bytes=dict.fromkeys(base, 0), trainable_params=st.trainable_params, nccl_bytes=NCCL_BYTES)
    if par.engine_name == "torch" and par.sharding.torch_replica:  # DDP (ZeRO-1: + ZeroRedundancyOptimizer)
        out.bytes.update(base)
        out.step_temporary = st.step_temporary
        # the Reducer's buckets hold every gradient: a second copy with gradient_as_bucket_view=False (the
        # default); with True the gradients are views into them, allocated once and never set to None
        out.comm_buffer_bytes = base[Component.GRADIENTS]
        if par.gradient_as_bucket_view:
            out.bytes[Component.GRADIENTS] = 0
        out.layout = "PyTorch DDP: full replica per GPU + gradient buckets" + (
            " (gradients as bucket views)" if par.gradient_as_bucket_view else "")
        if par.shards_states:
            _zero_redundancy(out, model, cfg, par, st)
        return out
    if par.engine_name == "torch":  # zero2, zero3, fsdp: FSDP2
        _fsdp2(out, model, cfg, par, st, base)
        if uses_fsdp1(cfg, par):
            _fsdp1_floor(out, model, cfg, par, st, base)
    else:  # DeepSpeed ZeRO 1/2/3 (make_parallel refuses the deepspeed engine for fsdp, which _fsdp2 plans)
        _deepspeed(out, model, cfg, par, st, base)
    _rollout_gather(out, model, cfg, par, st)
    return out


def _deepspeed(out: ShardedState, model: ModelSpec, cfg: TrainConfig, par: Parallel, st, base) -> None:
    """DeepSpeed ZeRO stage 1, 2 or 3 per rank (``deepspeed/runtime/zero/stage_1_and_2.py``, ``stage3.py``).

    Every trainable parameter has a 16-bit working copy, an fp32 master partition (4 P / N) and its
    optimiser states (on the master partition). Stages 1-2 keep the 16-bit weights whole and the 16-bit
    gradients whole through backward; ``step()`` frees them once it has built the fp32 gradient partition
    from them (``single_grad_partition = flat_grad_partition.to(fp32)``; ``free_grad_in_param_list``),
    which lives through the update. Stage 3 keeps 16-bit partitions of the weights and gradients; its
    step adds the fp32 gradient partition beside them, and the parameters it gathers stay gathered while
    they will be used again within ``stage3_max_reuse_distance`` elements (:func:`_zero3_kept`). The
    reduce / all-gather buckets live only inside a collective (none across the step). FusedAdam leaves no
    temporaries; ``torch_adam`` (:attr:`Parallel.torch_adam`) two fp32 partitions.
    """
    n = par.gpus
    regime = cfg.regime
    opt = get_optimizer(cfg.optimizer)
    P = st.trainable_params
    full = cfg.recipe.adapter is Adapter.FULL
    offload = par.offload == "cpu"
    frozen_w = _frozen_weight_bytes(model, cfg, st) if full else base[Component.WEIGHTS]
    quant = base.get(Component.QUANT_STATE, 0)
    groups = _trainable_groups(model, cfg)
    p16 = DTYPE_BYTES[regime.compute_dtype]
    mixed = regime.compute_dtype != FP32
    master = 4 * P if mixed else 0
    g32 = 4 * P if mixed else 0
    part = -(-P // n)  # elements of this rank's flat partition
    # the optimiser keeps its states on the fp32 master partition (DeepSpeed's K = 12 for Adam)
    states = opt.total_state_bytes([(s, c, 4) for s, c in groups])
    temps = opt.step_temporary_bytes([(s, c, 4) for s, c in groups], "trainer") // n + (
        2 * 4 * part if par.torch_adam else 0)
    trainable_w = p16 * P
    train_key = Component.WEIGHTS if full else Component.ADAPTERS
    stage = par.sharding.deepspeed_stage
    if stage in (1, 2):
        out.bytes[Component.WEIGHTS] = frozen_w
        out.bytes[Component.QUANT_STATE] = quant
        out.bytes[train_key] += trainable_w
        if offload:
            out.cpu_bytes = (master + g32 + states) // n + p16 * P // n
        else:
            out.bytes[Component.MASTER_WEIGHTS] = master // n
            out.bytes[Component.GRADIENTS] = p16 * P
            out.fp32_grad_bytes = (g32 if mixed else 4 * P) // n
            out.step_grad_bytes = out.fp32_grad_bytes
            out.bytes[Component.OPTIMIZER_STATES] = states // n
            out.step_temporary = temps
    else:
        if not offload:
            out.bytes[Component.WEIGHTS] = frozen_w // n
            out.bytes[Component.QUANT_STATE] = quant  # module attributes, not parameters: every rank keeps them
            out.bytes[train_key] += trainable_w // n
            out.bytes[Component.MASTER_WEIGHTS] = master // n
            out.bytes[Component.GRADIENTS] = p16 * part
            out.fp32_grad_bytes = g32 // n
            out.step_grad_bytes = p16 * part + g32 // n
            out.bytes[Component.OPTIMIZER_STATES] = states // n
            out.step_temporary = temps
        else:
            out.cpu_bytes = (frozen_w + quant + trainable_w + master + g32 + states) // n
        out.gathered_bytes = _zero3_kept(model, cfg, par, st)
        out.load_reserved_bytes = _zero3_whole_module_bytes(cfg, base, trainable_w)
        if out.load_reserved_bytes:
            out.notes.append("ZeRO-3 without zero.Init (transformers builds a quantised model outside it): "
                             "DeepSpeed moves the whole module onto each GPU before partitioning it; the "
                             "allocator keeps those blocks reserved (a floor under the device total, offload or not)")
        # contiguous_gradients (default on): one reduce bucket per gradient dtype, allocated at init (stage3.py
        # ``bucket.buffer = torch.empty(self.reduce_bucket_size, ...)``); the HF Trainer's "auto" sets hidden^2
        out.comm_buffer_bytes = p16 * int(par.reduce_bucket_size or model.hidden_size ** 2)
        return _deepspeed_layout(out, stage, mixed, offload)
    out.comm_buffer_bytes = 0  # stages 1-2 allocate their gradient buckets inside backward only
    _deepspeed_layout(out, stage, mixed, offload)


def _zero3_whole_module_bytes(cfg: TrainConfig, base: dict, trainable_w: int) -> int:
    """Bytes of the whole module DeepSpeed ZeRO-3 places on each GPU at ``deepspeed.initialize`` when the
    model was not built under ``deepspeed.zero.Init`` (0 when it was).

    ``DeepSpeedEngine._configure_distributed_model`` (deepspeed/runtime/engine.py, 0.14-0.19): ``if not
    (self.dont_change_device or is_zero_init_model): self.module.to(self.device)`` after the 16-bit cast;
    stage 3 partitions the parameters afterwards (``DeepSpeedZeRoOffload._convert_to_zero_parameters``), and
    nothing calls ``empty_cache`` at init, so the caching allocator keeps the whole module's blocks reserved
    (the step reuses them). transformers builds a quantised model outside ``zero.Init`` (PR #29587,
    2024-03, "Disable zero.init when using DeepSpeed with QLoRA"; ``modeling_utils.get_init_context``: ``if
    not is_quantized ...: deepspeed.zero.Init``; a quantised model is built on meta and loaded whole), so
    every quantised-base plan under ZeRO-3 pays it, with parameter offload too (PEFT's DeepSpeed guide,
    caveat 3: "DeepSpeed Stage 3 and qlora when used with CPU offloading leads to more GPU memory usage
    when compared to disabling CPU offloading"; its 70B QLoRA run on 2 GPUs: 36.6 GB per GPU, about the
    whole NF4 model). Full and 16-bit-base models are built under ``zero.Init`` by the same stacks.
    """
    if not cfg.recipe.adapter.quantized_base:
        return 0
    # the frozen base as stored (4-bit codes, 16-bit rest), its quantisation constants, the 16-bit adapters
    return int(base.get(Component.WEIGHTS, 0) + base.get(Component.QUANT_STATE, 0) + trainable_w)


def _deepspeed_layout(out: ShardedState, stage: int, mixed: bool, offload: bool) -> None:
    out.layout = (f"DeepSpeed ZeRO-{stage} ({'bf16/fp16 weights + fp32 master' if mixed else 'fp32'})"
                  + (", optimiser" + (" and parameters" if stage == 3 else "") + " offloaded to CPU" if offload else ""))


def _zero3_kept(model: ModelSpec, cfg: TrainConfig, par: Parallel, st) -> int:
    """Bytes ZeRO-3 holds gathered from a module's forward to its backward (16-bit or stored frozen bytes).

    ``PartitionedParameterCoordinator.release_sub_module`` keeps a parameter whose next use is within
    ``stage3_max_reuse_distance`` (default 1e9) elements of parameter traffic (``stage3.py``,
    ``partitioned_param_coordinator.py``): in forward-then-backward order a module's next use is its
    backward, after twice the parameters that follow it, so the trailing ``max_reuse_distance / 2``
    parameters of the modules that run a backward stay gathered (with a PEFT method the input embedding
    runs none: nothing flows back into it), plus the module at work (the largest).
    """
    full = cfg.recipe.adapter is Adapter.FULL
    p16 = DTYPE_BYTES[cfg.regime.compute_dtype]
    reused = model.params - (0 if full else model.embedding_params)
    if full:
        stored = p16 * reused
    else:  # the stored frozen weights (4-bit codes, 16-bit rest) but the embedding's, and the adapters
        stored = (_frozen_weight_bytes(model, cfg, st) - DTYPE_BYTES[cfg.regime.frozen_dtype] * model.embedding_params
                  + st.bytes.get(Component.ADAPTERS, 0))
    cap = DS_DEFAULTS["max_reuse_distance"] // 2 + largest_layer_params(model)
    return int(np.ceil(stored * min(1.0, cap / max(reused, 1))))


#: the option a configuration carries while planned as DeepSpeed's 16-bit engine runs it (keeps its cached
#: model state apart from the configuration's own)
_DS_CAST = "_deepspeed_16bit_module"


def deepspeed_cast(cfg: TrainConfig, par: Parallel) -> TrainConfig:
    """``cfg`` as DeepSpeed's bf16/fp16 engine runs it: every parameter cast to the 16-bit dtype.

    ``DeepSpeedEngine._configure_distributed_model`` casts the module's parameters to the engine's
    16-bit dtype ("replaces blanket module.half()/bfloat16()"; fp32 buffers kept): PEFT's fp32 adapters
    and ``prepare_model_for_kbit_training``'s fp32 upcasts become 16-bit (the 4-bit codes stay). Applies
    to a pure 16-bit regime (no autocast) under the DeepSpeed engine; otherwise ``cfg`` itself.
    """
    if not (par.distributed and par.engine_name == "deepspeed"):
        return cfg
    regime = cfg.regime
    upcast = cfg.stack.kbit_upcast and cfg.recipe.adapter.quantized_base
    if regime.autocast is not None or regime.compute_dtype == FP32 or (
            regime.adapter_dtype == regime.compute_dtype and not upcast):
        return cfg
    from dataclasses import replace

    view = replace(cfg, options=tuple(sorted(dict(cfg.options, **{_DS_CAST: True}).items())))
    view.__dict__["stack"] = replace(cfg.stack, kbit_upcast=False)
    view.__dict__["regime"] = replace(regime, adapter_dtype=regime.compute_dtype)
    return view


def _rollout_gather(out: ShardedState, model: ModelSpec, cfg: TrainConfig, par: Parallel, st) -> None:
    regime = cfg.regime
    if cfg.recipe.behaviour.generates and par.shards_params:
        policy = cfg.recipe.copies[0]
        per = DTYPE_BYTES[regime.compute_dtype] if policy.adapter is Adapter.FULL else _frozen_bytes_per_param(model, cfg, st)
        out.rollout_gather_bytes = int(model.params * per)
        out.notes.append("PPO generation gathers the whole policy (TRL ds3_gather_for_generation)")


#: a branch of combine_phases that an engine's own schedule replaces (never the maximum)
_NOT_HERE = -(2 ** 60)


def _expand(groups) -> list[tuple[tuple[int, ...], int]]:
    return [(shape, 1) for shape, count in groups for _ in range(count)]


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def _zero_redundancy(out: ShardedState, model: ModelSpec, cfg: TrainConfig, par: Parallel, st) -> None:
    """``torch.distributed.optim.ZeroRedundancyOptimizer`` over DDP: each rank keeps the optimiser states
    of its partition of the parameters.

    The partition is the optimiser's own (``ZeroRedundancyOptimizer._partition_parameters``, torch 2.x):
    parameters sorted by ``numel`` descending, each assigned to the rank with the smallest total so far.
    The plan is the largest rank's. The updated parameters are broadcast in place from their owner.
    """
    n = par.gpus
    opt = get_optimizer(cfg.optimizer)
    tensors = sorted(_expand(_trainable_groups(model, cfg)), key=lambda t: _numel(t[0]), reverse=True)
    sizes = [0] * n
    owned: list[list] = [[] for _ in range(n)]
    for shape, c in tensors:
        r = int(np.argmin(sizes))
        sizes[r] += _numel(shape)
        owned[r].append((shape, c))
    pbytes = _trainable_bytes_per_param(cfg)
    states = [opt.total_state_bytes([(sh, c, pbytes) for sh, c in o]) for o in owned]
    r = int(np.argmax(states))
    out.bytes[Component.OPTIMIZER_STATES] = int(states[r])
    out.step_temporary = opt.step_temporary_bytes([(sh, c, pbytes) for sh, c in owned[r]], cfg.regime.runner)
    out.layout = "PyTorch DDP + ZeroRedundancyOptimizer (ZeRO-1): full replica, gradient buckets, own states"


def _trainable_bytes_per_param(cfg: TrainConfig) -> int:
    regime = cfg.regime
    return DTYPE_BYTES[regime.trainable_dtype if cfg.recipe.adapter is Adapter.FULL else regime.adapter_dtype]


def _fsdp2(out: ShardedState, model: ModelSpec, cfg: TrainConfig, par: Parallel, st, base) -> None:
    """PyTorch FSDP2 (``fully_shard`` on every decoder layer and on the root), per rank.

    Sources: ``torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py`` (torch 2.13). Every
    parameter is sharded on dim 0 (padded to a multiple of N); a unit's all-gather writes one flat
    buffer (the unit's padded size) and copies out to the unsharded parameters.

    * Forward (``reshard_after_forward=True``, passed to the root too, as torchtune and accelerate
      do): the root's parameters stay unsharded through its forward and are gathered again when
      backward starts (flat buffer and parameters: 2R), then kept to the end of backward; each layer is
      gathered, and ``wait_for_unshard`` keeps the previous all-gather result alive until the
      next copy-out ("implicit prefetch", ``comm_ctx.all_gather_state``): R + 2L while a layer is
      gathered, R + L at the logits (the last result is freed by the root's post-forward).
    * Backward: ``_backward_prefetch`` all-gathers the next unit in backward order as each unit's
      pre-backward runs: R + L at the loss, R + 2L inside a layer, plus the layer's unsharded
      gradients and the previous unit's reduce-scatter input, which ``post_backward`` keeps until the
      next one (``reduce_scatter_max_input_buffers`` = 1); the head's unsharded gradients live from
      the logits' backward to the root's ``post_backward``, which reshards the root before it copies
      its gradients into the reduce-scatter input.
    * ``reshard_after_forward=False`` (zero2, SHARD_GRAD_OP): every layer stays gathered from its
      forward to its backward: R + (layers + 1) L at the logits, R + layers x L when backward starts.
    """
    n = par.gpus
    regime = cfg.regime
    full = cfg.recipe.adapter is Adapter.FULL
    offload = par.offload == "cpu"
    shardable = (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS,
                 Component.GRADIENTS, Component.OPTIMIZER_STATES)
    if offload:
        out.cpu_bytes = sum(base.get(c, 0) for c in shardable) // n
    else:
        for c in shardable:
            out.bytes[c] = -(-base.get(c, 0) // n)
        out.step_temporary = -(-st.step_temporary // n)
    root_p, layer_p = _unit_params(model)
    L = model.num_layers
    gb = _trainable_bytes_per_param(cfg)  # gradient bytes per trainable parameter
    if full:
        w = DTYPE_BYTES[regime.trainable_dtype]
        R, U = root_p * w, layer_p * w
        gU = layer_p * gb                      # one layer's unsharded gradients
        head_g = (model.lm_head_params + model.final_norm_params) * gb  # lm_head + final norm, from the logits on
        root_g = root_p * gb
    else:
        adapters = base.get(Component.ADAPTERS, 0)
        policy = cfg.recipe.copies[0]
        nb = DTYPE_BYTES[regime.frozen_dtype]
        if policy.quantized:
            from .memory import quantized_linears
            from .quant import nf4_bytes

            # NF4 codes are the layer's parameters (FSDP-QLoRA shards and gathers them); what is not
            # quantised was upcast to fp32 by prepare_model_for_kbit_training (the stack's kbit_upcast);
            # the quantisation constants are module attributes, not parameters: every rank keeps them all
            lin = quantized_linears(model, cfg)
            packed = sum(nf4_bytes(l.in_features * l.out_features, cfg.double_quant)[0] * l.count for l in lin)
            nb = 4 if cfg.stack.kbit_upcast else nb
            R = root_p * nb
            U = packed + (layer_p - sum(l.in_features * l.out_features * l.count for l in lin)) * nb
            out.bytes[Component.QUANT_STATE] = base.get(Component.QUANT_STATE, 0)
        else:
            R, U = root_p * nb, layer_p * nb
        U += adapters // max(L, 1)
        gU = adapters // max(L, 1)
        head_g = root_g = 0
    rs = gU  # the reduce-scatter input: the unit's gradients, padded, in the reduce dtype (= gradient dtype)
    out.fsdp2 = {"R": R, "U": U, "gU": gU, "rs": rs, "head_g": head_g, "root_g": root_g, "layers": L,
                 "sg": -(-gU // n), "reshard": par.reshards_after_forward,
                 "gU_mlp": min(gU, int(st.layer_grad)) if full else 0,
                 "no_sync": par.skips_sync(cfg), "sharded_grads": out.bytes.get(Component.GRADIENTS, 0)}
    # the generic phase arithmetic sees the root and the last layer's all-gather (forward end, loss)
    out.gathered_bytes = R + (U if par.reshards_after_forward else (L + 1) * U)
    # reshard_after_forward passed explicitly to the root too (torchtune's shard_model and accelerate's
    # FSDP2 plugin do; left to None, torch would keep the root gathered): the root is freed after the
    # loss and all-gathered again when backward starts, its flat buffer beside its parameters (2R)
    # before the prefetch of the last layer (R + U)
    out.gathered_bwd_start = R + (U if par.reshards_after_forward else L * U)
    # the layer-by-layer backward and its end are walked by _fsdp2_phases, not combine_phases' generic branches
    out.gathered_bwd_work = out.gathered_bwd_end = _NOT_HERE
    out.inflight_grad_bytes = 0
    out.comm_buffer_bytes = 0
    out.layout = ("PyTorch FSDP2 fully_shard per decoder layer + root"
                  + (", reshard_after_forward=False" if not par.reshards_after_forward else "")
                  + (", parameters and optimiser offloaded to CPU" if offload else ""))


def uses_fsdp1(cfg: TrainConfig, par: Parallel) -> bool:
    """Whether ``--strategy fsdp`` runs FSDP1 (``FullyShardedDataParallel``, FULL_SHARD) on ``cfg``'s stack
    (stacks.toml ``fsdp_engine``); its unit schedule is planned as FSDP2's, its reserve floor by :func:`_fsdp1_floor`."""
    return (par.strategy is not None and par.sharding.stack_fsdp and par.engine_name == "torch"
            and getattr(cfg.stack, "fsdp_engine", "fsdp2") == "fsdp1")


def _fsdp1_units(model: ModelSpec, cfg: TrainConfig, st, base, f: dict) -> tuple[tuple, tuple, int, int]:
    """(tensors on the GPU before the wrap, FSDP units' parameter bytes in wrap order, root bytes, layer unit bytes).

    The units of Answer.AI's llama-recipes policy (``lambda_auto_wrap_policy`` on leaf modules whose weight
    requires grad, ``transformer_auto_wrap_policy`` on the decoder layer): per layer, each LoRA A and B linear
    its own unit, then the layer (its frozen linears, NF4 codes in their 16-bit ``quant_storage`` under
    QLoRA, and its norms); the root (embeddings, final norm, lm_head) last. Full fine-tuning: the layers and
    the root. Sizes from the same terms as :func:`_fsdp2` (``R``, ``U``)."""
    from .quant import nf4_bytes

    L = max(model.num_layers, 1)
    R, U = f["R"], f["U"]
    full = cfg.recipe.adapter is Adapter.FULL
    adapters = 0 if full else base.get(Component.ADAPTERS, 0)
    per_layer_adapters = adapters // L
    frozen_u = U - per_layer_adapters
    quantized = set()
    if not full and cfg.recipe.copies[0].quantized:
        quantized = {l.name for l in _mem.quantized_linears(model, cfg)}
    w = DTYPE_BYTES[cfg.regime.trainable_dtype if full else cfg.regime.frozen_dtype]
    layer, lora, qs_parts = [], [], []
    ab = 0.0
    if not full and st.trainable_params:
        ab = adapters / st.trainable_params  # adapter bytes per trainable parameter
    for l in model.layer_linears():
        if not l.is_linear:
            continue
        n = l.in_features * l.out_features
        for _ in range(l.count):
            if l.name in quantized:
                packed, _qs = nf4_bytes(n, cfg.double_quant)
                layer.append(packed)
                qs_parts.append(n)
            else:
                layer.append(n * w)
            if not full and l.name in cfg.targets:
                lora += [int(cfg.rank * l.in_features * ab), int(cfg.rank * l.out_features * ab)]
    rest = max(0, frozen_u - sum(layer))  # norms (and biases): two tensors
    layer += [rest // 2, rest - rest // 2]
    root_p = model.embedding_params + model.lm_head_params + model.final_norm_params
    per = R / root_p if root_p else 0.0
    root = tuple(int(p * per) for p in (model.embedding_params, model.final_norm_params, model.lm_head_params) if p)
    units = []
    for _ in range(L):
        units += [(b,) for b in lora]
        units.append(tuple(layer))
    units.append(root)
    qs = base.get(Component.QUANT_STATE, 0)
    before = ()
    if qs and qs_parts:  # bitsandbytes' quantisation constants stay on the GPU (not parameters: not sharded)
        total = sum(qs_parts) * L
        before = tuple(int(qs * n / total) for n in qs_parts) * L
    return before, tuple(units), R, U


def _fsdp1_floor(out: ShardedState, model: ModelSpec, cfg: TrainConfig, par: Parallel, st, base) -> None:
    """FSDP1's reserve floor per rank: the wrap's cached blocks plus the unshard stream's own pool.

    Sources: torch 2.2 ``torch/distributed/fsdp/_init_utils.py`` (``_init_param_handle_from_module``:
    materialise, ``_sync_module_params_and_buffers``, ``_init_param_handle_from_params``),
    ``_flat_param.py`` (``flatten_tensors``: ``torch.cat``; ``_get_shard``: ``chunk.clone()`` padded;
    ``_alloc_padded_unsharded_flat_param`` under ``_unshard_stream``), ``_runtime_utils.py`` (the root is not
    resharded after forward; ``BackwardPrefetch.BACKWARD_PRE`` gathers the next unit while one runs;
    ``_FreeEventQueue._max_num_inflight_all_gathers = 2``). The wrap's freed flatten copies and materialised
    parameters stay reserved on the compute stream (:func:`vramplan.loadreserve.fsdp1_wrap_reserved`); the
    all-gather outputs (the root, the running unit and the prefetched one, padded to a multiple of N) live in
    the unshard stream's pool, which the compute stream's cached blocks cannot serve
    (:func:`vramplan.loadreserve.fsdp1_unshard_pool`). Their sum is a floor under the step's reserved total;
    the step's own reserve above it is planned as FSDP2's. Not modelled: CPU offload (the flat parameters on
    the host), the post-backward stream's reduce-scatter pool (a gradient shard per unit).
    """
    if par.offload == "cpu" or out.fsdp2 is None:
        return
    from .loadreserve import fsdp1_unshard_pool, fsdp1_wrap_reserved

    n = par.gpus
    before, units, R, U = _fsdp1_units(model, cfg, st, base, out.fsdp2)
    wrap = fsdp1_wrap_reserved(before, units, n, bool(getattr(cfg.stack, "fsdp1_sync_module_states", False)))

    def padded(b: int) -> int:
        return -(-int(b) // n) * n

    pool = fsdp1_unshard_pool((padded(R), padded(U), padded(U)))
    out.load_reserved_bytes = max(out.load_reserved_bytes, int(wrap + pool))
    out.fsdp1 = {"wrap_reserved": int(wrap), "unshard_pool": int(pool)}
    out.layout = out.layout.replace("PyTorch FSDP2 fully_shard", "PyTorch FSDP1 FullyShardedDataParallel", 1) + (
        " (unit schedule planned as FSDP2's; the wrap's reserve and the unshard stream's pool as a reserved floor)")
    out.notes.append(f"FSDP1: the wrap leaves {wrap / 2**30:.2f} GiB reserved per GPU and the unshard stream's pool "
                     f"holds {pool / 2**30:.2f} GiB (root + 2 units); their sum is a floor under the reserved total")


# -- per-GPU step memory -------------------------------------------------------------------

def parallel_step_memory(model: ModelSpec, cfg: TrainConfig, par: Parallel = SINGLE, batch=None, seq=None,
                         state: ShardedState | None = None, terms: StepTerms | None = None,
                         components: "bool | frozenset" = True) -> StepMemory:
    """Per-GPU tensor bytes of one steady-state step under ``par`` (arrays broadcast over batch/seq).

    The phases of :func:`vramplan.memory.step_memory` with the model-state terms of
    :func:`shard_state`: gathered units join forward and backward, their gradients the
    backward, communication buckets every phase, the gathered policy the PPO rollout.
    ``state`` and ``terms`` (:func:`vramplan.memory.step_terms` for the same batch/seq) may be passed in
    when already computed; ``components=False`` skips the per-component breakdown (a search
    only needs the peak), a set of components works out only those (each equal to its value in the whole
    breakdown: what a caller reads, e.g. the device chain's, ``planner.estimating.DEVICE_CHAIN_READS``).
    """
    model = cfg.stack.as_built(model)
    cast = deepspeed_cast(cfg, par)
    if cast is not cfg:  # what was computed for the configuration itself does not hold
        cfg, state, terms = cast, None, None
    full = _mem.model_state(model, cfg)  # unsharded: the casts and the gradient tail scale with the shard
    sh = state or shard_state(model, cfg, par, st=full)
    t = terms or _mem.step_terms(model, cfg, batch, seq)
    B = sh.bytes
    grads = (B.get(Component.GRADIENTS, 0) if sh.backward_grad_bytes is None else sh.backward_grad_bytes)
    shard = grads / full.bytes[Component.GRADIENTS] if full.bytes[Component.GRADIENTS] else 0.0
    state_terms = StateTerms(
        states=B.get(Component.OPTIMIZER_STATES, 0), cache=B.get(Component.AUTOCAST_CACHE, 0),
        casts=_mem.backward_casts(full, cfg), grads_bwd=grads + sh.inflight_grad_bytes,
        grads_opt=grads if sh.step_grad_bytes is None else sh.step_grad_bytes,
        grads_tail=full.grads_tail * shard, grads_end_extra=full.grads_end_extra * shard,
        layer_grad=full.layer_grad * shard, head_grad=full.head_grad * shard, step_temporary=sh.step_temporary,
        rollout_on=cfg.recipe.behaviour.generates, grads_held=_held_gradients(sh, full, cfg, par))
    gathering = Gathering(
        comm=sh.comm_buffer_bytes, gathered=sh.gathered_bytes, rollout_gather=sh.rollout_gather_bytes,
        fwd_mid=sh.gathered_fwd_mid, bwd_start=sh.gathered_bwd_start, bwd_work=sh.gathered_bwd_work,
        bwd_end=sh.gathered_bwd_end, comm_component=Component.REDUCE_BUFFERS if par.distributed else None,
        gathered_component=Component.ALLGATHER_BUFFERS if par.distributed else None)
    phases, peak, idx, comps = combine_phases(t, B, state_terms, gathering, components)
    if sh.fsdp2 is not None:
        phases, peak, idx, comps = _fsdp2_phases(sh, t, phases, comps, B, full, cfg, components)
    ms = ModelState(bytes=dict(B), params=model.params, trainable_params=sh.trainable_params,
                    step_temporary=sh.step_temporary, load_reserved=sh.load_reserved_bytes)
    return StepMemory(components=comps, phases=phases, peak=peak, peak_phase=idx, state=ms)


def _held_gradients(sh: ShardedState, full, cfg: TrainConfig, par: Parallel) -> int:
    """Gradient bytes a micro-batch after the first runs beside (:func:`vramplan.memory.held_gradients`), per GPU.

    One process and DDP (``no_sync`` or not): every gradient, summed in ``param.grad`` (with
    ``gradient_as_bucket_view`` they are the buckets, counted as such); FSDP2: its sharded sums, or every
    unsharded gradient when the sync is skipped (:func:`_fsdp2_held`). DeepSpeed: ZeRO-3 its 16-bit gradient
    partition, stage 2 its 16-bit partition, stage 1 every 16-bit gradient (``param.grad`` until the boundary).
    """
    if sh.fsdp2 is not None:
        held_sh, held_u = _fsdp2_held(sh.fsdp2, cfg)
        return held_sh + held_u * full.bytes.get(Component.GRADIENTS, 0)
    if par.distributed and par.engine_name == "deepspeed":
        if par.offload == "cpu":
            return 0
        if par.shards_params:  # ZeRO-3: its 16-bit gradient partition stays allocated across steps
            return sh.bytes.get(Component.GRADIENTS, 0)
        # stages 1-2 between micro-batches (stage_1_and_2.py): stage 1 leaves the 16-bit gradients in
        # ``param.grad`` until the boundary's reduction (every gradient); stage 2 reduces each micro-batch into
        # its partition (``averaged_gradients``: the 16-bit partition). Traced: DeepSpeed 0.19.8, 2 ranks.
        if cfg.grad_accum <= 1:
            return 0
        p16 = DTYPE_BYTES[cfg.regime.compute_dtype]
        return p16 * sh.trainable_params // (par.gpus if par.sharding.shards_gradients else 1)
    return int(_mem.held_gradients(ModelState(bytes=sh.bytes, params=0, trainable_params=sh.trainable_params), cfg))


def accumulation_step_memory(model: ModelSpec, cfg: TrainConfig, par: Parallel, batch, grad_accum,
                             state: ShardedState | None = None, terms: dict | None = None,
                             components: "bool | frozenset" = True) -> StepMemory:
    """:func:`parallel_step_memory` over paired ``batch`` / ``grad_accum`` arrays (a search's grid).

    Accumulation changes the memory only between one micro-batch and several (the earlier ones' gradients
    held: :func:`_held_gradients`), so the step is evaluated once each way and picked per grid point.
    ``components``: as :func:`parallel_step_memory`'s.
    """
    accum = np.asarray(grad_accum)
    one = parallel_step_memory(model, cfg.with_(grad_accum=1), par, batch=batch, state=state, terms=terms,
                               components=components)
    if not np.any(accum > 1):
        return one
    many = parallel_step_memory(model, cfg.with_(grad_accum=2), par, batch=batch, state=state, terms=terms,
                                components=components)
    on = np.broadcast_to(accum > 1, np.shape(one.peak))

    def pick(a, b):
        return np.where(on, b, a)

    return StepMemory(components={c: pick(one.components.get(c, 0), many.components.get(c, 0))
                                  for c in dict.fromkeys([*one.components, *many.components])},
                      phases={p: pick(one.phases[p], many.phases[p]) for p in one.phases},
                      peak=pick(one.peak, many.peak), peak_phase=pick(one.peak_phase, many.peak_phase), state=one.state)


def backward_casts_of(state, cfg: TrainConfig) -> int:
    """Autocast casts still saved when backward starts (:func:`vramplan.memory.backward_casts`)."""
    return int(_mem.backward_casts(state, cfg).cache_bwd)


def _fsdp2_phases(sh: ShardedState, t: StepTerms, phases: dict, comps: dict, B: dict, full_state, cfg: TrainConfig,
                  components: "bool | frozenset"):
    """Forward and backward of FSDP2 walked unit by unit (see :func:`_fsdp2` for the sources).

    Each point is the resident state (sharded weights, states, buffers) plus what lives there:

    * forward, a unit's copy-out: the previous unit's all-gather result is still referenced (the
      ``wait_for_unshard`` local that took it from ``all_gather_state`` lives to the function's end),
      so layer 0's copy-out holds R + flat(R) + flat(L0) + L0 = 2R + 2U, layer i's R + 3U (+ the layers
      kept gathered without resharding) beside the activations of the layers before it;
    * backward, for every layer i (k layers already reduced, their gradient shards ``sg`` each): the
      copy-out (own flat buffer and parameters, the previous unit's retained reduce-scatter input),
      the compute (own parameters, the next unit prefetched, the unsharded gradients, the layer's
      backward buffers) and the copy-in (unsharded gradients and the reduce-scatter input, the
      previous one popped), beside the saved activations of layers 0..i (``t.layer`` each; the
      final norm's and the head's saved tensors are freed once backward is past them);
    * the end: the root's gradients (embedding + head) and their reduce-scatter input.

    The start of backward (everything saved, the logits' gradients, R + the prefetched last layer)
    and the forward's end (logits) come from :func:`vramplan.phases.combine_phases`.
    """
    cands, states = _fsdp2_candidates(sh, t, B, full_state, cfg)
    return _merge_candidates(cands, phases, comps, B, sh, states, t.zeros, components)


def _fsdp2_candidates(sh: ShardedState, t: dict, B: dict, full_state, cfg: TrainConfig):
    """The points :func:`_fsdp2_phases` walks: ``([(phase, bytes, {component: bytes}), ...], optimiser states)``."""
    f = sh.fsdp2
    R, U, gU, rs, head_g, root_g, L, sg = (f[k] for k in ("R", "U", "gU", "rs", "head_g", "root_g", "layers", "sg"))
    gU_mlp = f["gU_mlp"]
    reshard = f["reshard"]
    zeros = t.zeros
    static = sum(B.get(c, 0) for c in (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS,
                                       Component.MASTER_WEIGHTS)) + sh.comm_buffer_bytes
    states = B.get(Component.OPTIMIZER_STATES, 0)
    base = static + states + zeros
    per = t.layer if not cfg.grad_ckpt else t.acts / max(L, 1)  # saved per layer (checkpoint inputs under GC)
    rec = t.recompute if cfg.grad_ckpt else zeros
    trans = np.maximum(t.transient + t.temps_fwd, t.temps_recompute)
    # gradient accumulation (a micro-batch after the first): the sharded sums of the earlier micro-batches
    # (every micro-batch reduce-scattered) or every unsharded gradient (gradient sync skipped: no_sync)
    held_sh, held_u = _fsdp2_held(f, cfg)
    cands: list[tuple[Phase, np.ndarray, dict]] = []
    # forward copy-outs
    # every point below is affine in the layer index i between the indices where a term switches
    # (i = 0: no prefetch, the root's buffer; i = L-1: nothing reduced yet), so its maximum over the
    # layers is at one of those indices or their neighbours: only those are walked
    ends = sorted({i for i in (0, 1, L - 2, L - 1) if 0 <= i < L})
    for i in ends:
        kept = 0 if reshard else i * U
        g = (2 * R + 2 * U) if i == 0 else (R + kept + 3 * U)
        a = i * per
        held = held_sh + held_u * (L * gU + root_g)
        cands.append((Phase.FORWARD, base + a + g + held, {Component.ALLGATHER_BUFFERS: g + zeros,
                                                          Component.ACTIVATIONS: a + zeros,
                                                          Component.GRADIENTS: held + zeros}))
    # backward starts (the loss's gradient, before the logits' gradients exist) with the root gathered
    # again when it was resharded after forward: its flat buffer beside its parameters, beside everything
    # saved, the logits kept for the loss's backward (logits_bwd - logits_fwd: what the loss' backward adds
    # is the logits' gradient) and the autocast casts still saved
    if reshard:
        cast = backward_casts_of(full_state, cfg)
        kept = np.maximum(t.logits_bwd - t.logits_fwd, 0)
        g = 2 * R
        held = held_sh + held_u * (L * gU + root_g)
        cands.append((Phase.BACKWARD, base + t.acts + cast + kept + g + held,
                      {Component.ALLGATHER_BUFFERS: g + zeros, Component.ACTIVATIONS: t.acts + zeros,
                       Component.LOGITS: kept + zeros, Component.AUTOCAST_CACHE: cast + zeros,
                       Component.GRADIENTS: held + zeros}))
    # backward, layer by layer
    for i in reversed(ends):
        k = L - 1 - i
        # reduced so far (or every sharded sum, accumulating); unsharded sums of the layers below and the embedding
        done = held_sh if held_sh else k * sg
        below = held_u * (i * gU + root_g - head_g)
        own_held = held_u * gU  # its own sums, before its backward adds to them
        rs_prev = rs if k >= 1 else 0
        a_i = (i + 1) * per
        own = (i + 1) * U if not reshard else U  # unsharded layers at this point (own included)
        prefetch = U if (reshard and i >= 1) else 0
        pts = []
        if reshard:  # copy-out: own flat buffer beside own parameters
            pts.append((R + 2 * U, rs_prev, head_g + done + below + own_held, a_i, zeros))
        # inside the layer's backward, as combine_phases' layer branch: early, everything it saved (and
        # its recomputation) without its gradients; late, its gradients but the MLP's saved tensors
        early = a_i + rec
        late_mlp = gU - gU_mlp + a_i  # before the MLP block's gradients: all saved, attention grads not yet
        late_attn = gU + a_i - per + t.layer_attn  # the attention block's backward: every layer gradient
        pts.append((R + own + prefetch, rs_prev, head_g + done + below + own_held, early, trans))
        pts.append((R + own + prefetch, rs_prev, head_g + done + below, np.maximum(late_mlp, late_attn), trans))
        pts.append((R + own - U + prefetch, rs, gU + head_g + done + below, a_i - per, zeros))
        for g, r, gr, a, tmp in pts:
            val = base + g + r + gr + a + tmp
            cands.append((Phase.BACKWARD, val, {Component.ALLGATHER_BUFFERS: g + zeros, Component.REDUCE_BUFFERS: r + zeros,
                                                Component.GRADIENTS: gr + zeros, Component.ACTIVATIONS: a + zeros,
                                                Component.TEMPORARIES: tmp + zeros}))
    end_done = held_sh if held_sh else L * sg
    for g, r, gr in ((R, rs if L else 0, root_g + end_done), (0, root_g, root_g + end_done)):
        cands.append((Phase.BACKWARD, base + g + r + gr, {Component.ALLGATHER_BUFFERS: g + zeros,
                                                         Component.REDUCE_BUFFERS: r + zeros,
                                                         Component.GRADIENTS: gr + zeros}))
    return cands, states


def _fsdp2_held(f: dict, cfg: TrainConfig) -> tuple[int, int]:
    """(sharded gradient bytes held from earlier micro-batches, 1 when every unsharded gradient is held, else 0).

    FSDP2's two accumulation flavours (pytorch/pytorch PR #126166's description): reduce-scatter every
    micro-batch and accumulate the sharded gradients (``sharded_param.grad`` += the new shard), or skip the
    sync (``set_requires_gradient_sync(False)``, FSDP1's ``no_sync()``) and keep the unsharded gradients
    (``unsharded_param.grad``) until the last micro-batch reduce-scatters them unit by unit.
    """
    if cfg.grad_accum <= 1 or cfg.uses("opt_in_bwd"):
        return 0, 0
    if f["no_sync"]:
        return 0, 1
    return f["sharded_grads"], 0


def _merge_candidates(cands: list, phases: dict, comps: dict, B: dict, sh: ShardedState, states, zeros,
                      components: "bool | frozenset"):
    """Each phase's peak raised to its largest candidate; the components where a candidate sets the step's peak
    (``components``: as :func:`parallel_step_memory`'s; a set keeps only those, each as the whole breakdown has it)."""
    phases = dict(phases)
    best: dict[Phase, tuple[np.ndarray, dict]] = {}
    want = None if components is True else frozenset(components or ())  # the components worked out (None: all)
    for ph, val, parts in cands:
        if ph not in best:
            best[ph] = (val, parts)
            continue
        cur, cparts = best[ph]
        take = val > cur
        # keys in first-seen order (a set of str-valued enum members would order them by the per-process string hash)
        merged = {c: np.where(take, parts.get(c, zeros), cparts.get(c, zeros)) for c in dict.fromkeys([*cparts, *parts])
                  if want is None or c in want}
        best[ph] = (np.maximum(cur, val), merged)
    wins = {}
    for ph, (val, parts) in best.items():
        wins[ph] = val > phases[ph]
        phases[ph] = np.maximum(phases[ph], val)
    from .memory import PHASE_ORDER

    stack = np.stack([phases[p] for p in PHASE_ORDER])
    idx = np.argmax(stack, axis=0)
    peak = np.max(stack, axis=0)
    if not components:
        return phases, peak, idx, {}
    comps = {c: np.asarray(v, dtype=np.float64) + zeros for c, v in comps.items()}
    for ph, (val, parts) in best.items():
        k = PHASE_ORDER.index(ph)
        here = (idx == k) & wins[ph]
        if not np.any(here):
            continue
        sched = {Component.WEIGHTS: B.get(Component.WEIGHTS, 0) + zeros, Component.QUANT_STATE: B.get(Component.QUANT_STATE, 0) + zeros,
                 Component.ADAPTERS: B.get(Component.ADAPTERS, 0) + zeros,
                 Component.MASTER_WEIGHTS: B.get(Component.MASTER_WEIGHTS, 0) + zeros,
                 Component.OPTIMIZER_STATES: states + zeros}
        for c, v in parts.items():
            sched[c] = sched.get(c, zeros) + v
        if sh.comm_buffer_bytes:
            sched[Component.REDUCE_BUFFERS] = sched.get(Component.REDUCE_BUFFERS, zeros) + sh.comm_buffer_bytes
        for c in dict.fromkeys([*comps, *sched]):
            if want is None or c in want:
                comps[c] = np.where(here, sched.get(c, zeros), comps.get(c, zeros))
    return phases, peak, idx, comps


# -- communication -------------------------------------------------------------------------

@dataclass(frozen=True)
class Comm:
    """Bytes each GPU moves per micro-step and per optimiser step, and the links they cross."""

    micro_bytes: float = 0.0     # over the GPU interconnect, every micro-step
    step_bytes: float = 0.0      # over the GPU interconnect, once per optimiser step
    pcie_micro_bytes: float = 0.0  # host <-> GPU (offload), every micro-step
    pcie_step_bytes: float = 0.0   # host <-> GPU (offload), once per optimiser step
    link: str = "none"
    link_gbs: float = 0.0        # achieved GB/s of the bottleneck link (efficiency applied)
    pcie_gbs: float = 0.0
    cpu_optimizer_params: int = 0  # parameters the CPU updates per optimiser step (offload)

    def seconds(self, grad_accum: int = 1) -> tuple[float, float]:
        """(interconnect seconds, host-link + CPU seconds) per optimiser step with ``grad_accum`` micro-steps."""
        net = (grad_accum * self.micro_bytes + self.step_bytes) / (self.link_gbs * 1e9) if self.link_gbs else 0.0
        host = ((grad_accum * self.pcie_micro_bytes + self.pcie_step_bytes) / (self.pcie_gbs * 1e9)
                if self.pcie_gbs else 0.0) + self.cpu_optimizer_params / CPU_ADAM_PARAMS_PER_S
        return net, host


#: INTERNODE_GBS's key per card class (vramplan.gpus.card_class)
_FAMILY = {"datacenter-hopper": "hopper", "datacenter-blackwell": "blackwell", "datacenter-ampere": "ampere-dc"}


def _gpu_family(gpu: GPUSpec) -> str:
    return _FAMILY.get(card_class(gpu).name, "other")


def interconnect(gpu: GPUSpec, par: Parallel) -> tuple[str, float]:
    """(link name, achieved GB/s per GPU per direction) that bounds ``par``'s ring collectives."""
    intra = ("nvlink", gpu.nvlink_gbs * LINK_EFFICIENCY["nvlink"]) if gpu.nvlink_gbs else \
        ("pcie", gpu.pcie_gbs * LINK_EFFICIENCY["pcie"])
    if par.nodes > 1:
        # NCCL runs one ring (channel) per NIC: a rank's traffic is spread over the node's adapters,
        # so the ring sees the node's aggregate inter-node bandwidth, unless the intra-node link is slower
        ib = INTERNODE_GBS[_gpu_family(gpu)]
        agg = ib * min(par.gpus_per_node, par.gpus) * LINK_EFFICIENCY["infiniband"]
        return ("infiniband", agg) if agg < intra[1] else intra
    return intra


def comm_volume(model: ModelSpec, cfg: TrainConfig, par: Parallel, gpu: GPUSpec,
                state: ShardedState | None = None, st=None) -> Comm:
    """Per-GPU communication of one step of ``cfg`` under ``par`` (see the module docstring).

    ``st`` is ``model_state(model, cfg)`` when the caller has it already.
    """
    if par.strategy is None:
        return Comm()
    n = par.gpus
    f = (n - 1) / n
    model = cfg.stack.as_built(model)
    st = st or model_state(model, cfg)
    regime = cfg.regime
    P = st.trainable_params
    p16 = DTYPE_BYTES[regime.compute_dtype]
    full = cfg.recipe.adapter is Adapter.FULL
    link, gbs = interconnect(gpu, par)
    pcie = gpu.pcie_gbs * LINK_EFFICIENCY["pcie"]
    gc = 1 if cfg.grad_ckpt else 0
    micro = step = pm = ps = 0.0
    cpu_params = 0
    s = par.sharding
    if not s.shards_states:  # DDP
        gbytes = st.bytes.get(Component.GRADIENTS, 0)  # reduced in the gradient dtype
        step = 2 * f * gbytes
    elif not s.shards_gradients:  # ZeRO-1
        step = 2 * f * p16 * P + f * p16 * P  # all-reduce gradients, all-gather updated weights
    elif not s.shards_params:  # ZeRO-2
        micro = f * p16 * P  # reduce-scatter every micro-step
        step = f * p16 * P   # all-gather updated weights
    else:  # ZeRO-3, FSDP
        # parameters gathered for every pass over the layers of every sharded copy
        sh = state or shard_state(model, cfg, par, st)
        per_frozen = _frozen_bytes_per_param(model, cfg, st)
        gathered = 0.0
        for c in cfg.recipe.copies:
            w = _copy_params(model, c.head) * (p16 if c.adapter is Adapter.FULL else per_frozen)
            if c.forward is Forward.GRAD:
                passes = 2 + gc + (1 if cfg.recipe.behaviour.generates else 0)
            else:
                passes = 1
            gathered += w * passes
        for _ in cfg.recipe.shared_roles:  # the policy's base again, adapter disabled
            gathered += model.params * (p16 if full else per_frozen)
        micro = f * gathered + f * p16 * P  # + reduce-scatter of gradients
        if sh.rollout_gather_bytes:
            micro += f * sh.rollout_gather_bytes
    if par.offload == "cpu":
        cpu_params = -(-P // n)
        if not s.shards_params:  # ZeRO-Offload (stages 1-2)
            pm = p16 * P / n   # gradient partition down every micro-step
            ps = p16 * P / n   # updated 16-bit weights up
        else:
            w16 = (p16 * P if full else 0) + (_frozen_weight_bytes(model, cfg, st) if full else
                                              st.bytes.get(Component.WEIGHTS, 0) + st.bytes.get(Component.QUANT_STATE, 0))
            pm = w16 / n * (2 + gc) + p16 * P / n
            ps = 0.0
    return Comm(micro_bytes=micro, step_bytes=step, pcie_micro_bytes=pm, pcie_step_bytes=ps, link=link,
                link_gbs=gbs if n > 1 else 0.0, pcie_gbs=pcie if par.offload == "cpu" else 0.0,
                cpu_optimizer_params=cpu_params)


def overlap(compute_s, comm_s, share: float = OVERLAP):
    """Step seconds when ``share`` of the shorter of compute and communication hides behind the other."""
    c = np.asarray(compute_s, dtype=np.float64)
    if type(comm_s) is float and comm_s == 0.0 and type(c) is np.ndarray and c.ndim and (c > 0.0).all():
        # no communication (one GPU): max(c, 0) is c and min(c, 0) is +0.0 where every c > 0, so the sum is c + 0.0
        return c + 0.0
    m = np.asarray(comm_s, dtype=np.float64)
    return np.maximum(c, m) + (1.0 - share) * np.minimum(c, m)

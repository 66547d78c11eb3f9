"""The one memory taxonomy shared by the analytic model, the dry run and calibration.

Every byte that vramplan predicts or measures is attributed to one
:class:`Component`, so the three layers diff component by component. Components are
``str`` Enums (as in PyTorch's ``mem_tracker``), used as dict keys and JSON keys alike.

Tensor components are storages a tensor-accounting dispatch mode can see; runtime
components (CUDA context, allocator reserve, kernel workspaces) only hardware shows.
``tensor_peak_bytes`` sums tensor components, ``peak_bytes`` adds the runtime ones.
"""

from __future__ import annotations

from enum import Enum


class Group(str, Enum):
    """Coarse breakdown (issue 3): parameters, gradients, optimiser state, activations, temporaries, runtime."""

    PARAMETERS = "parameters"
    GRADIENTS = "gradients"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"
    RUNTIME = "runtime"


class Component(str, Enum):
    """A named term of the memory model. Values are the JSON keys of ``components``."""

    #: Base-model weights of every model copy held in memory (trainable or frozen), in
    #: their storage dtype: fp32/bf16/fp16, int8, or packed NF4 (uint8, 2 values a byte).
    WEIGHTS = "weights"
    #: Quantisation constants of 8-bit/4-bit weights: absmax per block (fp32), and with
    #: double quantisation the 8-bit absmax plus the second-level fp32 constants.
    QUANT_STATE = "quant_state"
    #: Adapter parameters (LoRA A/B, DoRA magnitude, IA³ vectors, value heads).
    ADAPTERS = "adapters"
    #: fp32 copy of trainable weights kept beside 16-bit working weights (classic mixed precision).
    MASTER_WEIGHTS = "master_weights"
    #: Gradients of the trainable parameters, in the parameter dtype.
    GRADIENTS = "gradients"
    #: Optimiser state (AdamW exp_avg / exp_avg_sq, 8-bit states with their constants, ...).
    OPTIMIZER_STATES = "optimizer_states"
    #: Tensors saved for backward by the decoder layers (or the checkpoint inputs under GC,
    #: plus one layer's recomputed activations).
    ACTIVATIONS = "activations"
    #: Logits, their fp32 upcast for the loss, and the loss' softmax buffers / logit gradients.
    LOGITS = "logits"
    #: Casts cached by autocast (16-bit copies of fp32 weights while they are saved for backward).
    AUTOCAST_CACHE = "autocast_cache"
    #: Transient buffers at the peak: optimiser-step temporaries (foreach sqrt), DoRA's weight
    #: norm, QLoRA's dequantised weight, attention workspaces.
    TEMPORARIES = "temporaries"
    #: PPO rollout: the KV cache and the generated sequences' logits/log-probs.
    KV_CACHE = "kv_cache"
    #: Multi-GPU: parameters gathered for the units in flight (FSDP2's unsharded parameters and
    #: its flat all-gather buffers, DeepSpeed ZeRO-3's gathered partitions and prefetch), per rank.
    ALLGATHER_BUFFERS = "allgather_buffers"
    #: Multi-GPU: gradient communication buffers (DDP's gradient buckets, FSDP2's reduce-scatter
    #: input, DeepSpeed's reduce buckets), per rank.
    REDUCE_BUFFERS = "reduce_buffers"
    #: CUDA context: driver, runtime and lazily loaded kernels (outside the caching allocator).
    CUDA_CONTEXT = "cuda_context"
    #: cuBLAS/cuBLASLt workspaces (taken from the caching allocator, PyTorch PRs #89027, #120925).
    WORKSPACE = "workspace"
    #: Caching-allocator reserve beyond allocated bytes (rounding, fragmentation, cached blocks).
    ALLOCATOR_RESERVE = "allocator_reserve"

    @property
    def group(self) -> Group:
        return _GROUPS[self]

    @property
    def is_tensor(self) -> bool:
        """True for storages a dispatch mode sees (everything but runtime overheads)."""
        return _GROUPS[self] is not Group.RUNTIME


_GROUPS = {
    Component.WEIGHTS: Group.PARAMETERS,
    Component.QUANT_STATE: Group.PARAMETERS,
    Component.ADAPTERS: Group.PARAMETERS,
    Component.MASTER_WEIGHTS: Group.PARAMETERS,
    Component.GRADIENTS: Group.GRADIENTS,
    Component.OPTIMIZER_STATES: Group.OPTIMIZER,
    Component.ACTIVATIONS: Group.ACTIVATIONS,
    Component.LOGITS: Group.ACTIVATIONS,
    Component.AUTOCAST_CACHE: Group.TEMPORARIES,
    Component.TEMPORARIES: Group.TEMPORARIES,
    Component.KV_CACHE: Group.ACTIVATIONS,
    Component.ALLGATHER_BUFFERS: Group.PARAMETERS,
    Component.REDUCE_BUFFERS: Group.GRADIENTS,
    Component.CUDA_CONTEXT: Group.RUNTIME,
    Component.WORKSPACE: Group.RUNTIME,
    Component.ALLOCATOR_RESERVE: Group.RUNTIME,
}

TENSOR_COMPONENTS = tuple(c for c in Component if c.is_tensor)
#: Components allocated once while loading the model and resident through every phase of a step
#: (the load phase of ``vramplan.memory.combine_phases``; exempt from the default allocator reserve).
RESIDENT_COMPONENTS = (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS)


class Phase(str, Enum):
    """Phases of one steady-state training step (step >= 2, optimiser states exist)."""

    LOAD = "load"
    ROLLOUT = "rollout"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"


class Quantity(str, Enum):
    """Which memory figure a prediction is of (every output says which)."""

    #: Live tensor storages only (torch.cuda.max_memory_allocated, the dry run's peak).
    ALLOCATED = "allocated"
    #: The caching allocator's reserve (torch.cuda.max_memory_reserved).
    RESERVED = "reserved"
    #: What nvidia-smi shows for the process: reserve + CUDA context.
    DEVICE_TOTAL = "device_total"

"""The analytic memory model: every component of one training step, in bytes.

``model_state`` adds up what does not depend on the batch (weights, quantisation
constants, adapters, gradients, optimiser states, step temporaries, autocast's weight
casts) for every model copy the method's recipe holds; ``step_memory`` adds the
activations, logits and KV cache of a micro-batch and finds the peak phase. Batch and
sequence may be numpy arrays (vectorised over a grid); numpy only, no torch.

The two sides meet as typed values: :func:`step_terms` returns the batch-dependent
:class:`~vramplan.phases.StepTerms`, :func:`state_terms` the batch-independent
:class:`~vramplan.phases.StateTerms`, and :func:`vramplan.phases.combine_phases` (re-exported
here) turns them into the phases of a step (load, rollout, forward, backward, optimizer step)
and the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from . import activations as act
from .adapters import adapter_tensors, full_tensors
from .attention import scores_kernel
from .config import TrainConfig, fields_but
from .methods import Adapter, Forward, ModelCopy, Role
from .models import ModelSpec
from .optimizers import get_optimizer
from .phases import (PHASE_ORDER, TERM_NAMES, BackwardCasts, StateTerms, StepTerms,  # noqa: F401 (re-exported)
                     combine_phases, filled)
from .precision import DTYPE_BYTES, Regime
from .quant import nf4_bytes
from .taxonomy import RESIDENT_COMPONENTS, Component, Phase


@dataclass
class ModelState:
    """Batch-independent bytes of all model copies, by component, and parameter counts."""

    bytes: dict[Component, int] = field(default_factory=dict)
    params: int = 0            # parameters of the policy
    trainable_params: int = 0  # trainable parameters of all copies
    step_temporary: int = 0    # inside optimizer.step()
    largest_grad: int = 0      # bytes of the largest single trainable tensor's gradient
    head_cast: int = 0         # autocast's casts of the output heads' weights (saved by their matmuls)
    layer_cast: int = 0        # autocast's casts of one decoder layer's trainable weights
    attn_cast: int = 0         # ... of its attention block's
    layer_grad: int = 0        # gradients of one decoder layer's MLP block (full training)
    head_grad: int = 0         # gradients made before any layer's backward: the output head and final norm
    head_grad_cast: int = 0    # the 16-bit gradient of the head weight's autocast cast (beside its fp32 cast)
    grads_tail: int = 0        # gradients produced by the first layer's attention block and the embedding
    grads_end_extra: int = 0   # temporaries of the last gradient accumulation (tied embeddings)
    frozen_layer_casts: int = 0  # the decoder layers' part of AUTOCAST_CACHE made per use (frozen weights: not
    #                              cached, so freed in a checkpointed forward)
    load_reserved: int = 0     # bytes the caching allocator holds reserved after the model load (one GPU; 0:
    #                            nothing beyond the loaded tensors: vramplan.loadreserve)

    def add(self, comp: Component, n: int) -> None:
        self.bytes[comp] = self.bytes.get(comp, 0) + int(n)


ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")


def _attention_params(model: ModelSpec) -> int:
    names = {model.mod(r) for r in ATTENTION_LINEARS}
    return sum(l.params for l in model.layer_linears() if l.name in names)


def _copy_params(model: ModelSpec, copy: ModelCopy) -> int:
    if copy.head == "scalar":
        return model.params - model.lm_head_params + model.hidden_size  # score head h x 1
    return model.params


_STATE_CACHE: dict = {}
#: The techniques a model state reads (the optimiser's states offloaded to the CPU): :func:`model_state` is kept
#: by these alone of a configuration's techniques.
STATE_TECHNIQUES = frozenset({"opt_offload"})
_NO_TECHNIQUES: frozenset = frozenset()


def model_state(model: ModelSpec, cfg: TrainConfig) -> ModelState:
    """Weights, quantisation state, adapters, gradients and optimiser state of every held copy.

    Batch-independent, so a search over batch, sequence and checkpointing reuses one result
    (cached on the fields it reads -- of the techniques, those of :data:`STATE_TECHNIQUES`; callers get their
    own copy).
    """
    # (versions: a version-gated behaviour can change the adapter dtype or the optimizer kernel)
    key = (model, cfg.method, cfg.adapter, cfg.rank, cfg.targets, cfg.optimizer, cfg.precision, cfg.framework,
           STATE_TECHNIQUES.intersection(cfg.techniques) if cfg.techniques else _NO_TECHNIQUES, cfg.double_quant,
           cfg.versions, cfg.options)
    try:
        st = _STATE_CACHE.get(key)  # (one hash of the key)
    except TypeError:  # a spec built with list fields (from a log's JSON): not cacheable
        return _model_state(model, cfg)
    if st is None:
        if len(_STATE_CACHE) > 4096:
            _STATE_CACHE.clear()
        st = _STATE_CACHE[key] = _model_state(model, cfg)
    return _own_copy(st)


def _own_copy(st: ModelState) -> ModelState:
    """``replace(st, bytes=dict(st.bytes))`` without running ``__init__``: the caller's own copy of a cached
    state (a search asks for thousands)."""
    new = object.__new__(ModelState)
    new.__dict__.update(st.__dict__)
    new.bytes = dict(st.bytes)
    return new


_BASE_CACHE: dict = {}


def _model_state(model: ModelSpec, cfg: TrainConfig) -> ModelState:
    """:func:`model_state` uncached: the optimiser's states and step temporaries over the rest.

    The rest (:func:`_state_without_optimizer`) is kept on the fields it reads: not ``optimizer``, nor
    ``techniques`` (a technique acts on the step, not on what is held; the optimiser's offload is read here).
    """
    key = (model, cfg.method, cfg.adapter, cfg.rank, cfg.targets, cfg.precision, cfg.framework, cfg.double_quant,
           cfg.versions, cfg.options)
    try:
        base = _BASE_CACHE.get(key)
    except TypeError:  # an unhashable spec (list fields): not cacheable
        key, base = None, None
    if base is None:
        st, groups = _state_without_optimizer(model, cfg)
        base = st, tuple(groups)
        if key is not None:
            if len(_BASE_CACHE) > 4096:
                _BASE_CACHE.clear()
            _BASE_CACHE[key] = base
    st, opt_groups = base
    st = _own_copy(st)
    states, temporary = (0, 0) if cfg.uses("opt_offload") else _optimizer_bytes(cfg, opt_groups)
    st.add(Component.OPTIMIZER_STATES, states)
    st.step_temporary = temporary
    # (st.largest_grad: the largest of opt_groups' tensors, from the copies' shares)
    if cfg.recipe.adapter.quantized_base and cfg.behaves("torchao_nf4_unchunked_load"):
        # torchtune < 0.2.0 quantises on the GPU with torchao 0.1's unchunked to_nf4 (stacks.toml [behaviours])
        from .loadreserve import nf4_unchunked_load_reserved

        st.load_reserved = nf4_unchunked_load_reserved(cfg.stack.as_built(model), cfg)
    return st


#: :func:`_optimizer_bytes` by (optimiser name, runner name, groups): ``(optimiser, runner, (states, temporaries))``
_OPTIMIZER_CACHE: dict = {}


def _optimizer_bytes(cfg: TrainConfig, groups: tuple) -> tuple[int, int]:
    """``(states, step temporaries)`` in bytes of ``cfg``'s optimiser over the trainable tensors ``groups``
    (``OptimizerDef.total_state_bytes`` and ``step_temporary_bytes`` under the regime's runner), kept on what they
    read: the optimiser and the runner (these very definitions, held in the entry) and the groups -- a fit's
    hundreds of model states hold a few dozen sets of groups."""
    opt, regime = get_optimizer(cfg.optimizer), cfg.regime
    runner = regime.training_loop
    key = (opt.name, regime.runner, groups)
    try:
        kept = _OPTIMIZER_CACHE.get(key)
    except TypeError:  # unhashable groups (list shapes): worked out each time
        return opt.total_state_bytes(groups), opt.step_temporary_bytes(groups, regime.runner)
    if kept is not None and kept[0] is opt and kept[1] is runner:
        return kept[2]
    out = (opt.total_state_bytes(groups), opt.step_temporary_bytes(groups, regime.runner))
    if len(_OPTIMIZER_CACHE) > 1024:
        _OPTIMIZER_CACHE.clear()
    _OPTIMIZER_CACHE[key] = (opt, runner, out)
    return out


#: The components every model state lists, in this order (zero where no copy holds any).
_STATE_COMPONENTS = (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS,
                    Component.GRADIENTS, Component.OPTIMIZER_STATES, Component.AUTOCAST_CACHE)
#: :class:`ModelState` fields to which each copy adds its own bytes, and those that keep the largest copy's value.
_ADDED_FIELDS = ("trainable_params", "head_cast", "frozen_layer_casts")
_LARGEST_FIELDS = ("layer_cast", "attn_cast", "grads_tail", "layer_grad", "head_grad", "head_grad_cast",
                  "grads_end_extra", "largest_grad")


def _state_without_optimizer(model: ModelSpec, cfg: TrainConfig) -> tuple[ModelState, list]:
    """Every batch-independent byte but the optimiser's, and the trainable tensors the optimiser steps (and the
    largest one's gradient bytes, ``largest_grad``): the sum of every held copy's share (:func:`_copy_share`), bytes
    and added fields summed, the others the largest copy's -- one copy's share is its state."""
    model = cfg.stack.as_built(model)  # litgpt: a separate lm_head even when tied (stacks.toml untied_embeddings)
    regime = cfg.regime
    shares = [_copy_share(model, copy, cfg, regime) for copy in cfg.recipe.copies]
    if not shares:
        return _empty_state(model), []
    st = _own_copy(shares[0].state)
    opt_groups: list[tuple[tuple[int, ...], int, int]] = list(shares[0].groups)
    for share in shares[1:]:
        share.add_to(st)
        opt_groups += share.groups
    return st, opt_groups


def _empty_state(model: ModelSpec) -> ModelState:
    """The state of no copy: the spec's parameters, every component of :data:`_STATE_COMPONENTS` at zero."""
    return ModelState(bytes=_ZERO_BYTES.copy(), params=model.params)


_ZERO_BYTES = dict.fromkeys(_STATE_COMPONENTS, 0)  # (copied: no component hashed again)


class _Share:
    """One held copy's part of a :class:`ModelState` (:func:`_copy_share`): the state of this copy alone and its
    optimiser groups; to add it to another copy's state (:meth:`add_to`), its bytes by component in the order it
    adds them, its non-zero :data:`_ADDED_FIELDS` and :data:`_LARGEST_FIELDS` (worked out on first use: most
    recipes hold one copy)."""

    __slots__ = ("state", "groups", "_part")

    def __init__(self, state: ModelState, groups: tuple):
        self.state, self.groups, self._part = state, groups, None

    def add_to(self, st: ModelState) -> None:
        """Add this copy's bytes and added fields to ``st``; keep the larger of each of its largest fields."""
        part = self._part
        if part is None:
            own = self.state
            part = self._part = (tuple(own.bytes.items()),
                                 tuple((n, getattr(own, n)) for n in _ADDED_FIELDS if getattr(own, n)),
                                 tuple((n, getattr(own, n)) for n in _LARGEST_FIELDS if getattr(own, n)))
        b = st.bytes
        for comp, n in part[0]:
            b[comp] = b.get(comp, 0) + n
        for name, n in part[1]:
            setattr(st, name, getattr(st, name) + n)
        for name, n in part[2]:
            if n > getattr(st, name):
                setattr(st, name, n)


#: :func:`_copy_share` by the fields it reads: ``(stack, share)`` (the stack kept beside its ``id`` in the key)
_SHARE_CACHE: dict = {}


def _copy_share(model: ModelSpec, copy: ModelCopy, cfg: TrainConfig, regime: Regime) -> _Share:
    """:func:`_add_copy`'s share of one copy, kept on what it reads: the (as-built) spec; the copy's adapter,
    quantisation and head; the stack; the regime's dtypes; double quantisation (a 4-bit base), the rank (an
    adapter) and the targets (an adapter, or a 4-bit base a stack quantises only where adapted). A search
    asks for the same few dozen shares hundreds of times, for configurations differing elsewhere."""
    stack, adapter, quantized = cfg.stack, copy.adapter, copy.quantized
    peft = adapter is not None and adapter is not Adapter.FULL
    key = (model, adapter, quantized, copy.head, id(stack), regime.trainable_dtype, regime.frozen_dtype,
           regime.adapter_dtype, regime.autocast, regime.compute_dtype, quantized and cfg.double_quant,
           cfg.rank if peft else None, cfg.targets if peft or quantized else None)
    try:
        kept = _SHARE_CACHE.get(key)
    except TypeError:  # an unhashable spec (list fields): worked out each time
        return _new_share(model, copy, cfg, regime)
    if kept is not None and kept[0] is stack:
        return kept[1]
    share = _new_share(model, copy, cfg, regime)
    if len(_SHARE_CACHE) > 4096:
        _SHARE_CACHE.clear()
    _SHARE_CACHE[key] = (stack, share)
    return share


def _new_share(model: ModelSpec, copy: ModelCopy, cfg: TrainConfig, regime: Regime) -> _Share:
    """:func:`_copy_share` worked out: :func:`_add_copy` into an empty state."""
    st = _empty_state(model)
    groups = _add_copy(st, model, copy, cfg, regime)
    st.largest_grad = max((math.prod(shape) * pb for shape, _c, pb in groups), default=0)
    return _Share(st, tuple(groups))


def _add_copy(st: ModelState, model: ModelSpec, copy: ModelCopy, cfg: TrainConfig, regime: Regime) -> list:
    """Add one held copy's bytes to ``st``; return its trainable tensors as optimiser groups."""
    n = _copy_params(model, copy)
    # what bitsandbytes quantises: nn.Linear weights of the decoder layers (not biases, embeddings,
    # lm_head, norms -- nor fused MoE expert parameters, which are not nn.Linear in transformers >= 5)
    quantizable = quantized_linears(model, cfg) if copy.quantized else []
    non_linear = n - model.num_layers * sum(l.count * l.in_features * l.out_features for l in quantizable)
    # the stack's fp32 RoPE cache buffers (torchtune; stacks.toml rope_cache)
    st.add(Component.WEIGHTS, cfg.stack.rope_cache_bytes(model, copy.adapter is not None and copy.adapter.is_peft))
    if copy.adapter is Adapter.FULL:
        return _add_full_copy(st, model, copy, regime, n)
    # a frozen base, maybe with an adapter
    if copy.quantized:
        _add_quantized_base(st, model, copy, cfg, regime, (quantizable, non_linear))
    else:
        st.add(Component.WEIGHTS, n * DTYPE_BYTES[regime.frozen_dtype])
        if copy.trains and copy.adapter is not None and casts_frozen_base(regime):
            _add_frozen_casts(st, model, copy, regime)
    if copy.adapter is None:
        return []
    ab = DTYPE_BYTES[regime.adapter_dtype]
    groups, count = _adapter_groups(model, copy.adapter, cfg.rank, cfg.targets, copy.head, ab)
    st.trainable_params += count
    st.add(Component.ADAPTERS, count * ab)
    st.add(Component.GRADIENTS, count * ab)
    if regime.autocast is not None and not copy.adapter.ia3:
        st.add(Component.AUTOCAST_CACHE, count * DTYPE_BYTES[regime.compute_dtype])
    return list(groups)


#: :func:`_adapter_groups` by its arguments
_ADAPTER_GROUPS: dict = {}


def _adapter_groups(model: ModelSpec, adapter: Adapter, rank: int, targets: tuple, head: str,
                    nbytes: int) -> tuple[tuple, int]:
    """The optimiser groups ``(shape, count, nbytes)`` of ``adapter``'s tensors on ``model`` (and a scalar head's
    ``1 x hidden`` value head beside them), and their parameters; kept by the arguments (a search asks for a few
    dozen hundreds of times)."""
    key = (model, adapter, rank, targets, head, nbytes)
    try:
        kept = _ADAPTER_GROUPS.get(key)
    except TypeError:  # an unhashable spec (list fields): worked out each time
        return _new_adapter_groups(model, adapter, rank, targets, head, nbytes)
    if kept is None:
        if len(_ADAPTER_GROUPS) > 1024:
            _ADAPTER_GROUPS.clear()
        kept = _ADAPTER_GROUPS[key] = _new_adapter_groups(model, adapter, rank, targets, head, nbytes)
    return kept


def _new_adapter_groups(model: ModelSpec, adapter: Adapter, rank: int, targets: tuple, head: str,
                        nbytes: int) -> tuple[tuple, int]:
    """:func:`_adapter_groups` worked out."""
    tensors = [(t.shape, t.count) for t in adapter_tensors(model, adapter, rank, targets)]
    if head == "scalar":
        tensors.append(((1, model.hidden_size), 1))  # the value head trains beside the adapter
    count = sum(math.prod(s) * c for s, c in tensors)
    return tuple((s, c, nbytes) for s, c in tensors), count


def _add_quantized_base(st: ModelState, model: ModelSpec, copy: ModelCopy, cfg: TrainConfig, regime: Regime,
                        linears: tuple[list, int]) -> None:
    """A 4-bit frozen base: the packed NF4 linears (``linears``: those quantised, and the parameters left
    16-bit), their quantisation state, and the head's autocast cast when the rest is upcast to fp32."""
    quantizable, non_linear = linears
    packed, qs = 0, 0
    for l in quantizable:
        p, q = nf4_bytes(l.in_features * l.out_features, cfg.double_quant)
        packed += p * l.count * model.num_layers
        qs += q * l.count * model.num_layers
    if cfg.stack.quantizes_head and copy.head == "lm" and not model.tie_embeddings:
        # the stack quantises every nn.Linear, the lm_head included (stacks.toml quantizes_head)
        hp = model.vocab_size * model.hidden_size
        p, q = nf4_bytes(hp, cfg.double_quant)
        packed, qs, non_linear = packed + p, qs + q, non_linear - hp
    kbit = copy.trains and cfg.stack.kbit_upcast  # prepare_model_for_kbit_training upcasts the rest to fp32
    nb = 4 if kbit else DTYPE_BYTES[regime.frozen_dtype]
    st.add(Component.WEIGHTS, packed + non_linear * nb)
    st.add(Component.QUANT_STATE, qs)
    if kbit and regime.autocast is not None and copy.head == "lm":
        # autocast casts the fp32 lm_head (or tied embedding) for its matmul; the frozen weight's
        # cast is saved for the input gradient, alive from the loss forward to its backward
        head = model.vocab_size * model.hidden_size * DTYPE_BYTES[regime.compute_dtype]
        st.add(Component.AUTOCAST_CACHE, head)
        st.head_cast += head


def casts_frozen_base(regime: Regime) -> bool:
    """Whether autocast casts a 16-bit, non-quantised frozen base for every matmul: the frozen weights are
    wider than the compute dtype (litgpt bf16-mixed: Fabric keeps them fp32, stacks.toml mixed_frozen_dtype)."""
    return regime.autocast is not None and DTYPE_BYTES[regime.frozen_dtype] > DTYPE_BYTES[regime.compute_dtype]


def _add_frozen_casts(st: ModelState, model: ModelSpec, copy: ModelCopy, regime: Regime) -> None:
    """Autocast's casts of a wide frozen base, saved by their matmuls for the input gradient.

    PyTorch's autocast caches a cast only for a leaf that requires grad (``cached_cast``'s
    ``can_try_cache``: ``arg.requires_grad() && arg.is_leaf()``), so a frozen fp32 weight is cast anew at
    every use and each 16-bit copy is what its ``mm`` saves (``mm_mat1_backward`` needs ``mat2``): one
    copy of every decoder-layer linear (the adapted ones' base weights included) and of the lm_head per
    use (its chunks: :func:`frozen_head_chunk_casts`). Under checkpointing only the recomputed layer's
    are alive in backward (:func:`backward_casts`)."""
    c = DTYPE_BYTES[regime.compute_dtype]
    layer = sum(l.params for l in model.layer_linears() if l.is_linear)
    head = model.vocab_size * model.hidden_size if copy.head == "lm" else 0
    st.add(Component.AUTOCAST_CACHE, (model.num_layers * layer + head) * c)
    st.frozen_layer_casts += model.num_layers * layer * c
    st.head_cast += head * c
    st.layer_cast = max(st.layer_cast, layer * c)
    st.attn_cast = max(st.attn_cast, _attention_params(model) * c)


def frozen_head_chunk_casts(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime, T, rows):
    """Bytes of the frozen lm_head's casts beyond the first (:func:`_add_frozen_casts`) when the stack runs
    the head over chunks of each sequence (litgpt ``lm_head_chunk_size=128``): every chunk's matmul casts
    the fp32 weight again and saves its copy (0 for an unchunked head, a trainable or a 16-bit one)."""
    if not (copy.trains and copy.head == "lm" and copy.adapter is not None and copy.adapter.is_peft
            and not copy.quantized and casts_frozen_base(regime)):
        return 0
    mode, chunks = act.loss_mode_chunks(cfg, copy, regime, T, rows)
    if mode != "chunked" or not cfg.stack.loss_chunk_tokens:
        return 0
    return (np.ceil(np.asarray(chunks, dtype=np.float64) - 1e-9) - 1) * model.vocab_size * model.hidden_size \
        * DTYPE_BYTES[regime.compute_dtype]


def _add_full_copy(st: ModelState, model: ModelSpec, copy: ModelCopy, regime: Regime, n: int) -> list:
    """Add a fully trained copy of ``n`` parameters to ``st``; return its tensors as optimiser groups."""
    opt_groups: list[tuple[tuple[int, ...], int, int]] = []
    wb = DTYPE_BYTES[regime.trainable_dtype]
    st.add(Component.WEIGHTS, n * wb)
    st.add(Component.GRADIENTS, n * wb)
    st.trainable_params += n
    tensors = full_tensors(model, copy.head)
    attn = _attention_params(model)
    opt_groups += [(shape, cnt, wb) for shape, cnt in tensors]
    # backward ends with the first layer's attention block (its MLP ran backward before it)
    # and the embedding (tied: accumulated into the lm_head's existing gradient)
    embed = 0 if (model.tie_embeddings and copy.head == "lm") else model.embedding_params
    st.grads_tail = max(st.grads_tail, (attn + embed) * wb)
    st.layer_grad = max(st.layer_grad, (model.layer_params - attn) * wb)
    head_p = (model.lm_head_params if copy.head == "lm" else model.hidden_size) + model.final_norm_params
    st.head_grad = max(st.head_grad, head_p * wb)
    if model.tie_embeddings and copy.head == "lm":
        # the embedding's dense gradient is accumulated into the lm_head's: two V x h
        # buffers beside every gradient at the very end of backward (measured by the dry run)
        st.grads_end_extra = max(st.grads_end_extra, 2 * model.embedding_params * wb)
    if regime.autocast is not None:
        # autocast caches a 16-bit cast of every weight a matmul uses (leaf tensors requiring grad)
        # (fused MoE expert banks are plain parameters that autocast never casts)
        c = DTYPE_BYTES[regime.compute_dtype]
        head = model.vocab_size * model.hidden_size if copy.head == "lm" else 0
        layer = sum(l.params for l in model.layer_linears() if l.is_linear)
        st.add(Component.AUTOCAST_CACHE, (model.num_layers * layer + head) * c)
        st.head_cast += head * c
        if c != wb:  # the head's matmul backward makes the cast's 16-bit gradient; its ToCopy backward casts it up
            st.head_grad_cast = max(st.head_grad_cast, head * c)
        st.layer_cast = max(st.layer_cast, layer * c)
        st.attn_cast = max(st.attn_cast, attn * c)
    return opt_groups


@dataclass
class StepMemory:
    """Tensor bytes of one step: components at the peak and the peak of every phase (arrays)."""

    components: dict[Component, np.ndarray]
    phases: dict[Phase, np.ndarray]
    peak: np.ndarray
    peak_phase: np.ndarray  # index into PHASE_ORDER
    state: ModelState



def quantized_linears(model: ModelSpec, cfg: TrainConfig) -> list:
    """The decoder-layer linears QLoRA quantises: every ``nn.Linear`` (bitsandbytes), or only the
    adapted ones where the stack's builder says so (stacks.toml ``nf4_adapted_only``)."""
    linears = [l for l in model.layer_linears() if l.is_linear]
    if model.linear_subclass and cfg.stack.bnb_exact_linear:
        # transformers >= 5 replace_with_bnb_linear converts ``type(module) is nn.Linear`` only: Falcon's
        # FalconLinear stays 16-bit (and prepare_model_for_kbit_training upcasts it: stacks.toml bnb_exact_linear)
        return []
    if cfg.stack.quantises_only_adapted(model):
        linears = [l for l in linears if l.name in cfg.targets]
    return linears


def _dequant_temp(model: ModelSpec, regime: Regime, cfg: TrainConfig) -> int:
    """QLoRA: the working set of dequantising one layer's largest quantised weight of n elements:
    n x (a + b x compute dtype bytes) with ``(a, b)`` the stack's ``dequant_temp`` -- (0, 1) for
    bitsandbytes MatMul4Bit (the dequantised weight), (8, 3) for torchao NF4Tensor (stacks.toml)."""
    linears = quantized_linears(model, cfg) if cfg.stack.quantises_only_adapted(model) else model.layer_linears()
    largest = max((l.in_features * l.out_features for l in linears), default=0)
    per, copies = cfg.stack.dequant_temp
    return largest * (per + copies * DTYPE_BYTES[regime.compute_dtype])


#: Input groups of a decoder layer's linears: linears of one group read one tensor.
_INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in", "o_proj": "o_proj",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "shared_expert_gate": "mlp_in",
                "down_proj": "down_proj",
                # GPT-NeoX / Falcon names (the catalogue's layer_linears for those architectures)
                "query_key_value": "attn_in", "dense": "o_proj", "dense_h_to_4h": "mlp_in", "dense_4h_to_h": "down_proj"}


def bnb_ctx_input_bytes(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime, T):
    """Bytes bitsandbytes < 0.43.2 ``MatMul4Bit`` keeps on ``ctx`` for a whole forward of ``T`` tokens:
    each 4-bit linear's input ``A`` (cast to the compute dtype) -- one tensor per group of linears
    reading the same input (norm outputs, the attention output, the MLP product) in every layer, and
    the final norm's output when the stack quantises the lm_head. Layer 0's attention input needs no
    gradient (a frozen embedding): ``ctx.tensors = (None, None)`` there.

    ``ctx.tensors`` is a plain attribute, not ``save_for_backward``: autograd's backward does not
    release it; it dies with the graph (bitsandbytes 0.42.0 ``autograd/_functions.py``
    ``MatMul4Bit.forward``; fixed by commit 9e753741, PR #1270, in 0.43.2). 0 when the behaviour
    is off or the copy is not a trained adapter over a 4-bit base.
    """
    if not (copy.adapter is not None and copy.adapter.quantized_base and copy.quantized and copy.trains
            and cfg.behaves("bnb_4bit_saves_input")):
        return np.zeros_like(np.asarray(T, dtype=np.float64))
    c = DTYPE_BYTES[regime.compute_dtype]
    widths: dict[str, int] = {}
    for lin in quantized_linears(model, cfg):
        g = _INPUT_GROUP.get(lin.name)
        if g is not None:
            widths[g] = lin.in_features
    per_layer = sum(widths.values())
    per_tok = model.num_layers * per_layer - widths.get("attn_in", 0)
    if cfg.stack.quantizes_head and copy.head == "lm" and not model.tie_embeddings:
        per_tok += model.hidden_size  # the final norm's output, read by the 4-bit lm_head's chunks
    return np.asarray(T, dtype=np.float64) * c * per_tok


def _dora_largest(model: ModelSpec, cfg: TrainConfig):
    """The adapted linear whose DoRA weight-norm buffers are largest (None without one)."""
    lins = [l for l in model.layer_linears() if l.is_linear and l.name in cfg.targets]
    return max(lins, key=lambda l: 4 * l.in_features * l.out_features + l.in_features ** 2, default=None)


def _dora_norm_temp(model: ModelSpec, cfg: TrainConfig, regime: Regime) -> int:
    """DoRA: PEFT's weight norm ``||W + s * B @ A||`` builds four dense copies of the largest adapted
    weight in the adapter dtype (W cast, B @ A, its scaled copy, the sum), in every forward, beside
    the identity ``get_lora_weight`` pushes through the adapter (``torch.eye(in_features)``, saved
    by lora_A while ``lora_weight``'s graph lives) (PEFT ``DoraLinearLayer``, peft/tuners/lora/dora.py)."""
    lin = _dora_largest(model, cfg)
    if lin is None:
        return 0
    return (4 * lin.in_features * lin.out_features + lin.in_features ** 2) * DTYPE_BYTES[regime.adapter_dtype]


def _dora_prefix(model: ModelSpec, cfg: TrainConfig, copy, regime: Regime, T, s):
    """What a checkpointed layer's recomputation has saved again when its largest DoRA module builds
    its weight norm: the attention block's input side (the norm, the projections' inputs and outputs)
    when that module is an input projection of attention; else the whole layer (a bound)."""
    lin = _dora_largest(model, cfg)
    if lin is not None and lin.name in {model.mod(r) for r in ("q_proj", "k_proj", "v_proj", "qkv_proj")}:
        return act.layer_activation_bytes(model, cfg, copy, regime, T, s, part="attention_inputs")
    return act.layer_activation_bytes(model, cfg, copy, regime, T, s)


def fused_layer_applies(cfg: TrainConfig, copy: ModelCopy, model: ModelSpec | None = None) -> bool:
    """The stack's own decoder-layer kernels run this copy (stacks.toml ``fused_lora_layers``): Unsloth
    patches LoRA/QLoRA layers with its fast_lora autograd functions only without LoRA dropout (a dropout
    layer sends PEFT's own forward) and not for DoRA, IA3 or full fine-tuning."""
    return (cfg.stack.fused_lora_layers and copy.adapter.low_rank and not copy.adapter.dora
            and not cfg.dropout)


def fused_layer_bytes(model: ModelSpec, regime: Regime, T, attention_only: bool = False):
    """Saved bytes of one decoder layer run by Unsloth's kernels, for ``T`` tokens (16-bit activations).

    Source: unslothai/unsloth @3c789bc8 (2025-01-14). Per token, in the compute dtype: the input
    RMSNorm's input ``X`` (kernels/rms_layernorm.py saves X, W and a fp32 1/rms per row), LoRA_QKV's
    normalised input (kernels/fast_lora.py saves X and the LoRA A/B weights only), flash_attn_func's
    q, k, v (un-expanded K/V; RoPE rotated in place by Fast_RoPE_Embedding, which saves cos/sin only),
    its output (also LoRA_W's saved input: a view of the same storage) and fp32 log-sum-exp per head;
    the post-attention RMSNorm's input (the residual sum) and 1/rms; LoRA_MLP's normalised input X,
    gate output e and up output g (the SwiGLU product h is recomputed in backward). No fp32 copy of
    any row exists (the HF/PEFT layer saves fp32 norm upcasts and every intermediate of the MLP).
    ``attention_only``: the attention block's share (the MLP's saved tensors freed).
    """
    d = DTYPE_BYTES[regime.compute_dtype]
    h, q, kv, i = model.hidden_size, model.q_dim, model.kv_dim, model.intermediate_size
    attn = d * (2 * h + q + 2 * kv + q) + 4 * model.num_heads + 4
    if attention_only:
        return np.asarray(T, dtype=np.float64) * attn
    mlp = d * (2 * h + 2 * i) + 4
    return np.asarray(T, dtype=np.float64) * (attn + mlp)


def fused_layer_transient(model: ModelSpec, regime: Regime, T):
    """Buffers of a fused (Unsloth) layer's backward beyond its saved tensors, for ``T`` tokens.

    Unsloth_Offloaded_Gradient_Checkpointer.backward (unsloth_zoo @36ff5fc3) holds the recomputed
    layer output and the incoming gradient dY while ``torch.autograd.backward`` runs; LoRA_MLP's
    backward allocates DW = dY @ W_down^T (T x intermediate) and writes everything else in place
    (the SwiGLU backward into DW/e/g, dX into X)."""
    d = DTYPE_BYTES[regime.compute_dtype]
    return np.asarray(T, dtype=np.float64) * d * (2 * model.hidden_size + model.intermediate_size)


def _stack_activations(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime, T, s, layer=None):
    """Saved activations of the decoder stack of a copy that trains: ``(kept, recomputed)``.

    ``kept`` is what is alive when the loss's backward starts; ``recomputed`` what a
    checkpointed layer's recomputation adds while that layer runs backward. ``layer``: one layer's
    saved tensors (:func:`vramplan.activations.layer_activation_bytes` of these arguments) when the
    caller has them.

    * no checkpointing: every layer's saved tensors (layer 0's input needs no gradient unless
      the copy trains fully or checkpointing made the inputs require grad);
    * gradient checkpointing (HF, non-reentrant, per decoder layer): each layer's input kept,
      one layer recomputed in backward; with ``gc_offload`` (Unsloth) the inputs live in host memory;
    * ``selective_ckpt``: every second layer checkpointed (torchtune ``ac_option=2``);
    * ``act_offload``: saved tensors moved to host memory, two layers (current + prefetched) on the GPU.
    """
    kbit = cfg.stack.kbit_upcast
    L = model.num_layers
    full_layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s) if layer is None else layer
    if fused_layer_applies(cfg, copy, model):
        full_layer = fused_layer_bytes(model, regime, T)
    offload = cfg.uses("act_offload")
    if cfg.grad_ckpt:
        # (Unsloth < 2024.4 checkpointed with torch.utils.checkpoint: inputs on the GPU; stacks.toml [behaviours])
        gc_offload = cfg.stack.gc_offload and not cfg.behaves("unsloth_gc_on_gpu")
        ckpt_in = act.checkpoint_input_bytes(model, copy, regime, T, kbit)
        kept = ckpt_in if (gc_offload or offload) else L * ckpt_in
        return kept, full_layer
    if cfg.uses("selective_ckpt"):
        ck = L // 2
        return (L - ck) * full_layer + ck * act.checkpoint_input_bytes(model, copy, regime, T, kbit), full_layer
    first_grad = copy.adapter is Adapter.FULL
    first = act.layer_activation_bytes(model, cfg, copy, regime, T, s, input_requires_grad=first_grad)
    if offload:
        return 2 * full_layer, 0 * full_layer
    return (L - 1) * full_layer + first, 0 * full_layer


def attention_as_run(model: ModelSpec, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the attention the stack really runs: SDPA that only the math backend can take
    (transformers' Falcon multi-query: ``ModelSpec.sdpa_math``) materialises its scores like eager
    attention, and is planned as eager (the dry run: within a few % of it; eager's fp32 softmax is the
    safe side of the math backend's); a model that runs its own attention (BLOOM: ``eager_only``), a
    soft-capped model on a stack whose own attention computes those scores by hand (torchtune, litgpt:
    ``Stack.softcap_by_hand``) and SDPA that transformers refuses (:func:`sdpa_refused`: Gemma-2 from
    5.21) are planned as eager too."""
    kernel = cfg.attention
    if kernel.materialises_scores:
        return cfg
    hf = cfg.stack.transformers_modules
    scores = ((kernel.torch_sdpa and model.sdpa_math and hf)  # Falcon multi-query: SDPA's math backend only
              or (model.eager_only and hf)  # BLOOM: its own ALiBi attention (baddbmm scores, fp32 softmax)
              or (model.attn_logit_softcapping and cfg.stack.softcap_by_hand)  # torchtune, litgpt: Gemma-2 by hand
              or sdpa_refused(model, cfg))  # Gemma-2, transformers >= 5.21: no SDPA; the default falls back to eager
    return cfg.with_(attn=scores_kernel().name) if scores else cfg


def ties_stand_in(model: ModelSpec, cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s attention, one that stands in for another (``AttentionKernel.same_as``: flash-attn for
    SDPA, which dispatches to the same FlashAttention-2 kernels), is planned to the byte as that other here:
    both run as the same kernel (:func:`attention_as_run`: neither, or both, planned as eager), and SDPA gets no
    mask and no composite flash-attn would not (no padded batch, no sliding window shorter than the sequence:
    :func:`vramplan.activations.sdpa_masked_fraction` zero; for a method that generates, no fp32 attention over
    grouped kv heads, which SDPA runs as its math composite: ``methods.grpo``'s no-grad layer work).

    False when it cannot tell: the search then evaluates the two apart (exact, only slower).
    tests/test_attention.py holds every True against the two configurations' step terms and work.
    """
    same = cfg.attention.same_as
    if same is None:
        return False
    twin = cfg.with_(attn=same)
    run, twin_run = attention_as_run(model, cfg), attention_as_run(model, twin)
    if (run is cfg) != (twin_run is twin):  # one of them is planned as eager, the other not
        return False
    if run is not cfg:  # both planned as eager: the same configuration from here
        return run.attn == twin_run.attn
    if np.any(act.sdpa_masked_fraction(model, twin, cfg.seq) > 0):
        return False
    if cfg.recipe.behaviour.generates and model.kv_dim < model.q_dim:
        d = act.copy_dtypes(cfg.recipe.copies[0], cfg.regime, cfg.stack.kbit_upcast)
        if d.attn == 4 or d.residual == 4:
            return False
    return True


def sdpa_refused(model: ModelSpec, cfg: TrainConfig) -> bool:
    """Whether the stack's transformers refuses the SDPA that ``cfg`` asks for (``ModelSpec.sdpa_unsupported``:
    ``_supports_sdpa = False``, Gemma-2 from transformers 5.21.0) and so runs eager attention; before 5.21
    (stacks.toml [behaviours.sdpa_drops_softcap]) SDPA ran with the softcap dropped."""
    return (cfg.attention.torch_sdpa and model.sdpa_unsupported and cfg.stack.transformers_modules
            and not cfg.behaves("sdpa_drops_softcap"))


class _TermsSum:
    """:class:`StepTerms` under construction: each copy of the recipe adds to some terms (saved
    activations, logits) and raises the running maximum of others (one layer's buffers)."""

    def __init__(self, zeros: np.ndarray):
        self.terms = dict.fromkeys(TERM_NAMES, zeros)

    def add(self, **terms) -> None:
        t = self.terms
        for name, v in terms.items():
            t[name] = t[name] + v

    def peak(self, **terms) -> None:
        t = self.terms
        for name, v in terms.items():
            t[name] = np.maximum(t[name], v)

    def build(self, **final) -> StepTerms:
        return StepTerms(**{**self.terms, **final})


def step_terms(model: ModelSpec, cfg: TrainConfig, batch=None, seq=None,
               ranks: tuple[int, ...] | None = None) -> StepTerms:
    """The batch-dependent terms of a step (:class:`vramplan.phases.StepTerms`, bytes over batch/seq),
    shared by :func:`step_memory` and the sharded planner (:func:`vramplan.distributed.parallel_step_memory`).

    Each copy of the recipe adds its terms: a frozen copy its no-grad forward (:func:`_nograd_copy_peak`),
    a training copy its saved decoder stack (:func:`_stack_activations`), the layer running backward
    (:func:`_layer_terms`), its head and loss (:func:`_head_terms`) and its temporaries
    (:func:`_temporary_terms`); then the loss's kept logits, a reference's eager scores, the rollout and
    the shared attention mask; last the method's own hook (``Behaviour.step_terms``).

    ``ranks``: the LoRA ranks to evaluate in this one pass (a tuple; None: the config's own rank). The configuration
    is taken with its rank a tuple, a rank axis (:func:`vramplan.activations.rank_column`): the terms that read the
    rank (through a layer's saved tensors) gain a leading axis, one row per rank, and the others keep the grid's
    shape; :meth:`vramplan.phases.StepTerms.rank_rows` splits them. Everything between the layer's sums and the
    terms is element-wise, so each row equals, to the byte, the terms of ``cfg`` with that rank.
    """
    if ranks is not None:
        cfg = cfg.with_(rank=tuple(ranks))
    cfg = attention_as_run(model, cfg)
    model = cfg.stack.as_built(model)
    recipe = cfg.recipe
    b = np.asarray(cfg.batch if batch is None else batch, dtype=np.float64)
    s = np.asarray(cfg.seq if seq is None else seq, dtype=np.float64)
    rows = b * recipe.sequences_per_example  # sequences through a training forward
    T = rows * s  # tokens
    zeros = np.zeros(np.broadcast(b, s).shape)
    acc = _TermsSum(zeros)
    for copy in recipe.copies:
        if copy.forward is Forward.NO_GRAD:
            acc.peak(nograd_peak=_nograd_copy_peak(model, cfg, copy, T, s, rows))
            continue
        # one layer's saved tensors, read by the stack and by the layer running backward (computed once)
        layer = act.layer_activation_bytes(model, cfg, copy, cfg.regime, T, s)
        kept, recompute = _stack_activations(model, cfg, copy, cfg.regime, T, s, layer)
        acc.peak(recompute=recompute, **_layer_terms(model, cfg, copy, T, s, zeros, layer))
        saved, logits_fwd, logits_bwd = _head_terms(model, cfg, copy, T, rows, kept)
        # what the final norm and the head saved: freed by their backward, before any layer's
        acc.add(acts=saved, logits_fwd=logits_fwd, logits_bwd=logits_bwd, head_acts=saved - kept)
        if cfg.stack.keeps_last_graph:
            # the loop keeps the last step's graph until this step's loss exists (stacks.toml
            # keeps_last_graph): what its nodes still hold after backward sits beside this forward
            acc.add(last_graph=bnb_ctx_input_bytes(model, cfg, copy, cfg.regime, T))
        _temporary_terms(acc, model, cfg, copy, T, s, zeros)
    kept_logits = _kept_logits(model, cfg, T)
    if kept_logits is not None:  # (None: no logits kept, the term stays zero)
        acc.add(logits_kept=kept_logits)
    scores = _reference_scores(model, cfg, T, s)
    if scores is not None:
        acc.peak(attn_fwd=scores)
    if recipe.behaviour.generates:
        acc.terms.update(_rollout_terms(model, cfg, b, s, zeros))
    if recipe.copies[0].forward is not Forward.NONE:
        # without checkpointing nothing keeps the mask for backward (eager's ``+ mask`` saves nothing; SDPA saves
        # its own converted bias): it is gone before any layer's backward (the dry run); checkpointing keeps it as
        # every layer's input
        mask = act.attention_mask_bytes(model, cfg, cfg.regime, b, s)
        acc.add(acts=mask, head_acts=0.0 if cfg.grad_ckpt else mask)
    policy = recipe.copies[0]
    dora = acc.terms["dora_prefix"] if (policy.adapter is not None and policy.adapter.dora) else acc.terms["layer"]
    terms = acc.build(dora_prefix=dora)
    return recipe.behaviour.step_terms(model, cfg, terms, b, s)


def _nograd_copy_peak(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, T, s, rows):
    """A frozen copy's no-grad forward (a reference model): one layer's working set at a time (its
    saved-if-trained tensors, and eager attention's scores at the softmax) plus its logits."""
    regime = cfg.regime
    f, _ = act.logits_bytes(model, copy, regime, T, copy.head, cfg, rows)
    working = act.layer_activation_bytes(model, cfg, copy, regime, T, s)
    working = working + act.eager_attention_work(model, cfg, copy, regime, T, s)[0]  # scores at softmax
    return f + working


def _layer_terms(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, T, s, zeros, layer=None) -> dict:
    """The decoder layer running backward, for a training copy: its saved tensors (``layer``, and its
    attention block's: ``layer_attn``), its backward buffers (``transient``) and eager attention's
    working sets (``attn_fwd``, ``attn_bwd``). Unsloth's fused kernels (:func:`fused_layer_bytes`) run
    their own flash attention whatever the requested kernel: no eager working set. Under checkpointing
    a layer's forward keeps nothing: its attention block is all working set. ``layer``: as
    :func:`_stack_activations`'s."""
    regime = cfg.regime
    if fused_layer_applies(cfg, copy, model):
        attn_layer = fused_layer_bytes(model, regime, T, attention_only=True)
        fused_transient = fused_layer_transient(model, regime, T)
        return dict(layer=fused_layer_bytes(model, regime, T), layer_attn=attn_layer,
                    transient=fused_transient, transient_linear=fused_transient,
                    attn_fwd=zeros + (attn_layer if cfg.grad_ckpt else 0), attn_bwd=zeros)
    attn_layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s, part="attention")
    ef, eb = act.eager_attention_work(model, cfg, copy, regime, T, s)
    if layer is None:
        layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s)
    # without checkpointing ``acts`` holds the whole last layer, whose MLP block is not made yet at its softmax
    ahead = 0 if (cfg.grad_ckpt or not cfg.attention.materialises_scores) else layer - attn_layer
    transient = act.layer_backward_transient(model, copy, regime, T, cfg.stack.kbit_upcast, tuple(cfg.targets))
    return dict(layer=layer, layer_attn=attn_layer, transient=transient,
                transient_linear=act.linear_backward_transient(model, copy, regime, T, transient,
                                                               cfg.stack.kbit_upcast, tuple(cfg.targets)),
                attn_fwd=ef + (attn_layer if cfg.grad_ckpt else 0) - ahead, attn_bwd=eb)


def _head_terms(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, T, rows, stack_saved):
    """A training copy's head: ``(saved, logits_fwd, logits_bwd)`` bytes.

    ``saved``: the decoder stack's saved activations (``stack_saved``) plus the final norm's saved tensors -- its fp32 upcast (HF RMSNorm), or Unsloth's kernel's
    16-bit input and a fp32 1/rms per row; with a trainable lm_head also the norm's output it saves
    (and torchtune's fp32 normalised input, stacks.toml ``norm_fp32``). The logits and loss:
    :func:`vramplan.activations.logits_bytes`, plus a 4-bit lm_head dequantised whole for every
    chunk's matmul, in forward and backward (the stack's ``dequant_temp`` of V x h elements)."""
    regime, h = cfg.regime, model.hidden_size
    if fused_layer_applies(cfg, copy, model):  # Unsloth's final RMSNorm kernel
        saved = stack_saved + T * (DTYPE_BYTES[regime.compute_dtype] * h + 4)
    else:
        saved = stack_saved + T * 4 * h  # final norm's fp32 upcast
    if copy.adapter is Adapter.FULL:
        d = act.copy_dtypes(copy, regime, cfg.stack.kbit_upcast)
        saved = saved + T * d.norm_out * h  # final norm output saved by the trainable lm_head
        if cfg.stack.norm_fp32:  # and the fp32 normalised input its weight's multiply saves (torchtune)
            saved = saved + T * 4 * h
    f, bw = act.logits_bytes(model, copy, regime, T, copy.head, cfg, rows)
    if copy.quantized and cfg.stack.quantizes_head and copy.head == "lm" and not model.tie_embeddings:
        per, copies_ = cfg.stack.dequant_temp
        hq = model.vocab_size * h * (per + copies_ * DTYPE_BYTES[regime.compute_dtype])
        f, bw = f + hq, bw + hq
    hc = frozen_head_chunk_casts(model, cfg, copy, regime, T, rows)  # litgpt's chunked head over a wide frozen base
    if type(hc) is int and hc == 0:  # none (adding an integer zero changes no byte count)
        return saved, f, bw
    return saved, f + hc, bw + hc


def _temporary_terms(acc: _TermsSum, model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, T, s, zeros) -> None:
    """A training copy's temporaries: QLoRA's dequantised weight (:func:`_dequant_temp`, forward and
    backward), DoRA's weight-norm buffers (:func:`_dora_norm_temp`; in backward too when checkpointing
    recomputes the forward) and what a recomputed layer has saved when they are built (:func:`_dora_prefix`)."""
    if copy.quantized:
        acc.peak(temps_fwd=_dequant_temp(model, cfg.regime, cfg) + zeros)
    if copy.adapter is not None and copy.adapter.dora:
        acc.peak(temps_fwd_only=_dora_norm_temp(model, cfg, cfg.regime) + zeros,
                 dora_prefix=_dora_prefix(model, cfg, copy, cfg.regime, T, s))
        if cfg.grad_ckpt:
            acc.peak(temps_recompute=acc.terms["temps_fwd_only"])


def _fp32_logit_bytes(cfg: TrainConfig, regime: Regime) -> float:
    """Bytes per logit of the policy's logits as TRL's losses see them: fp32 when the model computes
    in fp32 or when the HF Trainer's accelerate converts its output, else the model's dtype."""
    pol = act.copy_dtypes(cfg.recipe.copies[0], regime, cfg.stack.kbit_upcast)
    return 4.0 if (pol.logits == 4 or regime.training_loop.fp32_outputs) else float(pol.logits)


def _kept_logits(model: ModelSpec, cfg: TrainConfig, T):
    """Logits a step keeps through its whole backward: TRL PPO keeps the response logits (a view of
    the whole sequence's) for its entropy statistic, computed after backward (runtime/steps.py
    ppo_step); None for other losses (none kept)."""
    if cfg.recipe.method.loss != "response_logps":
        return None
    return T * model.vocab_size * _fp32_logit_bytes(cfg, cfg.regime)


def _reference_scores(model: ModelSpec, cfg: TrainConfig, T, s):
    """TRL DPO with eager attention (``AttentionKernel.materialises_scores``): the reference's no-grad forward
    runs beside the policy's saved activations and its fp32 logits (accelerate converts); each of its eager
    layers holds the scores at softmax (nothing saved under no_grad). None when there is no such forward."""
    if not cfg.attention.materialises_scores:
        return None
    recipe = cfg.recipe
    roles = {c.role for c in recipe.copies} | set(recipe.shared_roles)
    if Role.REFERENCE not in roles or recipe.behaviour.generates:
        return None
    regime = cfg.regime
    ref = next((c for c in recipe.copies if c.role is Role.REFERENCE), recipe.copies[0])
    ef, _ = act.eager_attention_work(model, cfg, ref, regime, T, s, grad=False)
    scores = ef + act.layer_activation_bytes(model, cfg, ref, regime, T, s, part="attention")
    return scores + T * model.vocab_size * _fp32_logit_bytes(cfg, regime)


def _rollout_terms(model: ModelSpec, cfg: TrainConfig, b, s, zeros) -> dict:
    """The rollout of a method that generates: the KV cache of every generated sequence (prompt +
    generated = the sequence) and what the rollout holds beside it (``kv``, ``rollout_logits``)."""
    recipe, regime = cfg.recipe, cfg.regime
    policy = recipe.copies[0]
    gb = b * recipe.behaviour.generation(cfg, s).sequences_per_example  # sequences generated
    kv = act.kv_cache_bytes(model, regime, policy, gb, s, cfg.stack.kbit_upcast) + zeros
    return dict(kv=kv, rollout_logits=act.rollout_logits_bytes(model, cfg, policy, gb, s, kv))


def backward_casts(st: ModelState, cfg: TrainConfig) -> BackwardCasts:
    """Autocast's weight casts seen by backward. Under checkpointing the layers saved nothing in
    forward, so only the heads' casts are still saved when backward starts, and each recomputed
    layer casts its weights again; without it every cast made in forward is saved by its matmul."""
    cache = st.bytes.get(Component.AUTOCAST_CACHE, 0)
    head = min(cache, st.head_cast)
    return BackwardCasts(cache_bwd=head if cfg.grad_ckpt else cache,
                         recompute_cache=st.layer_cast if cfg.grad_ckpt else 0,
                         layer_cache=st.layer_cast, attn_cache=st.attn_cast, head_cache=head)


def step_gradients(st: ModelState, cfg: TrainConfig) -> int:
    """Gradient bytes alive at once through backward and the optimiser step: every gradient, or with the step inside
    backward (``opt_in_bwd``) only the largest (each is consumed and freed as soon as it is ready)."""
    return st.largest_grad if cfg.uses("opt_in_bwd") else st.bytes[Component.GRADIENTS]


def state_terms(st: ModelState, cfg: TrainConfig, grads_held=0) -> StateTerms:
    """The batch-independent terms :func:`combine_phases` takes from a :class:`ModelState` (bytes).

    With the optimiser step inside backward (``opt_in_bwd``) each gradient is consumed and freed
    as soon as it is ready: only the largest one is alive at a time. ``grads_held``: gradients
    alive through a micro-batch (:func:`held_gradients`).
    """
    in_bwd = cfg.uses("opt_in_bwd")
    grads = step_gradients(st, cfg)
    # a frozen weight's per-use casts are saved by its layer's matmuls: a checkpointed forward frees them
    cache = st.bytes[Component.AUTOCAST_CACHE] - (st.frozen_layer_casts if cfg.grad_ckpt else 0)
    return StateTerms(states=st.bytes[Component.OPTIMIZER_STATES], cache=cache,
                      casts=backward_casts(st, cfg), grads_bwd=grads, grads_opt=grads,
                      grads_tail=0 if in_bwd else st.grads_tail, grads_end_extra=st.grads_end_extra,
                      layer_grad=0 if in_bwd else st.layer_grad, head_grad=0 if in_bwd else st.head_grad,
                      head_grad_cast=0 if in_bwd else st.head_grad_cast,
                      step_temporary=st.step_temporary, rollout_on=cfg.recipe.behaviour.generates,
                      grads_held=grads_held)


def resident_floor(model: ModelSpec, cfg: TrainConfig, st: ModelState | None = None, optimizer: bool = True) -> int:
    """A lower bound (bytes) on :func:`step_memory`'s peak at every micro-batch and sequence length.

    The larger of the two batch-independent phases :func:`combine_phases` builds: loading (the
    resident weights, quantisation state, adapters and master weights) and the optimiser step
    (those plus optimiser states, gradients and the step's temporaries). Every step's peak is
    the largest of its phases, so it is at least this. ``optimizer=False``: without the
    optimiser's states and temporaries (the part that depends on the optimiser), a bound for
    every optimiser at once.
    """
    st = st or model_state(model, cfg)
    # state_terms' states, step temporary and grads_opt, read without building the rest of its StateTerms
    grads = step_gradients(st, cfg)
    static = sum(st.bytes.get(c, 0) for c in RESIDENT_COMPONENTS)
    own = st.bytes[Component.OPTIMIZER_STATES] + st.step_temporary if optimizer else 0
    return int(static + max(0, own + grads))


def step_memory(model: ModelSpec, cfg: TrainConfig, batch=None, seq=None, grad_accum=None,
                components: "bool | frozenset" = True) -> StepMemory:
    """Peak tensor bytes of a steady-state step of ``cfg`` on ``model``, by component and phase.

    ``batch``, ``seq`` and ``grad_accum`` default to the config's; arrays broadcast. With gradient
    accumulation (``grad_accum > 1``) every micro-batch after the first runs its forward and backward
    beside the gradients the earlier ones summed (``zero_grad`` runs only after the optimizer step):
    the HF Trainer, torchtune, litgpt (finetune/full.py ``fabric.no_backward_sync`` loop) and any
    plain loop accumulate into ``param.grad``. Full fine-tuning: one more copy of the trainable
    weights at the forward's end; adapters: their (small) gradients. ``components``: as
    :func:`vramplan.phases.combine_phases` (a set: only those components at the peak, for a caller that reads
    no other).
    """
    st = model_state(model, cfg)
    t = step_terms(model, cfg, batch, seq)
    phases, peak, idx, comps = combine_phases(t, st.bytes, state_terms(st, cfg, held_gradients(st, cfg, grad_accum)),
                                              components=components)
    return StepMemory(components=comps, phases=phases, peak=peak, peak_phase=idx, state=st)


def _grid_key(values) -> tuple | None:
    """A hashable key of a batch or sequence grid (None: the config's own)."""
    if values is None:
        return None
    a = np.asarray(values)
    return (a.dtype.str, a.shape, a.tobytes())


def held_gradients(st: ModelState, cfg: TrainConfig, grad_accum=None):
    """Gradient bytes alive through a micro-batch's forward and backward (:class:`StateTerms`'
    ``grads_held``): every gradient when the step accumulates (``grad_accum > 1``, the config's unless
    given; arrays broadcast), none with the optimiser step inside backward (which refuses accumulation)."""
    if cfg.uses("opt_in_bwd"):
        return 0
    accum = np.asarray(cfg.grad_accum if grad_accum is None else grad_accum)
    return np.where(accum > 1, st.bytes[Component.GRADIENTS], 0)


def step_memory_rows(model: ModelSpec, cfgs: list[TrainConfig], batch=None, seq=None,
                     grad_accum=None) -> tuple[StepMemory, list]:
    """:func:`step_memory` of several configurations at once: every array gains a leading axis, one row per config.

    The configurations must share the method's rollout (a search's candidates do). The
    activation terms (:func:`step_terms`) are evaluated once per configuration that differs in
    more than its optimiser (the optimiser changes only the model state), and the phase
    arithmetic (:func:`combine_phases`) once for all rows: the same element-wise operations on
    the same values as one :func:`step_memory` call per row, so every row equals it to the byte.

    Returns:
        ``(memory, states)``: a :class:`StepMemory` whose arrays have shape ``(len(cfgs), *grid)``
        (its ``state`` is None) and each row's :class:`ModelState`.
    """
    return step_memory_rows_shared(model, cfgs, batch, seq, grad_accum)


#: The techniques :func:`step_terms` does not read: they change when gradients are freed (the optimiser step inside
#: backward) or where the optimiser's states live (host memory), not what a forward and its backward hold -- the
#: model state and the phases' state terms read them (:data:`STATE_TECHNIQUES`, :func:`state_terms`). The activation
#: terms :func:`step_memory_rows_shared` keeps are keyed without them (:func:`terms_fields`), so a technique trial of
#: ``recommend_techniques`` that only adds one of them reuses the terms without it (tests/test_lead11_speed.py).
TERMS_BLIND_TECHNIQUES = frozenset({"opt_in_bwd", "opt_offload"})


def terms_fields(cfg: TrainConfig) -> tuple:
    """The fields of ``cfg`` that :func:`step_terms` reads: all but the optimiser, and of the techniques those outside
    :data:`TERMS_BLIND_TECHNIQUES` (in their order, last): equal for two configurations exactly when they differ at
    most in those (:func:`~vramplan.config.fields_but`'s values, the techniques filtered)."""
    techs = cfg.techniques
    if techs and not TERMS_BLIND_TECHNIQUES.isdisjoint(techs):
        techs = tuple(t for t in techs if t not in TERMS_BLIND_TECHNIQUES)
    return fields_but(cfg, "optimizer", "techniques") + (techs,)


def step_memory_rows_shared(model: ModelSpec, cfgs: list[TrainConfig], batch=None, seq=None, grad_accum=None,
                            terms: dict | None = None, components: "bool | frozenset" = True,
                            states: list | None = None) -> tuple[StepMemory, list]:
    """:func:`step_memory_rows`; ``terms``: a dict the caller keeps to reuse each configuration's activation
    terms between calls over the same ``batch`` and ``seq`` grids (one planning call: a fit's searches share
    their fallbacks' configurations); equal keys, equal values, and nothing writes into them. ``components``:
    as :func:`vramplan.phases.combine_phases` (a set: only the components the caller reads). ``states``: each
    configuration's :func:`model_state`, when the caller has them."""
    if len({c.recipe.behaviour.generates for c in cfgs}) > 1:
        raise ValueError("step_memory_rows: configurations that generate and that do not")
    states = [model_state(model, c) for c in cfgs] if states is None else list(states)
    by_terms: dict = {} if terms is None else terms
    try:
        hash(model)
    except TypeError:  # a spec built with list fields (from a log's JSON): nothing kept between calls
        by_terms = {}
    grid = (_grid_key(batch), _grid_key(seq))
    distinct: list[StepTerms] = []  # each configuration's terms once (those of several optimisers are one object)
    at: dict[int, int] = {}  # id of one of them -> its place in ``distinct``
    rows = []
    keys = [(model, terms_fields(c), grid) for c in cfgs]  # (the activation terms do not read the optimiser)
    fill_step_terms(model, cfgs, keys, batch, seq, by_terms)
    for k in keys:
        terms = by_terms[k]
        j = at.setdefault(id(terms), len(at))
        if j == len(distinct):
            distinct.append(terms)
        rows.append(j)
    # one row per configuration: the distinct terms stacked, then each configuration's row taken
    t = StepTerms.stack(distinct)
    if len(distinct) < len(rows):
        t = t.take(np.array(rows, dtype=np.intp))
    extra = (1,) * (t.zeros.ndim - 1)

    def column(values) -> np.ndarray:
        return np.asarray(values, dtype=np.int64).reshape((len(cfgs),) + extra)

    present = set().union(*[st.bytes for st in states])  # the components some row has, in Component's order:
    base = {comp: column([st.bytes.get(comp, 0) for st in states]) for comp in Component if comp in present}
    # gradients held through accumulated micro-batches: (rows, 1...) x the accumulation grid
    held = _held_rows(states, cfgs, grad_accum, t.zeros.shape[1:], column)
    s = _stack_state_terms([state_terms(st, c) for st, c in zip(states, cfgs)], column, held)
    phases, peak, idx, comps = combine_phases(t, base, s, components=components)
    return StepMemory(components=comps, phases=phases, peak=peak, peak_phase=idx, state=None), states


def fill_step_terms(model: ModelSpec, cfgs: list[TrainConfig], keys: list, batch, seq, by_terms: dict) -> None:
    """Put in ``by_terms`` the activation terms (:func:`step_terms` over ``batch`` and ``seq``, broadcast to the grid)
    of each of ``cfgs`` whose key (``keys``, in order: the caller's, one that tells apart configurations whose terms
    differ -- :func:`step_memory_rows_shared`'s, the sharded search's) is not there yet. Low-rank configurations equal but in their rank, alpha and optimiser
    (no term reads alpha or the optimiser) are evaluated in one pass over their ranks (``step_terms``' ``ranks``: a
    rank axis), each rank's row (:meth:`StepTerms.rank_rows`) kept under its own configuration's key: the same
    values as one call per configuration (tests/test_rank11_speed.py). The others, and a rank alone in its group,
    take one call each."""
    groups: dict = {}  # the fields but rank, alpha and optimiser -> {rank: the keys of its configurations}
    firsts: dict = {}  # the same -> its first configuration (the one evaluated over the group's ranks)
    pending = set()
    for c, k in zip(cfgs, keys):
        if k in by_terms or k in pending:
            continue
        if c.recipe.adapter.low_rank:
            g = fields_but(c, "optimizer", "rank", "alpha")
            groups.setdefault(g, {}).setdefault(c.rank, []).append(k)
            firsts.setdefault(g, c)
            pending.add(k)
            continue
        t = step_terms(model, c, batch, seq)
        by_terms[k] = t.broadcast(t.zeros.shape)
    for g, by_rank in groups.items():
        c = firsts[g]
        if len(by_rank) == 1:  # one rank: the configuration's own terms
            t = step_terms(model, c, batch, seq)
            rows = [t.broadcast(t.zeros.shape)]
        else:
            t = step_terms(model, c, batch, seq, ranks=tuple(by_rank))
            rows = t.rank_rows(len(by_rank), t.zeros.shape)
        for row, ks in zip(rows, by_rank.values()):
            for k in ks:
                by_terms[k] = row


def _held_rows(states: list, cfgs: list[TrainConfig], grad_accum, grid: tuple, column) -> np.ndarray:
    """:func:`held_gradients` of every row, filled to ``grid`` and stacked (rows x grid). With an accumulation grid
    given, one ``np.where`` over a column of each row's gradients (0 with the step inside backward): the same
    element-wise choice, int64 as each row's; without one (each configuration's own accumulation), row by row."""
    if grad_accum is None or np.ndim(grad_accum) > len(grid):
        return np.array([filled(held_gradients(st, c, grad_accum), grid) for st, c in zip(states, cfgs)])
    grads = column([0 if c.uses("opt_in_bwd") else st.bytes[Component.GRADIENTS] for st, c in zip(states, cfgs)])
    return filled(np.where(np.asarray(grad_accum) > 1, grads, 0), (len(cfgs),) + grid)


def _stack_state_terms(rows: list[StateTerms], column, grads_held) -> StateTerms:
    """One :class:`StateTerms` of column arrays (``column``: values -> a ``(rows, 1...)`` array) from one per
    configuration; the rollout flag is shared (the rows agree on it) and ``grads_held`` given whole."""
    casts = BackwardCasts(**{f.name: column([getattr(r.casts, f.name) for r in rows]) for f in fields(BackwardCasts)})
    cols = {f.name: column([getattr(r, f.name) for r in rows]) for f in fields(StateTerms)
            if f.name not in ("casts", "rollout_on", "grads_held")}
    return StateTerms(**cols, casts=casts, rollout_on=rows[0].rollout_on, grads_held=grads_held)

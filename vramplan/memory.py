"""The analytic memory model: every component of one training step, in bytes.

``model_state`` adds up what does not depend on the batch (weights, quantisation
constants, adapters, gradients, optimiser states, step temporaries, autocast's weight
casts) for every model copy the method's recipe holds; ``step_memory`` adds the
activations, logits and KV cache of a micro-batch and finds the peak phase. Batch and
sequence may be numpy arrays (vectorised over a grid); numpy only, no torch.

Phases of a steady-state step (step >= 2: optimiser states exist, gradients were freed
by ``zero_grad(set_to_none=True)``):

* forward: static + states + saved activations + forward logits/loss buffers
* backward: static + states + max(saved activations + loss backward buffers,
  all gradients + one layer's backward transients)
* optimizer_step: static + states + gradients + the optimiser's temporaries
* rollout (PPO): static + states + KV cache of the generated sequences
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import activations as act
from .adapters import adapter_tensors, full_tensors
from .config import TrainConfig
from .methods import Adapter, Forward, ModelCopy, Role
from .models import ModelSpec
from .optimizers import get_optimizer
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
    grads_tail: int = 0        # gradients produced by the first layer's attention block and the embedding
    grads_end_extra: int = 0   # temporaries of the last gradient accumulation (tied embeddings)

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


def model_state(model: ModelSpec, cfg: TrainConfig) -> ModelState:
    """Weights, quantisation state, adapters, gradients and optimiser state of every held copy.

    Batch-independent, so a search over batch, sequence and checkpointing reuses one result
    (cached on the fields it reads; callers get their own copy).
    """
    # (versions: a version-gated behaviour can change the adapter dtype or the optimizer kernel)
    key = (model, cfg.method, cfg.adapter, cfg.rank, cfg.targets, cfg.optimizer, cfg.precision, cfg.framework,
           cfg.techniques, cfg.double_quant, cfg.versions, cfg.options)
    try:
        hash(key)
    except TypeError:  # a spec built with list fields (from a log's JSON): not cacheable
        return _model_state(model, cfg)
    st = _STATE_CACHE.get(key)
    if st is None:
        if len(_STATE_CACHE) > 4096:
            _STATE_CACHE.clear()
        st = _STATE_CACHE[key] = _model_state(model, cfg)
    return replace(st, bytes=dict(st.bytes))


_BASE_CACHE: dict = {}


def _model_state(model: ModelSpec, cfg: TrainConfig) -> ModelState:
    """:func:`model_state` uncached: the optimiser's states and step temporaries over the rest."""
    key = (model, cfg.method, cfg.adapter, cfg.rank, cfg.targets, cfg.precision, cfg.framework, cfg.techniques,
           cfg.double_quant, cfg.versions, cfg.options)
    try:
        base = _BASE_CACHE.get(key)
    except TypeError:  # an unhashable spec (list fields): not cacheable
        key, base = None, None
    if base is None:
        base = _state_without_optimizer(model, cfg)
        if key is not None:
            if len(_BASE_CACHE) > 4096:
                _BASE_CACHE.clear()
            _BASE_CACHE[key] = base
    st, opt_groups = base
    st = replace(st, bytes=dict(st.bytes))
    opt = get_optimizer(cfg.optimizer)
    offload = cfg.uses("opt_offload")
    st.add(Component.OPTIMIZER_STATES, 0 if offload else opt.total_state_bytes(opt_groups))
    st.step_temporary = 0 if offload else opt.step_temporary_bytes(opt_groups, cfg.regime.runner)
    st.largest_grad = max((math.prod(shape) * pb for shape, _c, pb in opt_groups), default=0)
    return st


def _state_without_optimizer(model: ModelSpec, cfg: TrainConfig) -> tuple[ModelState, list]:
    """Every batch-independent byte but the optimiser's, and the trainable tensors the optimiser steps."""
    model = cfg.stack.as_built(model)  # litgpt: a separate lm_head even when tied (stacks.toml untied_embeddings)
    regime = cfg.regime
    recipe = cfg.recipe
    st = ModelState(params=model.params)
    for comp in (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS,
                 Component.GRADIENTS, Component.OPTIMIZER_STATES, Component.AUTOCAST_CACHE):
        st.bytes[comp] = 0
    opt_groups: list[tuple[tuple[int, ...], int, int]] = []
    for copy in recipe.copies:
        n = _copy_params(model, copy)
        # what bitsandbytes quantises: nn.Linear weights of the decoder layers (not biases, embeddings,
        # lm_head, norms -- nor fused MoE expert parameters, which are not nn.Linear in transformers >= 5)
        quantizable = quantized_linears(model, cfg) if copy.quantized else []
        non_linear = n - model.num_layers * sum(l.count * l.in_features * l.out_features for l in quantizable)
        # the stack's fp32 RoPE cache buffers (torchtune; stacks.toml rope_cache)
        st.add(Component.WEIGHTS, cfg.stack.rope_cache_bytes(model, copy.adapter is not None and copy.adapter.is_peft))
        if copy.adapter is Adapter.FULL:
            opt_groups += _add_full_copy(st, model, copy, regime, n)
            continue
        # a frozen base, maybe with an adapter
        if copy.quantized:
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
        else:
            st.add(Component.WEIGHTS, n * DTYPE_BYTES[regime.frozen_dtype])
        if copy.adapter is None:
            continue
        ab = DTYPE_BYTES[regime.adapter_dtype]
        tensors = [(t.shape, t.count) for t in adapter_tensors(model, copy.adapter, cfg.rank, cfg.targets)]
        if copy.head == "scalar":
            tensors.append(((1, model.hidden_size), 1))  # the value head trains beside the adapter
        count = sum(math.prod(s) * c for s, c in tensors)
        st.trainable_params += count
        st.add(Component.ADAPTERS, count * ab)
        st.add(Component.GRADIENTS, count * ab)
        opt_groups += [(s, c, ab) for s, c in tensors]
        if regime.autocast is not None and not copy.adapter.ia3:
            st.add(Component.AUTOCAST_CACHE, count * DTYPE_BYTES[regime.compute_dtype])
    return st, opt_groups


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


PHASE_ORDER = (Phase.LOAD, Phase.ROLLOUT, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP)


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
        return act.layer_activation_bytes(model, cfg, copy, regime, T, s, attention_inputs_only=True)
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


def _stack_activations(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime, T, s):
    """Saved activations of the decoder stack of a copy that trains: ``(kept, recomputed)``.

    ``kept`` is what is alive when the loss's backward starts; ``recomputed`` what a
    checkpointed layer's recomputation adds while that layer runs backward.

    * no checkpointing: every layer's saved tensors (layer 0's input needs no gradient unless
      the copy trains fully or checkpointing made the inputs require grad);
    * gradient checkpointing (HF, non-reentrant, per decoder layer): each layer's input kept,
      one layer recomputed in backward; with ``gc_offload`` (Unsloth) the inputs live in host memory;
    * ``selective_ckpt``: every second layer checkpointed (torchtune ``ac_option=2``);
    * ``act_offload``: saved tensors moved to host memory, two layers (current + prefetched) on the GPU.
    """
    kbit = cfg.stack.kbit_upcast
    L = model.num_layers
    full_layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s)
    if fused_layer_applies(cfg, copy, model):
        full_layer = fused_layer_bytes(model, regime, T)
    ckpt_in = act.checkpoint_input_bytes(model, copy, regime, T, kbit)
    offload = cfg.uses("act_offload")
    if cfg.grad_ckpt:
        # (Unsloth < 2024.4 checkpointed with torch.utils.checkpoint: inputs on the GPU; stacks.toml [behaviours])
        gc_offload = cfg.stack.gc_offload and not cfg.behaves("unsloth_gc_on_gpu")
        kept = ckpt_in if (gc_offload or offload) else L * ckpt_in
        return kept, full_layer
    if cfg.uses("selective_ckpt"):
        ck = L // 2
        return (L - ck) * full_layer + ck * ckpt_in, full_layer
    first_grad = copy.adapter is Adapter.FULL
    first = act.layer_activation_bytes(model, cfg, copy, regime, T, s, input_requires_grad=first_grad)
    if offload:
        return 2 * full_layer, 0 * full_layer
    return (L - 1) * full_layer + first, 0 * full_layer


def attention_as_run(model: ModelSpec, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the attention the stack really runs: SDPA that only the math backend can take
    (transformers' Falcon multi-query: ``ModelSpec.sdpa_math``) materialises its scores like eager
    attention, and is planned as eager (the dry run: within a few % of it; eager's fp32 softmax is the
    safe side of the math backend's)."""
    if cfg.attn == "sdpa" and model.sdpa_math and cfg.stack.transformers_modules:
        return cfg.with_(attn="eager")
    return cfg


def step_terms(model: ModelSpec, cfg: TrainConfig, batch=None, seq=None) -> dict[str, np.ndarray]:
    """The batch-dependent terms of a step (arrays over batch/seq), shared by :func:`step_memory`
    and the sharded planner (:func:`vramplan.distributed.parallel_step_memory`).

    Keys: acts (saved activations alive when backward starts, incl. the shared attention mask),
    recompute (a checkpointed layer's recomputed activations), layer (the saved tensors of the
    layer running backward; layer_attn: its attention block's), logits_fwd, logits_bwd,
    transient (one layer's backward buffers), nograd_peak (frozen copies' forward working set),
    temps_fwd (QLoRA's dequantised weight, in forward and backward), temps_fwd_only (DoRA's
    weight-norm buffers in forward), temps_recompute (the same in a checkpointed layer's
    recomputation, before its backward's buffers exist), kv (PPO KV cache), rollout_logits, head_acts (the
    final norm's and the head's saved tensors, in acts, freed before any layer runs backward), zeros.
    """
    cfg = attention_as_run(model, cfg)
    model = cfg.stack.as_built(model)
    regime = cfg.regime
    kbit = cfg.stack.kbit_upcast
    recipe = cfg.recipe
    b = np.asarray(cfg.batch if batch is None else batch, dtype=np.float64)
    s = np.asarray(cfg.seq if seq is None else seq, dtype=np.float64)
    rows = b * recipe.sequences_per_example  # sequences through a training forward
    T = rows * s  # tokens
    zeros = np.zeros(np.broadcast(b, s).shape)
    acts, recompute, layer, layer_attn, logits_fwd, logits_bwd = (zeros.copy() for _ in range(6))
    transient, nograd_peak, temps_fwd, kv = zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy()
    temps_fwd_only, temps_recompute = zeros.copy(), zeros.copy()
    last_graph, head_acts = zeros.copy(), zeros.copy()
    attn_fwd, attn_bwd, rec_prefix = zeros.copy(), zeros.copy(), zeros.copy()
    for copy in recipe.copies:
        if copy.forward is Forward.NO_GRAD:
            # frozen copies run under no_grad: only one layer's working set at a time plus their logits
            f, _ = act.logits_bytes(model, copy, regime, T, copy.head, cfg, rows)
            working = act.layer_activation_bytes(model, cfg, copy, regime, T, s)
            working = working + act.eager_attention_work(model, cfg, copy, regime, T, s)[0]  # scores at softmax
            nograd_peak = np.maximum(nograd_peak, f + working)
            continue
        a, r = _stack_activations(model, cfg, copy, regime, T, s)
        recompute = np.maximum(recompute, r)
        fused = fused_layer_applies(cfg, copy, model)
        if fused:
            layer = np.maximum(layer, fused_layer_bytes(model, regime, T))
            layer_attn = np.maximum(layer_attn, fused_layer_bytes(model, regime, T, attention_only=True))
        else:
            layer = np.maximum(layer, act.layer_activation_bytes(model, cfg, copy, regime, T, s))
            layer_attn = np.maximum(layer_attn, act.layer_activation_bytes(model, cfg, copy, regime, T, s,
                                                                           attention_only=True))
        d = act.copy_dtypes(copy, regime, kbit)
        a_layers = a
        if fused:  # Unsloth's final RMSNorm kernel saves its 16-bit input and a fp32 1/rms per row
            a = a + T * (DTYPE_BYTES[regime.compute_dtype] * model.hidden_size + 4)
        else:
            a = a + T * 4 * model.hidden_size  # final norm's fp32 upcast
        if copy.adapter is Adapter.FULL:
            a = a + T * d.norm_out * model.hidden_size  # final norm output saved by the trainable lm_head
            if cfg.stack.norm_fp32:  # and the fp32 normalised input its weight's multiply saves (torchtune)
                a = a + T * 4 * model.hidden_size
        # what the final norm and the head saved: freed by their backward, before any layer's
        head_acts = head_acts + (a - a_layers)
        f, bw = act.logits_bytes(model, copy, regime, T, copy.head, cfg, rows)
        if copy.quantized and cfg.stack.quantizes_head and copy.head == "lm" and not model.tie_embeddings:
            # a 4-bit lm_head is dequantised whole for every chunk's matmul, in forward (beside the
            # logits of the chunks before) and in backward: the stack's dequant_temp of V x h elements
            per, copies_ = cfg.stack.dequant_temp
            hq = model.vocab_size * model.hidden_size * (per + copies_ * DTYPE_BYTES[regime.compute_dtype])
            f, bw = f + hq, bw + hq
        acts += a
        logits_fwd += f
        logits_bwd += bw
        if cfg.stack.keeps_last_graph:
            # the loop keeps the last step's graph until this step's loss exists (stacks.toml
            # keeps_last_graph): what its nodes still hold after backward sits beside this forward
            last_graph = last_graph + bnb_ctx_input_bytes(model, cfg, copy, regime, T)
        if fused:
            transient = np.maximum(transient, fused_layer_transient(model, regime, T))
            # Unsloth runs its own flash attention whatever the requested kernel: no eager working set
            ef, eb = zeros, zeros
            attn_layer = fused_layer_bytes(model, regime, T, attention_only=True)
        else:
            transient = np.maximum(transient, act.layer_backward_transient(model, copy, regime, T, s, cfg.attn, kbit,
                                                                                tuple(cfg.targets)))
            ef, eb = act.eager_attention_work(model, cfg, copy, regime, T, s)
            attn_layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s, attention_only=True)
        # (under checkpointing a layer's forward keeps nothing: its attention block is all working set)
        attn_fwd = np.maximum(attn_fwd, ef + (attn_layer if cfg.grad_ckpt else 0))
        attn_bwd = np.maximum(attn_bwd, eb)
        if copy.quantized:
            temps_fwd = np.maximum(temps_fwd, _dequant_temp(model, regime, cfg) + zeros)
        if copy.adapter is not None and copy.adapter.dora:  # in backward too when checkpointing recomputes the forward
            temps_fwd_only = np.maximum(temps_fwd_only, _dora_norm_temp(model, cfg, regime) + zeros)
            rec_prefix = np.maximum(rec_prefix, _dora_prefix(model, cfg, copy, regime, T, s))
            if cfg.grad_ckpt:
                temps_recompute = np.maximum(temps_recompute, temps_fwd_only)
    rollout_logits = zeros.copy()
    logits_kept = zeros.copy()
    if recipe.method.loss == "response_logps":
        # TRL PPO keeps the response logits (a view of the whole sequence's) for its entropy statistic,
        # computed after backward: they stay alive through every layer's backward (runtime/steps.py ppo_step)
        pol = act.copy_dtypes(recipe.copies[0], regime, kbit)
        lg = 4.0 if (pol.logits == 4 or regime.runner == "trainer") else float(pol.logits)
        logits_kept = logits_kept + T * model.vocab_size * lg
    roles = {c.role for c in recipe.copies} | set(recipe.shared_roles)
    if cfg.attn == "eager" and Role.REFERENCE in roles and not recipe.behaviour.generates:
        # TRL DPO: the reference's no-grad forward runs beside the policy's saved activations and its
        # fp32 logits; each of its eager layers holds the scores at softmax (nothing saved under no_grad)
        ref = next((c for c in recipe.copies if c.role is Role.REFERENCE), recipe.copies[0])
        ef, _ = act.eager_attention_work(model, cfg, ref, regime, T, s)
        scores = ef + act.layer_activation_bytes(model, cfg, ref, regime, T, s, attention_only=True)
        pol = act.copy_dtypes(recipe.copies[0], regime, kbit)
        fp32_logits = 4.0 if (pol.logits == 4 or regime.runner == "trainer") else float(pol.logits)  # (accelerate converts)
        attn_fwd = np.maximum(attn_fwd, scores + T * model.vocab_size * fp32_logits)
    if recipe.behaviour.generates:
        # the KV cache of every generated sequence (prompt + generated = the sequence) and the rollout's logits
        policy = recipe.copies[0]
        gb = b * recipe.behaviour.generation(cfg, s).sequences_per_example  # sequences generated
        kv = act.kv_cache_bytes(model, regime, policy, gb, s, kbit) + zeros
        rollout_logits = act.rollout_logits_bytes(model, cfg, policy, gb, s, kv)
    if recipe.copies[0].forward is not Forward.NONE:
        acts = acts + act.attention_mask_bytes(model, cfg, regime, b, s)
    terms = {"acts": acts, "recompute": recompute, "layer": layer, "layer_attn": layer_attn, "logits_fwd": logits_fwd,
            "logits_bwd": logits_bwd, "transient": transient, "nograd_peak": nograd_peak, "temps_fwd": temps_fwd,
            "temps_fwd_only": temps_fwd_only, "temps_recompute": temps_recompute, "kv": kv,
            "rollout_logits": rollout_logits, "attn_fwd": attn_fwd, "attn_bwd": attn_bwd, "logits_kept": logits_kept,
            "dora_prefix": rec_prefix if (recipe.copies[0].adapter is not None and recipe.copies[0].adapter.dora) else layer,
            "last_graph": last_graph, "head_acts": head_acts, "zeros": zeros}
    return recipe.behaviour.step_terms(model, cfg, terms, b, s)


def backward_casts(st: ModelState, cfg: TrainConfig) -> dict[str, int]:
    """Autocast's weight casts seen by backward (:func:`combine_phases`' ``cache_bwd`` and
    ``recompute_cache``). Under checkpointing the layers saved nothing in forward, so only the
    heads' casts are still saved when backward starts, and each recomputed layer casts its
    weights again; without it every cast made in forward is saved by its matmul."""
    cache = st.bytes.get(Component.AUTOCAST_CACHE, 0)
    head = min(cache, st.head_cast)
    return {"cache_bwd": head if cfg.grad_ckpt else cache, "recompute_cache": st.layer_cast if cfg.grad_ckpt else 0,
            "layer_cache": st.layer_cast, "attn_cache": st.attn_cast, "head_cache": head}


def combine_phases(t: dict[str, np.ndarray], base: dict[Component, int], *, states, cache, cache_bwd,
                   recompute_cache, layer_cache=0, attn_cache=0, head_cache=0, grads_bwd, grads_opt, step_temporary, rollout_on: bool, grads_tail=0,
                   grads_end_extra=0, layer_grad=0, head_grad=0, comm=0, gathered=0,
                   rollout_gather=0, components: bool = True, gathered_fwd_mid=None, gathered_bwd_start=None,
                   gathered_bwd_work=None, gathered_bwd_end=None, comm_component=None, gathered_component=None,
                   grads_held=0):
    """The phases of a step from its terms, the peak phase, and the components at the peak.

    One place for the phase arithmetic of :func:`step_memory` and the sharded planner
    (:func:`vramplan.distributed.parallel_step_memory`). ``t``: :func:`step_terms`; ``base``:
    the always-resident bytes by component (weights, quantisation state, adapters, master
    weights); ``cache``: autocast's weight casts during forward (the cache lives until the
    autocast context exits); ``cache_bwd``: the casts still saved for backward when it starts
    (all of them without checkpointing; only the heads' with it); ``recompute_cache``: the
    casts a recomputed layer makes again; ``layer_cache``: the casts of the layer running
    backward (alive until it is done, checkpointed or not) and ``attn_cache`` its attention
    block's; ``head_cache``: the heads' casts, freed once the loss's backward is through the
    heads (before any layer's); ``grads_bwd`` / ``grads_opt``: gradient bytes alive at
    the end of backward and during the optimiser step; ``grads_tail``: the part of ``grads_bwd``
    produced by the first layer and the embedding, after the last layer's backward work;
    ``grads_end_extra``: buffers of the last accumulation, beside every gradient;
    ``layer_grad``: the gradients of the first layer's MLP block (produced before its attention's); ``comm`` (buckets), ``gathered`` (unsharded units in forward and
    backward) and ``rollout_gather`` (the policy gathered for generation) are the sharded
    planner's extras. An engine that gathers differently through the step passes the bytes
    gathered (and its in-flight buffers) at each point: ``gathered_fwd_mid`` (a layer's forward
    before the logits: beside the activations but one layer's), ``gathered_bwd_start`` (beside
    everything saved and the logits' gradients), ``gathered_bwd_work`` (inside a layer's
    backward), ``gathered_bwd_end`` (beside every gradient); each defaults to ``gathered``
    (``gathered_fwd_mid`` to no such point). ``comm_component`` / ``gathered_component`` name
    the components ``comm`` and the gathered bytes are reported under (default gradients and
    weights). ``grads_held``: gradients already alive when the step's forward starts (gradient
    accumulation: the earlier micro-batches' sums, kept through this micro-batch's forward and
    backward; autograd's AccumulateGrad adds each new gradient into them in place).
    Returns ``(phases, peak, peak_phase_index, components)``.
    """
    zeros = t["zeros"]
    acts, logits_fwd, logits_bwd = t["acts"], t["logits_fwd"], t["logits_bwd"]
    transient, nograd_peak, temps_fwd, kv = t["transient"], t["nograd_peak"], t["temps_fwd"], t["kv"]
    recompute, layer_saved, layer_attn = t["recompute"], t["layer"], t["layer_attn"]
    attn_fwd, attn_bwd = t.get("attn_fwd", zeros), t.get("attn_bwd", zeros)
    static = sum(base.get(c, 0) for c in RESIDENT_COMPONENTS) + zeros + comm
    states, cache, cache_bwd = states + zeros, cache + zeros, cache_bwd + zeros
    held = grads_held + zeros
    # QLoRA's dequantised weight lives inside one layer's forward/backward, never beside the loss
    # DoRA's norm buffers in the last layer's forward beside what that layer has saved so far
    # (without checkpointing ``acts`` holds the whole layer; the prefix is what exists by then)
    ckpt = recompute > 0
    dora_side = np.where(ckpt, 0, np.maximum(layer_saved - t.get("dora_prefix", layer_saved), 0))
    temps_f = np.maximum(temps_fwd, t["temps_fwd_only"] - dora_side)
    # the last step's graph, when the loop keeps it into this forward (stacks.toml keeps_last_graph)
    last_graph = t.get("last_graph", zeros)
    # a layer's forward buffers (QLoRA's dequantised weight, eager attention's scores) come before the heads'
    # autocast casts exist (made by the head's matmul, after every layer): beside the cache less those
    head_f = np.minimum(head_cache, cache)
    fwd_work = acts + last_graph + np.maximum(logits_fwd, np.maximum(temps_f, attn_fwd) - head_f)
    # backward starts with everything saved plus the loss's gradients; then, layer by layer, saved
    # tensors and casts are freed while gradients accumulate: a layer's backward sees the larger of
    # the two ends, plus its recomputation (checkpointing), its transient buffers and its dequantised weight
    saved_bwd = acts + cache_bwd + held
    # a layer's backward works beside either end: early, every saved tensor (plus its recomputation);
    # late, the first layer beside every gradient but its attention block's and the embedding's
    grads_before = np.maximum(grads_bwd - grads_tail, 0)
    # (the final norm's and the head's saved tensors were freed by their backward, before any layer's)
    saved_side = (acts - t.get("head_acts", zeros) + np.maximum(cache_bwd - head_cache, 0) + recompute
                  + recompute_cache + held)
    # the first layer's MLP backward (all its saved tensors and casts), then its attention's
    grads_side = np.maximum(np.maximum(grads_before - layer_grad, 0) + layer_saved + layer_cache,
                            grads_before + layer_attn + attn_cache)
    layer_temps = transient + temps_fwd
    mlp_work = np.maximum(saved_side, grads_side) + layer_temps
    # DoRA's weight-norm buffers in a checkpointed layer's recomputation: beside what the layer has
    # saved again before its largest adapted module runs (``rec_prefix``), not the whole layer
    rec_prefix = np.minimum(t.get("dora_prefix", layer_saved), recompute)
    rec_saved = saved_side - recompute + rec_prefix
    rec_grads = grads_before + rec_prefix
    rec_work = np.maximum(rec_saved, rec_grads) + t["temps_recompute"]
    # eager attention's backward peak (its softmax's buffers) comes after the layer's MLP is done: the
    # layer's attention-block tensors (less what matmul's backward freed) plus those buffers
    # (the last layer's attention runs backward after the head's and its MLP's gradients exist)
    # (and its MLP's weight casts are released with that block's saved tensors)
    attn_side_cache = np.maximum(cache_bwd - head_cache, 0) + recompute_cache - (layer_cache - attn_cache)
    saved_attn = saved_side - layer_saved + layer_attn + head_grad + layer_grad - (layer_cache - attn_cache)
    grads_attn = grads_before + layer_attn + attn_cache
    attn_work = np.maximum(saved_attn, grads_attn) + attn_bwd
    work = np.maximum(np.maximum(mlp_work, attn_work), rec_work)
    g_start = gathered if gathered_bwd_start is None else gathered_bwd_start
    g_work = gathered if gathered_bwd_work is None else gathered_bwd_work
    g_end = gathered if gathered_bwd_end is None else gathered_bwd_end
    bwd_acts = saved_bwd + logits_bwd + g_start
    work = work + g_work
    kept = t.get("logits_kept", zeros)  # logits a step keeps through its whole backward
    bwd_grads = np.maximum(work, grads_bwd + grads_end_extra + g_end) + kept
    fwd = gathered + np.maximum(fwd_work, nograd_peak)
    fwd_mid = zeros if gathered_fwd_mid is None else np.maximum(acts - layer_saved, 0) + gathered_fwd_mid
    phases = {Phase.LOAD: static.copy(),
              Phase.ROLLOUT: static + states + kv + t["rollout_logits"] + rollout_gather if rollout_on else zeros.copy(),
              Phase.FORWARD: static + states + cache + held + np.maximum(fwd, fwd_mid),
              Phase.BACKWARD: static + states + np.maximum(bwd_acts, bwd_grads),
              Phase.OPTIMIZER_STEP: static + states + grads_opt + step_temporary}
    stack = np.stack([phases[p] for p in PHASE_ORDER])
    idx = np.argmax(stack, axis=0)
    peak = np.max(stack, axis=0)
    if not components:
        return phases, peak, idx, {}

    def at_peak(by_phase: dict[Phase, np.ndarray]) -> np.ndarray:
        out = zeros.copy()
        for k, p in enumerate(PHASE_ORDER):
            out = np.where(idx == k, by_phase.get(p, zeros), out)
        return out

    bwd_act = bwd_acts >= bwd_grads
    in_rec = rec_work > np.maximum(mlp_work, attn_work)  # the layer's peak is DoRA's norm in its recomputation
    in_attn = ~in_rec & (attn_work > mlp_work)  # the layer's peak is eager attention's softmax backward
    # in the layer branch: the saved end or the gradient end
    bwd_saved = np.where(in_rec, rec_saved >= rec_grads,
                         np.where(in_attn, saved_attn >= grads_attn, saved_side >= grads_side))
    bwd_end = grads_bwd + grads_end_extra + g_end >= work  # backward's last state: all gradients
    fwd_act = fwd_work >= nograd_peak
    fwd_at_mid = fwd_mid > fwd
    fwd_temps = logits_fwd < temps_f - head_f
    fwd_attn = attn_fwd - head_f > np.maximum(logits_fwd, temps_f - head_f)  # eager attention's scores are the forward's peak
    fwd_layer = fwd_act & ~fwd_at_mid & (fwd_temps | fwd_attn)  # the forward's peak is inside a layer
    comps: dict[Component, np.ndarray] = {c: base.get(c, 0) + zeros
                                          for c in (Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS)}
    layer = ~bwd_act & ~bwd_end  # the peak is inside a layer's backward
    g_comp = gathered_component or Component.WEIGHTS
    g_at = at_peak({Phase.FORWARD: np.where(fwd_at_mid, 0 if gathered_fwd_mid is None else gathered_fwd_mid, gathered)
                    + zeros, Phase.BACKWARD: np.where(bwd_act, g_start, np.where(layer, g_work, g_end)) + zeros,
                    Phase.ROLLOUT: rollout_gather + zeros})
    comps[Component.WEIGHTS] = base.get(Component.WEIGHTS, 0) + zeros
    comps[g_comp] = comps.get(g_comp, zeros) + g_at
    comps[Component.OPTIMIZER_STATES] = at_peak({p: states for p in PHASE_ORDER if p is not Phase.LOAD})
    comps[Component.AUTOCAST_CACHE] = at_peak({
        Phase.FORWARD: np.where(fwd_layer, cache - head_f, cache),
        Phase.BACKWARD: np.where(bwd_act, cache_bwd, np.where(
            layer, np.where(bwd_saved, np.where(in_attn, attn_side_cache, np.maximum(cache_bwd - head_cache, 0)
                                                + recompute_cache),
                            np.where(in_rec, 0, np.where(in_attn, attn_cache, layer_cache))), 0))})
    c_comp = comm_component or Component.GRADIENTS
    comps[c_comp] = comps.get(c_comp, zeros) + comm
    comps[Component.GRADIENTS] = comps.get(Component.GRADIENTS, zeros) + at_peak({
        Phase.FORWARD: held,
        Phase.BACKWARD: np.where(bwd_act, held, np.where(layer, np.where(
            bwd_saved, np.where(in_attn, head_grad + layer_grad, 0) + held, grads_before), grads_bwd)),
        Phase.OPTIMIZER_STEP: grads_opt + zeros})
    comps[Component.ACTIVATIONS] = at_peak({
        Phase.FORWARD: np.where(fwd_at_mid, np.maximum(acts - layer_saved, 0), np.where(fwd_act, acts + last_graph,
                                                                                         nograd_peak)),
        Phase.BACKWARD: np.where(bwd_act, acts, np.where(layer, np.where(
            bwd_saved, acts + np.where(in_rec, rec_prefix, np.where(in_attn, recompute - layer_saved + layer_attn,
                                                                    recompute)),
            np.where(in_rec, rec_prefix, np.where(in_attn, layer_attn, layer_saved))), 0))})
    comps[Component.LOGITS] = at_peak({Phase.FORWARD: np.where(fwd_act & ~fwd_temps & ~fwd_attn & ~fwd_at_mid, logits_fwd, 0),
                                       Phase.BACKWARD: np.where(bwd_act, logits_bwd, kept),
                                       Phase.ROLLOUT: t["rollout_logits"]})
    comps[Component.TEMPORARIES] = at_peak({Phase.FORWARD: np.where(fwd_at_mid, 0, np.where(
                                                fwd_act & fwd_attn, attn_fwd, np.where(fwd_act & fwd_temps, temps_f, 0))),
                                            Phase.BACKWARD: np.where(layer, np.where(in_rec, t["temps_recompute"],
                                                                                np.where(in_attn, attn_bwd, layer_temps)),
                                                                     np.where(bwd_act, 0, grads_end_extra)),
                                            Phase.OPTIMIZER_STEP: step_temporary + zeros})
    comps[Component.KV_CACHE] = at_peak({Phase.ROLLOUT: kv})
    return phases, peak, idx, comps


def state_terms(st: ModelState, cfg: TrainConfig) -> dict:
    """The batch-independent keyword arguments :func:`combine_phases` takes from a :class:`ModelState`.

    With the optimiser step inside backward (``opt_in_bwd``) each gradient is consumed and freed
    as soon as it is ready: only the largest one is alive at a time.
    """
    in_bwd = cfg.uses("opt_in_bwd")
    grads = st.largest_grad if in_bwd else st.bytes[Component.GRADIENTS]
    return dict(states=st.bytes[Component.OPTIMIZER_STATES], cache=st.bytes[Component.AUTOCAST_CACHE],
                **backward_casts(st, cfg), grads_bwd=grads, grads_opt=grads,
                grads_tail=0 if in_bwd else st.grads_tail, grads_end_extra=st.grads_end_extra,
                layer_grad=0 if in_bwd else st.layer_grad, head_grad=0 if in_bwd else st.head_grad,
                step_temporary=st.step_temporary, rollout_on=cfg.recipe.behaviour.generates)


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
    a = state_terms(st, cfg)
    static = sum(st.bytes.get(c, 0) for c in RESIDENT_COMPONENTS)
    own = a["states"] + a["step_temporary"] if optimizer else 0
    return int(static + max(0, own + a["grads_opt"]))


def step_memory(model: ModelSpec, cfg: TrainConfig, batch=None, seq=None, grad_accum=None) -> StepMemory:
    """Peak tensor bytes of a steady-state step of ``cfg`` on ``model``, by component and phase.

    ``batch``, ``seq`` and ``grad_accum`` default to the config's; arrays broadcast. With gradient
    accumulation (``grad_accum > 1``) every micro-batch after the first runs its forward and backward
    beside the gradients the earlier ones summed (``zero_grad`` runs only after the optimizer step):
    the HF Trainer, torchtune, litgpt (finetune/full.py ``fabric.no_backward_sync`` loop) and any
    plain loop accumulate into ``param.grad``. Full fine-tuning: one more copy of the trainable
    weights at the forward's end; adapters: their (small) gradients.
    """
    st = model_state(model, cfg)
    t = step_terms(model, cfg, batch, seq)
    phases, peak, idx, comps = combine_phases(t, st.bytes, **state_terms(st, cfg),
                                              grads_held=held_gradients(st, cfg, grad_accum))
    return StepMemory(components=comps, phases=phases, peak=peak, peak_phase=idx, state=st)


def held_gradients(st: ModelState, cfg: TrainConfig, grad_accum=None):
    """Gradient bytes alive through a micro-batch's forward and backward (:func:`combine_phases`'
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
    if len({c.recipe.behaviour.generates for c in cfgs}) > 1:
        raise ValueError("step_memory_rows: configurations that generate and that do not")
    states = [model_state(model, c) for c in cfgs]
    by_terms: dict = {}
    rows = []
    for c in cfgs:
        k = c.with_(optimizer="adamw")
        if k not in by_terms:
            t = step_terms(model, c, batch, seq)
            shape = t["zeros"].shape
            by_terms[k] = {name: v if np.shape(v) == shape else np.broadcast_to(v, shape) for name, v in t.items()}
        rows.append(by_terms[k])
    t = {name: np.stack([r[name] for r in rows]) for name in rows[0]}
    extra = (1,) * (t["zeros"].ndim - 1)

    def column(values) -> np.ndarray:
        return np.asarray(values, dtype=np.int64).reshape((len(cfgs),) + extra)

    base = {comp: column([st.bytes.get(comp, 0) for st in states]) for comp in Component
            if any(comp in st.bytes for st in states)}
    args = [state_terms(st, c) for st, c in zip(states, cfgs)]
    kw = {name: (args[0][name] if name == "rollout_on" else column([a[name] for a in args])) for name in args[0]}
    # gradients held through accumulated micro-batches: (rows, 1...) x the accumulation grid
    kw["grads_held"] = np.stack([np.broadcast_to(held_gradients(st, c, grad_accum), t["zeros"].shape[1:])
                                 for st, c in zip(states, cfgs)])
    phases, peak, idx, comps = combine_phases(t, base, **kw)
    return StepMemory(components=comps, phases=phases, peak=peak, peak_phase=idx, state=None), states


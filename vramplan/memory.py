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

from dataclasses import dataclass, field

import numpy as np

from . import activations as act
from .adapters import adapter_tensors, full_tensors
from .config import TrainConfig
from .methods import Adapter, ModelCopy, Forward
from .models import ModelSpec
from .optimizers import get_optimizer
from .precision import DTYPE_BYTES, Regime, get_regime
from .quant import nf4_bytes
from .taxonomy import Component, Phase


@dataclass
class ModelState:
    """Batch-independent bytes of all model copies, by component, and parameter counts."""

    bytes: dict[Component, int] = field(default_factory=dict)
    params: int = 0            # parameters of the policy
    trainable_params: int = 0  # trainable parameters of all copies
    step_temporary: int = 0    # inside optimizer.step()
    largest_grad: int = 0      # bytes of the largest single trainable tensor's gradient

    def add(self, comp: Component, n: int) -> None:
        self.bytes[comp] = self.bytes.get(comp, 0) + int(n)


def _copy_params(model: ModelSpec, copy: ModelCopy) -> int:
    if copy.head == "scalar":
        return model.params - model.lm_head_params + model.hidden_size  # score head h x 1
    return model.params


def model_state(model: ModelSpec, cfg: TrainConfig) -> ModelState:
    """Weights, quantisation state, adapters, gradients and optimiser state of every held copy."""
    regime = cfg.regime
    opt = get_optimizer(cfg.optimizer)
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
        quantizable = [l for l in model.layer_linears() if l.is_linear]
        non_linear = n - model.num_layers * sum(l.count * l.in_features * l.out_features for l in quantizable)
        if copy.adapter is Adapter.FULL:
            wb = DTYPE_BYTES[regime.trainable_dtype]
            st.add(Component.WEIGHTS, n * wb)
            st.add(Component.GRADIENTS, n * wb)
            st.trainable_params += n
            tensors = full_tensors(model, copy.head)
            opt_groups += [(shape, cnt, wb) for shape, cnt in tensors]
            if regime.autocast is not None:
                # autocast caches a 16-bit cast of every weight a matmul uses (leaf tensors requiring grad)
                matmul_params = model.linear_params + (model.vocab_size * model.hidden_size if copy.head == "lm" else 0)
                st.add(Component.AUTOCAST_CACHE, matmul_params * DTYPE_BYTES[regime.compute_dtype])
            continue
        # a frozen base, maybe with an adapter
        if copy.quantized:
            packed, qs = 0, 0
            for l in quantizable:
                p, q = nf4_bytes(l.in_features * l.out_features, cfg.double_quant)
                packed += p * l.count * model.num_layers
                qs += q * l.count * model.num_layers
            kbit = copy.trains and cfg.stack.kbit_upcast  # prepare_model_for_kbit_training upcasts the rest to fp32
            nb = 4 if kbit else DTYPE_BYTES[regime.frozen_dtype]
            st.add(Component.WEIGHTS, packed + non_linear * nb)
            st.add(Component.QUANT_STATE, qs)
        else:
            st.add(Component.WEIGHTS, n * DTYPE_BYTES[regime.frozen_dtype])
        if copy.adapter is None:
            continue
        ab = DTYPE_BYTES[regime.adapter_dtype]
        tensors = [(t.shape, t.count) for t in adapter_tensors(model, copy.adapter, cfg.rank, cfg.targets)]
        if copy.head == "scalar":
            tensors.append(((1, model.hidden_size), 1))  # the value head trains beside the adapter
        count = sum(int(np.prod(s)) * c for s, c in tensors)
        st.trainable_params += count
        st.add(Component.ADAPTERS, count * ab)
        st.add(Component.GRADIENTS, count * ab)
        opt_groups += [(s, c, ab) for s, c in tensors]
        if regime.autocast is not None and copy.adapter is not Adapter.IA3:
            st.add(Component.AUTOCAST_CACHE, count * DTYPE_BYTES[regime.compute_dtype])
    offload = cfg.uses("opt_offload")
    st.add(Component.OPTIMIZER_STATES, 0 if offload else opt.total_state_bytes(opt_groups))
    st.step_temporary = 0 if offload else opt.step_temporary_bytes(opt_groups, regime.runner)
    st.largest_grad = max((int(np.prod(shape)) * pb for shape, _c, pb in opt_groups), default=0)
    return st


@dataclass
class StepMemory:
    """Tensor bytes of one step: components at the peak and the peak of every phase (arrays)."""

    components: dict[Component, np.ndarray]
    phases: dict[Phase, np.ndarray]
    peak: np.ndarray
    peak_phase: np.ndarray  # index into PHASE_ORDER
    state: ModelState


PHASE_ORDER = (Phase.LOAD, Phase.ROLLOUT, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP)


def _dequant_temp(model: ModelSpec, regime: Regime) -> int:
    """QLoRA: one layer's largest dequantised weight in the compute dtype (bitsandbytes MatMul4Bit)."""
    largest = max(l.in_features * l.out_features for l in model.layer_linears())
    return largest * DTYPE_BYTES[regime.compute_dtype]


def _stack_activations(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime, T, s):
    """Saved activations of the whole decoder stack of a copy that trains, per checkpointing and offloading.

    * no checkpointing: every layer's saved tensors (layer 0's input needs no gradient unless
      the copy trains fully or checkpointing made the inputs require grad);
    * gradient checkpointing (HF, non-reentrant, per decoder layer): each layer's input, plus
      one layer recomputed in backward; with ``gc_offload`` (Unsloth) the inputs live in host memory;
    * ``selective_ckpt``: every second layer checkpointed (torchtune ``ac_option=2``);
    * ``act_offload``: saved tensors moved to host memory, two layers (current + prefetched) on the GPU.
    """
    kbit = cfg.stack.kbit_upcast
    L = model.num_layers
    full_layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s)
    ckpt_in = act.checkpoint_input_bytes(model, copy, regime, T, kbit)
    offload = cfg.uses("act_offload")
    if cfg.grad_ckpt:
        kept = ckpt_in if (cfg.stack.gc_offload or offload) else L * ckpt_in
        return kept + full_layer
    if cfg.uses("selective_ckpt"):
        ck = L // 2
        return (L - ck) * full_layer + ck * ckpt_in + full_layer
    first_grad = copy.adapter is Adapter.FULL
    first = act.layer_activation_bytes(model, cfg, copy, regime, T, s, input_requires_grad=first_grad)
    if offload:
        return 2 * full_layer
    return (L - 1) * full_layer + first


def step_terms(model: ModelSpec, cfg: TrainConfig, batch=None, seq=None) -> dict[str, np.ndarray]:
    """The batch-dependent terms of a step (arrays over batch/seq), shared by :func:`step_memory`
    and the sharded planner (:func:`vramplan.distributed.parallel_step_memory`).

    Keys: acts (saved activations incl. the shared attention mask), logits_fwd, logits_bwd,
    transient (one layer's backward buffers), nograd_peak (frozen copies' forward working set),
    temps_fwd (QLoRA dequantised weight), kv (PPO KV cache), rollout_logits, zeros.
    """
    regime = cfg.regime
    kbit = cfg.stack.kbit_upcast
    recipe = cfg.recipe
    b = np.asarray(cfg.batch if batch is None else batch, dtype=np.float64)
    s = np.asarray(cfg.seq if seq is None else seq, dtype=np.float64)
    T = b * s * recipe.sequences_per_example  # tokens through a training forward
    zeros = np.zeros(np.broadcast(b, s).shape)
    acts, logits_fwd, logits_bwd = zeros.copy(), zeros.copy(), zeros.copy()
    transient, nograd_peak, temps_fwd, kv = zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy()
    for copy in recipe.copies:
        if copy.forward is Forward.NO_GRAD:
            # frozen copies run under no_grad: only one layer's working set at a time plus their logits
            f, _ = act.logits_bytes(model, copy, regime, T, copy.head, cfg)
            layer = act.layer_activation_bytes(model, cfg, copy, regime, T, s)
            nograd_peak = np.maximum(nograd_peak, f + layer)
            continue
        a = _stack_activations(model, cfg, copy, regime, T, s)
        d = act.copy_dtypes(copy, regime, kbit)
        a = a + T * 4 * model.hidden_size  # final norm's fp32 upcast
        if copy.adapter is Adapter.FULL:
            a = a + T * d.norm_out * model.hidden_size  # final norm output saved by the trainable lm_head
        f, bw = act.logits_bytes(model, copy, regime, T, copy.head, cfg)
        acts += a
        logits_fwd += f
        logits_bwd += bw
        transient = np.maximum(transient, act.layer_backward_transient(model, copy, regime, T, s, cfg.attn, kbit))
        if copy.quantized:
            temps_fwd = np.maximum(temps_fwd, _dequant_temp(model, regime) + zeros)
    rollout_logits = zeros.copy()
    if recipe.method.rollout:
        policy = recipe.copies[0]
        kv = act.kv_cache_bytes(model, regime, policy, b, s, kbit) + zeros
        rollout_logits = np.where(kv > 0, act.logits_bytes(model, policy, regime, b, "lm", cfg)[0], 0) + zeros
    if recipe.copies[0].forward is not Forward.NONE:
        acts = acts + act.attention_mask_bytes(model, cfg, regime, b, s)
    return {"acts": acts, "logits_fwd": logits_fwd, "logits_bwd": logits_bwd, "transient": transient,
            "nograd_peak": nograd_peak, "temps_fwd": temps_fwd, "kv": kv, "rollout_logits": rollout_logits,
            "zeros": zeros}


def step_memory(model: ModelSpec, cfg: TrainConfig, batch=None, seq=None) -> StepMemory:
    """Peak tensor bytes of a steady-state step of ``cfg`` on ``model``, by component and phase.

    ``batch`` and ``seq`` default to the config's; arrays broadcast.
    """
    recipe = cfg.recipe
    b = np.asarray(cfg.batch if batch is None else batch, dtype=np.float64)
    s = np.asarray(cfg.seq if seq is None else seq, dtype=np.float64)
    st = model_state(model, cfg)
    zeros = np.zeros(np.broadcast(b, s).shape)

    static = sum(st.bytes[c] for c in (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS,
                                       Component.MASTER_WEIGHTS)) + zeros
    states = st.bytes[Component.OPTIMIZER_STATES] + zeros
    cache = st.bytes[Component.AUTOCAST_CACHE] + zeros
    grads_all = st.bytes[Component.GRADIENTS] + zeros
    if cfg.uses("opt_in_bwd"):
        grads_all = st.largest_grad + zeros  # each gradient is consumed and freed as soon as it is ready

    t = step_terms(model, cfg, batch, seq)
    acts, logits_fwd, logits_bwd = t["acts"], t["logits_fwd"], t["logits_bwd"]
    transient, nograd_peak, temps_fwd, kv = t["transient"], t["nograd_peak"], t["temps_fwd"], t["kv"]
    # ordered phases
    load = static.copy()
    rollout = static + states + kv + t["rollout_logits"]
    forward = static + states + cache + np.maximum(acts + logits_fwd + temps_fwd, nograd_peak)
    backward = static + states + cache + np.maximum(acts + logits_bwd + temps_fwd,
                                                    grads_all + transient + temps_fwd)
    opt_step = static + states + grads_all + st.step_temporary
    phases = {Phase.LOAD: load, Phase.ROLLOUT: rollout if recipe.method.rollout else zeros.copy(),
              Phase.FORWARD: forward, Phase.BACKWARD: backward, Phase.OPTIMIZER_STEP: opt_step}
    stack = np.stack([phases[p] for p in PHASE_ORDER])
    idx = np.argmax(stack, axis=0)
    peak = np.max(stack, axis=0)

    def at_peak(by_phase: dict[Phase, np.ndarray]) -> np.ndarray:
        out = zeros.copy()
        for k, p in enumerate(PHASE_ORDER):
            out = np.where(idx == k, by_phase.get(p, zeros), out)
        return out

    bwd_act_branch = acts + logits_bwd >= grads_all + transient
    fwd_act_branch = acts + logits_fwd + temps_fwd >= nograd_peak
    comps: dict[Component, np.ndarray] = {}
    for c in (Component.WEIGHTS, Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS):
        comps[c] = st.bytes[c] + zeros
    comps[Component.OPTIMIZER_STATES] = at_peak({p: states for p in PHASE_ORDER if p is not Phase.LOAD})
    comps[Component.AUTOCAST_CACHE] = at_peak({Phase.FORWARD: cache, Phase.BACKWARD: cache})
    comps[Component.GRADIENTS] = at_peak({Phase.BACKWARD: np.where(bwd_act_branch, 0, grads_all),
                                          Phase.OPTIMIZER_STEP: grads_all})
    comps[Component.ACTIVATIONS] = at_peak({Phase.FORWARD: np.where(fwd_act_branch, acts, nograd_peak),
                                            Phase.BACKWARD: np.where(bwd_act_branch, acts, 0)})
    comps[Component.LOGITS] = at_peak({Phase.FORWARD: np.where(fwd_act_branch, logits_fwd, 0),
                                       Phase.BACKWARD: np.where(bwd_act_branch, logits_bwd, 0)})
    comps[Component.TEMPORARIES] = at_peak({Phase.FORWARD: np.where(fwd_act_branch, temps_fwd, 0),
                                            Phase.BACKWARD: np.where(bwd_act_branch, temps_fwd, transient + temps_fwd),
                                            Phase.OPTIMIZER_STEP: st.step_temporary + zeros})
    comps[Component.KV_CACHE] = at_peak({Phase.ROLLOUT: kv})
    # the rollout's logits of one decode step are small; fold them into KV_CACHE's phase total
    comps[Component.LOGITS] = comps[Component.LOGITS] + at_peak({Phase.ROLLOUT: rollout - static - states - kv})
    return StepMemory(components=comps, phases=phases, peak=peak, peak_phase=idx, state=st)

"""Activation memory of a decoder stack, counted tensor by tensor as autograd saves it.

Units: bytes. Inputs ``tokens`` (= micro-batch x sequences x seq) and ``seq`` may be numpy
arrays; every function broadcasts, so a whole grid evaluates at once.

The model follows what PyTorch autograd saves for a Hugging Face (transformers >= 5)
Llama-style decoder layer, op by op, rather than a fitted per-layer constant. The
starting point is Korthikanti et al., "Reducing Activation Recomputation in Large
Transformer Models" (MLSys 2023), s*b*h*(34 + 5*a*s/h) bytes per GPT layer in 16 bit;
SwiGLU MLPs, RMSNorm's fp32 upcast, PEFT's input casts, autocast's per-call casts and
FlashAttention change the terms, which are listed below and were checked against the
dry run (``benchmarks/dryrun_vs_analytic.py``; evidence in ``reports/``):

* RMSNorm (``LlamaRMSNorm``): ``x.to(float32)`` is saved by ``pow``/``mul`` when x
  requires grad (4 B/elem); the normalised output in the input dtype is saved by
  ``weight * x`` only when the norm weight trains.
* A linear saves its input only when its weight trains (autograd saves ``self`` for
  ``mm`` only if ``mat2`` needs a gradient). Under autocast each linear call casts its
  own copy of an fp32 input; the casts are not shared.
* PEFT LoRA casts the layer input to the adapter dtype (fp32) when autocast is off and
  ``lora_A`` saves that copy; under autocast ``lora_A`` saves autocast's 16-bit cast.
* SDPA with FlashAttention / memory-efficient kernels saves q, k, v, the output and
  an fp32 logsumexp per head and token; GQA runs without ``repeat_kv`` when there is no
  mask (transformers' ``use_gqa_in_sdpa``). Eager attention materialises the fp32
  softmax and its 16-bit cast (heads x seq^2 per sequence) and repeats k, v.
* SwiGLU MLP: gate and up outputs, the activation's output and (when ``down_proj``
  trains) the product are saved.
* Loss (``ForCausalLMLoss``): logits are upcast to fp32, ``log_softmax`` saves its fp32
  output; its backward holds the saved output, the incoming and the outgoing gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import TrainConfig
from .methods import Adapter, ModelCopy
from .models import ModelSpec
from .precision import DTYPE_BYTES, FP32, Regime


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the tensors that flow through one model copy."""

    residual: int      # the residual stream between layers
    norm_out: int      # RMSNorm output (= weight dtype x input dtype promotion)
    proj_out: int      # outputs of base linears (q/k/v, gate/up): autocast dtype or weight dtype
    linear_in: int     # what a base linear sees as input (autocast casts a copy)
    autocast_casts: bool  # each linear call makes its own cast of an fp32 input
    logits: int        # lm_head output dtype
    adapter: int       # adapter parameter dtype


def copy_dtypes(copy: ModelCopy, regime: Regime) -> Dtypes:
    """The dtypes that ``copy`` computes in under ``regime`` (HF stack)."""
    c = DTYPE_BYTES[regime.compute_dtype]
    ac = regime.autocast is not None
    if copy.adapter is Adapter.FULL:
        wb = DTYPE_BYTES[regime.trainable_dtype]
    elif copy.quantized and copy.trains:
        wb = 4  # prepare_model_for_kbit_training upcasts embeddings/norms/lm_head to fp32
    else:
        wb = DTYPE_BYTES[regime.frozen_dtype]
    residual = wb
    proj = c if ac else (residual if copy.quantized else wb)  # bnb Linear4bit casts its output back to the input dtype
    return Dtypes(residual=residual, norm_out=wb, proj_out=proj, linear_in=c if ac else wb,
                  autocast_casts=ac and wb != c, logits=c if ac else wb, adapter=DTYPE_BYTES[regime.adapter_dtype])


def layer_activation_bytes(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime,
                           tokens, seq, *, input_requires_grad: bool = True):
    """Bytes autograd saves in one decoder layer for ``tokens`` tokens of length-``seq`` sequences.

    Returns an array broadcast over ``tokens`` and ``seq``.
    """
    T = np.asarray(tokens, dtype=np.float64)
    s = np.asarray(seq, dtype=np.float64)
    d = copy_dtypes(copy, regime)
    h, qd, kvd, heads = model.hidden_size, model.q_dim, model.kv_dim, model.num_heads
    full = copy.adapter is Adapter.FULL
    peft = copy.adapter is not None and not full
    targets = set(cfg.targets) if peft else set()
    lora_like = copy.adapter in (Adapter.LORA, Adapter.QLORA, Adapter.DORA)
    lin = {l.name: l for l in model.layer_linears()}

    per_tok = 0.0  # bytes per token
    per_seq2 = 0.0  # bytes per token per sequence position (eager attention's s^2 terms)

    def norm(requires_grad: bool, width: int = h) -> float:
        b = 4.0 * width if requires_grad else 0.0  # fp32 upcast saved by pow/mul
        if full:
            b += d.norm_out * width  # normalised output saved for the weight gradient
        return b

    def linear_inputs(names: list[str], width: int, fresh: bool) -> float:
        """Saved copies of the input of the linears ``names`` that all read one tensor.

        ``fresh``: the input is a new tensor nobody else saves (a norm's output, the MLP
        product); False when it is already counted (SDPA's output feeds o_proj in place:
        flash kernels write it in the layout ``transpose(1, 2).contiguous()`` keeps).
        """
        b = 0.0
        if full:
            if d.autocast_casts:
                b += d.linear_in * width * len(names)  # one autocast cast per call
            elif fresh:
                b += d.linear_in * width  # the shared input, saved once by every mm
        if lora_like:
            adapted = [n for n in names if n in targets]
            if regime.autocast is not None:
                b += DTYPE_BYTES[regime.compute_dtype] * width * len(adapted)
            elif d.linear_in != d.adapter:
                b += d.adapter * width * len(adapted)  # PEFT's _cast_input_dtype copy, one per adapter
            elif adapted and not full:
                b += d.adapter * width  # the shared input itself
            rank_bytes = DTYPE_BYTES[regime.compute_dtype] if regime.autocast else d.adapter
            b += sum(rank_bytes * cfg.rank for n in adapted)  # lora_A output saved by lora_B
            if copy.adapter is Adapter.DORA:
                # DoRA: the base output's cast and lora output enter the magnitude scaling
                # (PEFT DoraLinearLayer: (m / ||W + BA||) scales the base result and the LoRA result; both saved)
                b += sum((d.adapter + d.proj_out) * lin[n].out_features for n in adapted)
        return b

    def ia3_out(names: list[str]) -> float:
        if copy.adapter is not Adapter.IA3:
            return 0.0
        # IA³ scales the base output (out features) or the feed-forward input: the scaled operand is saved
        return sum(d.proj_out * (lin[n].in_features if n in model.ia3_feedforward else lin[n].out_features)
                   for n in names if n in targets or n in cfg.targets)

    # -- attention block ------------------------------------------------------------------
    per_tok += norm(input_requires_grad)
    attn_in = ["qkv_proj"] if model.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    per_tok += linear_inputs(attn_in, h, fresh=True)
    per_tok += ia3_out(attn_in)
    if model.qk_norm == "head" or model.qk_norm == "full":
        per_tok += norm(True, qd) + norm(True, kvd)
    a = d.proj_out
    if cfg.attn == "eager":
        rep = qd  # repeat_kv expands k and v to every head
        per_tok += a * (qd + rep + rep)
        per_seq2 += heads * (4 + (a if a != 4 else 0))  # fp32 softmax + its cast, x seq per token
    else:
        per_tok += a * (qd + 2 * kvd) + a * qd + 4 * heads  # q, k, v, out, logsumexp
    # attention output (transposed, contiguous) feeds o_proj
    per_tok += linear_inputs(["o_proj"], qd, fresh=False)
    per_tok += ia3_out(["o_proj"])
    # -- MLP block ----------------------------------------------------------------------
    if model.norms_per_layer == 4:  # Gemma-2/3 post-attention norm before the residual add
        per_tok += norm(True)
    per_tok += norm(True)
    m = d.proj_out
    if model.is_moe:
        k, mi = model.experts_per_token, model.moe_intermediate_size
        router = 4 * model.num_experts * 2  # router logits fp32 + softmax
        expert = k * (m * h + m * 2 * mi + m * mi * 2 + (m * mi if full else 0))
        per_tok += router + expert + (m * h if full else 0)
        if model.shared_expert_intermediate_size:
            si = model.shared_expert_intermediate_size
            per_tok += linear_inputs(["gate_proj", "up_proj"], h, fresh=True) + m * si * 3 + (m * si if full else 0)
    else:
        i = model.intermediate_size
        mlp_in = ["gate_up_proj"] if model.fused_gate_up else ["gate_proj", "up_proj"]
        per_tok += linear_inputs(mlp_in, h, fresh=True)
        per_tok += ia3_out(mlp_in)
        per_tok += m * i * 3  # gate out (act input), act out, up out
        if model.fused_gate_up:
            per_tok += m * i * 2  # the fused output is chunked: the 2i tensor stays alive
        per_tok += linear_inputs(["down_proj"], i, fresh=True) if (full or "down_proj" in targets) else 0.0
        per_tok += ia3_out(["down_proj"])
    if model.norms_per_layer == 4:
        per_tok += norm(True)
    return T * per_tok + T * s * per_seq2


def layer_backward_transient(model: ModelSpec, copy: ModelCopy, regime: Regime, tokens, seq, attn: str):
    """Gradient buffers alive while one layer runs backward (above its saved tensors)."""
    T = np.asarray(tokens, dtype=np.float64)
    d = copy_dtypes(copy, regime)
    i = model.moe_intermediate_size * model.experts_per_token if model.is_moe else model.intermediate_size
    b = T * (2 * d.proj_out * i + 2 * d.residual * model.hidden_size)
    if attn == "eager":
        b = b + T * np.asarray(seq, dtype=np.float64) * model.num_heads * 8
    return b


def logits_bytes(model: ModelSpec, copy: ModelCopy, regime: Regime, tokens, head: str = "lm"):
    """(forward peak, backward peak) bytes of the logits and the fp32 loss for ``tokens`` tokens.

    Forward: the logits in their dtype, the fp32 upcast (transient) and log_softmax's saved
    fp32 output. Backward: the saved output plus the incoming and outgoing fp32 gradients.
    A scalar head (reward/value) has one output per token.
    """
    T = np.asarray(tokens, dtype=np.float64)
    if head == "scalar":
        return T * 8.0, T * 8.0
    V = model.vocab_size
    d = copy_dtypes(copy, regime)
    up = 4.0 if d.logits != 4 else 0.0
    fwd = T * V * (d.logits + up + 4.0)
    bwd = T * V * 12.0
    return fwd, bwd


def checkpoint_input_bytes(model: ModelSpec, copy: ModelCopy, regime: Regime, tokens):
    """Under gradient checkpointing each decoder layer keeps only its input hidden states."""
    return np.asarray(tokens, dtype=np.float64) * copy_dtypes(copy, regime).residual * model.hidden_size


def kv_cache_bytes(model: ModelSpec, regime: Regime, copy: ModelCopy, batch, total_tokens):
    """KV cache of ``batch`` sequences of ``total_tokens``: 2 (k, v) x layers x kv_dim per token."""
    d = copy_dtypes(copy, regime)
    return (np.asarray(batch, dtype=np.float64) * np.asarray(total_tokens, dtype=np.float64)
            * 2 * model.num_layers * model.kv_dim * d.proj_out)

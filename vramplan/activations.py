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
  softmax and its 16-bit cast (heads x seq^2 per sequence) and repeats k, v; its backward
  peaks in ``_softmax_backward_data`` after the layer's MLP is done (:func:`eager_attention`).
* SwiGLU MLP: gate and up outputs, the activation's output and (when ``down_proj``
  trains) the product are saved.
* Loss (``ForCausalLMLoss``): logits are upcast to fp32, ``log_softmax`` saves its fp32
  output; its backward holds the saved output, the incoming and the outgoing gradient.
* QLoRA: bitsandbytes ``Linear4bit`` returns its input's dtype, so over
  ``prepare_model_for_kbit_training``'s fp32 residual stream the projections' outputs (and
  the MLP's saved tensors) are fp32 while attention runs in autocast's dtype.
* A mask (padding, or a sliding window shorter than the sequence) makes SDPA repeat k/v
  and save the mask as a per-layer additive bias; Gemma-2's soft-capping saves ``tanh``'s
  output (attention scores and logits).
* MoE (transformers >= 5): grouped_mm experts save the gate_up output, the activation's
  output and the down output per routed token; fp32 expert banks (QLoRA, full training under
  autocast) run a per-expert path that also saves the gathered input and the product.
* DPO and PPO compute log-probs from the logits the trainer returns (fp32 after
  accelerate's conversion): see :func:`logits_bytes`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .config import TrainConfig
from .methods import LOW_RANK, Adapter, ModelCopy
from .models import ModelSpec
from .precision import DTYPE_BYTES, Regime, get_runner


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the tensors that flow through one model copy."""

    residual: int      # the residual stream between layers
    norm_out: int      # RMSNorm output (= weight dtype x input dtype promotion)
    proj_out: int      # outputs of base linears (q/k/v, gate/up): autocast dtype or weight dtype
    attn: int          # what attention computes in (SDPA's saved q/k/v/out; autocast casts to it)
    linear_in: int     # what a base linear sees as input (autocast casts a copy)
    autocast_casts: bool  # each linear call makes its own cast of an fp32 input
    logits: int        # lm_head output dtype
    adapter: int       # adapter parameter dtype


def act_saved_bytes(model: ModelSpec, cfg: TrainConfig, regime: Regime, m: int) -> int:
    """Bytes per MLP-width element that the MLP activation saves for backward (``m``: its input's dtype size).

    Every ATen activation (silu, gelu, gelu_pytorch_tanh, relu) saves one tensor: its input (relu: its
    output). ``gelu_new`` is transformers' ``NewGELUActivation``, a Python formula
    ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * pow(x, 3))))`` (transformers/activations.py):
    pow saves x, tanh its output, and the last multiply both operands (``0.5 * x`` and ``1 + tanh``). Under
    autocast ``pow`` is on the fp32 list, so its saved input, tanh's output and ``1 + tanh`` are fp32 and only
    ``0.5 * x`` keeps x's dtype (dry run: Phi-2, bf16-mixed). A stack that runs its own model (stacks.toml
    ``fused_activation``: litgpt's ``F.gelu``) saves one tensor whatever the config says.
    """
    if cfg.stack.fused_activation or model.hidden_act != "gelu_new":
        return m
    return 3 * 4 + m if regime.autocast is not None else 4 * m


#: Bytes per element that a LoRA module with ``lora_dropout > 0`` keeps beyond what it keeps without
#: dropout: measured by the dry run (PEFT 0.21 on meta; smollm2-360m, q_proj / q_proj,k_proj / down_proj,
#: bf16 and bf16-mixed: +2.0 B per element of the adapted module's input, each case).
DROPOUT_SAVED_BYTES = 2


def copy_dtypes(copy: ModelCopy, regime: Regime, kbit_upcast: bool = True) -> Dtypes:
    """The dtypes that ``copy`` computes in under ``regime``.

    ``kbit_upcast``: QLoRA's non-quantised weights were upcast to fp32 (HF stack's
    ``prepare_model_for_kbit_training``), so the residual stream runs in fp32.
    """
    key = (_copy_fields(copy), _regime_fields(regime), kbit_upcast)
    d = _DTYPES.get(key)
    if d is None:
        d = _DTYPES[key] = _new_dtypes(copy, regime, kbit_upcast)
    return d


#: :func:`copy_dtypes` by its (immutable) arguments' field values: a handful of copies and regimes, asked thousands
#: of times.
_DTYPES: dict = {}
#: a :class:`ModelCopy`'s / :class:`Regime`'s field values, in field order (what the dataclass compares and hashes):
#: the key of a kept value read from one, without the dataclass's ``__hash__`` and ``__eq__`` -- a search's
#: configurations resolve equal copies and regimes as new objects, each compared field by field on every look-up
_copy_fields = operator.attrgetter(*(f.name for f in fields(ModelCopy)))
_regime_fields = operator.attrgetter(*(f.name for f in fields(Regime)))


def _new_dtypes(copy: ModelCopy, regime: Regime, kbit_upcast: bool) -> Dtypes:
    """:func:`copy_dtypes`, computed."""
    c = DTYPE_BYTES[regime.compute_dtype]
    ac = regime.autocast is not None
    if copy.adapter is Adapter.FULL:
        wb = DTYPE_BYTES[regime.trainable_dtype]
    elif copy.quantized and copy.trains and kbit_upcast:
        wb = 4  # prepare_model_for_kbit_training upcasts embeddings/norms/lm_head to fp32
    else:
        wb = DTYPE_BYTES[regime.frozen_dtype]
    residual = wb
    # bitsandbytes Linear4bit casts its input to the compute dtype and its output back to the input
    # dtype (``out.to(inp_dtype)``), with or without autocast; other linears output autocast's dtype
    proj = residual if copy.quantized else (c if ac else wb)
    return Dtypes(residual=residual, norm_out=wb, proj_out=proj, attn=c if ac else proj, linear_in=c if ac else wb,
                  autocast_casts=ac and wb != c, logits=c if ac else wb, adapter=DTYPE_BYTES[regime.adapter_dtype])


#: The parts of a decoder layer :func:`layer_activation_bytes` counts.
LAYER_PARTS = ("layer", "attention", "attention_inputs")


def layer_activation_bytes(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime,
                           tokens, seq, *, input_requires_grad: bool = True, part: str = "layer"):
    """Bytes autograd saves in one decoder layer for ``tokens`` tokens of length-``seq`` sequences.

    ``part``: ``"layer"`` (the whole layer), ``"attention"`` (its attention block only) or
    ``"attention_inputs"`` (its attention block up to and including the q/k/v projections'
    outputs, before DoRA's scaling saves its own). ``input_requires_grad``: the layer's input
    needs a gradient (False for layer 0 of an adapter copy without checkpointing: a frozen embedding).

    Formula: ``tokens x per_token + tokens x seq x per_score + per_layer``, each summed op by op
    from the pieces below (the module docstring lists the sources): the norms (:func:`_norm_saved`),
    the linears' inputs (:func:`_linear_inputs`: full training, LoRA/DoRA, bitsandbytes 4-bit),
    IA³'s scaled tensors (:func:`_ia3_saved`), the attention kernel (:func:`_sdpa_saved` or
    :func:`_eager_saved`), and the MLP (:func:`_gated_mlp`, :func:`_plain_mlp`, :func:`_moe_mlp`).
    Returns an array broadcast over ``tokens`` and ``seq``.
    """
    if part not in LAYER_PARTS:
        raise ValueError(f"layer_activation_bytes: part {part!r} not in {LAYER_PARTS}")
    T = np.asarray(tokens, dtype=np.float64)
    s = np.asarray(seq, dtype=np.float64)
    per = _layer_sums(model, cfg, copy, regime, T, s, input_requires_grad, part)
    if part == "attention_inputs":
        return T * per
    per_token, per_score, per_layer = per
    if part == "attention":
        return T * per_token + T * s * per_score
    return T * per_token + T * s * per_score + per_layer


#: :func:`_layer_sums` kept by what they are computed from (cleared when it grows past 8192 entries).
_SUMS: dict = {}
#: The techniques a layer's saved tensors read (:func:`sdpa_masked_fraction`: padding masks SDPA): the kept sums are
#: keyed on these alone of a configuration's techniques, so its other technique sets (offloading, chunked or fused
#: losses, the optimiser inside backward) share them.
LAYER_TECHNIQUES = frozenset({"padding"})
_NO_TECHNIQUES: frozenset = frozenset()


def _layer_sums(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime, T, s, input_requires_grad: bool,
                part: str):
    """:func:`layer_activation_bytes`' sums (``attention_inputs``: bytes per token; else ``(per_token, per_score,
    per_layer)``), kept per what they read when the sequence is one number and the attention does not materialise
    its scores (eager's per-token sum reads the tokens): the model, the copy, the regime, and of the config its
    stack, versions, techniques of :data:`LAYER_TECHNIQUES`, attention, dropout, targets and rank -- not its method,
    micro-batch, checkpointing, optimiser or other techniques, so the searches of a fit (LoRA and every method
    training the same LoRA policy, with and without checkpointing, with each technique set) compute each once.
    Equal inputs, equal sums (tests/test_fit_speed.py, tests/test_first10_speed.py). A config whose rank is a
    tuple of ranks (a rank axis: :func:`rank_column`) gets sums with a leading rank axis, kept under that tuple and
    the grid's dimensions."""
    key = None
    rank = cfg.rank
    if type(rank) is tuple:  # a rank axis (:func:`rank_column`): the column's shape reads the grid's dimensions
        rank = (rank, max(T.ndim, s.ndim))
    if s.ndim == 0 and not cfg.attention.materialises_scores:
        key = (model, _copy_fields(copy), _regime_fields(regime), cfg.framework, cfg.versions,
               LAYER_TECHNIQUES.intersection(cfg.techniques) if cfg.techniques else _NO_TECHNIQUES, cfg.attn,
               cfg.dropout, cfg.targets, rank, float(s), input_requires_grad, part)
        try:
            kept = _SUMS.get(key)
        except TypeError:  # a spec built with list fields (from a log's JSON): nothing kept
            key = kept = None
        if kept is not None:
            return kept
    ly = _layer_setup(model, cfg, copy, regime)
    if type(rank) is tuple:
        ly = replace(ly, rank=rank_column(*rank))
    acc = _Saved()
    if part == "attention_inputs":
        out = _attention_inputs(ly, acc, input_requires_grad)
    else:
        _attention_block(ly, acc, T, s, input_requires_grad)
        if part == "layer":
            _mlp_block(ly, acc, input_requires_grad)
        out = (acc.per_token, acc.per_score, acc.per_layer)
    if key is not None:
        if len(_SUMS) > 8192:
            _SUMS.clear()
        _SUMS[key] = out
    return out


def rank_column(ranks: tuple[int, ...], ndim: int) -> np.ndarray:
    """A rank axis: the LoRA ranks ``ranks`` as an int64 column of shape ``(R, 1, ...)`` against a grid of ``ndim``
    dimensions. A configuration whose ``rank`` is such a tuple (:func:`vramplan.memory.step_terms`' ``ranks``) gets
    the saved bytes of every rank at once. The rank enters a layer's sums in one product (:func:`_lora_inputs`:
    ``lora_A``'s output, saved by ``lora_B``; integers, exact, as with the config's int rank), and everything after
    it is element-wise float64 arithmetic in the same order, so row ``i`` is, byte for byte, the sums of the config
    with rank ``ranks[i]`` (tests/test_rank11_speed.py)."""
    return np.array(ranks, dtype=np.int64).reshape((len(ranks),) + (1,) * ndim)


@dataclass(frozen=True)
class _Layer:
    """What one copy's decoder layer is made of, resolved once for the pieces of :func:`layer_activation_bytes`."""

    model: ModelSpec
    cfg: TrainConfig
    copy: ModelCopy
    regime: Regime
    d: Dtypes
    full: bool                 #: every weight trains (the linears save their inputs)
    targets: frozenset         #: the adapted modules (PEFT adapters; empty otherwise)
    lora_like: bool            #: a low-rank adapter (LoRA, QLoRA, DoRA)
    lin: dict                  #: the layer's linears by name
    dropout: bool              #: LoRA dropout > 0
    keeps_4bit_input: bool     #: bitsandbytes < 0.43.2 MatMul4Bit keeps every 4-bit linear's input
    layer_norm: bool           #: LayerNorm (else RMSNorm)
    ln_out: int | None         #: a LayerNorm's output bytes per element (None for RMSNorm)
    attn_in: tuple[str, ...]   #: the linears reading the attention block's normed input
    mlp_in: tuple[str, ...]    #: the linears reading the MLP block's normed input
    shared: bool               #: a parallel block with one norm: attention and the MLP read one normed tensor
    rank: Any                  #: the LoRA rank: the config's, or a rank axis's column (:func:`rank_column`)


#: The last :func:`_layer_setup`: ``(model, cfg, copy, regime, layer)``. A step's terms ask for one copy's
#: layer several times in a row (its saved tensors, its first layer, its attention block) with the same
#: (immutable) objects; the same objects give the same layer.
_LAST_SETUP: tuple | None = None


def _layer_setup(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime) -> _Layer:
    """Resolve the dtypes and the adapter's reach for one copy (:func:`_new_layer`), reusing the last
    call's when it was given these very objects."""
    global _LAST_SETUP
    last = _LAST_SETUP
    if last is not None and last[0] is model and last[1] is cfg and last[2] is copy and last[3] is regime:
        return last[4]
    ly = _new_layer(model, cfg, copy, regime)
    _LAST_SETUP = (model, cfg, copy, regime, ly)
    return ly


def _new_layer(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime) -> _Layer:
    """Resolve the dtypes and the adapter's reach for one copy. torch LayerNorm is on autocast's fp32
    list: under autocast it computes on an fp32 copy of its input and returns fp32, which every linear
    reading it casts on its own; without autocast it keeps the input's dtype (``ln_out``)."""
    d = copy_dtypes(copy, regime, cfg.stack.kbit_upcast)
    full = copy.adapter is Adapter.FULL
    peft = copy.adapter is not None and not full
    lora_like = copy.adapter in LOW_RANK
    layer_norm = model.norm_kind == "layer"
    nm = model.mod
    attn_in = (nm("qkv_proj"),) if model.fused_qkv else (nm("q_proj"), nm("k_proj"), nm("v_proj"))
    if model.mlp_kind == "plain":
        mlp_in = (nm("up_proj"),)
    else:
        mlp_in = (nm("gate_up_proj"),) if model.fused_gate_up else (nm("gate_proj"), nm("up_proj"))
    keeps = (copy.adapter is not None and copy.adapter.quantized_base and copy.quantized
             and cfg.behaves("bnb_4bit_saves_input"))
    return _Layer(model=model, cfg=cfg, copy=copy, regime=regime, d=d, full=full,
                  targets=frozenset(cfg.targets) if peft else frozenset(), lora_like=lora_like,
                  lin={l.name: l for l in model.layer_linears()}, dropout=lora_like and cfg.dropout > 0,
                  keeps_4bit_input=keeps, layer_norm=layer_norm,
                  ln_out=(4 if regime.autocast is not None else d.norm_out) if layer_norm else None,
                  attn_in=attn_in, mlp_in=mlp_in,
                  shared=model.parallel_block and model.norms_per_layer == 1 and not model.is_moe, rank=cfg.rank)


class _Saved:
    """Running sums of one layer's saved bytes: per token, per score element (token x sequence position,
    eager attention's ``s^2`` terms) and per layer whatever the tokens (weight casts saved for backward)."""

    def __init__(self) -> None:
        self.per_token = 0.0
        self.per_score = 0.0
        self.per_layer = 0.0


def _norm_saved(ly: _Layer, requires_grad: bool, width: int | None = None, in_bytes: int | None = None,
                same_input: bool = False) -> float:
    """Bytes per token one norm saves over ``width`` features (default the hidden size).

    * LayerNorm (``native_layer_norm``): its input (under autocast the fp32 cast of a 16-bit input)
      and a fp32 mean and rstd per row; its backward needs no output, so a trainable weight saves
      nothing more. ``same_input``: a second LayerNorm of a tensor the first already saved (GPT-NeoX's
      parallel residual): only its own cast (under autocast) and its mean and rstd.
    * RMSNorm (``LlamaRMSNorm``): the fp32 upcast saved by ``pow``/``mul`` when the input requires
      grad (4 B/elem); with a trainable weight also the normalised output, cast back to the input's
      dtype (``in_bytes``), saved for the weight gradient -- fp32 when the weight is applied in fp32
      (torchtune RMSNorm, stacks.toml ``norm_fp32``; Gemma / OLMo-2).
    """
    model, d = ly.model, ly.d
    width = model.hidden_size if width is None else width
    if ly.layer_norm and width == model.hidden_size:
        if not (requires_grad or ly.full):
            return 0.0
        cast = ly.regime.autocast is not None and d.residual != 4
        x = 0.0 if (same_input and not cast) else (4.0 if cast else float(d.residual)) * width
        return x + 8.0
    b = 4.0 * width if requires_grad else 0.0  # fp32 upcast saved by pow/mul
    if ly.full:
        fp32 = ly.cfg.stack.norm_fp32 or model.norm_weight_fp32
        b += (4 if fp32 else (d.norm_out if in_bytes is None else in_bytes)) * width
    return b


def _linear_inputs(ly: _Layer, names, width: int, fresh: bool, in_bytes: int | None = None,
                   dora_saved: bool = True) -> float:
    """Bytes per token saved for the linears ``names`` that all read one tensor of ``width`` features.

    ``fresh``: the input is a new tensor nobody else saves (a norm's output, the MLP product);
    False when it is already counted (SDPA's output feeds o_proj in place: flash kernels write it in
    the layout ``transpose(1, 2).contiguous()`` keeps). ``in_bytes``: the input's dtype size (default:
    the norm output's). The sum of :func:`_full_linear_inputs`, :func:`_lora_inputs` and
    :func:`_bnb_4bit_input`.
    """
    xb = ly.d.norm_out if in_bytes is None else in_bytes
    b = 0.0
    if ly.full:
        b += _full_linear_inputs(ly, names, width, fresh, xb)
    input_saved = False  # the shared input tensor itself is kept by someone (for the 4-bit behaviour)
    if ly.lora_like:
        lora, input_saved = _lora_inputs(ly, names, width, fresh, xb, dora_saved)
        b += lora
    b += _bnb_4bit_input(ly, width, fresh, input_saved)
    return b


def _full_linear_inputs(ly: _Layer, names, width: int, fresh: bool, xb: int) -> float:
    """Full training: a trainable weight's matmul saves its input (autograd saves ``self`` for ``mm`` when
    ``mat2`` needs a gradient); under autocast each call casts its own copy of an fp32 input (the casts are
    not shared), else the shared input is saved once."""
    d, c = ly.d, DTYPE_BYTES[ly.regime.compute_dtype]
    if d.autocast_casts and xb != c:
        return d.linear_in * width * len(names)  # one autocast cast per call
    if fresh:
        return (xb if ly.regime.autocast is not None else d.linear_in) * width  # the shared input, saved once
    return 0.0


def _lora_inputs(ly: _Layer, names, width: int, fresh: bool, xb: int, dora_saved: bool) -> tuple[float, bool]:
    """LoRA/DoRA on the adapted ones of ``names``: ``(bytes per token, whether the shared input itself is saved)``.

    PEFT casts the input to the adapter dtype first (when the stack does, stacks.toml
    ``peft_input_cast``); autocast then casts whatever reaches ``lora_A`` to the compute dtype, one
    copy per call, saved by ``lora_A``; with the dtypes equal ``lora_A`` saves the shared input itself
    (or, with dropout, each module's dropout output). Dropout keeps :data:`DROPOUT_SAVED_BYTES` per
    element per module (litgpt's fused qkv: one module). ``lora_A``'s output (rank wide) is saved by
    ``lora_B``. DoRA (PEFT ``DoraLinearLayer``): ``m / ||W + BA||`` scales the base result and the LoRA
    result; both saved (``lora_B``'s output in autocast's dtype under autocast, else the adapter's).
    The rank is the layer's (``_Layer.rank``: a rank axis's column makes the bytes a column too).
    """
    d, cfg, regime = ly.d, ly.cfg, ly.regime
    adapted = [n for n in names if n in ly.targets]
    c = DTYPE_BYTES[regime.compute_dtype]
    e = d.adapter if (cfg.stack.peft_input_cast and xb != d.adapter) else xb
    target = c if regime.autocast is not None else e
    b, input_saved = 0.0, False
    if e != xb or target != e:
        b += target * width * len(adapted)  # a cast copy per adapted module, saved by lora_A
    elif adapted and fresh and not ly.full:
        if ly.dropout:
            b += xb * width * len(adapted)  # each module's dropout output, saved by its lora_A
        else:
            b += xb * width  # lora_A saves the shared input itself
            input_saved = True
    if ly.dropout and adapted:
        qkv_only = cfg.stack.lora_qkv_pad and set(adapted) <= {"q_proj", "k_proj", "v_proj"}
        b += DROPOUT_SAVED_BYTES * width * (1 if qkv_only else len(adapted))
    b += target * ly.rank * len(adapted)  # lora_A's output, saved by lora_B
    if ly.copy.adapter.dora and dora_saved:
        b += sum((target + d.proj_out) * ly.lin[n].out_features for n in adapted)
    return b, input_saved


def _bnb_4bit_input(ly: _Layer, width: int, fresh: bool, input_saved: bool) -> float:
    """bitsandbytes < 0.43.2: ``MatMul4Bit.forward`` keeps A (the input cast to the compute dtype) on
    ``ctx`` until backward for every 4-bit linear; linears reading one tensor keep that one tensor
    (0 when someone already saves that input, or the behaviour is off)."""
    if ly.keeps_4bit_input and fresh and not input_saved and not (ly.full and ly.regime.autocast is None):
        return DTYPE_BYTES[ly.regime.compute_dtype] * width
    return 0.0


def _ia3_saved(ly: _Layer, names) -> float:
    """IA³ (PEFT ``IA3 Linear``): the scaled base output is saved (out features), or, for feed-forward
    modules, the input after casting it to the vector's dtype (``x.to(ia3_l.dtype) * ia3_l``)."""
    if ly.copy.adapter is None or not ly.copy.adapter.ia3:
        return 0.0
    model, d = ly.model, ly.d
    return sum(d.adapter * ly.lin[n].in_features if n in model.ia3_feedforward else d.proj_out * ly.lin[n].out_features
               for n in names if n in ly.targets or n in ly.cfg.targets)


def _attention_inputs(ly: _Layer, acc: _Saved, input_requires_grad: bool) -> float:
    """Per token, the attention block up to the q/k/v projections' outputs: its norm, the projections'
    saved inputs (the MLP's too in a parallel block with one norm) without DoRA's scaling, and the base
    outputs (q, k, v in the projections' dtype)."""
    m, h = ly.model, ly.model.hidden_size
    acc.per_token += _norm_saved(ly, input_requires_grad)
    first = ly.attn_in + (ly.mlp_in if ly.shared else ())
    return (acc.per_token + _linear_inputs(ly, first, h, fresh=True, dora_saved=False, in_bytes=ly.ln_out)
            + ly.d.proj_out * (m.q_dim + 2 * m.kv_dim))


def _attention_block(ly: _Layer, acc: _Saved, T, s, input_requires_grad: bool) -> None:
    """Add the attention block: its norm, the projections' inputs (and IA³'s), litgpt's zero-padded
    LoRA qkv, the q/k norms, the attention kernel (:func:`_eager_saved` or :func:`_sdpa_saved`) and
    o_proj's input (the attention output, transposed and contiguous)."""
    model, nm, h = ly.model, ly.model.mod, ly.model.hidden_size
    acc.per_token += _norm_saved(ly, input_requires_grad)
    first = ly.attn_in + (ly.mlp_in if ly.shared else ())
    acc.per_token += _linear_inputs(ly, first, h, fresh=True, in_bytes=ly.ln_out)
    acc.per_token += _ia3_saved(ly, ly.attn_in)
    qkv_adapted = [n for n in (nm("q_proj"), nm("k_proj"), nm("v_proj")) if n in ly.targets] if ly.lora_like else []
    if ly.cfg.stack.lora_qkv_pad and 0 < len(qkv_adapted) < 3:
        # a fused-qkv LoRA zero-pads the adapted outputs into the qkv width (litgpt LoRAQKVLinear.zero_pad,
        # index_copy_): the LoRA-B output of the adapted projections stays saved (stacks.toml lora_qkv_pad)
        acc.per_token += ly.d.adapter * sum(ly.lin[n].out_features for n in qkv_adapted)
    if model.qk_norm == "head" or model.qk_norm == "full":
        # q/k norms see the projections' outputs (autocast's dtype under autocast)
        acc.per_token += (_norm_saved(ly, True, model.q_dim, ly.d.proj_out)
                          + _norm_saved(ly, True, model.kv_dim, ly.d.proj_out))
    if ly.cfg.attention.materialises_scores:
        _eager_saved(ly, acc, T, s)
    else:
        _sdpa_saved(ly, acc, s)
    acc.per_token += _linear_inputs(ly, [nm("o_proj")], model.q_dim, fresh=False, in_bytes=ly.d.attn)
    acc.per_token += _ia3_saved(ly, [nm("o_proj")])


def _eager_saved(ly: _Layer, acc: _Saved, T, s) -> None:
    """Eager attention (:func:`eager_attention`): the tensors its two matmuls save per token, and the
    fp32 softmax output and its 16-bit cast per score element (heads x query x key position)."""
    ea = eager_attention(ly.model, ly.cfg, ly.copy, ly.regime)
    acc.per_token = acc.per_token + ea.qk + ea.v_bytes(T, s)
    acc.per_score += ly.model.num_heads * ea.saved


def _sdpa_saved(ly: _Layer, acc: _Saved, s) -> None:
    """SDPA with FlashAttention / memory-efficient kernels: q, k, v, the output and an fp32 logsumexp per
    head. With a mask (padding, or a sliding window shorter than the sequence) SDPA cannot use GQA
    (``repeat_kv`` copies k and v to every head) and the memory-efficient kernel saves the mask converted
    to an additive bias of the query dtype, per layer; a stack that expands k and v for GQA itself
    (torchtune ``MultiHeadAttention``: expand + flatten, a copy) hands SDPA two full-width copies in every
    layer (stacks.toml ``gqa_expand_kv``); v as a view of a fused qkv output keeps all of it saved."""
    model, d = ly.model, ly.d
    a, qd, kvd = d.attn, model.q_dim, model.kv_dim
    acc.per_token += a * (qd + 2 * kvd) + a * qd + 4 * model.num_heads  # q, k, v, out, logsumexp
    masked = sdpa_masked_fraction(model, ly.cfg, s)
    # (one kv head: repeat_kv's expand + reshape merges a size-1 dim, a view; nothing more is saved)
    expanded = 1.0 if ly.cfg.stack.gqa_expand_kv else masked * (ly.model.num_kv_heads > 1)
    acc.per_token = acc.per_token + expanded * 2 * a * (qd - kvd) + masked * a * s
    if model.fused_qkv and d.attn == d.proj_out:
        acc.per_token += a * (qd + kvd)  # v is a view of the fused qkv output: all of it stays saved


def _mlp_block(ly: _Layer, acc: _Saved, input_requires_grad: bool) -> None:
    """Add the MLP block: Gemma-2/3's post-attention norm before the residual add, the post-attention
    norm (GPT-NeoX's parallel residual: a second norm of the layer input; none in a parallel block with
    one norm), the MLP by kind, and Gemma-2/3's post-MLP norm."""
    model = ly.model
    if model.norms_per_layer == 4:
        acc.per_token += _norm_saved(ly, True)
    if not ly.shared:
        acc.per_token += (_norm_saved(ly, input_requires_grad, same_input=True) if model.parallel_block
                          else _norm_saved(ly, True))
    if model.is_moe:
        _moe_mlp(ly, acc)
    elif model.mlp_kind == "plain":
        _plain_mlp(ly, acc)
    else:
        _gated_mlp(ly, acc)
    if model.norms_per_layer == 4:
        acc.per_token += _norm_saved(ly, True)


def _gated_mlp(ly: _Layer, acc: _Saved) -> None:
    """SwiGLU (``down(act(gate(x)) * up(x))``): gate's output (the activation's input), the activation's
    output and up's output (a fused gate_up's 2i output is chunked into views and saved whole: the same
    bytes); the product only for a trainable down_proj's weight gradient, its adapter, or, with
    bitsandbytes < 0.43.2, a 4-bit down_proj's ``MatMul4Bit`` ctx even when frozen and not adapted."""
    m, i, h = ly.d.proj_out, ly.model.intermediate_size, ly.model.hidden_size
    acc.per_token += _linear_inputs(ly, ly.mlp_in, h, fresh=True, in_bytes=ly.ln_out)
    acc.per_token += _ia3_saved(ly, ly.mlp_in)
    acc.per_token += m * i * 3
    down_kept = ly.full or "down_proj" in ly.targets or ly.keeps_4bit_input
    acc.per_token += _linear_inputs(ly, ["down_proj"], i, fresh=True, in_bytes=m) if down_kept else 0.0
    acc.per_token += _ia3_saved(ly, ["down_proj"])


def _plain_mlp(ly: _Layer, acc: _Saved) -> None:
    """up -> act -> down (GPT-NeoX, Falcon, Phi-2): the activation saves the up output
    (:func:`act_saved_bytes`); its output is saved by down when down trains."""
    model, m, h = ly.model, ly.d.proj_out, ly.model.hidden_size
    i = model.intermediate_size
    if not ly.shared:
        acc.per_token += _linear_inputs(ly, ly.mlp_in, h, fresh=True, in_bytes=ly.ln_out)
    acc.per_token += _ia3_saved(ly, ly.mlp_in)
    acc.per_token += act_saved_bytes(model, ly.cfg, ly.regime, m) * i
    down = model.mod("down_proj")
    acc.per_token += _linear_inputs(ly, [down], i, fresh=True, in_bytes=m) if (ly.full or down in ly.targets) else 0.0
    acc.per_token += _ia3_saved(ly, [down])


def _moe_mlp(ly: _Layer, acc: _Saved) -> None:
    """A mixture of experts (transformers >= 5): the router's fp32 logits and softmax, the routed
    experts (:func:`_routed_expert_saved`, or every expert: :func:`_dense_expert_saved`), and a shared
    expert (a SwiGLU of its own width). Full training also saves the experts' output for the routing
    weights' gradient."""
    model, m, h = ly.model, ly.d.proj_out, ly.model.hidden_size
    router = 4 * model.num_experts * 2  # router logits fp32 + softmax
    expert = _dense_expert_saved(ly, acc) if model.dense_experts else _routed_expert_saved(ly)
    acc.per_token += router + expert + (m * h if ly.full else 0)
    if model.shared_expert_intermediate_size:
        si = model.shared_expert_intermediate_size
        acc.per_token += (_linear_inputs(ly, ["gate_proj", "up_proj"], h, fresh=True) + m * si * 3
                          + (m * si if ly.full else 0))


def _routed_expert_saved(ly: _Layer) -> float:
    """Per token, the ``k`` routed experts (grouped_mm): the gate_up output (its gate half feeds the
    activation), the activation's output, the down output (saved by the routing weight's multiply);
    full training also the product for down's weight gradient. fp32 expert banks -- QLoRA: fused
    experts are not nn.Linear, so bitsandbytes leaves them and ``prepare_model_for_kbit_training``
    upcasts them; full training in a mixed regime: fp32 master weights autocast does not cast -- run
    without grouped_mm, saving the gathered input, the gate_up and down outputs, the activation's output
    and the product, all fp32 (dry run, Qwen3-30B-A3B / Mixtral)."""
    model, d, m, h = ly.model, ly.d, ly.d.proj_out, ly.model.hidden_size
    k, mi = model.experts_per_token, model.moe_intermediate_size
    if d.residual == 4 and (ly.copy.quantized or ly.full):
        return k * 4 * (2 * h + 4 * mi)
    return k * (m * h + m * 2 * mi + m * mi + (m * mi if ly.full else 0))


def _dense_expert_saved(ly: _Layer, acc: _Saved) -> float:
    """Per token, every expert (transformers ``Llama4TextMoe``): ``hidden_states.repeat(num_experts)``
    scaled by the sigmoid router scores (the multiply saves the repeated copy, in the residual dtype),
    then ``torch.bmm`` over every expert in autocast's dtype: the gate_up output, the activation's output
    (and the product when down trains). Frozen fp32 banks (QLoRA: ``prepare_model_for_kbit_training``)
    are cast by autocast for bmm, and the casts stay saved for the input gradient (dry run, Scout):
    added to ``acc.per_layer``."""
    model, d, regime, h = ly.model, ly.d, ly.regime, ly.model.hidden_size
    E, mi = model.num_experts, model.moe_intermediate_size
    eo = DTYPE_BYTES[regime.compute_dtype] if regime.autocast is not None else d.proj_out
    if regime.autocast is not None and not ly.full and d.residual != eo:
        acc.per_layer += sum(l.params for l in model.layer_linears() if not l.is_linear) * eo
    return E * (d.residual * h + eo * 2 * mi + eo * mi + (eo * mi if ly.full else 0))


@dataclass(frozen=True)
class EagerAttention:
    """What transformers' ``eager_attention_forward`` keeps, per layer.

    ``qk`` and ``v``: bytes per token of the tensors the two matmuls save (q and k after rotary
    embedding, ``repeat_kv``'s copies of k and v when heads are grouped; v is a view of the
    projection's output when it is not copied, and a fused qkv output stays whole behind it).
    ``saved``, ``fwd_peak``, ``bwd_peak``: bytes per score element (one per head x query x key
    position) -- saved for backward; alive at the forward's peak inside the block when the forward
    saves nothing (no grad, or a checkpointed forward); alive at its backward's peak (what ``saved``
    held there, the rest freed by then, plus the gradients). ``capped``: bytes per score of Gemma-2's
    soft-capping ``tanh`` output (0 without soft-capping), part of ``saved``: a forward that saves it
    holds it at the softmax too, and its backward (after the softmax's) keeps it through ``bwd_peak``.
    """

    qk: float
    v: float
    v_one_row: float

    def v_bytes(self, tokens, seq):
        """Bytes per token v holds for ``tokens / seq`` sequences per call."""
        rows = np.asarray(tokens, dtype=np.float64) / np.asarray(seq, dtype=np.float64)
        return np.where(rows <= 1.0, self.v_one_row, self.v)
    saved: float
    fwd_peak: float
    bwd_peak: float
    capped: float = 0.0


def eager_attention(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime) -> EagerAttention:
    """The eager attention block op by op (transformers ``eager_attention_forward``, >= 5)::

        w = matmul(q, k.T) * scaling (+ mask)      # scores in the matmul's dtype (+ the mask's)
        w = softmax(w, dim=-1, dtype=float32).to(q.dtype)
        w = dropout(w, p=attention_dropout)        # training only
        out = matmul(w, v)

    * Softmax (``ATen/native/SoftMax.cpp``): a 16-bit input is converted to fp32 first, a
      transient the size of the fp32 output (CUDA fp16 skips it: ``_softmax(half_to_float)``);
      ``_softmax`` saves its fp32 output; ``.to`` makes the 16-bit probabilities that
      ``matmul(w, v)`` saves. 4 + a bytes saved per score (4 when everything is fp32).
    * Backward, in reverse: ``matmul``'s gradient of w (a bytes) frees the 16-bit probabilities
      and v; the cast's fp32 gradient (4); ``_softmax_backward_data`` writes the input's gradient
      (fp32; fp16 for half_to_float) beside the saved output and its gradient: 12 bytes per
      score at the block's peak (10 with half_to_float), the 16-bit probabilities already freed.
    * Dropout (``p > 0``, CUDA ``native_dropout``): the dropped probabilities (a) and a 1-byte
      mask are saved instead of the cast probabilities, which ``native_dropout_backward`` does
      not need.
    * Gemma-2's soft-capping (``w = tanh(w / cap) * cap`` before the mask) saves ``tanh``'s output
      (a per score), alive at the softmax when the forward saves it, and still saved at
      ``_softmax_backward_data`` (tanh's backward runs after the softmax's): 14 bytes per score at
      the block's backward peak in bf16 (the dry run, Gemma-2 at 8k tokens).
    Checked against the dry run (``benchmarks/dryrun_vs_analytic.py --attn eager``).
    """
    d = copy_dtypes(copy, regime, cfg.stack.kbit_upcast)
    a = d.attn
    qd, kvd = model.q_dim, model.kv_dim
    grouped = qd != kvd
    qk = a * qd + a * qd  # q, and k (repeat_kv's copy when grouped; the rotary output otherwise)
    # v: repeat_kv's copy, v_proj's output, or matmul's contiguous copy of a strided view (batched
    # 4-D matmul folds batch and heads with ``reshape``, a copy unless one sequence: then a view, and
    # a view of a fused qkv output keeps all of it: ``v_one_row``)
    v = a * qd
    v_one_row = d.proj_out * (qd + 2 * kvd) if (model.fused_qkv and not grouped and d.attn == d.proj_out) else v
    scores, conv, low = eager_score_dtypes(a, d.residual, regime.compute_dtype)
    half_to_float = scores == 2 and not conv
    p_drop = float((model.hf_config or {}).get("attention_dropout") or 0.0)
    dropped = 0.0 < p_drop < 1.0
    saved = 4.0 + (a + 1.0 if dropped else low)
    capped = float(a) if model.attn_logit_softcapping else 0.0  # tanh(scores / cap) saved for backward
    saved += capped
    fwd_peak = eager_softmax_peak(a, d.residual, regime.compute_dtype)
    # backward: the 16-bit probabilities (or dropout's output) and v are freed by matmul's backward
    grad_in = 2.0 if half_to_float else (4.0 if (conv or scores == 4) else float(scores))
    # (soft-capping's tanh output is still saved there: its backward comes after the softmax's)
    bwd_peak = 4.0 + 4.0 + grad_in + capped
    return EagerAttention(qk=qk, v=v, v_one_row=v_one_row, saved=saved, fwd_peak=fwd_peak, bwd_peak=bwd_peak,
                          capped=capped)


def eager_score_dtypes(attn: float, residual: float, compute_dtype: str) -> tuple[float, float, float]:
    """``(scores, conv, low)``: bytes per score element of eager attention's scores (the matmul's dtype
    ``attn`` promoted by the additive mask's, the hidden states' ``residual``), of the fp32 copy softmax
    converts a 16-bit input to (0 for fp32 scores, and for CUDA fp16, which takes
    ``_softmax(half_to_float=True)``: the dry run emulates it), and of the probabilities cast back
    to the query's dtype (``.to(q.dtype)``; 0 when that is fp32: no copy)."""
    scores = float(max(attn, residual))
    half_to_float = scores == 2 and compute_dtype == "float16"
    conv = 4.0 if (scores != 4 and not half_to_float) else 0.0
    low = float(attn) if attn != 4 else 0.0
    return scores, conv, low


def eager_softmax_peak(attn: float, residual: float, compute_dtype: str) -> float:
    """Bytes per score element (one per head x query x key position) alive at eager attention's
    forward peak when the forward saves nothing (no grad, a checkpointed forward): the scaled and
    masked scores beside each other, or the scores, softmax's fp32 conversion and its fp32 output
    (``softmax(w, dim=-1, dtype=float32)``), or the scores, that output and its cast back to the
    query's dtype (the chained ``.to(q.dtype)``: the scores stay bound until the assignment), or,
    once the scores are freed, that output and autocast's cast of it for ``matmul(w, v)``. The
    rotary embedding's cos/sin come in the hidden states' dtype, so q has the scores' dtype: fp32
    scores (an fp32 residual stream: full training under autocast, QLoRA) make ``.to`` a no-op.
    10 bytes in bf16, 8 with fp32 scores (the dry run: Llama-, Qwen2-, Mistral- and Gemma-2-shaped
    prefills). Dtypes: :func:`eager_score_dtypes`."""
    scores, conv, low = eager_score_dtypes(attn, residual, compute_dtype)
    cast_at_to = low if scores != 4 else 0.0
    return max(2 * scores, scores + conv + 4.0, scores + 4.0 + cast_at_to, 4.0 + low)


def eager_attention_work(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, regime: Regime, tokens, seq,
                         grad: bool | None = None):
    """(forward, backward) bytes of the eager attention block's working set in one layer, above the
    rest of that layer's attention-block tensors: the forward's peak inside the block over what it
    will have saved, and, at the backward's peak (``_softmax_backward_data``), the scores' buffers
    (:func:`eager_attention`) plus the output's and v's gradients, less what matmul's backward has
    freed (the 16-bit probabilities and v). Zero unless the attention materialises its scores
    (``AttentionKernel.materialises_scores``: eager).

    ``grad``: the forward saves tensors for backward (default: ``copy`` trains and the layer is not
    checkpointed); then soft-capping's saved ``tanh`` output sits beside the softmax's buffers. A
    no-grad forward (a reference, a checkpointed forward) frees it once the cap's multiply has run."""
    T = np.asarray(tokens, dtype=np.float64)
    s = np.asarray(seq, dtype=np.float64)
    if not cfg.attention.materialises_scores:
        return 0.0 * T * s, 0.0 * T * s
    ea = eager_attention(model, cfg, copy, regime)
    d = copy_dtypes(copy, regime, cfg.stack.kbit_upcast)
    heads = model.num_heads
    if grad is None:
        grad = copy.trains and not cfg.grad_ckpt
    fwd = T * s * heads * (ea.fwd_peak + (ea.capped if grad else 0.0) - ea.saved)
    grads = T * (d.attn * model.q_dim + d.attn * model.q_dim)  # d(out) and d(v)
    bwd = T * s * heads * (ea.bwd_peak - ea.saved) - T * ea.v_bytes(T, s) + grads
    return fwd, bwd


def sdpa_masked_fraction(model: ModelSpec, cfg: TrainConfig, seq):
    """The fraction of decoder layers whose SDPA call gets an attention mask: every layer when
    batches are padded; the sliding-window layers when the sequence is longer than the window.
    Zero unless the attention goes through torch's SDPA dispatch (``AttentionKernel.torch_sdpa``)."""
    s = np.asarray(seq, dtype=np.float64)
    if not cfg.attention.torch_sdpa:
        return 0.0 * s
    if cfg.uses("padding"):
        return 1.0 + 0.0 * s
    if not model.sliding_window:
        return 0.0 * s
    return np.where(s > model.sliding_window, model.sliding_fraction, 0.0)


def layer_backward_transient(model: ModelSpec, copy: ModelCopy, regime: Regime, tokens,
                             kbit_upcast: bool = True, targets: tuple[str, ...] = ()):
    """Gradient buffers alive while one layer runs backward (above its saved tensors), bytes.

    A dense MLP's backward (the dry run, op by op: ``benchmarks/dryrun_vs_analytic.py``) holds, at
    its peak, the incoming gradient of the layer's output (``tokens x hidden``, residual dtype) and
    ``tokens x intermediate`` buffers: the gradient of the down projection's input and, in a gated
    MLP, the two products of the ``act(gate) * up`` backward (``grad * up`` and ``grad * act``)
    before the first is consumed: three; a plain MLP's activation backward: two. IA³ on the down projection
    (``targets``; PEFT scales a feed-forward module's input after casting it to the vector's dtype) moves
    those three into the vector's dtype: the incoming gradient cast up, ``grad * scaling`` and
    ``grad * x`` before its reduction to the vector's gradient (the dry run). A mixture of
    experts runs each expert over its own tokens: two buffers of every routed token's
    intermediate width and two of the hidden width bound it.
    """
    T = np.asarray(tokens, dtype=np.float64)
    d = copy_dtypes(copy, regime, kbit_upcast)
    # (eager attention's softmax buffers are not here: :func:`eager_attention_work`, after the MLP's)
    if model.is_moe:
        i = model.moe_intermediate_size * model.experts_per_token
        return T * (2 * d.proj_out * i + 2 * d.residual * model.hidden_size)
    n = 3 if model.mlp_kind == "gated" else 2
    h = model.hidden_size
    down = model.mod("down_proj")
    ia3_down = copy.adapter is not None and copy.adapter.ia3 and down in targets and down in model.ia3_feedforward
    mlp = T * (n * d.proj_out * model.intermediate_size + d.residual * h)
    if ia3_down:
        mlp = np.maximum(mlp, T * (3 * max(d.adapter, d.proj_out) * model.intermediate_size + d.residual * h))
    if not model.closing_norm:
        return mlp
    # a closing norm (Gemma-2/3, OLMo-2) runs backward first, in fp32: five tokens x hidden fp32 buffers
    # beside the incoming gradient (as the final norm's: ``methods.preference.NORM_BACKWARD_BUFFERS``);
    # by the MLP's backward its saved tensors (the fp32 upcast; a trained weight's fp32 normalised input)
    # are freed
    freed = 4.0 * h * (2 if copy.adapter is Adapter.FULL else 1)
    return np.maximum(mlp - T * freed, T * (5 * 4.0 * h + d.residual * h))


def linear_backward_transient(model: ModelSpec, copy: ModelCopy, regime: Regime, tokens, transient,
                              kbit_upcast: bool = True, targets: tuple[str, ...] = ()):
    """The layer's backward buffers beside a dequantised 4-bit MLP weight (QLoRA), bytes: at most ``transient``.

    bitsandbytes' MatMul4Bit backward dequantises its weight, multiplies and frees it. The down projection
    runs backward before the ``act(gate) * up`` product's (under checkpointing even before the layer is
    recomputed: MatMul4Bit keeps its tensors on ctx, so no saved-tensor unpack triggers it), beside the
    incoming gradient and its own output, the gradient of its input; the gate and up projections after
    that product's backward freed its buffers (and the recomputed ``act`` and ``up`` it saved). So a
    dequantised weight never sits beside all of :func:`layer_backward_transient`'s buffers: beside the
    incoming gradient (``tokens x hidden``) and ``n - 1`` of the ``tokens x intermediate`` buffers
    (gated: 2, plain: 1). The dry run, op by op (mistral-7b-v0.3 QLoRA, eager, checkpointing, 2k tokens:
    the MLP's backward peaks at the product's two gradients, 368 MiB of buffers and no weight dequantised;
    the up projection dequantises 276 MiB lower). A mixture of experts and IA³ on the down projection keep
    ``transient`` (not traced)."""
    T = np.asarray(tokens, dtype=np.float64)
    down = model.mod("down_proj")
    ia3_down = copy.adapter is not None and copy.adapter.ia3 and down in targets and down in model.ia3_feedforward
    if model.is_moe or ia3_down:
        return transient
    d = copy_dtypes(copy, regime, kbit_upcast)
    n = 3 if model.mlp_kind == "gated" else 2
    return np.minimum(transient, T * ((n - 1) * d.proj_out * model.intermediate_size + d.residual * model.hidden_size))


@dataclass(frozen=True)
class LossRun:
    """How the stack (its version, and the techniques) runs the loss over the logits (:func:`loss_run`)."""

    mode: str            #: ``full_fp32`` (HF ForCausalLMLoss), ``chunked`` or ``fused_linear`` (Liger / Unsloth)
    chunks: Any          #: chunk count (an array over tokens when chunks hold a fixed number of tokens)
    keep: float          #: bytes per logit of the logits output kept through backward (0: the loop frees it)
    upcast: bool         #: each chunk is upcast to fp32 before the log-softmax
    upcast_bytes: float  #: bytes per logit of that fp32 copy (0 when the logits are fp32 or no upcast is made)


def loss_run(cfg: TrainConfig | None, copy: ModelCopy, d: Dtypes, tokens, rows) -> LossRun:
    """The loss the stack runs for ``tokens`` tokens in ``rows`` sequences (stacks.toml ``loss``,
    ``loss_chunks``, ``loss_upcast``, ``loss_chunk_tokens``, ``frees_logits``; version behaviours;
    the ``liger_ce`` / ``chunked_ce`` techniques). Without a config: HF's full fp32 loss."""
    T = np.asarray(tokens, dtype=np.float64)
    mode, chunks, keep, upcast = "full_fp32", 1, 0.0, True
    if cfg is not None:
        mode, chunks, keep, upcast = _stack_loss(cfg, copy, d, T, rows)
    up = 4.0 if d.logits != 4 else 0.0
    if not upcast and mode == "chunked":
        up = 0.0  # cross-entropy in the logits' dtype: no fp32 copy (litgpt chunked_cross_entropy)
    return LossRun(mode=mode, chunks=chunks, keep=keep, upcast=upcast, upcast_bytes=up)


def _stack_loss(cfg: TrainConfig, copy: ModelCopy, d: Dtypes, T, rows):
    """``(mode, chunks, keep, upcast)`` of :class:`LossRun` for a configuration."""
    st = cfg.stack
    mode, chunks, upcast = st.loss, st.loss_chunks, st.loss_upcast
    old_tt = cfg.behaves("torchtune_bf16_full_ce")
    if old_tt:
        # torchtune < 0.3.0: nn.CrossEntropyLoss on the whole shifted 16-bit logits, which the recipe
        # keeps through backward (stacks.toml [behaviours.torchtune_bf16_full_ce])
        mode, chunks, upcast = "chunked", 1, False
    elif st.loss_chunk_tokens and mode == "chunked":
        # chunks of loss_chunk_tokens tokens: of every sequence when the head runs chunked (litgpt LoRA:
        # lm_head_chunk_size), else of the flattened logits (stacks.toml loss_chunk_tokens)
        r = np.maximum(np.asarray(rows, dtype=np.float64), 1.0)
        per_row = copy.adapter is not None and copy.adapter.is_peft
        chunk = r * np.minimum(st.loss_chunk_tokens, T / r) if per_row else np.minimum(st.loss_chunk_tokens, T)
        chunks = T / np.maximum(chunk, 1.0)
    keep = 0.0 if (st.frees_logits and not old_tt) else float(d.logits)
    if keep and mode == "full_fp32" and cfg.behaves("hf_fp32_logits_output"):
        # transformers < 4.46 returns the fp32 upcast as output.logits: a loop that keeps the output
        # through backward keeps fp32 logits (stacks.toml [behaviours.hf_fp32_logits_output])
        keep = 4.0
    if cfg.uses("liger_ce"):
        mode = "fused_linear"
    elif cfg.uses("chunked_ce") and mode == "full_fp32":
        # (a stack that already chunks its loss keeps its own chunks; a fused loss has no logits)
        mode, chunks = "chunked", 8
    return mode, chunks, keep, upcast


def loss_mode_chunks(cfg, copy: ModelCopy, regime: Regime, tokens, rows=1):
    """``(mode, chunks)`` of the loss ``cfg``'s stack runs over ``tokens`` tokens in ``rows`` sequences
    (:func:`loss_run`): ``chunked`` and the chunk count (an array over tokens) for litgpt's per-row
    128-token lm_head chunks, torchtune's 8 chunks; ``full_fp32`` / ``fused_linear`` otherwise."""
    T = np.asarray(tokens, dtype=np.float64)
    run = loss_run(cfg, copy, copy_dtypes(copy, regime, cfg.stack.kbit_upcast), T, rows)
    return run.mode, run.chunks


def logits_bytes(model: ModelSpec, copy: ModelCopy, regime: Regime, tokens, head: str = "lm",
                 cfg: TrainConfig | None = None, rows=1):
    """(forward peak, backward peak) bytes of the logits and the loss for ``tokens`` tokens.

    * ``full_fp32`` (HF ``ForCausalLMLoss``): :func:`full_fp32_ce_bytes`.
    * ``chunked`` (torchtune ``CEWithChunkedOutputLoss``, litgpt ``chunked_cross_entropy``):
      :func:`chunked_ce_bytes`, or :func:`chunked_ce_no_upcast_bytes` without the fp32 upcast.
    * ``fused_linear`` (Liger ``FusedLinearCrossEntropy``, Unsloth): :func:`fused_linear_ce_bytes`.
    * ``torch.compile``'d loss: :func:`compiled_ce_bytes`.
    * A scalar head (reward/value) has one output per token: 8 bytes per token each way.
    * Methods whose loss has its own buffers (``Behaviour.loss_bytes``: the preference family) use
      them; TRL DPO's ``sequence_logps`` :func:`sequence_logps_bytes`; TRL PPO's ``response_logps``
      :func:`response_logps_bytes`.
    Gemma-2's soft-capped logits add ``tanh``'s saved output (one logit each way), except under a
    fused loss (no logits tensor).
    """
    T = np.asarray(tokens, dtype=np.float64)
    own = _method_loss_bytes(model, copy, regime, T, head, cfg, rows)
    if own is not None:
        return own
    if head == "scalar":
        return T * 8.0, T * 8.0
    kbit = cfg.stack.kbit_upcast if cfg is not None else True
    d = copy_dtypes(copy, regime, kbit)
    loss = loss_run(cfg, copy, d, T, rows)
    own_logps = cfg is not None and cfg.recipe.method.loss_kind.per_token_logps
    if cfg is not None and cfg.uses("compile") and loss.mode in ("chunked", "full_fp32") and not own_logps:
        return compiled_ce_bytes(T, model.vocab_size, d.logits, loss)
    fwd, bwd = _logits_by_loss(model, cfg, d, T, rows, loss, regime.runner)
    if model.final_logit_softcapping and loss.mode != "fused_linear":
        # Gemma-2: logits = tanh(logits / cap) * cap; tanh's output is saved for backward
        fwd, bwd = fwd + T * model.vocab_size * d.logits, bwd + T * model.vocab_size * d.logits
    return fwd, bwd


def _method_loss_bytes(model: ModelSpec, copy: ModelCopy, regime: Regime, T, head: str, cfg: TrainConfig | None, rows):
    """A training copy's logits and loss bytes when its method's loss has its own buffers
    (:meth:`vramplan.methods.base.Behaviour.loss_bytes`), with Gemma-2's saved ``tanh`` of soft-capped
    logits as :func:`logits_bytes` adds it; None when the method keeps its ``loss`` kind's accounting."""
    if cfg is None or not copy.trains:
        return None
    d = copy_dtypes(copy, regime, cfg.stack.kbit_upcast)
    own = cfg.recipe.behaviour.loss_bytes(model, copy, regime, T, rows, cfg, d.logits)
    if own is None:
        return None
    cap = T * model.vocab_size * d.logits * bool(model.final_logit_softcapping and head == "lm")
    return own[0] + cap, own[1] + cap


def _logits_by_loss(model: ModelSpec, cfg: TrainConfig | None, d: Dtypes, T, rows, loss: LossRun, runner: str):
    """The (forward, backward) bytes of the method's loss kind, else of the stack's loss mode
    (``runner``: the regime's training loop, ``trainer`` or ``loop``)."""
    V, h = model.vocab_size, model.hidden_size
    kind = cfg.recipe.method.loss_kind if cfg is not None else None
    if kind is not None and kind.response_only:
        return response_logps_bytes(model, cfg, d, T, rows, runner)
    if kind is not None and kind.per_token_logps:
        return sequence_logps_bytes(T, V, d.logits, runner, rows)
    if loss.mode == "fused_linear":
        return fused_linear_ce_bytes(T, V, h, d, loss)
    if loss.mode == "chunked" and cfg is not None and not loss.upcast:
        return chunked_ce_no_upcast_bytes(T, V, d.logits, loss)
    if loss.mode == "chunked":
        return chunked_ce_bytes(model, cfg, d, T, loss)
    return full_fp32_ce_bytes(T, V, d.logits, loss)


def full_fp32_ce_bytes(tokens, vocab: int, logit_bytes: float, loss: LossRun):
    """HF ``ForCausalLMLoss``: forward holds the logits in their dtype, the whole fp32 upcast
    (transient) and log_softmax's saved fp32 output, ``T V (b + up + 4)``; backward holds the saved
    output plus the incoming and outgoing fp32 gradients and the kept logits, ``T V (12 + keep)``."""
    T = tokens
    return T * vocab * (logit_bytes + loss.upcast_bytes + 4.0), T * vocab * (12.0 + loss.keep)


def chunked_ce_bytes(model: ModelSpec, cfg: TrainConfig | None, d: Dtypes, tokens, loss: LossRun):
    """torchtune ``CEWithChunkedOutputLoss`` / litgpt ``chunked_cross_entropy`` with an fp32 upcast
    per chunk (``n`` chunks): forward ``T V (b + 4 + up / n)`` (every chunk's saved fp32 log-probs, one
    chunk's upcast); backward ``T V (4 + 8 / n + b / n + keep)`` (one chunk's gradients at a time).
    When the head runs per chunk (torchtune ``chunked_output``, full training), once every chunk's loss
    backward is done the head's backward accumulates its weight gradient chunk by chunk: two chunk
    gradients and their sum (``3 V h`` in the norm's dtype) beside the chunks' logit gradients not yet
    consumed (all but two) -- measured by the dry run."""
    T, V, n = tokens, model.vocab_size, loss.chunks
    fwd = T * V * (d.logits + 4.0 + loss.upcast_bytes / n)
    bwd = T * V * (4.0 + 8.0 / n + d.logits / n + loss.keep)
    if cfg is not None and cfg.stack.chunked_output and n > 1 and cfg.recipe.copies[0].adapter is Adapter.FULL:
        head = 3.0 * V * model.hidden_size * d.norm_out + T * V * d.logits * (n - 2) / n
        bwd = np.maximum(bwd, head)
    return fwd, bwd


def chunked_ce_no_upcast_bytes(tokens, vocab: int, logit_bytes: float, loss: LossRun):
    """Cross-entropy in the logits' dtype (litgpt ``chunked_cross_entropy``; torchtune < 0.3.0's
    ``CrossEntropyLoss``, one chunk): log_softmax saves each chunk's output beside the logits,
    ``T V 2b``; backward holds them and two chunk gradients, ``T V (b + keep) + 2 (T / n) V b`` (dry run)."""
    T, lg = tokens, float(logit_bytes)
    return T * vocab * (lg + lg), T * vocab * (lg + loss.keep) + 2.0 * (T / loss.chunks) * vocab * lg


def fused_linear_ce_bytes(tokens, vocab: int, hidden: int, d: Dtypes, loss: LossRun):
    """Liger ``FusedLinearCrossEntropy`` / Unsloth: the lm_head and the loss run over token chunks of
    ``2**ceil(log2(T / ceil(V / h)))`` tokens (at most T); no logits tensor. Forward: one chunk's logits,
    their upcast and fp32 work, ``chunk V (b + up + 4)``, beside the input gradient (``T h`` in the
    residual dtype) computed in forward and kept for backward; backward: that gradient twice."""
    T = tokens
    chunk = np.exp2(np.ceil(np.log2(np.maximum(1.0, np.ceil(T / np.ceil(vocab / hidden))))))
    chunk = np.minimum(chunk, T)
    work = chunk * vocab * (d.logits + loss.upcast_bytes + 4.0)
    grad_in = T * hidden * d.residual
    return work + grad_in, grad_in + T * hidden * d.residual


def compiled_ce_bytes(tokens, vocab: int, logit_bytes: float, loss: LossRun):
    """A ``torch.compile``'d loss (stacks.toml techniques.compile): the min-cut partitioner saves the
    logits and a per-row logsumexp, recomputing the softmax in backward; one chunk's fp32 working set
    (``(T / n) V 8``) is live at a time (the whole logits when the loss is not chunked)."""
    T = tokens
    n = loss.chunks if loss.mode == "chunked" else 1
    work = (T / n) * vocab * 8.0
    return T * vocab * logit_bytes + work, T * vocab * (logit_bytes + loss.keep) + work


def sequence_logps_bytes(tokens, vocab: int, logit_bytes: float, runner: str, rows):
    """TRL DPO's ``sequence_logps`` (``selective_log_softmax`` over the ``rows`` sequences of the batch),
    as the dry run measures it (``benchmarks/dryrun_vs_analytic.py``). With fp32 logits (the HF
    Trainer's accelerate converts the 16-bit output to fp32; or an fp32 model) the fp32 logits are
    saved by the gather and the per-row logsumexp: forward holds the 16-bit output while converting,
    the fp32 logits and a masked copy for the logits metric (``T V (8 + b)``); backward holds them
    with the gather's scattered gradient, the rows' stacked gradient and their sum (``T V 16``). With
    16-bit logits (a plain bf16 loop) each row's log_softmax output is saved beside the logits, one
    row's fp32 temporaries at a time (``T V (2b + 4 / rows)``), and backward holds two 16-bit gradients."""
    T = tokens
    if logit_bytes == 4 or get_runner(runner).fp32_outputs:
        return T * vocab * (8.0 + (logit_bytes if logit_bytes != 4 else 0.0)), T * vocab * 16.0
    r = np.maximum(np.asarray(rows, dtype=np.float64), 1.0)
    return T * vocab * (2.0 * logit_bytes + 4.0 / r), T * vocab * 2.0 * logit_bytes


def response_logps_bytes(model: ModelSpec, cfg: TrainConfig, d: Dtypes, tokens, rows, runner: str):
    """TRL PPO's ``response_logps``: the whole sequence's logits stay alive (the response logits are a
    view into them) with their gradient twice over (the slice's zero-filled gradient and the accumulated
    one), plus the temperature-scaled response logits and their clone; measured by the dry run. TRL asks
    the policy for ``output_hidden_states``: without checkpointing nothing else keeps the layers'
    outputs (their norms save fp32 copies), so the tuple holds them until the logits are taken;
    accelerate converts every one of them to fp32 too."""
    T, V = tokens, model.vocab_size
    r = np.maximum(np.asarray(rows, dtype=np.float64), 1.0)
    RV = r * response_tokens(cfg, T / r) * V
    fp32_outputs = get_runner(runner).fp32_outputs
    lg = 4.0 if (d.logits == 4 or fp32_outputs) else float(d.logits)
    converted = d.logits != 4 and fp32_outputs
    fwd = T * V * (lg + (d.logits if converted else 0.0)) + (0.0 if lg == 4 else RV * lg)
    hs = (model.num_layers + 1) * T * model.hidden_size
    if not cfg.grad_ckpt:
        fwd = fwd + hs * d.residual
    if converted:
        fwd = fwd + hs * 4.0
    return fwd, T * V * 3 * lg + RV * 2 * lg


def checkpoint_input_bytes(model: ModelSpec, copy: ModelCopy, regime: Regime, tokens, kbit_upcast: bool = True):
    """Under gradient checkpointing each decoder layer keeps only its input hidden states."""
    return np.asarray(tokens, dtype=np.float64) * copy_dtypes(copy, regime, kbit_upcast).residual * model.hidden_size


def attention_mask_bytes(model: ModelSpec, cfg: TrainConfig, regime: Regime, batch, seq):
    """The 4-D mask shared by every layer: eager attention's additive float mask, or SDPA's
    boolean mask when batches are padded or a sliding window is shorter than the sequence
    (with packing / equal lengths and no window SDPA runs ``is_causal``)."""
    b = np.asarray(batch, dtype=np.float64) * cfg.recipe.sequences_per_example
    s = np.asarray(seq, dtype=np.float64)
    kernel = cfg.attention
    if kernel.materialises_scores:
        # an additive mask in the hidden states' dtype; a model mixing sliding-window and full
        # layers (Gemma-2/3) builds one of each once the window is shorter than the sequence
        d = copy_dtypes(cfg.recipe.copies[0], regime, cfg.stack.kbit_upcast)
        frac = model.sliding_fraction
        masks = np.where((frac > 0) & (frac < 1) & (s > (model.sliding_window or np.inf)), 2.0, 1.0)
        return masks * b * s * s * d.residual
    if kernel.torch_sdpa:
        if not (model.sliding_window or cfg.uses("padding")):  # no mask (sdpa_masked_fraction 0): is_causal
            return b * s * 0.0
        return b * s * s * np.where(sdpa_masked_fraction(model, cfg, s) > 0, 1.0, 0.0)
    if model.sliding_window and kernel.handles_masks_itself:
        # a kernel taking the window as an argument (flash_attention_2) builds no mask; run through transformers'
        # SDPA interface instead (flash-attn not installed: the flash kernel via SDPA; the dry run) the
        # sliding-window layers' boolean mask is still built. Counted: the safe side of the two
        return b * s * s * np.where(s > model.sliding_window, 1.0, 0.0)
    return b * s * 0.0


def kv_cache_bytes(model: ModelSpec, regime: Regime, copy: ModelCopy, batch, total_tokens, kbit_upcast: bool = True):
    """KV cache of ``batch`` sequences of ``total_tokens``: 2 (k, v) x layers x kv_dim per token,
    in the model's own dtype (TRL generates without autocast; bitsandbytes returns the input dtype)."""
    d = copy_dtypes(copy, regime, kbit_upcast)
    return (np.asarray(batch, dtype=np.float64) * np.asarray(total_tokens, dtype=np.float64)
            * 2 * model.num_layers * model.kv_dim * d.residual)


def response_tokens(cfg: TrainConfig, seq):
    """Tokens generated per sequence of ``seq`` tokens (a grid), as the method's ``generation`` hook says
    (PPO: ``--ppo-response``, else half the sequence, at most ``seq - 1``; vramplan.methods.generation)."""
    return cfg.recipe.behaviour.generation(cfg, np.asarray(seq, dtype=np.float64)).generated_tokens


def rollout_logits_bytes(model: ModelSpec, cfg: TrainConfig, copy: ModelCopy, batch, seq, kv):
    """PPO rollout (TRL ``PPOTrainer``, no autocast): the bytes beside its KV cache ``kv`` at the
    rollout's peak, the larger of

    * the end of generation: ``generate``'s fp32 scores of every response step, as a list and
      stacked (2 x batch x response x vocab x 4 B), beside the cache;
    * the reference forward over prompt + response after the cache is dropped: its logits in
      the model dtype and the temperature-scaled response slice (less the cache it replaces).
    """
    b = np.asarray(batch, dtype=np.float64)
    s = np.asarray(seq, dtype=np.float64)
    resp = response_tokens(cfg, s)
    V = model.vocab_size
    dl = copy_dtypes(copy, cfg.regime, cfg.stack.kbit_upcast).residual
    return np.maximum(2.0 * b * resp * V * 4, b * (s + resp) * V * dl - kv)

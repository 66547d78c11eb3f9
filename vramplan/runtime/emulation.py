"""Make ``meta`` tensors behave as CUDA tensors do in the ops that decide memory.

``meta`` tensors carry no device dispatch key for autocast (``AutocastCUDA`` acts only on
tensors whose ``is_cuda()`` is true) and the SDPA composite picks its math path for them.
Fake CUDA tensors (``FakeTensorMode`` with ``device='cuda'``) are no way out on a CPU-only
build: autograd asks the CUDA device guard for a stream when it records a node, and the
process aborts ("PyTorch is not linked with support for cuda devices"). So the dry run
runs on ``meta`` and this module emulates, *before autograd records anything* (a
``TorchFunctionMode``), what CUDA would do:

* **Autocast** with CUDA's policy lists, copied from ``ATen/autocast_mode.h`` (torch 2.13):
  lower-precision ops cast every floating argument to the autocast dtype, caching the casts
  of fp32 leaf tensors that require grad (trainable weights) until the outermost autocast
  region exits, exactly as ``at::autocast::cached_cast`` does; fp32 ops upcast; the
  ``fp32_set_opt_dtype`` ops (softmax, log_softmax, sum, cumsum, prod, vector norms) get
  ``dtype=float32`` when their first argument is an eligible 16-bit tensor; ``promote``
  ops cast to the widest floating type. The TLS flags of CUDA autocast are set too, so
  ``torch.is_autocast_enabled()`` answers as on a GPU (PEFT and HF branch on it).
* **SDPA backend choice** as ``sdp_utils.cpp`` makes it on sm80+ (priority flash,
  efficient, math, cudnn last): flash for fp16/bf16 without an explicit mask (it takes
  grouped-query heads natively), memory-efficient for fp32 or masked calls without
  grouped heads, the math composite otherwise. The fused kernels are called through their
  aten ops, whose meta kernels allocate what the CUDA kernels return (out and the fp32
  logsumexp); the dry run's tracker adds the kernels' backward workspaces.

* **Softmax's fp32 upcast of fp16** (``ATen/native/SoftMax.cpp``, ``softmax``/``log_softmax``
  with ``dtype=float32``): a CUDA fp16 input goes straight to ``_softmax(x, dim,
  half_to_float=True)`` (fp32 out, its gradient back in fp16); any other input -- and every
  ``meta`` one -- is first converted (a transient fp32 copy, an fp32 input gradient cast back
  in backward). bf16 takes the conversion path on CUDA too.
* **Dropout** (``ATen/native/Dropout.cpp``, ``is_fused_kernel_acceptable``): on CUDA, training
  with ``0 < p < 1`` runs the fused ``native_dropout`` (the output and a one-byte mask, saved
  for backward); on ``meta`` ``dropout`` would build a noise tensor in the input's dtype and
  multiply (the noise saved). Eager attention dropout and PEFT's ``lora_dropout`` go through it.

Known gaps (documented in the dry run's assumptions): an op that CUDA autocast would catch
*inside* a C++ composite that is not itself listed is not seen here (torch-function modes
see Python-level calls only); ``cross_entropy`` and ``linalg.norm``/``norm`` are mapped to
the policy of the op inside them. cuDNN attention is never chosen (it is last in torch's
default priority).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from ..attention import attention_kernel

# ---- CUDA autocast policy (ATen/autocast_mode.h, AT_FORALL_* lists; names as Python sees them)
_LOWER = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addmv", "addr", "baddbmm", "addbmm",
    "einsum", "mv", "chain_matmul", "linalg_multi_dot", "multi_dot", "linalg_vecdot", "vecdot", "conv1d", "conv2d",
    "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution", "prelu",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
}
_FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "rms_norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
}
_SET_OPT_DTYPE = {
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "vector_norm", "linalg_matrix_norm",
    "matrix_norm", "sum",
    # composites whose inner op is set_opt_dtype / fp32_append_dtype (norm.Scalar, norm.ScalarOpt_dim)
    "linalg_norm", "norm",
}
_PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
            "tensordot", "scatter_add"}
# composite Python functions whose first input goes through an fp32 op (log_softmax+nll_loss)
_FP32_INPUT = {"cross_entropy"}

LOWER, FP32, SET_OPT, PROMOTE, FP32_INPUT = range(5)
POLICY: dict[str, int] = {}
for _names, _pol in ((_LOWER, LOWER), (_FP32, FP32), (_SET_OPT_DTYPE, SET_OPT), (_PROMOTE, PROMOTE),
                     (_FP32_INPUT, FP32_INPUT)):
    POLICY.update(dict.fromkeys(_names, _pol))

_FLOAT16 = (torch.float16, torch.bfloat16)


def _eligible(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype is not torch.float64


def _map(fn: Callable, obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in obj):
        return type(obj)(fn(o) if isinstance(o, torch.Tensor) else o for o in obj)
    return obj


def _first_tensor(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


class CudaEmulation(TorchFunctionMode):
    """CUDA autocast policy and SDPA backend choice for meta tensors (see the module docstring).

    Args:
        attn: ``sdpa`` (torch's choice), ``flash`` (flash-attention kernels whenever the
            dtype allows, as HF's ``flash_attention_2`` would), or ``eager``.
        on_cached_cast: called with each autocast cast of a weight (``nn.Parameter``): the cached
            casts of trainable fp32 leaves, and the per-use casts of frozen fp32 weights.
        flash_dtype: what HF's ``flash_attention_2`` casts fp32 q, k, v to outside autocast
            (transformers ``integrations/flash_attention.py`` ``get_target_dtype``: a quantized
            model's ``config.dtype``, else its linears' weight dtype; the regime's 16-bit compute
            dtype here), so that an fp32 residual stream (QLoRA's generate, which bypasses
            accelerate's autocast) still runs the flash kernel. None: no cast.
    """

    def __init__(self, attn: str = "sdpa", on_cached_cast: Callable[[torch.Tensor], None] | None = None,
                 flash_dtype: torch.dtype | None = None):
        super().__init__()
        self.attn = attn
        self.kernel = attention_kernel(attn)  # what its SDPA calls stand in for (vramplan.attention)
        self.flash_dtype = flash_dtype
        self.on_cached_cast = on_cached_cast
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.nesting = 0
        self.sdpa_calls: dict[str, int] = {}

    # -- autocast ----------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._cache.clear()

    def _cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not _eligible(t) or t.dtype is dtype:
            return t
        lower = torch.get_autocast_dtype("cuda")
        if (dtype is lower and t.dtype is torch.float32 and t.requires_grad and t.is_leaf and not t._is_view()
                and torch.is_autocast_cache_enabled()):
            hit = self._cache.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
            cast = t.to(dtype)
            self._cache[id(t)] = (t, cast)
            if self.on_cached_cast is not None:
                self.on_cached_cast(cast)
            return cast
        cast = t.to(dtype)
        if self.on_cached_cast is not None and isinstance(t, torch.nn.Parameter):
            # a frozen fp32 weight (QLoRA's upcast lm_head, fp32 experts) is cast anew at every use
            # (not cached), but it is the same kind of memory: autocast's 16-bit copy of a weight
            self.on_cached_cast(cast)
        return cast

    def _autocast(self, func, policy: int, args, kwargs):
        lower = torch.get_autocast_dtype("cuda")
        if policy == LOWER:
            args = tuple(_map(lambda t: self._cast(t, lower), a) for a in args)
            kwargs = {k: _map(lambda t: self._cast(t, lower), v) for k, v in kwargs.items()}
        elif policy == FP32:
            args = tuple(_map(lambda t: self._cast(t, torch.float32), a) for a in args)
            kwargs = {k: _map(lambda t: self._cast(t, torch.float32), v) for k, v in kwargs.items()}
        elif policy == SET_OPT:
            first = _first_tensor(args, kwargs)
            given = kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
            if _eligible(first) and not given:
                kwargs = dict(kwargs, dtype=torch.float32)
        elif policy == FP32_INPUT:
            if args and _eligible(args[0]):
                args = (self._cast(args[0], torch.float32),) + tuple(args[1:])
            elif _eligible(kwargs.get("input")):
                kwargs = dict(kwargs, input=self._cast(kwargs["input"], torch.float32))
        elif policy == PROMOTE:
            ts = [t for a in list(args) + list(kwargs.values())
                  for t in (a if isinstance(a, (list, tuple)) else [a]) if _eligible(t)]
            to = torch.float32 if any(t.dtype is torch.float32 for t in ts) else lower
            args = tuple(_map(lambda t: self._cast(t, to), a) for a in args)
            kwargs = {k: _map(lambda t: self._cast(t, to), v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    # -- SDPA ------------------------------------------------------------------------------
    def _sdpa(self, func, args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        p = dict(zip(names, args))
        p.update(kwargs)
        q, k, v = p["query"], p["key"], p["value"]
        mask = p.get("attn_mask")
        dropout_p = float(p.get("dropout_p", 0.0) or 0.0)
        is_causal = bool(p.get("is_causal", False))
        scale = p.get("scale")
        enable_gqa = bool(p.get("enable_gqa", False))
        if torch.is_autocast_enabled("cuda"):  # scaled_dot_product_attention is a lower-precision op
            lower = torch.get_autocast_dtype("cuda")
            q, k, v = (self._cast(t, lower) for t in (q, k, v))
            if mask is not None:
                mask = self._cast(mask, lower)
        elif self.kernel.casts_fp32_inputs and q.dtype is torch.float32 and self.flash_dtype in _FLOAT16:
            q, k, v = (t.to(self.flash_dtype) for t in (q, k, v))  # _flash_attention_forward's fp32 -> target cast
        backend = self.choose_backend(q, k, v, mask, is_causal, enable_gqa)
        self.sdpa_calls[backend] = self.sdpa_calls.get(backend, 0) + 1
        if backend == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                       scale=scale)[0]
        if backend == "efficient":
            if mask is not None and mask.dtype is torch.bool:  # convert_boolean_attn_mask
                mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
            lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, lse, dropout_p, is_causal,
                                                                           scale=scale)[0]
        return func(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    def choose_backend(self, q, k, v, mask, is_causal: bool, enable_gqa: bool) -> str:
        """The backend CUDA's ``_fused_sdp_choice`` would take (sm80+, default priority)."""
        head_dim = q.shape[-1]
        same_dims = k.shape[-1] == head_dim and v.shape[-1] == head_dim
        gqa = q.dim() == 4 and k.dim() == 4 and q.shape[-3] != k.shape[-3]
        square = q.shape[-2] == k.shape[-2]
        flash_ok = q.dtype in _FLOAT16 and same_dims and head_dim <= 256 and (square or not is_causal)
        if not self.kernel.handles_masks_itself:  # HF's flash_attention_2 handles masks (unpadding) and GQA itself
            flash_ok = flash_ok and mask is None and (not gqa or enable_gqa)
        if flash_ok:
            return "flash"
        align = 4 if q.dtype is torch.float32 else 8
        if q.dtype in (*_FLOAT16, torch.float32) and not gqa and head_dim % align == 0 and v.shape[-1] % align == 0:
            return "efficient"
        return "math"

    # -- softmax and dropout as their CUDA kernels (see the module docstring) ---------------------
    def _softmax(self, func, name: str, args, kwargs):
        p = dict(zip(("input", "dim", "_stacklevel", "dtype"), args))
        p.update(kwargs)
        x, dim, dtype = p.get("input"), p.get("dim"), p.get("dtype")
        if (torch.is_autocast_enabled("cuda") and dtype is None and _eligible(x)
                and x.dtype is not torch.float32):
            dtype = torch.float32  # fp32_set_opt_dtype
        if isinstance(x, torch.Tensor) and x.dtype is torch.float16 and dtype is torch.float32 and dim is not None:
            return (torch._softmax if name == "softmax" else torch._log_softmax)(x, dim, True)
        return None

    @staticmethod
    def _dropout(args, kwargs):
        p = dict(zip(("input", "p", "training", "inplace"), args))
        p.update(kwargs)
        x, prob = p.get("input"), float(p.get("p", 0.5))
        if (isinstance(x, torch.Tensor) and p.get("training", True) and not p.get("inplace", False)
                and 0.0 < prob < 1.0 and x.numel() > 0 and x.is_floating_point()):
            return torch.native_dropout(x, prob, True)[0]
        return None

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name == "scaled_dot_product_attention":
            return self._sdpa(func, args, kwargs)
        if func is torch.nn.functional.softmax or func is torch.nn.functional.log_softmax:
            out = self._softmax(func, name, args, kwargs)
            if out is not None:
                return out
        if func is torch.nn.functional.dropout:
            out = self._dropout(args, kwargs)
            if out is not None:
                return out
        if name in ("grouped_mm", "_grouped_mm"):
            a, b = args[0], args[1]
            if a.dtype is not torch.bfloat16 or b.dtype is not torch.bfloat16:
                return _GroupedMMFallback.apply(a, b)
        if name is not None and torch.is_autocast_enabled("cuda"):
            policy = POLICY.get(name)
            if policy is not None:
                return self._autocast(func, policy, args, kwargs)
        # A Python composite runs with this mode off (re-entering would recurse through its own
        # has_torch_function check): the composites that hide a listed op are mapped above.
        return func(*args, **kwargs)


class _GroupedMMFallback(torch.autograd.Function):
    """``grouped_mm`` for non-bf16 operands on ``meta`` (whose kernel accepts bf16 only).

    Memory as a grouped GEMM: the [tokens, N] output; both operands saved for backward;
    gradients shaped like the operands. (2-D input sorted by expert, 3-D expert weights.)
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a.new_empty(a.shape[0], b.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return (torch.empty_like(a) if ctx.needs_input_grad[0] else None,
                torch.empty_like(b) if ctx.needs_input_grad[1] else None)


@contextmanager
def emulated_autocast(mode: CudaEmulation, dtype: torch.dtype, enabled: bool = True):
    """``torch.autocast('cuda', dtype)`` for meta tensors under ``mode`` (CUDA TLS flags + cast cache)."""
    prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", dtype)
    mode.nesting += 1
    try:
        yield
    finally:
        mode.nesting -= 1
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        if mode.nesting == 0:
            mode.clear_cache()


_PATCHED = False


def install_meta_patches() -> None:
    """Answer, for ``meta`` tensors, the data-dependent checks transformers makes on values.

    ``masking_utils.find_packed_sequence_indices`` reads position ids to detect packed
    sequences (``.all()`` on a tensor); the dry run's inputs are unpacked full-length
    sequences, for which it returns None -- so it returns None for meta tensors. Real
    tensors take the original path. Idempotent.
    """
    global _PATCHED
    if _PATCHED:
        return
    import transformers.masking_utils as mu

    orig = mu.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids):
        if isinstance(position_ids, torch.Tensor) and position_ids.device.type == "meta":
            return None
        return orig(position_ids)

    find_packed_sequence_indices.__wrapped__ = orig
    mu.find_packed_sequence_indices = find_packed_sequence_indices
    _patch_meta_params4bit_deepcopy()
    _PATCHED = True


def _patch_meta_params4bit_deepcopy() -> None:
    """bitsandbytes ``Params4bit.__deepcopy__`` makes the copy with ``Params4bit.__new__`` (a CPU tensor) and
    then assigns the data, which a ``meta`` tensor refuses. PEFT's DoRA deep-copies the 4-bit base layer once
    at init (``DoraLinearLayer.update_layer``, to dequantise it for the initial weight norm): for a meta
    weight the copy is built from meta data directly. Real tensors take bitsandbytes' path."""
    try:
        from bitsandbytes.nn import Params4bit
    except ImportError:  # pragma: no cover - QLoRA needs it; nothing to patch without it
        return
    import copy

    orig = Params4bit.__deepcopy__

    def __deepcopy__(self, memo):
        if self.data.device.type != "meta":
            return orig(self, memo)
        return Params4bit(torch.empty_like(self.data), requires_grad=self.requires_grad,
                          quant_state=copy.deepcopy(self.quant_state, memo), blocksize=self.blocksize,
                          compress_statistics=self.compress_statistics, quant_type=self.quant_type,
                          quant_storage=self.quant_storage, module=self.module, bnb_quantized=self.bnb_quantized)

    __deepcopy__.__wrapped__ = orig
    Params4bit.__deepcopy__ = __deepcopy__


def patch_meta_autocast() -> None:
    """transformers < 5.4 (``utils.generic.maybe_autocast``) opens ``torch.autocast(device_type)``
    for the rotary embedding's fp32 section with the inputs' device type, and ``torch.autocast``
    rejects ``meta`` ("unknown device type for autocast"); later releases return a null context for
    ``meta``. The modeling modules import the function by name, so every loaded ``transformers``
    module that holds it gets the wrapper. Idempotent; call after the model classes are imported."""
    import sys
    from contextlib import nullcontext

    gen = sys.modules.get("transformers.utils.generic")
    orig = getattr(gen, "maybe_autocast", None)
    if orig is None:
        return
    orig = getattr(orig, "__wrapped__", orig)

    def maybe_autocast(device_type, *args, **kwargs):
        if device_type == "meta":
            return nullcontext()
        return orig(device_type, *args, **kwargs)

    maybe_autocast.__wrapped__ = orig
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers") and getattr(mod, "maybe_autocast", None) is orig:
            mod.maybe_autocast = maybe_autocast

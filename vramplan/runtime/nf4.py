"""QLoRA's frozen base: ``nn.Linear`` replaced by bitsandbytes ``Linear4bit`` (NF4) as transformers does.

transformers' bitsandbytes integration (``replace_with_bnb_linear``, transformers 5) swaps
every module whose type *is* ``nn.Linear`` -- not the output embeddings, tied weights or
the last module (``get_keys_to_not_convert``) -- for ``bnb.nn.Linear4bit(in, out, bias,
compute_dtype, compress_statistics=double_quant, quant_type='nf4', quant_storage=uint8)``.
Fused MoE experts are 3-D ``nn.Parameter`` banks, not ``nn.Linear``: they stay in the load
dtype (and ``prepare_model_for_kbit_training`` then upcasts them to fp32 like every other
non-quantised parameter).

On a real device the weight is quantised by bitsandbytes itself (``Params4bit.to``), one
layer at a time: the model is built with every ``nn.Linear`` on ``meta``
(:func:`linears_on_meta`), and :func:`quantize_linears` materialises each weight in the
load dtype on the device, quantises it and drops it before the next. This is the shape of
transformers' bitsandbytes loading path (``from_pretrained`` creates the model on ``meta``
and quantises each checkpoint tensor as it is loaded), so the build never holds more than
the quantised model plus one linear layer in 16 bits -- not the whole bf16 model, which for
an 8B model (>= 16 GiB) would exceed the QLoRA training step itself. The weights are random
(normal, std 0.02): calibration measures memory and time, not quality. On
``meta`` the packed weight and every tensor of its ``QuantState`` are allocated with the
layout ``vramplan.quant`` documents (checked against real bitsandbytes in the tests), so
bitsandbytes' own ``matmul_4bit``/``dequantize_4bit`` code runs on them through its
registered fake kernels.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..quant import DYNAMIC_CODE_BYTES, NESTED_BLOCKSIZE, NF4_BLOCKSIZE, NF4_CODE_BYTES


def meta_params4bit(out_features: int, in_features: int, dtype: torch.dtype, double_quant: bool, module=None,
                    device: str = "meta"):
    """An NF4 ``Params4bit`` of shape [out, in] on ``device`` without data, laid out as bitsandbytes stores it."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Params4bit

    n = out_features * in_features
    blocks = -(-n // NF4_BLOCKSIZE)
    f32 = dict(dtype=torch.float32, device=device)
    code = torch.empty(NF4_CODE_BYTES // 4, **f32)
    if double_quant:
        state2 = QuantState(absmax=torch.empty(-(-blocks // NESTED_BLOCKSIZE), **f32),
                            code=torch.empty(DYNAMIC_CODE_BYTES // 4, **f32), blocksize=NESTED_BLOCKSIZE,
                            dtype=torch.float32)
        qs = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device=device),
                        shape=torch.Size([out_features, in_features]), code=code, blocksize=NF4_BLOCKSIZE,
                        quant_type="nf4", dtype=dtype, offset=torch.empty((), **f32), state2=state2)
    else:
        qs = QuantState(absmax=torch.empty(blocks, **f32), shape=torch.Size([out_features, in_features]), code=code,
                        blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=dtype)
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    return Params4bit(data, requires_grad=False, quant_state=qs, blocksize=NF4_BLOCKSIZE,
                      compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8, module=module,
                      bnb_quantized=True)


def quant_state_tensors(qs) -> list[torch.Tensor]:
    """Every tensor a ``QuantState`` holds (absmax, code, offset and the nested state's)."""
    out = []
    while qs is not None:
        out += [t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor)]
        qs = qs.state2
    return out


INIT_STD = 0.02  # the std of transformers' default initializer_range


@contextmanager
def linears_on_meta() -> Iterator[None]:
    """Create every ``nn.Linear`` (and subclass) built inside on ``meta``; everything else as usual.

    :func:`quantize_linears` then materialises the quantisable ones one at a time, and
    :func:`materialize_meta` the rest (an untied ``lm_head``).
    """
    orig = nn.Linear.__init__

    def init(self, in_features, out_features, bias=True, device=None, dtype=None):
        orig(self, in_features, out_features, bias, device="meta", dtype=dtype)

    nn.Linear.__init__ = init
    try:
        yield
    finally:
        nn.Linear.__init__ = orig


def _dense(shape, dtype: torch.dtype, device: str, kind: str) -> torch.Tensor:
    """A random 2-D weight (normal, std 0.02), a zero bias or a unit norm weight on ``device``."""
    if kind == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) < 2:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, INIT_STD)


def materialize_meta(model: nn.Module, device: str) -> int:
    """Give every parameter still on ``meta`` storage on ``device`` (random, as :func:`_dense`); returns how many.

    Tied parameters are the same object under several names and are materialised once.
    """
    done: dict[int, nn.Parameter] = {}
    count = 0
    for mname, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                data = _dense(tuple(p.shape), p.dtype, device, "bias" if pname == "bias" else "weight")
                done[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
                count += 1
            setattr(mod, pname, done[id(p)])
    return count


def quantize_linears(model: nn.Module, *, compute_dtype: torch.dtype, double_quant: bool, device: str,
                     fake: bool) -> int:
    """Swap ``model``'s quantisable ``nn.Linear`` modules for NF4 ``Linear4bit`` in place; returns how many.

    ``fake``: build the NF4 storage on ``meta`` (no quantisation); else quantise the
    module's own weight with bitsandbytes on ``device`` -- a weight still on ``meta`` (a model
    built under :func:`linears_on_meta`) is first materialised in its dtype on ``device``,
    quantised and dropped, one layer at a time; afterwards every parameter left on ``meta``
    is materialised (:func:`materialize_meta`).
    """
    import bitsandbytes as bnb
    from bitsandbytes.nn import Params4bit
    from transformers.quantizers.base import get_keys_to_not_convert

    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # pragma: no cover - older transformers
        def should_convert_module(name, skip):
            return not any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in skip or ())

    skip = get_keys_to_not_convert(model)
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not should_convert_module(name, skip):
            continue
        w = module.weight
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None, compute_dtype,
                                compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8,
                                device="meta")
        new.source_cls = type(module)
        if fake:
            new.weight = meta_params4bit(module.out_features, module.in_features, w.dtype, double_quant, module=new,
                                         device=w.device.type)
        else:
            data = _dense(tuple(w.shape), w.dtype, device, "weight") if w.is_meta else w.data
            p = Params4bit(data, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=double_quant,
                           quant_type="nf4", quant_storage=torch.uint8, module=new)
            del data
            new.weight = p.to(device)
            del p
        if module.bias is not None:
            b = module.bias
            bias = _dense(tuple(b.shape), b.dtype, device, "bias") if (b.is_meta and not fake) else b.data
            new.bias = nn.Parameter(bias, requires_grad=False)
        new.requires_grad_(False)
        if hasattr(new, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU inference path repacks the weight for good the first time it runs in
            # eval mode (a PPO rollout), and that layout has no backward: keep the training layout
            new.support_avx512bf16_for_cpu = False
        model.set_submodule(name, new)
        del module, w
        count += 1
    if not fake:
        materialize_meta(model, device)
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    return count

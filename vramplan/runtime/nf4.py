"""QLoRA's frozen base: ``nn.Linear`` replaced by bitsandbytes ``Linear4bit`` (NF4) as transformers does.

transformers' bitsandbytes integration (``replace_with_bnb_linear``, transformers 5) swaps
every module whose type *is* ``nn.Linear`` -- not the output embeddings, tied weights or
the last module (``get_keys_to_not_convert``) -- for ``bnb.nn.Linear4bit(in, out, bias,
compute_dtype, compress_statistics=double_quant, quant_type='nf4', quant_storage=uint8)``.
Fused MoE experts are 3-D ``nn.Parameter`` banks, not ``nn.Linear``: they stay in the load
dtype (and ``prepare_model_for_kbit_training`` then upcasts them to fp32 like every other
non-quantised parameter).

On a real device the weight is quantised by bitsandbytes itself (``Params4bit.to``). On
``meta`` the packed weight and every tensor of its ``QuantState`` are allocated with the
layout ``vramplan.quant`` documents (checked against real bitsandbytes in the tests), so
bitsandbytes' own ``matmul_4bit``/``dequantize_4bit`` code runs on them through its
registered fake kernels.
"""

from __future__ import annotations

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


def quantize_linears(model: nn.Module, *, compute_dtype: torch.dtype, double_quant: bool, device: str,
                     fake: bool) -> int:
    """Swap ``model``'s quantisable ``nn.Linear`` modules for NF4 ``Linear4bit`` in place; returns how many.

    ``fake``: build the NF4 storage on ``meta`` (no quantisation); else quantise the
    module's own weight with bitsandbytes on ``device``.
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
            p = Params4bit(w.data, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=double_quant,
                           quant_type="nf4", quant_storage=torch.uint8, module=new)
            new.weight = p.to(device)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data, requires_grad=False)
        new.requires_grad_(False)
        if hasattr(new, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU inference path repacks the weight for good the first time it runs in
            # eval mode (a PPO rollout), and that layout has no backward: keep the training layout
            new.support_avx512bf16_for_cpu = False
        model.set_submodule(name, new)
        del module, w
        count += 1
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    return count

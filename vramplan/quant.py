"""Storage layout of quantised weights, in pure Python (no torch, no numpy needed).

The analytic model imports these functions; the dry run builds its meta-device NF4 layers
from the same layout, and ``tests/test_quant.py`` checks both against a real
``bitsandbytes.nn.Params4bit`` quantised on CPU.

Layout of one NF4 matrix of ``numel`` elements as bitsandbytes stores it
(``bitsandbytes.functional.quantize_4bit``, bitsandbytes 0.43 -- 0.50; QLoRA paper,
Dettmers et al. 2023, arXiv:2305.14314):

* packed weight: ``uint8`` tensor of ``(numel + 1) // 2`` bytes (two 4-bit codes a byte,
  ``quant_storage=torch.uint8``, transformers' default).
* ``code``: the 16-entry fp32 NF4 code book, one copy per matrix (64 B).
* without double quantisation: ``absmax`` fp32 per block of ``blocksize`` (64) elements.
* with double quantisation (``compress_statistics=True``, ``bnb_4bit_use_double_quant``):
  ``absmax`` as ``uint8`` per block, the fp32 ``offset`` (0-dim, 4 B), and a nested
  ``state2`` holding fp32 ``absmax`` per 256 blocks plus its own 256-entry fp32 dynamic
  code book (``code.to(device, copy=True)``: 1 KiB per matrix).

Bits per parameter for block 64: 4 + 32/64 = 4.5 (0.5 bits of constants) without double
quantisation; 4 + 8/64 + 32/(64*256) ~ 4.127 with it (the paper's 0.127 bits).
"""

from __future__ import annotations

from functools import lru_cache

NF4_BLOCKSIZE = 64  # bitsandbytes quantize_4bit default (transformers BitsAndBytesConfig too)
NESTED_BLOCKSIZE = 256  # quantize_blockwise of the absmax in double quantisation
NF4_CODE_BYTES = 16 * 4  # get_4bit_type("nf4"): 16 fp32 values
DYNAMIC_CODE_BYTES = 256 * 4  # create_dynamic_map(): 256 fp32 values, copied per nested state
OFFSET_BYTES = 4  # fp32 0-dim mean of the absmax


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=4096)  # a planning search asks for the same few dozen matrices thousands of times
def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> tuple[int, int]:
    """Bytes of one NF4-quantised matrix of ``numel`` elements: ``(weight_bytes, quant_state_bytes)``.

    ``weight_bytes`` is the packed uint8 storage (Component.WEIGHTS); ``quant_state_bytes``
    every tensor of its ``QuantState`` (Component.QUANT_STATE): absmax, code book(s), offset.
    Raw tensor sizes, before the CUDA caching allocator's 512-byte rounding.

    Raises:
        ValueError: ``numel`` negative or ``blocksize`` not one bitsandbytes accepts.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"invalid NF4 blocksize {blocksize}")
    weight = (numel + 1) // 2
    blocks = _ceil_div(numel, blocksize)
    if double_quant:
        nested_blocks = _ceil_div(blocks, NESTED_BLOCKSIZE)
        state = blocks + OFFSET_BYTES + NF4_CODE_BYTES + 4 * nested_blocks + DYNAMIC_CODE_BYTES
    else:
        state = 4 * blocks + NF4_CODE_BYTES
    return weight, state


def nf4_tensor_bytes(numel: int, double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> list[tuple[str, int]]:
    """The individual tensors of one NF4 matrix, ``(name, bytes)``, in bitsandbytes' naming.

    Useful where per-allocation rounding matters (each is one CUDA allocation).
    """
    weight, _ = nf4_bytes(numel, double_quant, blocksize)
    blocks = _ceil_div(numel, blocksize)
    out = [("weight", weight), ("code", NF4_CODE_BYTES)]
    if double_quant:
        out += [("absmax", blocks), ("offset", OFFSET_BYTES),
                ("state2.absmax", 4 * _ceil_div(blocks, NESTED_BLOCKSIZE)), ("state2.code", DYNAMIC_CODE_BYTES)]
    else:
        out.append(("absmax", 4 * blocks))
    return out


def nf4_bits_per_param(double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> float:
    """Asymptotic bits per parameter (large matrices; per-matrix code books ignored)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize

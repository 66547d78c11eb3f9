"""Bytes of bitsandbytes NF4 storage (numpy-free arithmetic, no torch).

bitsandbytes ``Params4bit`` (quant_type nf4, blocksize 64) stores two 4-bit values per
byte (``ceil(numel / 2)`` uint8) and one absmax per block of 64 values. Without double
quantisation the absmax is fp32 (4 / 64 = 0.5 bit per parameter); with it
(``compress_statistics=True``) the absmax is quantised to uint8 in blocks of 256, each
block keeping an fp32 absmax, plus a 256-entry fp32 code and an fp32 offset:
8/64 + 32/(64*256) = 0.127 bit per parameter (Dettmers et al., 2023, section 3).
"""

from __future__ import annotations

NF4_BLOCK = 64
DQ_BLOCK = 256


def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = NF4_BLOCK) -> tuple[int, int]:
    """Return ``(packed_weight_bytes, quant_state_bytes)`` for one NF4 tensor of ``numel`` values."""
    numel = int(numel)
    packed = (numel + 1) // 2
    blocks = -(-numel // blocksize)
    if not double_quant:
        return packed, blocks * 4
    blocks2 = -(-blocks // DQ_BLOCK)
    return packed, blocks + blocks2 * 4 + 256 * 4 + 4

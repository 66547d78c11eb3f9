"""Byte sizes: parsing user input and rendering. Bytes are ``int`` everywhere else."""

from __future__ import annotations

import math
import re

from .errors import VramplanError

#: A largest device capacity accepted for ``--gpu-mem`` and matrix capacities (1 PiB; bytes).
MAX_CAPACITY = 1 << 50

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KIB,
    "m": 1000**2, "mb": 1000**2, "mib": MIB,
    "g": 1000**3, "gb": 1000**3, "gib": GIB,
    "t": 1000**4, "tb": 1000**4, "tib": TIB,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float, label: str = "size") -> int:
    """Parse ``"24GiB"``, ``"24 GB"``, ``"80g"``, ``"24"`` or a number of bytes into an int.

    Decimal prefixes (GB = 10^9) and binary ones (GiB = 2^30) are both accepted, as
    GPU vendors market in GB and tools report in GiB. A bare number in *text* (``--gpu-mem 24``)
    is a card size in GB as cards are sold, which for GPU memory is binary: a "24 GB" card
    holds 24 GiB, so ``"24"`` is 24 GiB. An ``int``/``float`` (the Python API) is bytes.
    At most 1 PiB (:data:`MAX_CAPACITY`).

    Raises:
        VramplanError: unreadable text, an unknown unit, not finite, not positive, or absurdly large.
    """
    if isinstance(text, bool):
        raise VramplanError(f"{label} must be a size such as 24GiB, got {text!r}")
    if isinstance(text, (int, float)) or type(text).__module__ == "numpy":
        try:
            value, unit = float(text), "b"
        except OverflowError:
            value, unit = float("inf"), "b"
        if not math.isfinite(value):
            raise VramplanError(f"{label} must be a finite number of bytes, got {text!r}")
    else:
        raw = str(text)
        m = _SIZE.match(raw) if len(raw) <= 64 else None
        if not m:
            raise VramplanError(f"cannot read size {raw[:40]!r}" + (f" for {label}" if label != "size" else ""), "write it like 24 (GB, as cards are sold), "
                                "24GiB, 20GB or 16000MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit == "":
            unit = "gib"  # a bare number is a card size in (binary) GB
    if unit not in _UNITS:
        raise VramplanError(f"unknown size unit {unit!r} in {text!r}", "use B, MB, MiB, GB, GiB, TB or TiB")
    size = value * _UNITS[unit]
    if not size >= 1:
        raise VramplanError(f"{label} must be positive, got {text!r}")
    if size > MAX_CAPACITY:
        raise VramplanError(f"{label} {str(text)[:40]} is larger than 1 PiB",
                            "a bare number is a card size in GB (24 = 24 GiB); write 24GiB or 80GB")
    return int(round(size))


def fmt_bytes(nbytes: int | float, digits: int = 2) -> str:
    """Human-readable binary size: ``'13.48 GiB'``, ``'512.0 MiB'``."""
    n = float(nbytes)
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: int | float) -> str:
    """Parameter counts: ``6.74B``, ``4.19M``, ``512K``."""
    n = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))

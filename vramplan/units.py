"""Byte sizes: parsing user input and rendering. Bytes are ``int`` everywhere else."""

from __future__ import annotations

import re

from .errors import VramplanError

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KIB,
    "m": 1000**2, "mb": 1000**2, "mib": MIB,
    "g": 1000**3, "gb": 1000**3, "gib": GIB,
    "t": 1000**4, "tb": 1000**4, "tib": TIB,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Parse ``"24GiB"``, ``"24 GB"``, ``"80g"`` or a number of bytes into an int.

    Decimal prefixes (GB = 10^9) and binary ones (GiB = 2^30) are both accepted, as
    GPU vendors market in GB and tools report in GiB.
    """
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise VramplanError(f"cannot read size {text!r}", "write it like 24GiB, 20GB or 16000MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise VramplanError(f"unknown size unit {unit!r} in {text!r}", "use B, MB, MiB, GB, GiB, TB or TiB")
    size = int(round(value * _UNITS[unit]))
    if size <= 0:
        raise VramplanError(f"size must be positive, got {text!r}")
    return size


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

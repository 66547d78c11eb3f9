"""What a process can use on a card, and the CUDA context it pays: published PyTorch OOM messages.

``vramplan/data/cuda_memory.json`` holds PyTorch out-of-memory messages pasted in public GitHub
issues (each with its URL and date), copied as printed. Two figures come from them:

* **usable capacity** (:func:`usable_bytes`): PyTorch's "total capacity" (``cudaMemGetInfo``'s
  total) is what the process can use; it is below the total ``nvidia-smi`` prints (the catalogue's
  ``memory_bytes``) by the driver's own reservation: a T4 shows 15360 MiB in ``nvidia-smi`` and
  14.75 GiB (15104 MiB) to PyTorch, 14.56 GiB with a 2026 driver; an A100 40GB 40960 MiB and
  39.50-39.59 GiB. The catalogue takes the smallest published figure (the safe side), floored to a MiB.
* **CUDA context** (:func:`context_bytes`): messages of torch >= 2.1 print the memory the process
  holds and, of it, what PyTorch allocated and reserved; the rest (``in use - allocated -
  reserved-unallocated``) is the CUDA context with the kernels it loaded and the libraries'
  own memory. The default context of a card is the median of its observations, rounded up to a
  MiB (a T4: about 0.13 GiB in three messages, 1.0 GiB in a fourth that loaded custom
  quantisation kernels; an A100 40GB: 0.49 GiB), else :data:`vramplan.overheads.DEFAULT_CONTEXT_BYTES`.

Numpy-free; no import of :mod:`vramplan.gpus` (which applies :func:`usable_bytes` to its catalogue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ._data import load_data
from .errors import VramplanError
from .units import GIB, MIB


@dataclass(frozen=True)
class Observation:
    """One published OOM message (figures as printed)."""

    gpu: str
    url: str
    date: str
    total_capacity_gib: float
    process_in_use_gib: float | None = None
    allocated_gib: float | None = None
    reserved_unallocated_mib: float | None = None
    where: str = ""
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return int(round(self.total_capacity_gib * GIB))

    @property
    def non_pytorch_bytes(self) -> int | None:
        """``in use - allocated - reserved-unallocated`` (bytes): the process's memory outside PyTorch's allocator."""
        if None in (self.process_in_use_gib, self.allocated_gib, self.reserved_unallocated_mib):
            return None
        return int(round(self.process_in_use_gib * GIB - self.allocated_gib * GIB - self.reserved_unallocated_mib * MIB))


@lru_cache(maxsize=1)
def observations() -> tuple[Observation, ...]:
    raw = load_data("cuda_memory.json")
    out = []
    for i, o in enumerate(raw.get("observations", [])):
        try:
            obs = Observation(**o)
        except TypeError as exc:
            raise VramplanError(f"cuda_memory.json: observation {i} is malformed ({exc})") from None
        if not obs.url.startswith("https://") or not (0 < obs.total_capacity_gib < 1e4):
            raise VramplanError(f"cuda_memory.json: observation {i} needs an https source and a total capacity")
        out.append(obs)
    return tuple(out)


def of(gpu: str) -> list[Observation]:
    return [o for o in observations() if o.gpu == gpu]


def usable_bytes(gpu: str) -> int | None:
    """The smallest published PyTorch total capacity of catalogue card ``gpu`` (bytes, floored to a MiB), or None."""
    obs = of(gpu)
    if not obs:
        return None
    return (min(o.total_bytes for o in obs) // MIB) * MIB


def context_bytes(gpu: str) -> int | None:
    """The median published non-PyTorch memory of a process on ``gpu`` (bytes, rounded up to a MiB), or None."""
    xs = sorted(x for x in (o.non_pytorch_bytes for o in of(gpu)) if x is not None and x > 0)
    if not xs:
        return None
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return int(math.ceil(med / MIB)) * MIB


def describe(gpu: str) -> str:
    """One line for the assumptions: where the card's usable capacity and context come from."""
    obs = of(gpu)
    if not obs:
        return ""
    ctx = [o.non_pytorch_bytes for o in obs if o.non_pytorch_bytes is not None]
    parts = [f"{gpu}: {len(obs)} published PyTorch OOM messages (vramplan/data/cuda_memory.json): usable "
             f"{usable_bytes(gpu) / GIB:.2f} GiB (their smallest total capacity)"]
    if ctx:
        parts.append(f"CUDA context {context_bytes(gpu) / MIB:.0f} MiB (median of {len(ctx)}: "
                     + ", ".join(f"{c / MIB:.0f}" for c in sorted(ctx)) + " MiB)")
    return "; ".join(parts)

"""Runtime overheads beyond tensor storages: CUDA context, cuBLAS workspaces, allocator reserve.

Defaults come from public measurements (``shared/REFERENCE.md``); a card's calibration
profile (``profiles/<gpu>.json``) replaces them with measured figures, and every
prediction says which it used.

* CUDA context with lazy module loading (PyTorch's default since 1.13): 287,047,680 B
  measured in PyTorch PR #86509; 426 MiB on an RTX 6000 Ada with torch 2.10. It grows with
  the SM count, so the default takes the high end, 512 MiB.
* cuBLAS workspace: 8 MiB per handle and stream by default, 32 MiB on Hopper (PyTorch PRs
  #89027, #120925); forward and the autograd thread each hold a handle: two workspaces.
* Caching allocator: requests rounded to 512 B, blocks cached and fragmented; reserved
  exceeds allocated by 10-35% for LLM training (REFERENCE.md). Default: 15% of the tensor
  peak, with +/-10% of the tensor peak reported as uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gpus import GPUSpec
from .taxonomy import Component
from .units import MIB

DEFAULT_CONTEXT_BYTES = 512 * MIB
DEFAULT_RESERVE_FRACTION = 0.15
DEFAULT_UNCERTAINTY_FRACTION = 0.10


@dataclass(frozen=True)
class Overheads:
    components: dict[Component, int]
    uncertainty_bytes: int
    calibrated: bool
    source: str


def _workspace(gpu: GPUSpec | None) -> int:
    per = 32 * MIB if gpu is not None and gpu.compute_capability.startswith("9") else 8 * MIB
    return 2 * per


def _profile(gpu: GPUSpec | None):
    if gpu is None or gpu.custom:
        return None
    try:
        from .profiles import load_profile
    except ImportError:  # pragma: no cover - profiles module not present in this build
        return None
    return load_profile(gpu.name)


def runtime_overheads(tensor_peak_bytes: int, gpu: GPUSpec | None = None) -> Overheads:
    """Runtime components for a step whose live tensors peak at ``tensor_peak_bytes``.

    Uses ``gpu``'s calibration profile when one ships, else the documented defaults.
    """
    peak = int(tensor_peak_bytes)
    prof = _profile(gpu)
    if prof is not None:
        reserved = int(prof.reserved_bytes(peak))
        comps = {
            Component.CUDA_CONTEXT: int(prof.context_bytes),
            Component.WORKSPACE: int(getattr(prof, "workspace_bytes", 0) or 0),
            Component.ALLOCATOR_RESERVE: max(0, reserved - peak),
        }
        unc = int(getattr(prof, "reserved_uncertainty_bytes", lambda p: 0.03 * p)(peak)) if callable(
            getattr(prof, "reserved_uncertainty_bytes", None)) else int(0.03 * peak)
        return Overheads(comps, unc, True, f"profile {getattr(prof, 'source', gpu.name)}")
    comps = {
        Component.CUDA_CONTEXT: DEFAULT_CONTEXT_BYTES,
        Component.WORKSPACE: _workspace(gpu),
        Component.ALLOCATOR_RESERVE: int(DEFAULT_RESERVE_FRACTION * peak),
    }
    return Overheads(comps, int(DEFAULT_UNCERTAINTY_FRACTION * peak), False, "defaults (no calibration profile)")

"""The GPU catalogue: usable memory, tensor throughput, bandwidth, features, sources.

Entries live in ``vramplan/data/gpus.json`` (one per card, each figure with its source),
validated on load. ``--gpu auto`` reads the local card through NVML; ``--gpu-mem 24GiB``
plans for any capacity with a generic card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from ._data import load_data
from .errors import VramplanError, unknown
from .units import GIB, MIB


@dataclass(frozen=True)
class GPUSpec:
    """One card. Memory in bytes; throughput in TFLOP/s (dense, no sparsity); bandwidth in GB/s."""

    name: str
    display_name: str
    memory_bytes: int
    bf16_tflops: float
    fp16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    compute_capability: str
    arch: str
    bf16: bool
    flash_attention: bool
    sm_count: int = 0
    nvlink_gbs: float = 0.0   # per-GPU NVLink bandwidth, one direction, GB/s (0: none)
    pcie_gbs: float = 32.0    # host link, one direction, GB/s
    aliases: tuple[str, ...] = ()
    nvml_names: tuple[str, ...] = ()
    sources: dict = field(default_factory=dict, compare=False, hash=False)
    uncertain: tuple[str, ...] = ()
    custom: bool = False

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    def tensor_tflops(self, dtype: str) -> float:
        """Peak dense tensor-core TFLOP/s for a compute dtype name."""
        return {"bfloat16": self.bf16_tflops, "float16": self.fp16_tflops}.get(dtype, self.fp32_tflops)


_REQUIRED = ("name", "display_name", "memory_bytes", "bf16_tflops", "fp16_tflops", "fp32_tflops", "bandwidth_gbs",
             "compute_capability", "arch", "bf16", "flash_attention", "sources")


def _parse(entry: dict) -> GPUSpec:
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise VramplanError(f"gpus.json: entry {entry.get('name')!r} lacks {', '.join(missing)}")
    if not isinstance(entry["memory_bytes"], int) or entry["memory_bytes"] <= 0:
        raise VramplanError(f"gpus.json: {entry['name']}: memory_bytes must be a positive int")
    known = set(GPUSpec.__dataclass_fields__)
    kw = {k: v for k, v in entry.items() if k in known}
    for k in ("aliases", "nvml_names", "uncertain"):
        kw[k] = tuple(entry.get(k, ()))
    return GPUSpec(**kw)


@lru_cache(maxsize=None)
def catalogue() -> dict[str, GPUSpec]:
    out: dict[str, GPUSpec] = {}
    for entry in load_data("gpus.json")["gpus"]:
        spec = _parse(entry)
        if spec.name in out:
            raise VramplanError(f"gpus.json: duplicate GPU {spec.name!r}")
        out[spec.name] = spec
    return out


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("nvidia", "").replace("geforce", ""))


@lru_cache(maxsize=None)
def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for spec in catalogue().values():
        for key in (spec.name, spec.display_name, *spec.aliases, *spec.nvml_names):
            table.setdefault(_norm(key), spec.name)
    return table


def catalogue_name(name: str) -> str | None:
    """The catalogue name of ``name`` (a name, alias or NVML name), or None for a card outside the catalogue."""
    return _aliases().get(_norm(str(name)))


def profiled_gpu(name: str) -> GPUSpec | None:
    """A card outside the catalogue that has a calibration profile: its memory and name from the profile's NVML reading.

    The throughput figures are generic (:func:`custom_gpu`); the calibrated ones come from
    the profile. None when no GPU profile of that name exists.
    """
    from dataclasses import replace

    from .errors import ProfileError
    from .profiles import load_profile, profile_key

    try:
        key = profile_key(name)
        prof = load_profile(key)
    except ProfileError:
        return None
    if prof is None:
        return None
    dev = prof.device or {}
    total = dev.get("nvml_total_bytes") or dev.get("total_bytes")
    if not isinstance(total, int) or total <= 0:
        return None
    shown = dev.get("nvml_name") or dev.get("name") or key
    spec = custom_gpu(total)
    return replace(spec, name=key, display_name=str(shown), custom=False,
                   sources={"memory_bytes": f"NVML, recorded in calibration profile {prof.path}",
                            "all": "throughput figures are generic placeholders; calibrated ones come from the profile"})


def gpu_names() -> list[str]:
    return list(catalogue())


def get_gpu(name: str | GPUSpec) -> GPUSpec:
    """Resolve a catalogue name or alias (``rtx4000ada``, ``"RTX 4000 Ada"``, ``h100``), or ``auto``."""
    if isinstance(name, GPUSpec):
        return name
    if str(name).lower() == "auto":
        return detect_gpu()
    key = _norm(str(name))
    table = _aliases()
    if key in table:
        return catalogue()[table[key]]
    if not key or len(str(name)) > 200:  # no card is named so; and a profile file of that name cannot exist
        raise unknown("GPU", str(name)[:60], gpu_names(), "vramplan gpus")
    prof = profiled_gpu(str(name))  # a calibrated card outside the catalogue
    if prof is not None:
        return prof
    raise unknown("GPU", str(name), gpu_names(), "vramplan gpus")


def custom_gpu(memory_bytes: int, like: GPUSpec | None = None) -> GPUSpec:
    """A card of ``memory_bytes`` (``--gpu-mem``), with the throughput of ``like`` or generic Ampere figures."""
    if like is not None:
        from dataclasses import replace

        return replace(like, name=f"{like.name}@{memory_bytes / GIB:.1f}GiB", memory_bytes=int(memory_bytes), custom=True)
    return GPUSpec(
        name=f"custom-{memory_bytes / GIB:.1f}GiB", display_name=f"any GPU with {memory_bytes / GIB:.1f} GiB",
        memory_bytes=int(memory_bytes), bf16_tflops=100.0, fp16_tflops=100.0, fp32_tflops=20.0, bandwidth_gbs=900.0,
        compute_capability="8.0", arch="generic", bf16=True, flash_attention=True,
        sources={"all": "generic placeholder for --gpu-mem; throughput figures are not a real card's"},
        uncertain=("bf16_tflops", "bandwidth_gbs"), custom=True,
    )


def detect_gpu(index: int = 0) -> GPUSpec:
    """Read the local card through NVML and match it to the catalogue.

    The catalogue entry's figures are kept, but memory is the card's real total. An
    unknown card becomes a generic one with that memory.
    """
    from . import nvml

    info = nvml.device_info(index)
    key = _norm(info.name)
    table = _aliases()
    if key in table:
        from dataclasses import replace

        return replace(catalogue()[table[key]], memory_bytes=info.total_bytes)
    prof = profiled_gpu(info.name)  # calibrated: the name calibrate gave it (profiles.profile_key)
    if prof is not None:
        from dataclasses import replace

        return replace(prof, memory_bytes=info.total_bytes)
    spec = custom_gpu(info.total_bytes)
    from dataclasses import replace

    return replace(spec, name=_norm(info.name) or spec.name, display_name=info.name)


def mib(n: float) -> int:
    return int(n * MIB)

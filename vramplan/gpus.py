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
from .cardnames import alias_table, catalogue_name
from .cardnames import norm_name as _norm
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
    #: ``compute_capability`` parsed once as numbers, (major, minor): compare this, never the string
    #: ("12.0" < "8.0" as text). (0, 0) when the text is not ``major.minor``.
    cc: tuple[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "cc", parse_compute_capability(self.compute_capability) or (0, 0))

    def tensor_tflops(self, dtype: str) -> float:
        """Peak dense tensor-core TFLOP/s for a compute dtype name."""
        return {"bfloat16": self.bf16_tflops, "float16": self.fp16_tflops}.get(dtype, self.fp32_tflops)


def parse_compute_capability(text) -> tuple[int, int] | None:
    """``"12.0"`` -> ``(12, 0)`` (also a ``(major, minor)`` pair); None when missing or not ``major.minor``."""
    if isinstance(text, (tuple, list)) and len(text) == 2 and all(isinstance(x, int) for x in text):
        return int(text[0]), int(text[1])
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(text)) if text is not None else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def generation(cc: tuple[int, int] | None) -> str:
    """The NVIDIA architecture of a compute capability: ``volta|turing|ampere|ada|hopper|blackwell``, or ``unknown``.

    CUDA C++ Programming Guide, "Compute Capabilities": 7.0 Volta, 7.5 Turing, 8.0/8.6/8.7
    Ampere, 8.9 Ada Lovelace, 9.0 Hopper, 10.x/11.x/12.x Blackwell (datacenter B200/GB200 10.0,
    GeForce/workstation RTX 50 and RTX PRO 12.0).
    """
    if cc is None or cc < (7, 0):
        return "unknown"
    major, minor = cc
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    if major == 8:
        return "ada" if minor >= 9 else "ampere"
    if major == 9:
        return "hopper"
    return "blackwell" if major <= 12 else "unknown"


#: Card classes of the default efficiencies (``vramplan.throughput``) and of the interconnect
#: defaults (``vramplan.distributed``).
CARD_CLASSES = ("datacenter-hopper", "datacenter-blackwell", "datacenter-ampere", "gddr", "pre-ampere", "generic")


@dataclass(frozen=True)
class CardClass:
    """What the planner derives from a card's architecture, in one place (:func:`card_class`)."""

    name: str        # one of CARD_CLASSES
    generation: str  # :func:`generation` of the compute capability (``generic`` for a placeholder card)
    cc: tuple[int, int]

    @property
    def datacenter(self) -> bool:
        return self.name.startswith("datacenter-")

    @property
    def hopper_or_newer(self) -> bool:
        """Compute capability 9.0-12.x: PyTorch gives cuBLAS 32 MiB workspaces (``vramplan.overheads``)."""
        return self.generation in ("hopper", "blackwell")


def card_class(gpu: GPUSpec) -> CardClass:
    """The class of ``gpu``: datacenter Hopper/Blackwell/Ampere (HBM, own efficiencies), GDDR, pre-Ampere, generic.

    Compute capabilities are compared as numbers (:attr:`GPUSpec.cc`). Datacenter Blackwell is
    10.x (B200/GB200); the RTX 50 series and RTX PRO Blackwell (12.x) are GDDR cards. A
    ``--gpu-mem`` placeholder (arch ``generic``) is ``generic``.
    """
    arch = (gpu.arch or "").lower()
    cc = gpu.cc
    gen = generation(cc) if arch != "generic" else "generic"
    if gpu.custom and arch == "generic":
        name = "generic"
    elif arch == "hopper":
        name = "datacenter-hopper"
    elif arch == "blackwell" and cc[0] == 10:
        name = "datacenter-blackwell"
    elif arch == "ampere" and cc == (8, 0):
        name = "datacenter-ampere"
    elif arch in ("turing", "volta") or (cc != (0, 0) and cc < (8, 0)):
        name = "pre-ampere"
    else:
        name = "gddr"
    return CardClass(name, gen, cc)


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
    kw.pop("cc", None)
    for k in ("aliases", "nvml_names", "uncertain"):
        kw[k] = tuple(entry.get(k, ()))
    cc = parse_compute_capability(entry["compute_capability"])
    if cc is None:
        raise VramplanError(f"gpus.json: {entry['name']}: compute_capability {entry['compute_capability']!r} is not "
                            "'major.minor'")
    if str(entry["arch"]).lower() != generation(cc):
        raise VramplanError(f"gpus.json: {entry['name']}: arch {entry['arch']!r} does not match compute capability "
                            f"{entry['compute_capability']} ({generation(cc)})")
    return GPUSpec(**kw)


@lru_cache(maxsize=None)
def catalogue() -> dict[str, GPUSpec]:
    out: dict[str, GPUSpec] = {}
    from dataclasses import replace

    from .cudamem import usable_bytes

    for entry in load_data("gpus.json")["gpus"]:
        spec = _parse(entry)
        usable = usable_bytes(spec.name)
        if usable is not None and usable < spec.memory_bytes:
            # what the process can use: PyTorch's total capacity in published OOM messages (vramplan.cudamem),
            # below the nvidia-smi total by the driver's own reservation
            spec = replace(spec, memory_bytes=usable, sources={
                **spec.sources, "memory_bytes": f"{usable / GIB:.2f} GiB usable: the smallest PyTorch 'total capacity' "
                f"in published OOM messages (vramplan/data/cuda_memory.json); nvidia-smi total "
                f"{spec.memory_bytes / 2**20:.0f} MiB ({spec.sources.get('memory_bytes', '')})"})
        if spec.name in out:
            raise VramplanError(f"gpus.json: duplicate GPU {spec.name!r}")
        out[spec.name] = spec
    return out


def _aliases() -> dict[str, str]:
    catalogue()  # validate the entries before trusting their names
    return alias_table()


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
    # what PyTorch can use (torch.cuda.get_device_properties().total_memory: cudaMemGetInfo's total, below
    # NVML's by the driver's reservation), else the NVML total (vramplan.cudamem)
    usable, nvml_total = dev.get("total_bytes"), dev.get("nvml_total_bytes")
    total = usable if isinstance(usable, int) and usable > 0 else nvml_total
    if not isinstance(total, int) or total <= 0:
        return None
    what = ("usable (torch total_memory)" if total == usable else "the NVML total (nvidia-smi; the usable "
            "capacity is smaller by the driver's reservation, not recorded)")
    shown = dev.get("nvml_name") or dev.get("name") or key
    spec = custom_gpu(total)
    return replace(spec, name=key, display_name=str(shown), custom=False,
                   sources={"memory_bytes": f"{what}, recorded in calibration profile {prof.path}",
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

    Plans use the capacity a process can use, the same figure whether the card is named or detected: a
    catalogue card keeps its ``memory_bytes`` (the usable capacity of :mod:`vramplan.cudamem` where PyTorch
    OOM messages publish it, else the nvidia-smi total) unless NVML reports less (ECC on, a MIG slice, a
    smaller variant); a calibrated card its profile's usable total (:func:`profiled_gpu`). Only an unknown
    card plans with NVML's total, which is above the usable capacity by the driver's reservation (T4: 5%).
    ``sources["memory_bytes"]`` says which was used.
    """
    from dataclasses import replace

    from . import nvml

    info = nvml.device_info(index)
    key = _norm(info.name)
    table = _aliases()
    nv = f"NVML total {info.total_bytes / 2**20:.0f} MiB"
    if key in table:
        spec = catalogue()[table[key]]
        if info.total_bytes < spec.memory_bytes:
            return replace(spec, memory_bytes=info.total_bytes, sources={
                **spec.sources, "memory_bytes": f"{nv} (detected; below the catalogue's "
                f"{spec.memory_bytes / GIB:.2f} GiB: ECC, a MIG slice or a smaller variant)"})
        return replace(spec, sources={**spec.sources, "memory_bytes": f"catalogue capacity (detected, {nv}): "
                                      + spec.sources.get("memory_bytes", "")})
    prof = profiled_gpu(info.name)  # calibrated: the name calibrate gave it (profiles.profile_key)
    if prof is not None:
        if info.total_bytes < prof.memory_bytes:
            return replace(prof, memory_bytes=info.total_bytes,
                           sources={**prof.sources, "memory_bytes": f"{nv} (detected; below the profile's)"})
        return prof
    spec = custom_gpu(info.total_bytes)
    return replace(spec, name=_norm(info.name) or spec.name, display_name=info.name,
                   sources={**spec.sources, "memory_bytes": f"{nv} (detected card outside the catalogue: the usable "
                            "capacity is smaller by the driver's reservation, not known for it)"})


def capacity_note(card: GPUSpec) -> str:
    """One line for the assumptions: the capacity the plan is judged against and where it comes from (the usable
    capacity of published OOM messages, the catalogue's nvidia-smi total, a profile, NVML or ``--gpu-mem``)."""
    src = card.sources.get("memory_bytes") or card.sources.get("all") or "catalogue"
    return f"card capacity {card.memory_bytes / GIB:.2f} GiB: {src}"


def mib(n: float) -> int:
    return int(n * MIB)

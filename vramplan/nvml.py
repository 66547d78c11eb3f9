"""The one place that imports NVML (the ``nvidia-ml-py`` package provides ``pynvml``).

Functions return plain dataclasses in bytes; any NVML failure becomes a
:class:`~vramplan.errors.VramplanError` naming what to install or check.

NVML numbers the GPUs of the machine in its own order (PCI bus order), while a torch device
index counts only the devices ``CUDA_VISIBLE_DEVICES`` leaves visible, in CUDA's order
(fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``). A torch index is therefore never
an NVML index: :func:`nvml_index` finds the NVML index of a device by its UUID or PCI bus
id, which both APIs report.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MissingDependencyError, VramplanError


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    driver: str
    cuda_driver_version: int | None


def _pynvml():
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        raise MissingDependencyError("NVML bindings are not installed",
                                     "pip install nvidia-ml-py (or vramplan[calibrate]), or pass --gpu NAME") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and friends
        raise VramplanError(f"NVML could not start ({exc})", "is there an NVIDIA GPU and driver? else pass --gpu NAME") from None
    return pynvml


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_index(uuid: str | None = None, pci_bus_id: str | None = None) -> int | None:
    """The NVML index of the device with this UUID (``GPU-...``) or PCI bus id (``00000000:3B:00.0``).

    None when neither is given or NVML knows no such device.
    """
    nv = _pynvml()
    for key, fn in ((uuid, "nvmlDeviceGetHandleByUUID"), (pci_bus_id, "nvmlDeviceGetHandleByPciBusId")):
        if not key or not hasattr(nv, fn):
            continue
        try:
            return int(nv.nvmlDeviceGetIndex(getattr(nv, fn)(key)))
        except Exception:
            continue
    return None


def device_info(index: int = 0) -> DeviceInfo:
    """Name, memory and driver of GPU ``index``."""
    nv = _pynvml()
    try:
        count = nv.nvmlDeviceGetCount()
        if index >= count:
            raise VramplanError(f"GPU index {index} does not exist ({count} GPUs found)")
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        try:
            cuda = int(nv.nvmlSystemGetCudaDriverVersion())
        except Exception:
            cuda = None
        return DeviceInfo(index, _text(nv.nvmlDeviceGetName(h)), int(mem.total), int(mem.used),
                          _text(nv.nvmlSystemGetDriverVersion()), cuda)
    except VramplanError:
        raise
    except Exception as exc:
        raise VramplanError(f"NVML query failed ({exc})") from None


def process_used_bytes(index: int = 0, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to process ``pid`` (default: this process), or None if unavailable."""
    import os

    nv = _pynvml()
    pid = os.getpid() if pid is None else pid
    h = nv.nvmlDeviceGetHandleByIndex(index)
    for fn in ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses"):
        f = getattr(nv, fn, None)
        if f is None:
            continue
        try:
            for p in f(h):
                if int(p.pid) == pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
            return None
        except Exception:
            continue
    return None


def device_count() -> int:
    """GPUs NVML sees (all of the machine's, whatever ``CUDA_VISIBLE_DEVICES`` says)."""
    return int(_pynvml().nvmlDeviceGetCount())


def used_bytes(index: int = 0) -> int:
    """Device-wide used memory (what nvidia-smi's Memory-Usage shows)."""
    nv = _pynvml()
    return int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(index)).used)

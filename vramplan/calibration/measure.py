"""Reading the device: torch.cuda allocator statistics, NVML process memory, OOM detection.

A :class:`Device` wraps everything the runner asks of the hardware, so tests swap in a fake
``torch.cuda`` and a fake NVML and exercise the runner's logic (OOM recovery, resume) on CPU.

What is measured, and how:
* ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``: the caching allocator's
  peaks of live tensors and of reserved segments (reset with ``reset_peak_memory_stats``).
* NVML process memory (``nvmlDeviceGetComputeRunningProcesses``): what nvidia-smi shows for
  this process: reserved segments + CUDA context + memory outside the allocator (paged
  optimiser states in ``cudaMallocManaged``). Where a container hides the process list, the
  device-wide used memory minus the baseline read before CUDA initialised stands in.
* Which NVML device: the torch device's UUID (or PCI bus id) looked up in NVML
  (:func:`vramplan.nvml.nvml_index`), never the torch index itself, which counts only the
  devices ``CUDA_VISIBLE_DEVICES`` leaves visible, in CUDA's order. Without a match (no UUID
  or PCI id from torch) the index is used only when it cannot be ambiguous: one GPU in NVML
  and no ``CUDA_VISIBLE_DEVICES``; otherwise nothing is read from NVML.
* The CUDA context: NVML used memory just before and just after CUDA initialises (a first
  1-element tensor), minus what the allocator reserved for that tensor.
* The cuBLAS workspaces: allocated bytes left behind by a forward and a backward matmul once
  their outputs and gradients are freed (workspaces come from the caching allocator since
  PyTorch PR #89027; forward and the autograd thread hold separate handles).
"""

from __future__ import annotations

import gc
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any

from ..errors import MissingDependencyError, VramplanError, install_hint

OOM_PATTERNS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")
_TRIED = re.compile(r"Tried to allocate ([0-9.]+) ?([KMGT]i?B)")
_UNIT = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


class DeviceLostError(VramplanError):
    """The device is unusable after an error (a sticky CUDA error): the run stops; --resume continues."""


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure: torch's OutOfMemoryError, a CUDA/cuBLAS allocation error, MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(p in text for p in OOM_PATTERNS)


def tried_bytes(message: str) -> int | None:
    """The request that failed, from torch's OOM message (``Tried to allocate 2.00 GiB``)."""
    m = _TRIED.search(message)
    return int(float(m.group(1)) * _UNIT[m.group(2)]) if m else None


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    head = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    return head[:limit]


def release(exc: BaseException) -> None:
    """Drop the frames an exception's traceback keeps alive (they hold the step's tensors)."""
    tb = exc.__traceback__
    if tb is not None:
        traceback.clear_frames(tb)
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None


@dataclass
class MemorySample:
    allocated: int | None = None
    reserved: int | None = None
    max_allocated: int | None = None
    max_reserved: int | None = None
    process: int | None = None      # NVML: this process's device memory
    device_used: int | None = None  # NVML: device-wide used memory


class Device:
    """The CPU: times steps, measures no memory."""

    kind = "cpu"

    def __init__(self, index: int = 0):
        self.index = index

    @property
    def torch_device(self) -> str:
        return "cpu"

    def synchronize(self) -> None:
        pass

    def reset_peak(self) -> None:
        pass

    def cleanup(self, collect: bool = True) -> None:
        if collect:
            gc.collect()

    def sample(self) -> MemorySample:
        return MemorySample()

    def healthy(self) -> bool:
        return True

    def describe(self) -> dict:
        import platform

        return {"kind": "cpu", "name": platform.processor() or platform.machine() or "cpu", "index": 0,
                "total_bytes": None}

    def probe_context(self) -> dict:
        return {"context_init_bytes": None, "nvml_baseline_used_bytes": None, "note": "no CUDA on the CPU"}

    def probe_workspace(self) -> dict:
        return {"workspace_bytes": None}


class CudaDevice(Device):
    """A CUDA GPU through ``torch.cuda`` and :mod:`vramplan.nvml` (both injectable for tests)."""

    kind = "cuda"

    def __init__(self, index: int = 0, cuda: Any = None, nvml: Any = None, torch: Any = None):
        super().__init__(index)
        if torch is None and cuda is None:
            try:
                import torch as _torch
            except ImportError:
                raise MissingDependencyError("torch is not installed", install_hint("calibrate")) from None
            torch = _torch
        self.torch = torch
        self.cuda = cuda if cuda is not None else torch.cuda
        if nvml is None:
            from .. import nvml as _nvml

            nvml = _nvml
        self.nvml = nvml
        self._baseline_used: int | None = None
        self._nvml_ok = True
        self._nvml_idx: int | None = None
        self._nvml_match: str | None = None  # how the NVML device was found: uuid, pci_bus_id, index, or none

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}"

    def available(self) -> bool:
        try:
            return bool(self.cuda.is_available()) and self.cuda.device_count() > self.index
        except Exception:
            return False

    def synchronize(self) -> None:
        self.cuda.synchronize(self.index)

    def reset_peak(self) -> None:
        self.cuda.reset_peak_memory_stats(self.index)

    def cleanup(self, collect: bool = True) -> None:
        """Free what the last point left: collect reference cycles, empty the cache, reset the peaks."""
        if collect:
            gc.collect()
        try:
            self.cuda.synchronize(self.index)
        except Exception:
            pass
        self.cuda.empty_cache()
        self.cuda.reset_peak_memory_stats(self.index)

    def _ids(self) -> tuple[str | None, str | None]:
        """This device's UUID (NVML spelling, ``GPU-...``) and PCI bus id, as torch reports them."""
        try:
            props = self.cuda.get_device_properties(self.index)
        except Exception:
            return None, None
        uuid = getattr(props, "uuid", None)
        uuid = str(uuid) if uuid else None
        if uuid and not uuid.startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        pci = None
        bus = getattr(props, "pci_bus_id", None)
        if isinstance(bus, int):
            pci = f"{int(getattr(props, 'pci_domain_id', 0) or 0):08X}:{bus:02X}:{int(getattr(props, 'pci_device_id', 0) or 0):02X}.0"
        return uuid, pci

    def nvml_device(self) -> int | None:
        """The NVML index of this torch device (see the module docstring), or None."""
        if self._nvml_match is not None:
            return self._nvml_idx
        import os

        uuid, pci = self._ids()
        idx = None
        find = getattr(self.nvml, "nvml_index", None)
        if find is not None and (uuid or pci):
            if uuid:
                idx = self._nvml_call(find, uuid, None, raw=True)
                self._nvml_match = "uuid" if idx is not None else None
            if idx is None and pci:
                idx = self._nvml_call(find, None, pci, raw=True)
                self._nvml_match = "pci_bus_id" if idx is not None else None
        if idx is None:
            count = self._nvml_call(getattr(self.nvml, "device_count", lambda: None), raw=True)
            if not os.environ.get("CUDA_VISIBLE_DEVICES") and count == 1 and self.index == 0:
                idx, self._nvml_match = 0, "index"
            elif find is None and count is None:  # an NVML stand-in without lookup (tests): the index
                idx, self._nvml_match = self.index, "index"
            else:
                self._nvml_match = "none"
        self._nvml_idx = idx
        return idx

    def _nvml_call(self, fn, *args, raw: bool = False):
        if not raw:
            i = self.nvml_device()
            if i is None:
                return None
            args = (i,) + args[1:]
        if not self._nvml_ok:
            return None
        try:
            return fn(*args)
        except MissingDependencyError:
            self._nvml_ok = False
            return None
        except Exception:
            return None

    def sample(self) -> MemorySample:
        c, i = self.cuda, self.index
        s = MemorySample(allocated=int(c.memory_allocated(i)), reserved=int(c.memory_reserved(i)),
                         max_allocated=int(c.max_memory_allocated(i)), max_reserved=int(c.max_memory_reserved(i)))
        s.process = self._nvml_call(self.nvml.process_used_bytes, i)
        s.device_used = self._nvml_call(self.nvml.used_bytes, i)
        if s.process is None and s.device_used is not None and self._baseline_used is not None:
            s.process = s.device_used - self._baseline_used  # fallback: device-wide delta since before CUDA init
        return s

    def healthy(self) -> bool:
        """A small allocation and a synchronize succeed (no sticky CUDA error)."""
        try:
            x = self.torch.ones(1024, device=self.torch_device)
            float(x.sum().item())
            del x
            self.cuda.synchronize(self.index)
            return True
        except Exception:
            return False

    def describe(self) -> dict:
        c, i = self.cuda, self.index
        props = c.get_device_properties(i)
        info = self._nvml_call(self.nvml.device_info, i)
        return {
            "kind": "cuda", "index": i, "name": str(getattr(props, "name", "") or (info.name if info else "")),
            "nvml_name": info.name if info else None,
            "total_bytes": int(getattr(props, "total_memory", 0)) or (info.total_bytes if info else None),
            "nvml_total_bytes": info.total_bytes if info else None,
            "compute_capability": f"{getattr(props, 'major', '?')}.{getattr(props, 'minor', '?')}",
            "sm_count": int(getattr(props, "multi_processor_count", 0) or 0),
            "driver": info.driver if info else None,
            "cuda_driver_version": info.cuda_driver_version if info else None,
            "uuid": self._ids()[0], "pci_bus_id": self._ids()[1],
            "nvml_index": self.nvml_device(), "nvml_match": self._nvml_match,
        }

    def probe_context(self) -> dict:
        """CUDA context size: NVML before and after CUDA initialises. Call before anything touches CUDA."""
        initialized = bool(getattr(self.cuda, "is_initialized", lambda: False)())
        before = self._nvml_call(self.nvml.used_bytes, self.index)
        self._baseline_used = before
        t0 = time.perf_counter()
        x = self.torch.zeros(1, device=self.torch_device)
        self.cuda.synchronize(self.index)
        init_s = time.perf_counter() - t0
        after = self._nvml_call(self.nvml.used_bytes, self.index)
        proc = self._nvml_call(self.nvml.process_used_bytes, self.index)
        reserved = int(self.cuda.memory_reserved(self.index))
        del x
        ctx = None
        if before is not None and after is not None and not initialized:
            ctx = max(0, after - before - reserved)
        return {"context_init_bytes": ctx, "nvml_baseline_used_bytes": before, "nvml_used_after_init_bytes": after,
                "nvml_process_after_init_bytes": proc, "reserved_after_init_bytes": reserved,
                "cuda_init_s": round(init_s, 3), "cuda_was_initialized": initialized}

    def probe_workspace(self, dtype: Any = None) -> dict:
        """Bytes the cuBLAS/cuBLASLt workspaces hold after a forward+backward linear (outputs freed)."""
        torch = self.torch
        dtype = dtype or getattr(torch, "bfloat16", None)
        try:
            x = torch.randn(512, 1024, device=self.torch_device, dtype=dtype, requires_grad=True)
            w = torch.randn(1024, 1024, device=self.torch_device, dtype=dtype, requires_grad=True)
            b = torch.randn(1024, device=self.torch_device, dtype=dtype, requires_grad=True)
            self.cuda.synchronize(self.index)
            base = int(self.cuda.memory_allocated(self.index))
            y = torch.nn.functional.linear(x, w, b)  # addmm with bias: the cuBLASLt path
            z = (x @ w.t()).float()                  # plain mm: the cuBLAS path
            (y.float().sum() + z.sum()).backward()   # backward runs on the autograd thread: its own handle
            self.cuda.synchronize(self.index)
            del y, z
            x.grad = w.grad = b.grad = None
            gc.collect()
            ws = int(self.cuda.memory_allocated(self.index)) - base
            del x, w, b
            return {"workspace_bytes": max(0, ws)}
        except Exception as exc:  # a probe must never stop the run
            return {"workspace_bytes": None, "workspace_error": first_line(exc)}


def make_device(device: str = "cuda", **kwargs) -> Device:
    """``cuda`` / ``cuda:1`` or ``cpu``."""
    d = str(device).lower()
    if d == "cpu":
        return Device()
    if d.startswith("cuda"):
        index = int(d.split(":", 1)[1]) if ":" in d else 0
        dev = CudaDevice(index, **kwargs)
        if not dev.available():
            raise VramplanError(f"no CUDA device {d} is available to calibrate", "use --device cpu on a machine without a GPU")
        return dev
    raise VramplanError(f"unknown device {device!r}", "use cuda, cuda:N or cpu")

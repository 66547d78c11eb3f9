"""The environment a calibration ran in: device, driver, CUDA and library versions.

Versions come from package metadata (``importlib.metadata``), so capturing them never
imports bitsandbytes (whose import probes the GPU and prints on CPU-only machines).
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "nvidia-ml-py", "numpy", "vramplan")
ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_MODULE_LOADING", "CUDA_VISIBLE_DEVICES",
            "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS")


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name == "vramplan":
            from .. import __version__

            return __version__
        return None


def versions() -> dict:
    out = {name: package_version(name) for name in PACKAGES}
    out["python"] = platform.python_version()
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except ImportError:  # pragma: no cover
        out["cuda"] = None
    return out


def environment(device_info: dict | None = None) -> dict:
    """Versions, platform and relevant environment variables (device info merged in if given)."""
    env = {
        "versions": versions(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "argv": list(sys.argv),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "time": now_iso(),
    }
    if device_info:
        env["device"] = device_info
        if device_info.get("driver"):
            env["versions"]["driver"] = device_info["driver"]
        if device_info.get("cuda_driver_version"):
            v = int(device_info["cuda_driver_version"])
            env["versions"]["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
    return env

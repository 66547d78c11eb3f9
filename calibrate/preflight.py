import importlib, importlib.metadata as md, os, platform, sys
problems = []
def ver(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "nvidia-ml-py", "numpy", "rich", "matplotlib"):
    print(f"{name} {ver(name) or 'MISSING'}")
for name in ("torch", "transformers", "peft", "numpy"):
    if ver(name) is None:
        problems.append(f"{name} is not installed")
for mod in ("torch", "transformers", "peft", "bitsandbytes"):
    if mod != "bitsandbytes" and ver(mod) is None:
        continue
    try:
        importlib.import_module(mod)
    except Exception as exc:  # a wheel that installs but does not import (wrong CUDA, wrong python)
        if mod == "bitsandbytes" and ver("bitsandbytes") is None:
            problems.append("bitsandbytes is missing: carry its wheel in .whl/ (bash calibrate/run_on_gpu.sh --fetch-wheels)")
        else:
            line = str(exc).splitlines()[0][:160] if str(exc) else ""
            problems.append(f"import {mod} fails: {type(exc).__name__}: {line}")
if os.environ.get("DEVICE", "cuda") != "cpu":
    try:
        import torch
        if not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} sees no CUDA device")
        else:
            p = torch.cuda.get_device_properties(0)
            print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "torch cuda", torch.version.cuda)
    except Exception as exc:
        problems.append(f"CUDA check failed: {exc}")
    try:
        from vramplan import nvml
        n = nvml.device_count()
        print("nvml", n, "GPU(s):", ", ".join(nvml.device_info(i).name for i in range(n)))
    except Exception as exc:
        problems.append(f"NVML does not see the card: {str(exc).splitlines()[0]} (pip install nvidia-ml-py, or carry its wheel)")
if problems:
    print("PREFLIGHT FAILED: " + "; ".join(problems), file=sys.stderr)
    sys.exit(4)
print("preflight ok")

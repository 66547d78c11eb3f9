#!/usr/bin/env bash
# Calibrate the GPU of a lent machine: run a suite, fit profiles/<gpu>.json, write the report.
#
#   bash calibrate/run_on_gpu.sh [SUITE] [TIME_LIMIT_S]      (defaults: standard 420)
#
# DEVICE=cpu with SUITE=cpu smoke-tests this script on a machine without a GPU.
# Runs from a copy of the repository (nothing pip-installed; PYTHONPATH points at it). Each
# call measures for at most TIME_LIMIT_S seconds (commands there are cut at 10 minutes),
# resumes the log it finds in profiles/, then fits the profile and writes the report from
# everything logged so far. It exits 0 once the suite is complete, 3 while points remain.
# The measuring process is stopped hard at TIME_LIMIT_S + 120 s (HARD_LIMIT=seconds overrides),
# and the log is brought back to $OUT even when the run fails.
# Results go to profiles/ and reports/calibration/ of the copy, and also to $OUT:
#   <gpu>.jsonl (raw log), <gpu>.json (profile), <gpu>.md + <gpu>.png (report),
#   result.json (what the run did), env.txt (device and versions), calibrate.log.
# Between calls, put the returned <gpu>.jsonl into profiles/ of the checkout that is sent
# (and <gpu>.json there, <gpu>.md/.png into reports/calibration/), then call again.
#
# bitsandbytes (QLoRA, 8-bit optimisers) is not on the machine's image: carry its wheel in
# .whl/ (ignored by git). Fetch it here, once, before the first call:
#   bash calibrate/run_on_gpu.sh --fetch-wheels
# and name .whl in the call's carry list.
set -uo pipefail

cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # bitsandbytes needs torch, numpy and packaging, which the image has (hence --no-deps)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${BNB_VERSION:-0.50.2}"
    ls -l .whl
    exit 0
fi

SUITE="${1:-standard}"
LIMIT="${2:-420}"
OUT="${OUT:-/tmp/vramplan-out}"
mkdir -p "$OUT" profiles reports/calibration

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

{
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) suite=$SUITE limit=${LIMIT}s"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_cap --format=csv 2>&1
    python3 - <<'EOF'
import importlib.metadata as md, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
for name in ("transformers", "peft", "bitsandbytes", "accelerate", "nvidia-ml-py", "numpy", "rich", "matplotlib"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
} 2>&1 | tee "$OUT/env.txt"

# A hard stop well inside the machine's 10 minutes (a point that hangs, a GPU that stops answering):
# SIGINT first (the runner closes its log and exits 130), SIGKILL 30 s later; the copy below still runs.
HARD="${HARD_LIMIT:-$((${LIMIT%.*} + 120))}"
timeout -s INT -k 30 "$HARD" \
    python3 -m vramplan.calibration --device "${DEVICE:-cuda}" --suite "$SUITE" --out profiles --report-dir reports/calibration \
    --resume --time-limit "$LIMIT" --no-progress --json > "$OUT/result.json" 2> >(tee "$OUT/calibrate.log" >&2)
rc=$?
cat "$OUT/result.json"

GPU=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('gpu',''))" "$OUT/result.json" 2>/dev/null)
if [[ -z "$GPU" ]]; then
    # the run failed before printing its result (device lost, interrupted, crashed): the newest log in
    # profiles/ is this run's; bring it back, or what it measured is lost with the machine
    NEWEST=$(ls -t profiles/*.jsonl 2>/dev/null | head -n 1)
    [[ -n "$NEWEST" ]] && GPU=$(basename "$NEWEST" .jsonl)
fi
if [[ -n "$GPU" ]]; then
    for f in "profiles/$GPU.jsonl" "profiles/$GPU.json" "reports/calibration/$GPU.md" "reports/calibration/$GPU.png"; do
        [[ -f "$f" ]] && cp "$f" "$OUT/"
    done
fi
if [[ $rc -ne 0 ]]; then
    echo "calibration failed (exit $rc); the log keeps what was measured: call again to resume" >&2
    exit $rc
fi
if python3 -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('complete') else 1)" "$OUT/result.json"; then
    echo "suite $SUITE complete: profile, log and report are in \$OUT"
    exit 0
fi
echo "suite $SUITE not complete yet: carry profiles/$GPU.jsonl back and call again" >&2
exit 3

#!/usr/bin/env bash
# Calibrate the GPU of a lent machine: run a suite, fit profiles/<gpu>.json, write the report.
#
#   bash calibrate/run_on_gpu.sh [SUITE] [TIME_LIMIT_S]      (defaults: quick 300)
#
# For a short loan (15 minutes with start-up, commands cut at 10): the first call runs the
# quick suite (held-out points first) and ends with a profile, its raw log and its report in
# under 7 minutes: `bash calibrate/run_on_gpu.sh`. Then, time permitting, the standard suite
# in resumable pieces: `bash calibrate/run_on_gpu.sh standard 420`, called again with the
# returned log in profiles/ until it exits 0.
# A preflight (calibrate/preflight.py) runs first and fails in seconds with one
# "PREFLIGHT FAILED: ..." line (exit 4): versions of torch/transformers/peft/bitsandbytes, the
# carried bitsandbytes wheel installs and imports, CUDA and NVML see the card.
# PREFLIGHT_ONLY=1 runs just that; PYTHON=... picks the interpreter; DRYRUN=first|all records
# the dry run's accounting (default none: not needed on the card, and seconds per point).
#
# DEVICE=cpu with SUITE=cpu smoke-tests this script on a machine without a GPU.
# Runs from a copy of the repository (nothing pip-installed; PYTHONPATH points at it). Each
# call measures for at most TIME_LIMIT_S seconds (commands there are cut at 10 minutes),
# resumes the log it finds in profiles/, then fits the profile and writes the report from
# everything logged so far. It exits 0 once the suite is complete, 3 while points remain.
# The measuring process is stopped hard at TIME_LIMIT_S + 90 s (HARD_LIMIT=seconds overrides),
# and the log is brought back to $OUT even when the run fails.
# Results go to profiles/ and reports/calibration/ of the copy, and also to $OUT:
#   <gpu>.jsonl (raw log), <gpu>.json (profile), <gpu>.md + <gpu>.png (report),
#   result.json (what the run did), env.txt (device and versions), calibrate.log.
# Between calls, put the returned <gpu>.jsonl into profiles/ of the checkout that is sent
# (and <gpu>.json there, <gpu>.md/.png into reports/calibration/), then call again.
#
# bitsandbytes (QLoRA, 8-bit optimisers) and nvidia-ml-py (NVML: the CUDA context, the card's
# name) may be missing from the machine's image: carry their wheels in
# .whl/ (ignored by git). Fetch it here, once, before the first call:
#   bash calibrate/run_on_gpu.sh --fetch-wheels
# and name .whl in the call's carry list.
set -uo pipefail

cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # bitsandbytes needs torch, numpy and packaging, which the image has (hence --no-deps)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${BNB_VERSION:-0.50.2}" nvidia-ml-py
    ls -l .whl
    exit 0
fi

SUITE="${1:-quick}"
LIMIT="${2:-300}"
OUT="${OUT:-/tmp/vramplan-out}"
mkdir -p "$OUT" profiles reports/calibration

if compgen -G ".whl/*.whl" > /dev/null; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "PREFLIGHT FAILED: installing the carried wheels (.whl/) failed" >&2; exit 4; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

PY="${PYTHON:-python3}"
# -- preflight: seconds, one clear message on failure (calibrate/preflight.py) -----------------
{
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) suite=$SUITE limit=${LIMIT}s"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_cap --format=csv 2>&1 || true
    DEVICE="${DEVICE:-cuda}" timeout 120 "$PY" calibrate/preflight.py
} > "$OUT/env.txt" 2>&1
pre=$?
cat "$OUT/env.txt"
if [[ $pre -ne 0 ]] || ! grep -q "^preflight ok" "$OUT/env.txt"; then
    grep -h "PREFLIGHT FAILED" "$OUT/env.txt" >&2 || echo "PREFLIGHT FAILED: the preflight did not finish (exit $pre)" >&2
    exit 4
fi
[[ -n "${PREFLIGHT_ONLY:-}" ]] && exit 0

# A hard stop well inside the machine's 10 minutes (a point that hangs, a GPU that stops answering):
# SIGINT first (the runner closes its log and exits 130), SIGKILL 30 s later; the copy below still runs.
HARD="${HARD_LIMIT:-$((${LIMIT%.*} + 90))}"
# The log is copied to $OUT after every point (a watcher on the log's size), so a machine taken
# away mid-run still hands back everything measured.
copy_logs() { for f in profiles/*.jsonl; do [[ -f "$f" ]] && cp -p "$f" "$OUT/" 2>/dev/null; done; return 0; }
( last=""; while sleep 2; do now=$(stat -c %s profiles/*.jsonl 2>/dev/null | tr '\n' ' '); \
    if [[ "$now" != "$last" ]]; then copy_logs; last="$now"; fi; done ) &
COPIER=$!
timeout -s INT -k 30 "$HARD" \
    "$PY" -m vramplan.calibration --device "${DEVICE:-cuda}" --suite "$SUITE" --out profiles --report-dir reports/calibration \
    --resume --time-limit "$LIMIT" --dryrun "${DRYRUN:-none}" --no-progress --json > "$OUT/result.json" 2> >(tee "$OUT/calibrate.log" >&2)
rc=$?
kill "$COPIER" 2>/dev/null; wait "$COPIER" 2>/dev/null
copy_logs
cat "$OUT/result.json"

GPU=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('gpu',''))" "$OUT/result.json" 2>/dev/null)
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
if "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('complete') else 1)" "$OUT/result.json"; then
    echo "suite $SUITE complete: profile, log and report are in \$OUT"
    exit 0
fi
echo "suite $SUITE not complete yet: carry profiles/$GPU.jsonl back and call again" >&2
exit 3

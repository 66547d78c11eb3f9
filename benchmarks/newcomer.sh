#!/usr/bin/env sh
# A newcomer's walkthrough of the README and the questions of issue #15 (see benchmarks/newcomer.py).
# Usage: benchmarks/newcomer.sh [--quick]
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" benchmarks/newcomer.py "$@"

#!/usr/bin/env bash
# Run the whole test suite on this machine (CPU-only machines skip the GPU tests with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"

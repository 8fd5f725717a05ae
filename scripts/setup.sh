#!/usr/bin/env bash
# Set up a fresh machine for flashdino: the Fashion-MNIST package (the embedded default dataset),
# a virtual environment in .venv with the tested versions, DeepSpeed without its compiled ops, the
# flashdino package itself (editable), and the native DALI operator when a compiler is present.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# 1. The embedded default dataset (Debian package dataset-fashion-mnist, 31 MB).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing; install it with: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi

# 2. The virtual environment with the tested versions.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt
# DeepSpeed ships as a source archive; build only its Python part (no CUDA ops at install time).
.venv/bin/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 .venv/bin/python -m pip install -q deepspeed==0.19.8
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# The native DALI operator (CMake; CPU kernel, plus the CUDA kernel when nvcc exists). Optional:
# without it the DALI pipeline falls back to DALI's built-in ops and says so once.
.venv/bin/python -m flashdino.pipelines.native.build || echo "setup: native DALI plugin not built (see above); continuing" >&2

echo "setup: done. Try: .venv/bin/flashdino train   (tests: bash scripts/test.sh)"

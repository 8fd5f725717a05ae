#!/usr/bin/env bash
# Run the test suite here, on the CPU, against the library versions of the GPU machine's image
# (torch 2.11.0, torchvision 0.26.0, triton 3.6.0; see docs/GPU_CHECKLIST.md) instead of the
# versions .venv pins, so that an API difference shows up before device time is spent on it.
# Builds a second virtual environment, .venv-gpu-image (git-ignored; about 5 GB, as PyPI's torch
# 2.11 is a CUDA build), and passes its arguments on to pytest.
#
# numpy is held below 2.3 there: triton 3.6's interpreter turns one-element arrays into Python
# ints, which numpy 2.4.6 refuses ("only 0-dimensional arrays can be converted to Python
# scalars"); numpy 2.2.6 works. This is the interpreter's problem only: on the GPU no kernel is
# interpreted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-gpu-image
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q "setuptools<82"  # torch 2.11's own bound; new enough for the editable install
grep -v -E '^(torch|torchvision|numpy)==' requirements.txt > "$VENV/requirements-rest.txt"
"$VENV/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.3" \
  -r "$VENV/requirements-rest.txt"
"$VENV/bin/python" -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q deepspeed==0.19.8
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c 'import torch, triton, torchvision, numpy
print(f"compat_check: torch {torch.__version__}, triton {triton.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}")'
# DeepSpeed JIT-builds its CPU communication op per torch version: keep that build apart from
# .venv's, whose torch 2.14 leaves a lock file there that torch 2.11 would wait on forever.
export TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"

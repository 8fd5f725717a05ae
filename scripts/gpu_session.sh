#!/usr/bin/env bash
# The GPU runs of docs/GPU_CHECKLIST.md, as phases that fit the device tool's calls (10 minutes each,
# 30 minutes of device time per session). Runs ON the GPU machine, in the repository root.
#
# Here first:  bash scripts/gpu_prepare.sh            (-> .whl/p0..pN, .gpu/, .gpu-demo/; git-ignored)
# Then device calls, back to back (a warm machine keeps /tmp for about 30 s between calls). What
# needs no wheels comes first (`setup-lite`: no DALI, DeepSpeed or nvtx), so a session cut short
# still returns the throughput, parity, demo and kernel results:
#   carry [".gpu"]              bash scripts/gpu_session.sh setup-lite bench=simdino_vitb16,simdino_vits16
#   carry [".gpu", ".gpu-demo"] bash scripts/gpu_session.sh setup-lite demo-bg parity
#   carry [".gpu"]              bash scripts/gpu_session.sh setup-lite kernels packed=simdino_vitb16
#   one per wheel part K:  carry [".whl/pK"]  bash scripts/gpu_session.sh wheels K
#   carry [".gpu"]              bash scripts/gpu_session.sh setup tests data
#   carry [".gpu"]              bash scripts/gpu_session.sh setup-lite bench=simdinov2_vitb16   (next session if short)
# `setup` is idempotent (cheap on a warm machine; it redoes the install on a fresh one, which then
# needs the wheel calls again; `setup-lite` never needs them). Every call ends by packing what it measured into
# $OUT/gpu-results-<phases>.tgz; unpack it here with `tar xzf FILE` (it holds profiling/results/...
# written by the harnesses, and gpu-logs/), then `python -m flashdino.profiling.report --readme README.md`.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOGS=$ROOT/gpu-logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
# /tmp/site-fallback holds carried wheels, each installed only for a module the machine cannot
# import (see fallback), so it never shadows a package the machine has.
export PYTHONPATH=/tmp/fd:/tmp/site${PYTHONPATH:+:$PYTHONPATH}:/tmp/site-fallback
# No Debian photos on this machine: the JPEG sets of the tests and the data bench use the carried ones.
export FLASHDINO_PHOTOS="$ROOT/.gpu/photos"
fd() { python3 -m flashdino.engine.cli "$@"; }
fd_fast() {  # fd SUBCOMMAND with the bench suite's fast-path overrides (FAST_PATHS) before the rest
  local fast sub=$1; shift
  fast=$(python3 -c 'from flashdino.profiling.suite import FAST_PATHS; print(FAST_PATHS)') || return 1
  # shellcheck disable=SC2086  # $fast is a list of key=value words
  fd "$sub" $fast "$@"
}
status=0
# A call killed at the device tool's limit returns nothing: every phase stops by this deadline, so
# the results are always packed (GPU_SESSION_SECONDS: the call's timeout minus a margin).
END=$((SECONDS + ${GPU_SESSION_SECONDS:-560}))

run_phase() {  # name, command...: log to gpu-logs/<name>.log, remember a failure, go on
  local name=$1; shift
  local left=$((END - SECONDS - 15))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, the call's time is used up" | tee "$LOGS/$name.log"; status=1; return
  fi
  echo "=== $name (at most $left s): $*"
  local t0=$SECONDS
  timeout -k 10 "$left" bash -c "$(declare -f fd fd_fast); \"\$@\"" _ "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "=== $name: stopped at the call's deadline" | tee -a "$LOGS/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

phase_wheels() {  # copy one carried wheel part into /tmp/wc
  mkdir -p /tmp/wc && cp ".whl/p$1"/* /tmp/wc/ && ls -la /tmp/wc
}

fallback() {  # module, wheel name prefixes...: install the carried wheels when `import module` fails
  local mod=$1; shift
  python3 -c "import $mod" 2>/dev/null && return 0
  local wheels=() w
  for w in "$@"; do wheels+=(.gpu/fallback/"$w"-*.whl); done
  if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-fallback "${wheels[@]}"; then
    echo "setup: '$mod' was missing here; installed the carried ${*}"
  else
    echo "setup: '$mod' is missing and the carried wheels did not install (.gpu/fallback: run gpu_prepare.sh)"
  fi
}

phase_setup() {  # [lite]: without the carried wheels (no DALI, DeepSpeed, nvtx: enough for bench,
                 # parity and kernels; NVTX ranges fall back to torch.cuda.nvtx)
  if [ "${1:-}" = lite ]; then
    echo "setup-lite: the wheel parts are not installed; DALI, DeepSpeed and nvtx may be missing here"
  elif [ ! -e /tmp/site/.flashdino-wheels ]; then
    ls /tmp/wc/c0* >/dev/null 2>&1 || { echo "setup: no wheel parts in /tmp/wc; make the 'wheels K' calls first"; return 1; }
    (cd /tmp/wc && cat c0* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile \
      --target /tmp/site /tmp/wc/*.whl) || return 1
    touch /tmp/site/.flashdino-wheels
  fi
  # Light dependencies the machine may lack: installed from .gpu/fallback only when not importable.
  fallback yaml pyyaml; fallback tqdm tqdm; fallback torchvision torchvision
  fallback packaging packaging; fallback pluggy pluggy; fallback iniconfig iniconfig; fallback pytest pytest
  # The flashdino namespace without pip: one link per top-level folder (what setup.py's mapping does).
  mkdir -p /tmp/fd/flashdino
  for d in engine kernels pipelines profiling; do ln -sfn "$ROOT/$d" "/tmp/fd/flashdino/$d"; done
  python3 -m flashdino.pipelines.native.build || echo "setup: native DALI plugin not built; DALI falls back to built-in ops"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "torchvision", "nvidia.dali", "deepspeed", "nvtx", "yaml", "tqdm", "pytest",
             "scipy", "matplotlib", "tensorboard", "timm", "safetensors", "flash_attn"):
    try:
        m = importlib.import_module(name)
        print(f"{name:12s} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # flash_attn, matplotlib, tensorboard, timm, safetensors are optional
        print(f"{name:12s} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
}

# --continue-on-collection-errors: a module missing on this machine costs the tests that import it,
# not the whole GPU test run.
phase_tests() { run_phase tests python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
  --continue-on-collection-errors tests/; }

phase_parity() {  # issue 6: 200 steps of the fast path against the reference eager path
  # The bench suite's engine overrides exactly: the README table pairs parity and bench results by
  # their config hash, so any other set of overrides would leave its parity column empty.
  local fast
  fast=$(python3 -c 'from flashdino.profiling.suite import FAST_PATHS; print(FAST_PATHS)') || return 1
  # --time-limit: stop stepping in time to write the report (model build and compile come first);
  # the v1 run may take 2/3 of what is left, the v2 run the rest.
  # shellcheck disable=SC2086  # $fast is a list of key=value words
  run_phase parity_simdino_vitb16 fd parity --preset simdino_vitb16 --steps 200 $fast \
    --time-limit $(( (END - SECONDS) * 2 / 3 - 90 > 30 ? (END - SECONDS) * 2 / 3 - 90 : 30 ))
  # shellcheck disable=SC2086
  run_phase parity_simdinov2_vitb16 fd parity --preset simdinov2_vitb16 --steps 50 $fast \
    --time-limit $(( END - SECONDS - 120 > 30 ? END - SECONDS - 120 : 30 ))
}

phase_bench() {  # issue 6 targets; the suite's own parity stage is skipped (phase_parity did it)
  local presets=${1:-simdino_vitb16,simdino_vits16,simdinov2_vitb16}
  for preset in ${presets//,/ }; do
    run_phase "bench_$preset" python3 -m flashdino.profiling.suite --presets "$preset" --skip parity,kernels
  done
}

phase_variant() {  # PRESET:key=value[,key=value]: the engine and the engine with these overrides, one run
  local preset=${1%%:*} overrides=${1#*:} slug
  if [ -z "$preset" ] || [ "$preset" = "$1" ] || [ -z "$overrides" ]; then
    echo "variant: expected PRESET:key=value[,key=value], got '$1'"; status=2; return
  fi
  slug=$(echo "$overrides" | tr -c 'A-Za-z0-9_.=\n-' '_')
  # shellcheck disable=SC2086  # the overrides are key=value words
  run_phase "variant_${preset}_$slug" fd_fast bench --preset "$preset" --sides engine --variant ${overrides//,/ } \
    --steps 20 --warmup 3 --out "profiling/results/bench_variant/$preset/$slug"
}

phase_packed() {  # issue 6: does DINOv3-style packing of the crop groups pay? engine vs packed, one run
  local presets=${1:-simdino_vitb16}
  for preset in ${presets//,/ }; do phase_variant "$preset:runtime.multicrop=packed"; done
}

phase_kernels() { run_phase kernels python3 -m flashdino.profiling.kernel_bench; }

phase_data() {  # issue 4: DALI-GPU vs DALI-CPU vs torchvision, and the pipeline's share of a ViT-B step
  run_phase data fd data bench --data /tmp/jpegs --make-jpegs 6000 --photos .gpu/photos --batch-size 256 \
    --workers 14 --batches 30 --vit-step 20 --output profiling/results/data_bench
}

phase_demo() {  # issue 3: the longer demo must beat raw pixels; Fashion-MNIST travels in .gpu-demo
  # train.max_minutes keeps training within this call, leaving time for the k-NN, the plots and the
  # report (about 2 minutes). train.fit_to_time measures the speed after the compile warm-up (the
  # machine is shared with the tests and parity) and shortens the schedule to the whole epochs that
  # fit, so the run finishes a schedule rather than being cut mid-way; the report says so.
  local minutes=$(( (END - SECONDS - 150) / 60 ))
  [ "$minutes" -ge 1 ] || minutes=1
  rm -rf /tmp/demo-run  # a fresh run, never a resume of an earlier call's
  run_phase demo python3 -m flashdino.engine.eval.demo_report --preset demo_gpu --output-dir /tmp/demo-run \
    "data.path=$ROOT/.gpu-demo/fashion-mnist" "train.max_minutes=$minutes" train.fit_to_time=true
  # The run's small files come back with the logs; checkpoints (~64 MB) would sink the tarball.
  mkdir -p "$LOGS/demo-run"
  find /tmp/demo-run -maxdepth 1 -type f ! -name '*.pth' -size -8M -exec cp {} "$LOGS/demo-run/" \;
}

pack() {
  [ -n "${OUT:-}" ] || return 0
  local tag; tag=$(IFS=-; echo "$*" | tr -c 'A-Za-z0-9_.\n-' '_')
  tar czf "$OUT/gpu-results-$tag.tgz" --exclude='*.pt.trace.json' profiling/results gpu-logs 2>/dev/null
  ls -la "$OUT"
}

[ $# -gt 0 ] || { sed -n '2,18p' "$0"; exit 2; }
if [ "$1" = wheels ]; then phase_wheels "$2"; exit $?; fi
phases=("$@")
for p in "${phases[@]}"; do
  case $p in
    setup) phase_setup || { echo "setup failed"; status=1; break; } ;;
    setup-lite) phase_setup lite || { echo "setup failed"; status=1; break; } ;;
    demo-bg) (status=0; phase_demo; echo "$status" > "$LOGS/demo.status") & ;;  # correctness-only phases
                                                  # may share the machine with it; timed ones may not
    bench=*) phase_bench "${p#bench=}" ;;
    packed=*) phase_packed "${p#packed=}" ;;
    variant=*) phase_variant "${p#variant=}" ;;
    tests|parity|bench|packed|kernels|data|demo) "phase_$p" ;;
    *) echo "unknown phase '$p' (setup setup-lite tests parity bench bench=P1,P2 packed packed=P1,P2 variant=P:k=v,k=v kernels data demo demo-bg)"; status=2 ;;
  esac
done
wait  # a background demo
if [[ " ${phases[*]} " == *" demo-bg "* ]] && [ "$(cat "$LOGS/demo.status" 2>/dev/null)" != 0 ]; then status=1; fi
pack "${phases[@]}"
exit $status

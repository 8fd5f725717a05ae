#!/usr/bin/env bash
# Prepare, on the session's own machine, what the GPU machine lacks (docs/GPU_CHECKLIST.md):
#   .whl/p0 .. .whl/pN  DALI, DeepSpeed, nvtx and their needs, cut into parts that travel one per
#                       device call (../shared/tools/gpu-wheels.sh);
#   .gpu/photos         the source photos for the JPEG benchmark set (the GPU machine has none);
#   .gpu-demo/fashion-mnist  the demo's dataset (30 MB; the GPU machine lacks the Debian package),
#                       apart so that only the call running the demo carries it;
#   .gpu/fallback       wheels of the project's light dependencies (torchvision for torch 2.11,
#                       PyYAML, tqdm, pytest and its dependencies): gpu_session.sh installs one only
#                       when the machine cannot import that module (~9 MB);
#   .gpu/commit         the commit the results will be measured at (the copy there has no .git),
#   .gpu/manifest       and its files' hashes (`git ls-files -s`), by which the results there name
#                       any file changed since (profiling/env.py), so a stale record cannot pass.
# All three folders are git-ignored. Then follow scripts/gpu_session.sh's header.
# `bash scripts/gpu_prepare.sh commit` rewrites .gpu/commit alone (after a new commit).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .gpu
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- || echo ' dirty')" > .gpu/commit
git ls-files -s > .gpu/manifest
echo "gpu_prepare: .gpu/commit = $(cat .gpu/commit)"
[ "${1:-}" = commit ] && exit 0
wheels=../shared/tools/gpu-wheels.sh
[ -x "$wheels" ] || wheels=/work/shared/tools/gpu-wheels.sh
bash "$wheels"
mkdir -p .gpu/photos
python3 - <<'EOF'
# Ten photos, shrunk to at most 1600 px (what make_jpeg_set keeps anyway), so they travel in a few MB.
import glob, os
from PIL import Image
globs = ("/usr/share/backgrounds/mate/nature/*.jpg", "/usr/share/libjxl-testdata/jxl/flower/*.jpg")
paths = sorted(p for g in globs for p in glob.glob(g))[:10]
if not paths:
    raise SystemExit("gpu_prepare: no photos installed; apt-get install mate-backgrounds libjxl-testdata (shared/DATA.md)")
for p in paths:
    with Image.open(p) as img:
        img = img.convert("RGB")
        img.thumbnail((1600, 1600), Image.Resampling.BICUBIC)
        img.save(os.path.join(".gpu/photos", os.path.basename(p)), "JPEG", quality=95)
print(f"gpu_prepare: {len(paths)} photos in .gpu/photos")
EOF
rm -rf .gpu/fallback && mkdir -p .gpu/fallback
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/fallback torchvision==0.26.0 pyyaml tqdm pytest pluggy iniconfig packaging
echo "gpu_prepare: fallback wheels in .gpu/fallback: $(ls .gpu/fallback | tr '\n' ' ')"
fmnist=/usr/share/datasets/fashion-mnist
[ -e "$fmnist/train-images-idx3-ubyte.gz" ] || {
  echo "gpu_prepare: no Fashion-MNIST; apt-get install dataset-fashion-mnist (shared/DATA.md)"; exit 1; }
mkdir -p .gpu-demo/fashion-mnist && cp "$fmnist"/*.gz .gpu-demo/fashion-mnist/
echo "gpu_prepare: Fashion-MNIST in .gpu-demo/fashion-mnist"
du -sh .whl/p* .gpu .gpu-demo

"""Build the DALI operator plugin (``libflashdino_dali.so``) with CMake.

``build_native_plugin(build_dir)`` configures and builds the repository's ``CMakeLists.txt`` and
returns the path of the plugin, or ``None`` after logging one line saying why it could not (no
cmake, no C++ compiler, DALI not installed, or the build failed). The CUDA kernel is built when a
CUDA compiler is found (``cuda="auto"``); the CPU kernel always.

Run as a script: ``python -m flashdino.pipelines.native.build [BUILD_DIR] [--cuda on|off|auto]``.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from typing import Optional

log = logging.getLogger(__name__)

PLUGIN_NAME = "libflashdino_dali.so"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
DEFAULT_BUILD_DIR = os.path.join(REPO_ROOT, "build", "native")
SOURCES = ("color_ops.h", "color_augment.h", "color_augment.cc", "color_augment_gpu.cu")


def _find_cxx() -> Optional[str]:
    env = os.environ.get("CXX")
    if env and shutil.which(env.split()[0]):
        return env
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    return None


def _find_nvcc() -> Optional[str]:
    env = os.environ.get("CUDACXX")
    if env and shutil.which(env):
        return shutil.which(env)
    for cand in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        found = shutil.which(cand)
        if found:
            return found
    return None


def missing_requirement(cuda: str = "auto") -> Optional[str]:
    """One line naming what is missing to build the plugin, or None when everything is there."""
    if shutil.which("cmake") is None:
        return "cmake is not installed (apt-get install cmake, or pip install cmake)"
    if _find_cxx() is None:
        return "no C++ compiler found (set CXX or install g++)"
    try:
        import nvidia.dali.sysconfig  # noqa: F401
    except ImportError as exc:
        return f"NVIDIA DALI is not importable ({exc}); pip install nvidia-dali-cuda130"
    if cuda == "on" and _find_nvcc() is None:
        return "cuda='on' but no nvcc was found (set CUDACXX)"
    return None


def plugin_is_stale(plugin_path: str) -> bool:
    """True when a source file is newer than the built plugin."""
    if not os.path.exists(plugin_path):
        return True
    built = os.path.getmtime(plugin_path)
    here = os.path.dirname(os.path.realpath(__file__))
    paths = [os.path.join(here, s) for s in SOURCES] + [os.path.join(REPO_ROOT, "CMakeLists.txt")]
    return any(os.path.exists(p) and os.path.getmtime(p) > built for p in paths)


def build_native_plugin(
    build_dir: str = DEFAULT_BUILD_DIR,
    cuda: str = "auto",
    jobs: Optional[int] = None,
    cuda_architectures: Optional[str] = None,
    verbose: bool = False,
) -> Optional[str]:
    """Configure and build the plugin into `build_dir`; return its path, or None with a logged reason.

    cuda: "auto" (CUDA kernel when nvcc is found), "on" (required) or "off" (CPU kernel only).
    """
    cuda = cuda.lower()
    if cuda not in ("auto", "on", "off"):
        raise ValueError(f"build_native_plugin: cuda must be 'auto', 'on' or 'off', got {cuda!r}")
    reason = missing_requirement(cuda)
    if reason is not None:
        log.warning("flashdino native plugin not built: %s", reason)
        return None
    os.makedirs(build_dir, exist_ok=True)
    configure = [
        "cmake", "-S", REPO_ROOT, "-B", build_dir,
        f"-DPython3_EXECUTABLE={sys.executable}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DFLASHDINO_CUDA={cuda.upper()}",
    ]
    nvcc = _find_nvcc()
    if cuda != "off" and nvcc:
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    if cuda_architectures:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}")
    build = ["cmake", "--build", build_dir, "-j", str(jobs or max(1, os.cpu_count() or 1))]
    for cmd in (configure, build):
        proc = subprocess.run(cmd, capture_output=not verbose, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] if not verbose else []
            log.warning(
                "flashdino native plugin not built: `%s` failed (exit %d)%s",
                " ".join(cmd[:3]), proc.returncode, f": {tail[0]}" if tail else "",
            )
            return None
    path = os.path.join(build_dir, PLUGIN_NAME)
    if not os.path.exists(path):
        log.warning("flashdino native plugin not built: cmake finished but %s is missing", path)
        return None
    return path


def ensure_native_plugin(build_dir: str = DEFAULT_BUILD_DIR, cuda: str = "auto", jobs: Optional[int] = None) -> Optional[str]:
    """The plugin in `build_dir` if it is up to date with the sources, else a fresh build (or None)."""
    path = os.path.join(build_dir, PLUGIN_NAME)
    if not plugin_is_stale(path):
        return path
    return build_native_plugin(build_dir, cuda=cuda, jobs=jobs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the flashdino DALI operator plugin with CMake.")
    parser.add_argument("build_dir", nargs="?", default=DEFAULT_BUILD_DIR)
    parser.add_argument("--cuda", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--cuda-architectures", default=None, help='e.g. "90" for H100 only')
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_native_plugin(args.build_dir, args.cuda, args.jobs, args.cuda_architectures, args.verbose)
    if path is None:
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

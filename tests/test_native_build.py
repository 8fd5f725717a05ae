"""CMake build of the DALI plugin: the CUDA kernel compiles with nvcc; missing tools give a one-line reason."""
import logging
import os
import shutil
import subprocess
import time

import pytest

from flashdino.pipelines.native import build as native_build


@pytest.mark.slow
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    """Configure + build with FLASHDINO_CUDA=ON for sm_90 only (the H100), ~1 min on 2 cores."""
    reason = native_build.missing_requirement("on")
    if reason:
        pytest.skip(f"cannot compile the CUDA kernel here: {reason}")
    path = native_build.build_native_plugin(str(tmp_path / "cuda"), cuda="on", cuda_architectures="90")
    assert path is not None and os.path.getsize(path) > 0
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "-DC", path], capture_output=True, text=True, check=True).stdout
        assert "flashdino::ColorAugment<dali::GPUBackend>::RunImpl" in symbols
        assert "flashdino::ColorAugment<dali::CPUBackend>::RunImpl" in symbols


def test_missing_cmake_is_reported_in_one_line(tmp_path, monkeypatch, caplog):
    real_which = shutil.which
    monkeypatch.setattr(native_build.shutil, "which", lambda name, *a, **k: None if name == "cmake" else real_which(name, *a, **k))
    with caplog.at_level(logging.WARNING, logger=native_build.__name__):
        assert native_build.build_native_plugin(str(tmp_path)) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "cmake is not installed" in messages[0] and "\n" not in messages[0]


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setattr(native_build, "_find_cxx", lambda: None)
    assert "no C++ compiler" in native_build.missing_requirement()


def test_bad_cuda_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="cuda must be"):
        native_build.build_native_plugin(str(tmp_path), cuda="maybe")


def test_stale_plugin_is_detected(tmp_path):
    plugin = tmp_path / native_build.PLUGIN_NAME
    assert native_build.plugin_is_stale(str(plugin))  # missing
    plugin.write_bytes(b"")
    old = time.time() - 10 * 365 * 86400
    os.utime(plugin, (old, old))
    assert native_build.plugin_is_stale(str(plugin))  # older than the sources
    new = time.time() + 3600
    os.utime(plugin, (new, new))
    assert not native_build.plugin_is_stale(str(plugin))

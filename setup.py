"""Packaging for flashdino.

The repository keeps its architecture as top-level folders (engine/, kernels/,
pipelines/, profiling/); they are installed under one namespace, ``flashdino.*``,
because bare names such as ``kernels`` clash with packages on PyPI.
"""
import os
import re

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.dist import Distribution

TOP_LEVEL = ("engine", "kernels", "pipelines", "profiling")


def _subpackages(folder):
    """Every folder below ``folder`` that holds an __init__.py, as dotted flashdino names."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d != "build"]
        if "__init__.py" in files:
            dotted = "flashdino." + root.replace(os.sep, ".")
            found[dotted] = root
    return found


def _version():
    text = open(os.path.join("engine", "version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


# "flashdino" itself is an implicit namespace package: it has no folder of its own.
package_dir = {}
for top in TOP_LEVEL:
    package_dir.update(_subpackages(top))

class build_py(_build_py):
    """Also build the native DALI operator plugin (pipelines/native, CMake) when DALI and a compiler exist.

    Without them the build logs one line and the DALI pipeline falls back to DALI's built-in ops.
    Editable installs don't run this step: scripts/setup.sh runs the same build into build/native.
    """

    def run(self):
        super().run()
        import importlib.util
        import shutil

        spec = importlib.util.spec_from_file_location("_flashdino_native_build", os.path.join("pipelines", "native", "build.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        plugin = module.build_native_plugin()
        if plugin:
            dest = os.path.join(self.build_lib, "flashdino", "pipelines", "native")
            os.makedirs(dest, exist_ok=True)
            shutil.copy2(plugin, dest)


class BinaryDistribution(Distribution):
    """The wheel may carry the native plugin (a .so), so it is tagged for the platform."""

    def has_ext_modules(self):
        return True


setup(
    name="flashdino",
    cmdclass={"build_py": build_py},
    distclass=BinaryDistribution,
    version=_version(),
    description="Compiled, fused training engine for SimDINO / SimDINOv2 (and DINO / DINOv2) ViT pretraining",
    python_requires=">=3.10",
    packages=sorted(package_dir),
    package_dir=package_dir,
    package_data={"flashdino.engine": ["presets/*.yaml"]},
    install_requires=[
        "torch>=2.11",
        "torchvision",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "full": ["nvidia-dali-cuda130", "deepspeed", "nvtx", "tensorboard", "matplotlib", "safetensors", "timm"],
        "test": ["pytest", "scipy", "timm", "safetensors"],
    },
    entry_points={"console_scripts": ["flashdino = flashdino.engine.cli:main"]},
)

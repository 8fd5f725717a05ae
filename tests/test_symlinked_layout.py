"""The GPU machine imports flashdino through a folder of symlinks (scripts/gpu_session.sh, no pip).

Paths the package derives from its own location (the CMake source tree of the native plugin, the
plugin's build folder, the repository root whose .gpu/commit the results record) must resolve to the
real repository there, not to the folder of links.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

PROBE = """
import json, flashdino.pipelines.native.build as b, flashdino.pipelines.dali.plugin as p, flashdino.profiling.env as e
import flashdino.profiling.bench as pb
print(json.dumps({"file": b.__file__, "native_root": b.REPO_ROOT, "plugin_repo": p._REPO, "env_root": e._REPO_ROOT,
                  "results": pb.DEFAULT_RESULTS}))
"""


def test_package_paths_resolve_to_the_real_repository_through_symlinks(tmp_path):
    links = tmp_path / "fd" / "flashdino"
    links.mkdir(parents=True)
    for d in ("engine", "kernels", "pipelines", "profiling"):
        os.symlink(os.path.join(REPO, d), links / d)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fd"))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=str(tmp_path), env=env, capture_output=True, text=True, check=True)
    import json

    paths = json.loads(out.stdout.strip().splitlines()[-1])
    assert paths["file"].startswith(str(links)), f"the probe did not import through the links: {paths['file']}"
    assert paths["native_root"] == REPO
    assert paths["plugin_repo"] == REPO
    assert paths["env_root"] == REPO
    assert os.path.realpath(paths["results"]) == os.path.join(REPO, "profiling", "results")
    assert os.path.exists(os.path.join(paths["native_root"], "CMakeLists.txt"))

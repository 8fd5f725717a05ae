"""scripts/gpu_session.sh, the GPU session's driver, checked where it does not need a GPU: syntax,
usage, the deadline that skips a phase, and the results tarball every call must return."""
import os
import shutil
import subprocess
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SCRIPTS = ("gpu_session.sh", "gpu_prepare.sh")


def test_scripts_parse():
    for name in SCRIPTS:
        subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", name)], check=True)


def _copy_of_the_repo(tmp_path):
    # The script works in the repository it lives in; a copy keeps logs out of the real checkout.
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "scripts", "gpu_session.sh"), root / "scripts")
    (root / "profiling" / "results").mkdir(parents=True)
    (root / "profiling" / "results" / "README.md").write_text("results\n")
    return root


def _run_spent(tmp_path, *phases):
    """The script in a copy of the repo with a call deadline already spent: (result, $OUT folder)."""
    root = _copy_of_the_repo(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, GPU_SESSION_SECONDS="20", OUT=str(out))
    done = subprocess.run(["bash", "scripts/gpu_session.sh", *phases], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)
    return done, out


def test_usage_without_phases(tmp_path):
    root = _copy_of_the_repo(tmp_path)
    done = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and "gpu_session.sh" in done.stdout


def test_a_spent_deadline_skips_phases_and_still_packs_the_results(tmp_path):
    done, out = _run_spent(tmp_path, "tests", "kernels")
    assert done.returncode == 1, done.stdout + done.stderr  # skipped phases count as failures
    assert "=== tests: skipped, the call's time is used up" in done.stdout
    assert "=== kernels: skipped" in done.stdout
    (tgz,) = out.iterdir()
    assert tgz.name == "gpu-results-tests-kernels.tgz"
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
    assert "profiling/results/README.md" in names and "gpu-logs/tests.log" in names


def test_unknown_phase_is_named(tmp_path):
    done, _ = _run_spent(tmp_path, "benchmark")
    assert done.returncode == 2 and "unknown phase 'benchmark'" in done.stdout


def test_the_variant_phases_run_per_preset_and_respect_the_deadline(tmp_path):
    done, out = _run_spent(tmp_path, "packed=simdino_vitb16,simdino_vits16",
                           "variant=simdino_vitb16:runtime.compile=full,runtime.cuda_graphs=true")
    assert done.returncode == 1, done.stdout + done.stderr
    for name in ("simdino_vitb16_runtime.multicrop=packed", "simdino_vits16_runtime.multicrop=packed",
                 "simdino_vitb16_runtime.compile=full_runtime.cuda_graphs=true"):
        assert f"=== variant_{name}: skipped, the call's time is used up" in done.stdout, name
    assert len(list(out.iterdir())) == 1


def test_a_malformed_variant_is_named(tmp_path):
    done, _ = _run_spent(tmp_path, "variant=simdino_vitb16")
    assert done.returncode == 2 and "expected PRESET:key=value" in done.stdout

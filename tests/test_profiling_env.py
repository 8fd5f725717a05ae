"""profiling.env.git_info: the commit a result was measured at, also in a copy without .git."""
import subprocess

from flashdino.profiling.env import git_info


def test_commit_of_a_git_checkout(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("1")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_info(str(tmp_path)) == {"commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("2")
    assert git_info(str(tmp_path)) == {"commit": head, "dirty": True}


def test_a_copy_without_git_reports_the_recorded_commit(tmp_path):
    assert git_info(str(tmp_path)) == {"commit": None, "dirty": None}
    (tmp_path / ".gpu").mkdir()
    (tmp_path / ".gpu" / "commit").write_text("0123abcd dirty\n")
    info = git_info(str(tmp_path))
    assert info["commit"] == "0123abcd" and info["dirty"] is True and info["source"].endswith("commit")
    (tmp_path / ".gpu" / "commit").write_text("0123abcd\n")
    assert git_info(str(tmp_path))["dirty"] is False


def test_a_stale_recorded_commit_names_the_files_changed_since(tmp_path):
    """gpu_prepare.sh records the commit and `git ls-files -s`; code changed after that (a commit
    made after preparing the copy) marks the result dirty and names the files; results do not."""
    import shutil

    repo, copy = tmp_path / "repo", tmp_path / "copy"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "engine").mkdir()
    (repo / "profiling" / "results").mkdir(parents=True)
    (repo / "engine" / "step.py").write_text("x = 1\n")
    (repo / "profiling" / "results" / "old.md").write_text("old\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    manifest = subprocess.run(git + ["ls-files", "-s"], capture_output=True, text=True, check=True).stdout
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
    (copy / ".gpu").mkdir()
    (copy / ".gpu" / "commit").write_text(head + "\n")
    (copy / ".gpu" / "manifest").write_text(manifest)
    assert git_info(str(copy))["dirty"] is False
    (copy / "profiling" / "results" / "old.md").write_text("a result committed later\n")
    assert git_info(str(copy))["files_changed_since_commit"] == []
    (copy / "engine" / "step.py").write_text("x = 2\n")
    info = git_info(str(copy))
    assert info["commit"] == head and info["dirty"] is True
    assert info["files_changed_since_commit"] == ["engine/step.py"]

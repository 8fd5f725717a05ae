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

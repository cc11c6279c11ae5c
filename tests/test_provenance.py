import re
import subprocess

from pipeline import provenance


def test_git_commit_of_the_code(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the code's checkout counts, not the working directory
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|nogit", provenance.git_commit())


def test_git_commit_without_git(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    assert provenance.git_commit() == "nogit"

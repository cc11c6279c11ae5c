"""Where a result came from: the git commit of the code that made it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(short: bool = True) -> str:
    """The checkout's commit (with `+dirty` if it has uncommitted changes), or `nogit`."""
    here = Path(__file__).resolve().parent
    args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        commit = subprocess.run(args, cwd=here, capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")

"""Write files whole or not at all: a temporary name in the same folder, renamed when complete.

A failed write (out of space, over a file-size limit) leaves the previous file as it was, removes
the temporary file and ends in one error naming the file. Finished files get the permissions
the umask gives (a temporary file starts private).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError

# the errors a user fixes by making room, not by changing the pipeline
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the process's umask would leave it for a newly created file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def no_room_error(err: OSError, path: Path, kept: str = "nothing was replaced") -> UserError:
    """One line for a write that found no room: the file, the reason, what was kept."""
    return UserError(f"{path}: cannot write it ({os.strerror(err.errno)}); {kept}: "
                     f"make room in {path.parent} and run the stage again")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, umask_mode())
        os.replace(tmp_path, path)
    except OSError as err:
        if err.errno in NO_ROOM:
            raise no_room_error(err, path) from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_csv(df: pd.DataFrame, path: str | Path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n", **kwargs)

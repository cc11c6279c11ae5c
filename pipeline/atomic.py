"""Write files whole or not at all: a temporary name in the same folder, renamed when complete.

A failed write (out of space, over a file-size limit) leaves the previous file as it was, removes
the temporary file and ends in one error naming the file. Finished files get the permissions
the umask gives (a temporary file starts private).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError

# the errors a user fixes by making room, not by changing the pipeline
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def create_temp(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new, exclusively created file in `folder` (fd, path). Created with mode 0666, so the
    kernel applies the umask: the finished file gets the permissions a user expects."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), path
        except FileExistsError:
            continue


def no_room_error(err: OSError, path: Path, kept: str = "nothing was replaced") -> UserError:
    """One line for a write that found no room: the file, the reason, what was kept."""
    return UserError(f"{path}: cannot write it ({os.strerror(err.errno)}); {kept}: "
                     f"make room in {path.parent} and run the stage again")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = create_temp(path.parent, f".{path.name}.")
    os.close(fd)
    try:
        yield tmp_path
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

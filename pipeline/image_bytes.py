"""An image file's bytes, read once, with the checks both data paths make before decoding."""

from __future__ import annotations

import numpy as np

from pipeline.errors import BadImageError


def read_image_bytes(path: str) -> np.ndarray:
    """A file's bytes as uint8, naming the file when it is missing or a truncated JPEG."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        raise BadImageError(f"{path}: cannot read image (missing or unreadable)") from None
    if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-32:].tobytes():
        # decoders pad a truncated JPEG with grey and return it without an error
        raise BadImageError(f"{path}: truncated JPEG (no end-of-image marker): a partial copy?")
    return data


def read_jpeg_bytes(path: str) -> np.ndarray:
    """`read_image_bytes` for the GPU path, which decodes JPEG only."""
    data = read_image_bytes(path)
    if data[:2].tobytes() != b"\xff\xd8":
        raise BadImageError(f"{path}: not a JPEG (data.decode=gpu decodes JPEG only; "
                            "use data.decode=cpu for other formats)")
    return data

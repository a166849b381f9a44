"""Reader for the IDX files of MNIST and Fashion-MNIST (gzip-compressed or plain), with validation.

IDX layout (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type byte (0x08 = unsigned byte),
a byte with the number of dimensions d, d big-endian int32 sizes, then the data in C order. Images
are magic 2051 (d = 3: N, H, W), labels magic 2049 (d = 1: N). A truncated, corrupt or mislabelled
file raises ValueError naming the file, what is wrong, and how to get a good copy.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "write_idx", "IMAGES_MAGIC", "LABELS_MAGIC"]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UBYTE = 0x08


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e}); {fix}") from e


def read_idx(path: str | Path, magic: int, fix: str = "delete it and get the data again") -> np.ndarray:
    """The array stored in one IDX file; ``magic`` is IMAGES_MAGIC (N, H, W) or LABELS_MAGIC (N,)."""
    path = Path(path)
    raw = _read_bytes(path, fix)
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header (truncated file); {fix}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic or raw[2] != _UBYTE:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise ValueError(f"{path}: IDX magic number is {found}, expected {magic} ({kind}, unsigned bytes): "
                         f"not an IDX {kind} file or corrupt; {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, needs {header}); {fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: header says shape {shape} = {expected} bytes, "
                         f"file has {len(raw)}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz); used to build test fixtures."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {1: LABELS_MAGIC, 3: IMAGES_MAGIC}.get(array.ndim, 0x0800 + array.ndim)
    data = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape) + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)

"""Reading .npy and .npz files the user gives, without trusting what they claim.

Only the members the model needs are read from a .npz; every member's claimed size (the zip
entry's size and the .npy header's shape x itemsize) is checked against the memory available
before anything is allocated; object arrays are refused (no pickles); corrupt headers, corrupt
deflate streams and truncated data are one-line UserErrors naming the user's file.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import UserError, first_line

_READ_ERRORS = (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile, NotImplementedError, RuntimeError,
                SyntaxError, TypeError, OverflowError)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable; without /proc/meminfo, the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 1 << 40


def check_claim(nbytes: int, what: str) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when it exceeds the memory available."""
    limit = available_memory()
    if nbytes > limit:
        raise UserError(f"{what} would need {_size(nbytes)}, more than the {_size(limit)} of memory available")


def _size(n: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} bytes"


def _read_array(f, where: str) -> np.ndarray:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = np.lib.format._read_array_header(f, version)
    if dtype.hasobject:
        raise UserError(f"{where} holds Python objects (dtype {dtype}); only numeric arrays are read")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    check_claim(nbytes, where)
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise UserError(f"{where} is truncated: {got} of the {nbytes} bytes its header announces")
        got += n
    array = np.frombuffer(buf, dtype=dtype, count=count)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def read_npy(path: Path) -> np.ndarray:
    where = f"{path}"
    try:
        with open(path, "rb") as f:
            return _read_array(f, where)
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read {path}: {first_line(exc)}") from None


def read_npz(path: Path, names: Iterable[str] | None = None, what: str = "calibration file") -> dict[str, np.ndarray]:
    """The arrays of ``path`` by name; with ``names``, only those (others are never decompressed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {}
            for member in zf.namelist():
                members.setdefault(member[:-4] if member.endswith(".npy") else member, member)
            keys = list(members) if names is None else [n for n in names if n in members]
            out = {}
            for key in keys:
                member = members[key]
                where = f"{what} {path} (array {key!r})"
                check_claim(zf.getinfo(member).file_size, where)
                with zf.open(member) as f:
                    out[key] = _read_array(f, where)
            return out
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read {what} {path}: {first_line(exc)}") from None

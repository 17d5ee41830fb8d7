"""Reading .npy and .npz files the user gives, without trusting what they claim.

Only the members the model needs are read from a .npz; every member's claimed size (the zip
entry's size and the .npy header's shape x itemsize) is checked against the memory available
before anything is allocated; object arrays are refused (no pickles); corrupt headers, corrupt
deflate streams and truncated data are one-line UserErrors naming the user's file.
"""

from __future__ import annotations

import math
import os
import struct
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


class FileArray:
    """A C-order array whose bytes lie in a file from ``offset`` on (a member of an uncompressed .npz,
    a spilled batch): shape and dtype known, nothing read until ``read()``, which gives a fresh
    array each time. A leading-axis slice ``a[i:j]`` is another FileArray (no reading)."""

    __slots__ = ("path", "offset", "shape", "dtype")

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype):
        self.path, self.offset, self.shape, self.dtype = str(path), int(offset), tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __getitem__(self, key) -> "FileArray":
        if isinstance(key, tuple) and len(key) == 1:
            key = key[0]
        if not isinstance(key, slice) or key.step not in (None, 1) or not self.shape:
            raise TypeError("FileArray: only a leading-axis slice a[i:j] is supported")
        start, stop, _ = key.indices(self.shape[0])
        stop = max(stop, start)
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        return FileArray(self.path, self.offset + start * row, (stop - start, *self.shape[1:]), self.dtype)

    def read(self) -> np.ndarray:
        """The values, a fresh array (its own buffer)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return self._read_from(fd)
        finally:
            os.close(fd)

    def _read_from(self, fd: int) -> np.ndarray:
        """The values, read from the open file ``fd`` with positioned reads (no seek, no buffering)."""
        out = np.empty(self.shape, self.dtype)
        view, done = memoryview(out).cast("B"), 0
        while done < out.nbytes:
            n = os.preadv(fd, [view[done:]], self.offset + done)
            if n <= 0:
                raise UserError(f"{self.path} is truncated: {done} of the {out.nbytes} bytes expected at offset "
                                f"{self.offset}")
            done += n
        return out


def as_array(a) -> np.ndarray:
    """``a`` itself when it is an array, its values when it is a FileArray."""
    return a.read() if isinstance(a, FileArray) else a


def _read_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, which is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = np.lib.format._read_array_header(f, version)
    if dtype.hasobject:
        raise UserError(f"{where} holds Python objects (dtype {dtype}); only numeric arrays are read")
    return shape, fortran, dtype


def _read_array(f, where: str) -> np.ndarray:
    shape, fortran, dtype = _read_header(f, where)
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


def _stored(zf: zipfile.ZipFile, raw, member: str, where: str) -> FileArray | None:
    """Member ``member`` as a FileArray into the .npz file itself, when it is stored uncompressed
    in C order (what np.savez writes); None otherwise (then it is read whole)."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
        return None
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    with zf.open(member) as f:
        shape, fortran, dtype = _read_header(f, where)
        header = f.tell()
    if fortran and len(shape) > 1:
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    if header + nbytes > info.file_size:
        raise UserError(f"{where} is truncated: {info.file_size - header} of the {nbytes} bytes its header announces")
    return FileArray(os.fspath(zf.filename), start + header, shape, dtype)


def read_npz(path: Path, names: Iterable[str] | None = None, what: str = "calibration file",
             lazy: bool = False) -> dict[str, "np.ndarray | FileArray"]:
    """The arrays of ``path`` by name; with ``names``, only those (others are never decompressed).
    lazy: members stored uncompressed come back as FileArrays into the file (read batch by batch
    by whoever uses them); compressed ones are read."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            members = {}
            for member in zf.namelist():
                members.setdefault(member[:-4] if member.endswith(".npy") else member, member)
            keys = list(members) if names is None else [n for n in names if n in members]
            out = {}
            for key in keys:
                member = members[key]
                where = f"{what} {path} (array {key!r})"
                if lazy and (lazy_array := _stored(zf, raw, member, where)) is not None:
                    out[key] = lazy_array
                    continue
                check_claim(zf.getinfo(member).file_size, where)
                with zf.open(member) as f:
                    out[key] = _read_array(f, where)
            return out
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read {what} {path}: {first_line(exc)}") from None

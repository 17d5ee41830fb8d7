"""The exception types for problems the user can fix, and the one place that tells them from bugs.

``UserError``: bad input or options, raised with a one-line message. ``expected_failure(exc)``
says, for any other exception that reaches the command line, whether it is an expected condition
of the user's files or machine (a file system error, an unparsable protobuf, memory the input
claims) and what one line to print; everything else is a bug (exit 1).
"""

from __future__ import annotations

import errno
import sys


class UserError(Exception):
    """A problem with the user's input. The CLI prints ``str(err)`` as one line and exits 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every ``with`` and ``finally`` cleans up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def first_line(exc: BaseException, replace: dict[str, str] | None = None) -> str:
    """The first line of an exception's message, with temporary paths replaced by the user's names."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    for old, new in sorted((replace or {}).items(), key=lambda kv: -len(kv[0])):
        line = line.replace(old, new)
    return line


def warn(message: str) -> None:
    """One warning line on stderr (never silent, never a failure)."""
    print(f"onnx-gpfq: warning: {message}", file=sys.stderr)


_FS_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.ENAMETOOLONG: "file name too long", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EIO: "input/output error",
              errno.ENOENT: "no such file or directory", errno.EISDIR: "is a folder", errno.ENOTDIR: "not a folder",
              errno.EMFILE: "too many open files", errno.ENFILE: "too many open files", errno.EFBIG: "file too large",
              errno.EEXIST: "file exists", errno.EXDEV: "cross-device link", errno.EINVAL: "invalid argument"}


def expected_failure(exc: BaseException) -> str | None:
    """The one-line message for an expected condition, or None for a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _FS_ERRNOS:
        name = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or _FS_ERRNOS[exc.errno]}{name}"
    if isinstance(exc, MemoryError):
        return "out of memory: the input needs more memory than is available (fewer samples, a smaller --memory-budget?)"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read"
    try:
        from google.protobuf.message import DecodeError
    except ImportError:  # pragma: no cover
        DecodeError = ()
    if DecodeError and isinstance(exc, DecodeError):
        return f"cannot parse a protobuf input: {first_line(exc)}"
    return None

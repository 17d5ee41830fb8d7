"""Which files a run reads and writes, and the check that no output lands on an input or on another output.

Two paths name the same file when they resolve to the same path (symlinks followed) or, for files
that exist, when they share device and inode (hard links). Outputs that do not exist yet are
compared by resolved path. ``check_outputs`` is called once, before any work, with every file the
run will read and every file it may write; a clash is a UserError and nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
        return resolved, (st.st_dev, st.st_ino)
    except OSError:
        return resolved, None


def same_file(a: Path, b: Path) -> bool:
    ra, ia = _identity(a)
    rb, ib = _identity(b)
    return ra == rb or (ia is not None and ia == ib)


def check_outputs(outputs: Iterable[tuple[str, str | os.PathLike]], inputs: Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Refuse before any work: an output that is an input (or another output), a missing or
    read-only output folder, an output that is a folder. ``outputs`` and ``inputs`` are
    (what, path) pairs; ``what`` names the role in the message ("-o", "--report", "config file")."""
    outs = [(what, Path(p)) for what, p in outputs]
    ins = [(what, Path(p)) for what, p in inputs]
    for i, (what, out) in enumerate(outs):
        for src_what, src in ins:
            if same_file(out, src):
                raise UserError(f"{what} {out} is the same file as the {src_what} {src}: choose another output name")
        for other_what, other in outs[:i]:
            if same_file(out, other):
                raise UserError(f"{what} {out} is the same file as {other_what} {other}: choose another name")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"output folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"output folder {parent} is not writable")
        if out.is_dir():
            raise UserError(f"output path {out} is a folder")


def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """The external-data files a model file refers to (parsed without loading the data)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # load_model reports an unreadable model with its own message
        return []
    base = Path(model_path).parent
    files = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and (base / location) not in files:
                files.append(base / location)
    return files


def calibration_files(source: str) -> list[Path]:
    """The files a --calib source may read: the file itself, or every file in the folder."""
    if source.startswith("random:"):
        return []
    path = Path(source)
    if path.is_dir():
        try:
            return sorted(p for p in path.iterdir())
        except OSError:
            return []
    return [path]

"""Writing the outputs: every file beside its target as a temporary file first, then all renamed.

A crash, an interrupt or a full disk leaves no partial output and no temporary file, and the
outputs of one run (model, its external data, report) appear together or not at all.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx

from .errors import UserError


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path that would overwrite an input or cannot be written, before any work."""
    from .paths import check_outputs

    check_outputs([("output path", output)], [("input file", src) for src in inputs if isinstance(src, (str, os.PathLike))])
    return Path(output)


def save_model(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool = False) -> None:
    """Write atomically: temporary files in the same folder, renamed into place when complete.

    A crash, an interrupt or a full disk leaves no partial output and no temporary file. Models
    over 2 GiB (or with ``external_data``) store their tensors in ``OUTPUT.data`` beside the model.
    """
    write_outputs([(output, model, external_data)])


def write_text(output: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see ``save_model``)."""
    write_outputs([(output, text.encode(), False)])


def write_outputs(items: list[tuple[str | os.PathLike, onnx.ModelProto | bytes, bool]]) -> None:
    """Commit several outputs together: every one is written to a temporary file beside its
    target first, then all are renamed into place; if any write fails (or an interrupt comes),
    none is renamed and every temporary file is removed. Items: (path, ModelProto or bytes,
    external_data)."""
    staged: list[tuple[Path, Path]] = []  # (temporary, final), registered before anything is written
    folders: list[Path] = []
    current = None
    try:
        for output, content, external in items:
            current = Path(output)
            if isinstance(content, onnx.ModelProto):
                _stage_model(content, current, external, staged, folders)
            else:
                _stage_bytes(current, content, staged)
        while staged:
            tmp, final = staged[0]
            current = final
            os.replace(tmp, final)
            staged.pop(0)
    except OSError as exc:
        raise UserError(f"cannot write {current}: {exc.strerror or exc}") from None
    finally:
        for tmp, _ in staged:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        for folder in folders:
            if folder.is_dir():
                for leftover in folder.iterdir():
                    leftover.unlink()
                folder.rmdir()


def _temp_prefix(out: Path) -> str:
    # a legal 255-byte file name must still give a legal temporary name: keep at most 64 of its characters
    return f".{out.name[:64]}."


def _stage_model(model: onnx.ModelProto, out: Path, external_data: bool, staged: list, folders: list[Path]) -> None:
    from .graph import serialize

    data = None if external_data else serialize(model)
    if data is not None:
        _stage_bytes(out, data, staged)
        return
    folder = out.parent if str(out.parent) else Path(".")
    folders.append(Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=folder)))
    tmp = folders[-1]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    location = f"{out.name}.data"
    onnx.save(copy, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=1024)
    if (tmp / location).exists():
        staged.append((tmp / location, folder / location))
    staged.append((tmp / "model.onnx", out))


def _stage_bytes(out: Path, data: bytes, staged: list) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    staged.append((Path(tmp), out))
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # what open() would give, not mkstemp's 0600
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

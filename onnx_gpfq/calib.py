"""Calibration data: read it from what the user has, check it against the model's inputs, batch it.

Sources (``load_batches(source, ...)``):
- a ``.npz`` file: one array per model input, named after it, samples along the batch axis;
- a folder of ``.npz`` files (read in name order, as one data set) or of ``.npy`` files (single-input
  models: each file one sample, or a stack of samples), or of images (see ``ImageOptions``);
- ``"random:N"``: N seeded samples from the declared input shapes (``input_shapes`` fills symbolic
  dims) — for pipelines that only check that a conversion works;
- from Python: a dict of arrays (like a .npz), any iterable of ``{input_name: array}`` batches, or an
  onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``).

Batch axes: samples are stacked along axis 0, except for inputs listed in ``batch_axes``: a
recurrent state laid out (layers, batch, hidden) has batch axis 1, and an input with no batch axis
(``None``: a sample rate, a fixed state) is fed whole to every run. Scalar inputs have none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .choices import ImageChannels, ImageLayout, ImageResize, choice, opt, values
from .errors import UserError, warn
from .npyfile import FileArray, as_array

Batch = dict[str, np.ndarray]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and dims (int when fixed, None when symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing for a folder of images (needs Pillow: ``pip install onnx-gpfq[images]``).

    size: (height, width) fed to the model (default: the model input's fixed dims).
    resize: "stretch" to size, or "crop" (resize the shorter side, then center-crop).
    scale: multiplies the 0..255 pixel values first (e.g. 1/255); then (x - mean) / std per channel.
    channels: "RGB" or "BGR" order; layout: "NCHW" or "NHWC".
    Text is accepted as the command line gives it: size "224x224", mean and std "0.5,0.5,0.5".
    """

    size: tuple[int, int] | None = opt(None, "images: size fed to the model (default: the model's fixed H, W)",
                                       metavar="HxW", shown="")
    resize: str = opt("crop", "images: resize the shorter side and center-crop, or stretch",
                      check=choice(values(ImageResize)))
    scale: float = opt(1.0 / 255.0, "images: pixel scale before mean/std", kind=float, shown="1/255")
    mean: tuple[float, ...] = opt((0.0, 0.0, 0.0), "images: per-channel mean", metavar="R,G,B", cli_default="0,0,0")
    std: tuple[float, ...] = opt((1.0, 1.0, 1.0), "images: per-channel std", metavar="R,G,B", cli_default="1,1,1")
    channels: str = opt("RGB", "images: channel order", check=choice(values(ImageChannels)))
    layout: str = opt("NCHW", "images: tensor layout", check=choice(values(ImageLayout)))

    def __post_init__(self):
        if isinstance(self.size, str):
            object.__setattr__(self, "size", _hw(self.size))
        for name in ("mean", "std"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, _floats(getattr(self, name), f"--image-{name}"))
        for name, check in (("resize", "image resize must be stretch or crop"),
                            ("channels", "image channel order must be RGB or BGR"),
                            ("layout", "image layout must be NCHW or NHWC")):
            value = getattr(self, name)
            if value not in next(f for f in fields(self) if f.name == name).metadata["check"].choices:
                raise UserError(f"{check} (got {value!r})")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise UserError("image mean and std need 3 values each, std > 0")
        if not all(np.isfinite(v) for v in (self.scale, *self.mean, *self.std)) or self.scale == 0:
            raise UserError("image scale, mean and std must be finite numbers (scale not 0)")


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise UserError(f"--image-size must look like 224x224 (got {text!r})")


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} must be comma-separated numbers (got {text!r})") from None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def token_masks(choice: str, batches: list[Batch], inputs: list[InputSpec],
                batch_axes: Mapping[str, int | None] | None = None) -> tuple[str | None, list[np.ndarray] | None]:
    """The padded-token masks of --token-mask: (the input, one (samples, tokens) bool array per batch,
    True at real tokens), or (None, None) where none applies.

    "auto" takes the input named ``attention_mask`` (the name transformer exporters give it) when its
    calibration values are 2-D zeros and ones with samples on axis 0, and quietly none otherwise; an input
    named by the user must be such an input, with at least one real token (UserError).
    """
    if choice == "none":
        return None, None
    names = [spec.name for spec in inputs]
    name = "attention_mask" if choice == "auto" else choice
    if name not in names:
        if choice == "auto":
            return None, None
        raise UserError(f"--token-mask names {name!r}, which is not a model input ({', '.join(names)})")
    masks = [np.asarray(as_array(b[name])) for b in batches]
    problem = ("its samples are not on axis 0" if (batch_axes or {}).get(name, 0) != 0
               else next((f"its calibration values have shape {m.shape}, not (samples, tokens)" for m in masks if m.ndim != 2), None)
               or next(("its calibration values are not all 0 or 1" for m in masks if not np.isin(m, (0, 1)).all()), None))
    if problem is not None:
        if choice == "auto":
            return None, None
        raise UserError(f"--token-mask {name!r} cannot mark padded tokens: {problem}")
    masks = [m != 0 for m in masks]
    if not any(m.any() for m in masks):
        if choice == "auto":
            return None, None
        raise UserError(f"--token-mask {name!r} cannot mark padded tokens: it is 0 (padding) at every token")
    return name, masks


def load_batches(source, inputs: list[InputSpec], batch_size: int, *, batch_axes: Mapping[str, int | None] | None = None,
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None, images: ImageOptions | None = None,
                 seed: int = 0, lazy: bool = False) -> list[Batch]:
    """Read, validate and batch calibration data. Raises UserError naming the offending input.

    lazy: from a single uncompressed .npz (what np.savez writes), batches are ``npyfile.FileArray``s
    into the file, checked here as they are read once, then read again batch by batch where used
    (``npyfile.as_array``): the calibration set never sits in memory whole."""
    axes = {spec.name: (None if len(spec.dims) == 0 else 0) for spec in inputs}
    for name, axis in (batch_axes or {}).items():
        if name not in axes:
            raise UserError(f"--batch-axis names {name!r}, which is not a model input ({', '.join(axes)})")
        axes[name] = axis
    for name in input_shapes or {}:
        if name not in axes:
            raise UserError(f"--input-shape names {name!r}, which is not a model input ({', '.join(axes)})")
    if not inputs:
        raise UserError("the model has no inputs: there is nothing to calibrate")
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise UserError(f"--batch-size must be a positive integer (got {batch_size!r})")
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith("random:"):
            arrays = _random(text, inputs, input_shapes or {}, axes, seed)
        else:
            arrays = _read_path(Path(source), inputs, images, axes, lazy)
        batches = _split(arrays, inputs, batch_size, text, axes)
    elif hasattr(source, "get_next"):
        batches = []
        while (item := source.get_next()) is not None:
            batches.append(dict(item))
    elif isinstance(source, Mapping):
        batches = _split({k: np.asarray(v) for k, v in source.items()}, inputs, batch_size, "calibration dict", axes)
    elif isinstance(source, Iterable):
        batches = [dict(item) for item in source]
    else:
        raise UserError(f"unsupported calibration source of type {type(source).__name__}")
    if not batches:
        raise UserError("calibration data is empty: give at least one sample")
    return [_check_batch(b, inputs, i) for i, b in enumerate(batches)]


# --- sources ------------------------------------------------------------------------------------

def _read_path(path: Path, inputs: list[InputSpec], images: ImageOptions | None, axes,
               lazy: bool = False) -> dict[str, np.ndarray]:
    if not path.exists():
        raise UserError(f"calibration data not found: {path}")
    names = [spec.name for spec in inputs]
    if path.is_file():
        if path.suffix != ".npz":
            raise UserError(f"calibration file must be a .npz archive or a folder (got {path})")
        return _read_npz(path, names, lazy)
    if not path.is_dir():
        raise UserError(f"calibration data {path} is neither a regular file nor a folder")
    files = sorted(p for p in path.iterdir() if p.is_file())
    npz = [p for p in files if p.suffix == ".npz"]
    npy = [p for p in files if p.suffix == ".npy"]
    pictures = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    kinds = [kind for kind, group in ((".npz", npz), (".npy", npy), ("image", pictures)) if group]
    if len(kinds) > 1:
        raise UserError(f"calibration folder {path} holds {' and '.join(kinds)} files: keep one kind in it "
                        "(nothing would say which ones were used)")
    if npz:
        parts = [_read_npz(p, names) for p in npz]
        keys = set(parts[0])
        for p, part in zip(npz, parts):
            if set(part) != keys:
                raise UserError(f"{p} holds arrays {sorted(part)}, but {npz[0].name} holds {sorted(keys)}")
        return {k: _concat([part[k] for part in parts], axes.get(k, 0), k) for k in keys}
    if npy:
        if len(inputs) != 1:
            raise UserError(f"a folder of .npy files only works for single-input models; this one has "
                            f"{len(inputs)} inputs: use .npz files named by input")
        spec = inputs[0]
        from .npyfile import read_npy

        arrays = [read_npy(p) for p in npy]
        arrays = [a[None] if a.ndim == len(spec.dims) - 1 else a for a in arrays]  # one sample per file
        return {spec.name: _concat(arrays, 0, spec.name)}
    if pictures:
        return {**_read_images(pictures, inputs, images or ImageOptions())}
    raise UserError(f"calibration folder {path} has no .npz, .npy or image files")


def _concat(arrays: list[np.ndarray], axis: int | None, name: str) -> np.ndarray:
    if axis is None:
        return arrays[0]
    try:
        return np.concatenate(arrays, axis=axis)
    except ValueError as exc:
        raise UserError(f"calibration input {name!r}: files do not stack ({exc})") from None


def _read_npz(path: Path, names: Iterable[str] | None = None, lazy: bool = False) -> dict[str, np.ndarray]:
    """The arrays of a .npz (only those in ``names`` when given), each checked before reading;
    lazy: uncompressed members as FileArrays (see load_batches)."""
    from .npyfile import read_npz

    return read_npz(path, names, lazy=lazy)


def _read_images(files: list[Path], inputs: list[InputSpec], opts: ImageOptions) -> dict[str, np.ndarray]:
    try:
        from PIL import Image
    except ImportError:
        raise UserError("reading images needs Pillow: pip install 'onnx-gpfq[images]'") from None
    if len(inputs) != 1:
        raise UserError(f"a folder of images only works for single-input models (this one has {len(inputs)})")
    spec = inputs[0]
    if len(spec.dims) != 4:
        raise UserError(f"model input {spec.name!r} has rank {len(spec.dims)}; images need a rank-4 input")
    hw = spec.dims[2:4] if opts.layout == "NCHW" else spec.dims[1:3]
    size = opts.size or (tuple(hw) if None not in hw else None)
    if size is None:
        raise UserError(f"model input {spec.name!r} has symbolic height/width: give the image size (--image-size HxW)")
    h, w = size
    samples = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if opts.resize == "crop":
                    ratio = max(h / img.height, w / img.width)
                    img = img.resize((max(w, round(img.width * ratio)), max(h, round(img.height * ratio))), Image.BILINEAR)
                    left, top = (img.width - w) // 2, (img.height - h) // 2
                    img = img.crop((left, top, left + w, top + h))
                else:
                    img = img.resize((w, h), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)  # (h, w, 3) RGB
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
        if opts.channels == "BGR":
            pixels = pixels[..., ::-1]
        pixels = (pixels * opts.scale - np.array(opts.mean, np.float32)) / np.array(opts.std, np.float32)
        samples.append(pixels.transpose(2, 0, 1) if opts.layout == "NCHW" else pixels)
    return {spec.name: np.stack(samples).astype(np.float32)}


def _random(text: str, inputs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]], axes, seed: int) -> dict[str, np.ndarray]:
    """random:N -> N samples: floats ~ N(0, 1), integers uniform in 0..9, booleans fair coins."""
    try:
        n = int(text.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--calib random:N needs a positive sample count (got {text!r})")
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        dims = list(shapes.get(spec.name, spec.dims))
        if len(dims) != len(spec.dims):
            raise UserError(f"--input-shape {spec.name}: rank {len(dims)}, the model input has rank {len(spec.dims)}")
        axis = axes[spec.name]
        if axis is not None:
            dims[axis] = n
        if None in dims:
            raise UserError(f"model input {spec.name!r} has symbolic dims {_dims_text(spec.dims)}: "
                            f"give --input-shape {spec.name}:" + "x".join("1" if d is None else str(d) for d in spec.dims))
        from .npyfile import check_claim

        check_claim(int(np.prod(dims, dtype=object)) * spec.dtype.itemsize, f"--calib {text} for input {spec.name!r}")
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 10, dims).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            raise UserError(f"cannot make random data for input {spec.name!r} of dtype {spec.dtype}")
    return arrays


# --- batching and validation -------------------------------------------------------------------

def _split(arrays: dict[str, np.ndarray], inputs: list[InputSpec], batch_size: int, where: str, axes) -> list[Batch]:
    for spec in inputs:
        if spec.name not in arrays:
            found = ", ".join(sorted(arrays)) or "nothing"
            raise UserError(f"{where} has no array for model input {spec.name!r} (found: {found})")
    arrays = {k: v if axes.get(k, 0) == 0 else as_array(v) for k, v in arrays.items()}  # lazy: axis 0 only
    batched = [spec for spec in inputs if axes[spec.name] is not None]
    if not batched:  # nothing to split: one run with everything as given
        return [{spec.name: arrays[spec.name] for spec in inputs}]
    counts = {}
    for spec in batched:
        array, axis = arrays[spec.name], axes[spec.name]
        if array.ndim <= axis:
            raise UserError(f"calibration input {spec.name!r} has shape {array.shape}: no batch axis {axis}")
        counts[spec.name] = array.shape[axis]
    n = min(counts.values())
    if n == 0:
        raise UserError(f"{where} holds no samples for input {min(counts, key=counts.get)!r}")
    if len(set(counts.values())) > 1:
        raise UserError(f"{where}: inputs have different sample counts {counts}")
    fixed = {spec.dims[axes[spec.name]] for spec in batched if len(spec.dims) > axes[spec.name]
             and spec.dims[axes[spec.name]] is not None}
    if fixed:  # a fixed batch dim (often 1): feed batches of exactly that size
        if len(fixed) > 1:
            raise UserError(f"{where}: the model's inputs fix different batch sizes {sorted(fixed)}")
        batch_size = fixed.pop()
        if n % batch_size:
            if n < batch_size:
                raise UserError(f"{where}: the model takes batches of exactly {batch_size} but {n} samples were given")
            warn(f"{where}: the model takes batches of exactly {batch_size}: using {n - n % batch_size} of the {n} samples")
        n -= n % batch_size
    batches = []
    for i in range(0, n, batch_size):
        batch = {}
        for spec in inputs:
            axis = axes[spec.name]
            array = arrays[spec.name]
            # a view (a copy only where not contiguous): the stream keeps, copies or spills it within the
            # memory budget, so the data is not held twice while it is batched
            batch[spec.name] = array if axis is None else array[(slice(None),) * axis + (slice(i, min(i + batch_size, n)),)]
        batches.append(batch)
    return batches


def _check_batch(batch: Batch, inputs: list[InputSpec], index: int) -> Batch:
    """The batch with each input checked against the model (dtype converted where lossless in
    kind, rank, fixed dims, not empty, finite). A FileArray of the right dtype stays in its file:
    its values are read once here for the NaN / Inf check."""
    out: Batch = {}
    for spec in inputs:
        if spec.name not in batch:
            raise UserError(f"calibration batch {index} has no value for model input {spec.name!r}")
        array = batch[spec.name]
        lazy = isinstance(array, FileArray) and array.dtype == spec.dtype
        if not lazy:
            array = np.asarray(as_array(array))
        if array.dtype != spec.dtype:
            if array.dtype.kind == spec.dtype.kind == "f" or (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                array = array.astype(spec.dtype)
            else:
                raise UserError(f"calibration input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.dims and array.ndim != len(spec.dims) or (not spec.dims and array.ndim != 0):
            raise UserError(f"calibration input {spec.name!r} has rank {array.ndim} (shape {array.shape}), the model "
                            f"expects rank {len(spec.dims)}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
            if want is not None and got != want:
                raise UserError(f"calibration input {spec.name!r} has shape {array.shape}, the model expects "
                                f"{_dims_text(spec.dims)} (axis {axis})")
        if array.size == 0:
            raise UserError(f"calibration input {spec.name!r} is empty (shape {array.shape})")
        if array.dtype.kind == "f" and not np.isfinite(array.read() if lazy else array).all():
            raise UserError(f"calibration input {spec.name!r} contains NaN or Inf values")
        out[spec.name] = array if lazy or not array.ndim else np.ascontiguousarray(array)  # (it makes 0-d arrays 1-d)
    return out


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"

"""Data made on the spot, without downloads: seeded, calibration and evaluation drawn from separate
streams (``split`` 0 and 1) and, where samples could repeat (text strings), made disjoint.

Fonts: the DejaVu / STIX faces matplotlib ships (the ``bench`` extra installs it), else the system's
(``fc-list``). Sentences: the docstrings of Python's standard library.
"""

from __future__ import annotations

import inspect
import os
import subprocess

import numpy as np

ALNUM = "abcdefghijkmnpqrstuvwxyz23456789"  # the recogniser confuses l/1, o/0 even in float: left out


def fonts() -> list[str]:
    """TrueType files to render with (sorted, so the same on every run)."""
    found: list[str] = []
    try:
        import matplotlib  # noqa: PLC0415

        folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
        found = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                 if n.startswith("DejaVu") and n.endswith(".ttf") and "Display" not in n]
    except ImportError:
        pass
    if not found:
        try:
            out = subprocess.run(["fc-list", ":fontformat=TrueType", "file"], capture_output=True, text=True,
                                 timeout=20).stdout
            found = sorted({line.split(":")[0].strip() for line in out.splitlines() if line.strip().endswith(":")
                            or ".ttf" in line})[:16]
        except (OSError, subprocess.SubprocessError):
            found = []
    if not found:
        raise RuntimeError("no TrueType font found: install matplotlib (pip install 'onnx-gpfq[bench]') "
                           "or a system font (apt-get install fonts-dejavu-core)")
    return found


def _font(path: str, size: int):
    from PIL import ImageFont  # noqa: PLC0415

    return ImageFont.truetype(path, size)


def _rng(seed: int, split: int, what: str) -> np.random.Generator:
    return np.random.default_rng([seed, split, sum(map(ord, what))])


# ---------------------------------------------------------------- sentences

_MODULES = ["os", "os.path", "re", "json", "collections", "itertools", "functools", "string", "textwrap", "shutil",
            "pathlib", "subprocess", "threading", "queue", "heapq", "bisect", "random", "statistics", "decimal",
            "fractions", "datetime", "calendar", "csv", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "base64",
            "argparse", "logging", "unittest", "inspect", "ast", "dis", "pickle", "copy", "pprint", "enum",
            "dataclasses", "typing", "abc", "contextlib", "io", "tempfile", "glob", "fnmatch", "urllib.parse",
            "http.client", "email.message", "xml.dom.minidom", "sqlite3", "socket", "selectors", "asyncio",
            "concurrent.futures", "multiprocessing", "codecs", "locale", "gettext", "difflib", "struct", "array",
            "weakref", "types", "operator", "math", "cmath", "numbers", "uuid", "secrets", "platform", "sysconfig",
            "tokenize", "traceback", "warnings", "timeit", "trace", "doctest", "zlib", "lzma", "bz2", "configparser",
            "netrc", "mimetypes", "smtplib", "ftplib", "imaplib", "poplib", "wave", "colorsys", "sched", "shlex"]


def sentences() -> list[str]:
    """First sentences of standard-library docstrings, 6-40 words, deduplicated, sorted."""
    import importlib  # noqa: PLC0415
    import re  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    out = set()
    with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when read
        warnings.simplefilter("ignore")
        return sorted(_collect(out, importlib, re))


def _collect(out: set, importlib, re) -> set:
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)
                                          or inspect.isbuiltin(obj)) else None
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            first = re.split(r"(?<=[.!?])\s", para)[0]
            words = first.split()
            if 6 <= len(words) <= 40 and "(" not in words[0] and ">>>" not in first:
                out.add(first)
    return out


def sentence_pick(n: int, split: int, seed: int) -> list[str]:
    """n seeded sentences: calibration (split 0) from the front of one permutation, evaluation
    (split 1) from its back, so the two are disjoint while together they fit in the pool."""
    pool = sentences()
    order = np.random.default_rng([seed, 7]).permutation(len(pool))
    if n > len(pool) // 2:
        raise RuntimeError(f"only {len(pool)} stdlib sentences: ask for at most {len(pool) // 2} per set")
    picked = order[:n] if split == 0 else order[::-1][:n]
    return [pool[i] for i in picked]


def words(seed: int) -> list[str]:
    """Words for rendered pages (from the same docstrings)."""
    pool = sorted({w.strip(".,;:()[]'\"`") for s in sentences() for w in s.split()} - {""})
    return [pool[i] for i in np.random.default_rng([seed, 11]).permutation(len(pool))]


# ---------------------------------------------------------------- text lines (recogniser)

def text_strings(n: int, seed: int, split: int, exclude: set[str] = frozenset()) -> list[str]:
    """Captcha-like strings of 4-8 characters, no character twice in a row (the recogniser's CTC
    head collapses doubled letters even in float)."""
    rng = _rng(seed, split, "strings")
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(4, 9))
        s = ""
        while len(s) < k:
            c = ALNUM[int(rng.integers(len(ALNUM)))]
            if not s or s[-1] != c:
                s += c
        if s not in exclude and s not in out:
            out.append(s)
    return out


def text_lines(strings: list[str], seed: int, split: int, width: int = 256) -> np.ndarray:
    """(N, 1, 64, width) grey images in [0, 1] as ddddocr feeds them: rendered at a random size, resized
    to height 64 (LANCZOS, aspect kept), converted to grey; padded right with the background to ``width``
    so that samples stack (ddddocr runs one image at a time at its own width)."""
    from PIL import Image, ImageDraw, ImageFilter  # noqa: PLC0415

    rng = _rng(seed, split, "lines")
    faces = fonts()
    out = np.zeros((len(strings), 1, 64, width), dtype=np.float32)
    for i, text in enumerate(strings):
        font = _font(faces[int(rng.integers(len(faces)))], int(rng.integers(28, 56)))
        bg = tuple(int(v) for v in rng.integers(170, 256, 3))
        fg = tuple(int(v) for v in rng.integers(0, 90, 3))
        left, top, right, bottom = font.getbbox(text)
        pad = int(rng.integers(4, 14))
        img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
        draw = ImageDraw.Draw(img)
        draw.text((pad - left, pad - top), text, font=font, fill=fg)
        for _ in range(int(rng.integers(0, 4))):  # a few distractor strokes, as captchas have
            xy = [int(v) for v in rng.integers(0, max(img.size), 4)]
            draw.line(xy, fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=1)
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(0.8))
        w = max(1, int(img.size[0] * 64 / img.size[1]))
        img = img.resize((min(w, width), 64), Image.LANCZOS).convert("L")
        canvas = Image.new("L", (width, 64), img.getpixel((0, 0)))  # the background grey
        canvas.paste(img, (0, 0))
        out[i, 0] = np.asarray(canvas, dtype=np.float32) / 255.0
    return out


# ---------------------------------------------------------------- scenes (detectors)

def _background(rng, w: int, h: int):
    from PIL import Image  # noqa: PLC0415

    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    grad = a[None, None, :] * (1 - t) + b[None, None, :] * t
    img = np.broadcast_to(grad, (h, w, 3)) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def char_scene(seed: int, split: int, index: int, w: int = 416, h: int = 312):
    """Click-captcha-like scene for ddddocr's detector: 3-7 large characters on a noisy gradient."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    rng = np.random.default_rng([seed, split, index, 3])
    faces = fonts()
    img = _background(rng, w, h)
    for _ in range(int(rng.integers(3, 8))):
        size = int(rng.integers(28, 64))
        font = _font(faces[int(rng.integers(len(faces)))], size)
        ch = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[int(rng.integers(32))]
        tile = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((size // 2, size // 3), ch, font=font,
                                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)) + (255,))
        tile = tile.rotate(float(rng.uniform(-35, 35)), resample=Image.BICUBIC)
        img.paste(tile, (int(rng.integers(0, w - size * 2)), int(rng.integers(0, h - size * 2))), tile)
    return img


def people_scene(seed: int, split: int, index: int, size: int = 320):
    """Cartoon figures for NudeNet's detector: skin-toned heads with eyes and mouth, clothed torsos,
    arms, legs and feet, on a noisy gradient."""
    from PIL import ImageDraw  # noqa: PLC0415

    rng = np.random.default_rng([seed, split, index, 5])
    img = _background(rng, size, size)
    draw = ImageDraw.Draw(img)
    skins = [(241, 194, 167), (224, 172, 138), (198, 134, 99), (141, 85, 54), (255, 219, 190)]
    for _ in range(int(rng.integers(1, 4))):
        skin = skins[int(rng.integers(len(skins)))]
        hr = int(rng.integers(14, 40))
        cx, cy = int(rng.integers(hr, size - hr)), int(rng.integers(hr, size // 2))
        cloth = tuple(int(v) for v in rng.integers(0, 256, 3))
        torso = (cx - int(hr * 1.3), cy + hr, cx + int(hr * 1.3), cy + int(hr * 4.2))
        draw.rectangle(torso, fill=cloth)
        draw.line((torso[0], cy + hr * 1.3, torso[0] - hr, cy + hr * 3.4), fill=skin, width=max(3, hr // 3))
        draw.line((torso[2], cy + hr * 1.3, torso[2] + hr, cy + hr * 3.4), fill=skin, width=max(3, hr // 3))
        for sx in (-1, 1):
            x = cx + sx * hr // 2
            draw.line((x, torso[3], x, torso[3] + hr * 2.5), fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                      width=max(4, hr // 2))
            draw.ellipse((x - hr // 2, torso[3] + hr * 2.3, x + hr // 2 + sx * hr // 2, torso[3] + hr * 2.9), fill=skin)
        draw.ellipse((cx - hr, cy - int(hr * 1.2), cx + hr, cy + int(hr * 1.2)), fill=skin)
        e = max(2, hr // 5)
        for sx in (-1, 1):
            draw.ellipse((cx + sx * hr // 2 - e, cy - hr // 3 - e, cx + sx * hr // 2 + e, cy - hr // 3 + e), fill=(30, 30, 30))
        draw.arc((cx - hr // 2, cy, cx + hr // 2, cy + hr // 2 + 4), 0, 180, fill=(150, 40, 40), width=max(1, hr // 8))
        draw.pieslice((cx - hr, cy - int(hr * 1.4), cx + hr, cy - hr // 3), 180, 360,
                      fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
    return img


def document_page(seed: int, split: int, index: int, w: int = 608, h: int = 800):
    """A rendered document page for the layout model: header, title, paragraphs, a figure with a
    caption, a ruled table with a caption, a footer."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    rng = np.random.default_rng([seed, split, index, 9])
    faces = [f for f in fonts() if "Mono" not in f]
    vocab = words(seed)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    def phrase(k):
        return " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), k))

    margin, y = int(rng.integers(36, 60)), int(rng.integers(16, 30))
    small = _font(faces[0], 11)
    draw.text((margin, y), phrase(5), font=small, fill=(90, 90, 90))
    y += 30
    draw.text((margin, y), phrase(int(rng.integers(3, 7))).title(), font=_font(faces[1 % len(faces)], int(rng.integers(20, 28))),
              fill=(0, 0, 0))
    y += 48
    body = _font(faces[int(rng.integers(len(faces)))], int(rng.integers(12, 15)))
    line_h = body.size + 5
    blocks = ["para", "figure", "para", "table", "para"]
    rng.shuffle(blocks)
    for block in blocks:
        if y > h - 120:
            break
        if block == "para":
            for _ in range(int(rng.integers(3, 8))):
                if y > h - 80:
                    break
                text = phrase(int(rng.integers(6, 12)))
                while body.getlength(text) > w - 2 * margin and " " in text:
                    text = text.rsplit(" ", 1)[0]
                draw.text((margin, y), text, font=body, fill=(20, 20, 20))
                y += line_h
            y += 14
        elif block == "figure":
            fh = int(rng.integers(90, 180))
            fw = int(rng.integers((w - 2 * margin) // 2, w - 2 * margin))
            x0 = (w - fw) // 2
            draw.rectangle((x0, y, x0 + fw, y + fh), outline=(0, 0, 0), fill=(245, 245, 250))
            xs = np.linspace(x0 + 8, x0 + fw - 8, 40)
            ys = y + fh / 2 + np.cumsum(rng.normal(0, fh / 20, 40))
            draw.line(list(zip(xs.tolist(), np.clip(ys, y + 4, y + fh - 4).tolist())), fill=(200, 30, 30), width=2)
            for _ in range(int(rng.integers(2, 6))):
                bx = int(rng.integers(x0 + 10, x0 + fw - 30))
                draw.rectangle((bx, y + fh - int(rng.integers(10, fh - 10)), bx + 16, y + fh - 2),
                               fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            y += fh + 8
            draw.text((x0, y), "Figure %d. " % int(rng.integers(1, 9)) + phrase(5), font=small, fill=(0, 0, 0))
            y += 30
        else:
            draw.text((margin, y), "Table %d. " % int(rng.integers(1, 9)) + phrase(4), font=small, fill=(0, 0, 0))
            y += 22
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            cw = (w - 2 * margin) // cols
            for r in range(rows + 1):
                draw.line((margin, y + r * 22, margin + cols * cw, y + r * 22), fill=(0, 0, 0))
            for c in range(cols + 1):
                draw.line((margin + c * cw, y, margin + c * cw, y + rows * 22), fill=(0, 0, 0))
            for r in range(rows):
                for c in range(cols):
                    draw.text((margin + c * cw + 4, y + r * 22 + 4), vocab[int(rng.integers(len(vocab)))][:10], font=small,
                              fill=(0, 0, 0))
            y += rows * 22 + 24
    draw.text((w // 2 - 10, h - 30), str(int(rng.integers(1, 300))), font=small, fill=(60, 60, 60))
    return img


def text_page(seed: int, split: int, index: int):
    """A page of text lines (random size near 3:4), for the orientation classifier."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    rng = np.random.default_rng([seed, split, index, 13])
    vocab = words(seed)
    w, h = int(rng.integers(300, 480)), int(rng.integers(380, 620))
    if rng.random() < 0.3:
        w, h = h, w
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(img)
    faces = fonts()
    font = _font(faces[int(rng.integers(len(faces)))], int(rng.integers(14, 26)))
    y = int(rng.integers(10, 40))
    while y < h - font.size - 10:
        text = " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), 12))
        while font.getlength(text) > w - 40 and " " in text:
            text = text.rsplit(" ", 1)[0]
        draw.text((20, y), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
        y += int(font.size * rng.uniform(1.3, 1.9))
    return img

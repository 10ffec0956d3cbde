"""Find labelled images in a folder and load them as RGB pixels, the same way everywhere.

Layouts
-------
* class-per-folder: ``root/<class>/**/<image>``
* split folders: ``root/{train,val,test}/<class>/**/<image>``, any subset of the three (``validation`` and
  ``valid`` are read as ``val``). Every split must have the same class set as the first one (train when present).

What counts as an image
-----------------------
Formats are decided by content, never trusted from the extension. A file is a *candidate* when its name has an
image extension (jpg, jpeg, jpe, jfif, png, bmp, gif, webp, tif, tiff, any case) or its first bytes are a JPEG,
PNG, GIF, BMP (``BM`` plus a valid header size, since text can start with ``BM``), WebP or (Big)TIFF signature.
Candidates that then fail to decode are recorded as failures with the reason (never silently dropped). Hidden files
and folders (name starting with ``.``), files that are neither, and loose files next to the class folders are
ignored and counted in :attr:`Dataset.ignored`. Symbolic links are followed, but a folder already scanned (a link
loop, or a link into another class) is skipped and counted, so no file is listed twice.

Pixel rule (:func:`load_image`)
-------------------------------
1. The first frame of animated or multi-frame files is used.
2. EXIF orientation is applied (an EXIF block that cannot be read is ignored: the pixels are kept as stored).
3. Colour to 8-bit RGB: palette and greyscale are expanded; 16-bit greyscale (``I;16``) is scaled by 1/257 (65535 ->
   255) by its bit depth, so a dark 16-bit image stays dark; 32-bit integer images are scaled the same way only
   when a value exceeds 255 (they have no fixed range); float images in [0, 1] are scaled by 255, otherwise clipped
   to [0, 255]; CMYK, YCbCr and LAB go through Pillow's conversion; any alpha (RGBA, LA, premultiplied, palette
   transparency, or a PNG ``tRNS`` colour in a greyscale or RGB image) is composited over **white**, because
   transparent pixels carry arbitrary colour values (often black) that are not part of the picture, and transparent
   photos and logos are made to be seen on a light page.
4. Resize to ``size x size`` with antialiased bilinear filtering, by the resize rule:
   ``squash`` stretches the whole image (what ``keras.utils.image_dataset_from_directory`` does);
   ``crop`` (the default, see :data:`DEFAULT_RESIZE`) scales the shorter side to ``size`` and takes the centre
   square;
   ``pad`` scales the longer side to ``size`` and letterboxes with the ImageNet mean colour (124, 116, 104),
   which is close to zero after every registered backbone's preprocessing.
JPEGs (and MPO, the multi-picture JPEG of many phones) larger than the target are decoded at a reduced scale:
libjpeg-turbo's DCT-domain scaling by the smallest factor M/8 (M = 1..8) that still leaves at least ``size`` pixels
on each side, then resized by step 4 (EXIF orientation is applied after decoding, as in step 2). Scaling in the DCT
domain filters before it subsamples, so it is a proper downscale, and it halves the cost of decoding plus resizing
a typical 500x375 photo. It goes through ``simplejpeg`` (libjpeg-turbo's TurboJPEG API, which releases the GIL);
CMYK JPEGs and those it cannot read (arithmetic-coded, 12-bit, truncated) go through Pillow with its power-of-two
``draft`` scaling.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import DatasetError, ImageDecodeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
RESIZE_RULES = ("crop", "squash", "pad")
DEFAULT_RESIZE = "crop"
"""Default resize rule. ``crop`` feeds objects at their natural aspect ratio, as ImageNet backbones were trained and
evaluated (shorter side resized, centre crop), and keeps the full resolution of the short side; it scored best
with a linear probe on mixed-aspect photos (bench/resize.py, docs/benchmarks.md), squash within noise, pad last
(pad spends pixels on borders). Use ``squash`` when objects reach the image edges (documents, panoramas)."""
PAD_COLOUR = (124, 116, 104)
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
# Size of the DIB header that follows BMP's 14-byte file header: "BM" alone is too weak a signature (text files
# such as "BMW notes..." start with it).
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
SNIFF_BYTES = 32
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}


def sniff(head: bytes) -> str | None:
    """Image format from a file's first bytes (pass at least 18), or None if it is not a recognised signature."""
    for sig, fmt in _SIGNATURES:
        if head.startswith(sig):
            return fmt
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass(frozen=True)
class ImageItem:
    """One labelled image file.

    Attributes
    ----------
    relpath : str
        Path relative to the dataset root, with ``/`` separators (the row key in caches).
    label : int
        Index into :attr:`Dataset.classes`.
    split : str
        ``"train"``, ``"val"``, ``"test"`` or ``""`` when the folder has no split folders.
    size : int
        File size in bytes.
    mtime_ns : int
        Modification time in nanoseconds (with ``size``, the cheap change check on reruns).
    """

    relpath: str
    label: int
    split: str
    size: int
    mtime_ns: int


@dataclass
class Dataset:
    """What :func:`discover` found.

    Attributes
    ----------
    root : Path
        Absolute dataset folder.
    name : str
        Folder name, used to name caches.
    classes : list of str
        Sorted class names.
    items : list of ImageItem
        Candidate images sorted by relative path.
    ignored : Counter
        Counts of skipped entries by reason (``hidden``, ``not an image``, ``loose file``, ``unreadable``,
        ``folder seen before (link)``).
    ignored_examples : list of str
        A few ignored paths, for messages.
    has_splits : bool
        Whether split folders were found.
    unreadable : list of (str, str)
        Every entry counted as ``unreadable``: its path relative to ``root`` and why (a dangling link...).
    """

    root: Path
    name: str
    classes: list[str]
    items: list[ImageItem]
    ignored: Counter = field(default_factory=Counter)
    ignored_examples: list[str] = field(default_factory=list)
    has_splits: bool = False
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def ignored_summary(self, names: int = 3) -> str:
        """What was skipped, for the one line ``extract`` prints (``""`` when nothing was).

        Unreadable entries are named (the first ``names`` of them, then "and N more"), since each one is an image
        the user probably meant to include.

        Parameters
        ----------
        names : int
            Unreadable entries named before the rest are counted.

        Returns
        -------
        str
            e.g. ``2 hidden, 1 unreadable (red/ghost.jpg: dangling symbolic link)``.
        """
        parts = []
        for why, n in self.ignored.items():
            if not n:
                continue
            text = f"{n} {why}"
            if why == "unreadable" and self.unreadable:
                listed = ", ".join(f"{q}: {reason}" for q, reason in self.unreadable[:names])
                more = len(self.unreadable) - names
                text += f" ({listed}{f' and {more} more' if more > 0 else ''})"
            parts.append(text)
        return ", ".join(parts)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class for each split (``""`` when there are no split folders)."""
        out: dict[str, dict[str, int]] = {}
        for it in self.items:
            per = out.setdefault(it.split, dict.fromkeys(self.classes, 0))
            per[self.classes[it.label]] += 1
        return out


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def looks_like_image(path: Path) -> bool:
    """Whether a file is an image *candidate*: an image extension, or an image signature in its first bytes."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return sniff(f.read(SNIFF_BYTES)) is not None
    except OSError:
        return False


def _unreadable_reason(path: Path, exc: OSError) -> str:
    """Why an image candidate cannot be read, in a few words (a dangling link is named as such)."""
    if path.is_symlink() and not path.exists():
        return "dangling symbolic link"
    return exc.strerror or type(exc).__name__


def _scan_class(root: Path, class_dir: Path, ds_ignored: Counter, examples: list[str],
                seen_dirs: set[str], unreadable: list[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """Candidate images under one class folder (recursive): (relpath, size, mtime_ns).

    Symbolic links are followed, but a folder already scanned (a link loop, or a link to another class's folder)
    is skipped and counted, so no image is listed twice or under two labels. Candidates that cannot be read are
    counted and added to ``unreadable`` with the reason.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            ds_ignored["folder seen before (link)"] += 1
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        hidden_dirs = [d for d in dirnames if _is_hidden(d)]
        ds_ignored["hidden"] += len(hidden_dirs)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if _is_hidden(fn):
                ds_ignored["hidden"] += 1
                continue
            if not looks_like_image(p):
                ds_ignored["not an image"] += 1
                if len(examples) < 5:
                    examples.append(rel)
                continue
            try:
                st = p.stat()
            except OSError as exc:
                ds_ignored["unreadable"] += 1
                unreadable.append((rel, _unreadable_reason(p, exc)))
                continue
            found.append((rel, st.st_size, st.st_mtime_ns))
    return found


def _subdirs(path: Path, ignored: Counter, examples: list[str], root: Path) -> list[Path]:
    dirs = []
    for p in sorted(path.iterdir()):
        if _is_hidden(p.name):
            ignored["hidden"] += 1
        elif p.is_dir():
            dirs.append(p)
        else:
            ignored["loose file"] += 1
            if len(examples) < 5:
                examples.append(p.relative_to(root).as_posix())
    return dirs


def discover(root: str | os.PathLike) -> Dataset:
    """Find the labelled images under ``root``.

    Parameters
    ----------
    root : path
        A class-per-folder or split-folder dataset (see module docstring).

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetError
        Missing folder, no class folders, a single class, a class with no images, or a split whose classes differ
        from the first split's.
    """
    r = Path(root).expanduser()
    if not r.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not r.is_dir():
        raise DatasetError(f"{root} is a file; pass a folder with one sub-folder per class")
    r = r.resolve()
    ignored: Counter = Counter()
    examples: list[str] = []
    unreadable: list[tuple[str, str]] = []
    top = _subdirs(r, ignored, examples, r)  # counts the root's hidden and loose files, once
    split_dirs = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    has_splits = bool(split_dirs) and len(split_dirs) == len(top)
    if split_dirs and not has_splits:
        others = [d.name for d in top if d not in split_dirs]
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
            f"({', '.join(others[:5])}); use either <root>/<class>/ or <root>/{{train,val,test}}/<class>/"
        )
    groups: list[tuple[str, Path]] = (
        [(SPLIT_ALIASES[d.name.lower()], d) for d in split_dirs] if has_splits else [("", r)]
    )
    if has_splits and len({s for s, _ in groups}) != len(groups):
        raise DatasetError(f"{root} has two folders for the same split: {', '.join(d.name for d in split_dirs)}")
    groups.sort(key=lambda g: SPLITS.index(g[0]) if g[0] else 0)

    classes: list[str] | None = None
    first_split = ""
    rows: list[tuple[str, str, str, int, int]] = []
    seen_dirs: set[str] = {os.path.realpath(r)} | {os.path.realpath(g) for _, g in groups}
    for split, gdir in groups:
        class_dirs = _subdirs(gdir, ignored, examples, r) if split else top
        where = f"{gdir}" if split else f"{root}"
        if not class_dirs:
            raise DatasetError(f"no class folders in {where}; expected one sub-folder per class")
        names = [d.name for d in class_dirs]
        if classes is None:
            classes, first_split = names, split
            if len(classes) < 2:
                raise DatasetError(
                    f"only one class ({classes[0]}) in {where}; a classifier needs at least two class folders"
                )
        elif set(names) != set(classes):
            missing = sorted(set(classes) - set(names))
            extra = sorted(set(names) - set(classes))
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"extra {', '.join(extra)}"] if extra else []
            )
            raise DatasetError(
                f"split '{split}' has different classes from '{first_split}' ({'; '.join(parts)}); "
                f"every split needs the same class folders"
            )
        for d in class_dirs:
            if os.path.realpath(d) in seen_dirs:
                raise DatasetError(f"class folder {d} links to a folder already used; give each class its own images")
            found = _scan_class(r, d, ignored, examples, seen_dirs, unreadable)
            if not found:
                raise DatasetError(f"class folder {d} has no images; add images or remove the folder")
            rows.extend((rel, d.name, split, size, mt) for rel, size, mt in found)

    classes = sorted(classes or [])
    index = {c: i for i, c in enumerate(classes)}
    items = sorted(
        (ImageItem(rel, index[c], s, size, mt) for rel, c, s, size, mt in rows), key=lambda it: it.relpath
    )
    return Dataset(r, r.name, classes, items, ignored, examples, has_splits, sorted(unreadable))


# ---- decoding --------------------------------------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by the documented rule (alpha over white)."""
    mode = im.mode
    transparent_value = mode in ("L", "RGB") and "transparency" in im.info  # PNG tRNS: one colour is transparent
    if mode == "RGB" and not transparent_value:
        return im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to their straight-alpha twin
        im = im.convert("LA" if mode == "La" else "RGBA")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA") or transparent_value:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16"):  # 16-bit greyscale: scaled by its bit depth, never by its content
        arr = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode.startswith("I"):  # 32-bit integer greyscale: no fixed range, so 16-bit scaling only when it exceeds 8
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if np.nanmax(arr, initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _resize(im: Image.Image, size: int, rule: str) -> Image.Image:
    w, h = im.size
    if rule == "squash":
        return im.resize((size, size), Image.Resampling.BILINEAR)
    if rule == "crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    if rule == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), PAD_COLOUR)
        canvas.paste(im.resize((nw, nh), Image.Resampling.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise ValueError(f"unknown resize rule {rule!r}; known: {', '.join(RESIZE_RULES)}")


_ORIENTATION = {  # EXIF orientation -> the transposition that displays the picture upright (as ImageOps does)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _jpeg_scaled(data: bytes, im: Image.Image, size: int) -> Image.Image | None:
    """A JPEG decoded by libjpeg-turbo at the smallest DCT scale M/8 that keeps both sides >= ``size``, upright.

    Returns None when the binding is not installed, the JPEG is not RGB or greyscale (CMYK keeps Pillow's
    conversion), or the binding cannot decode these bytes: the caller then uses Pillow. ``im`` is the same file
    opened (not decoded) by Pillow, for its colour mode and EXIF orientation.
    """
    if im.mode not in ("RGB", "L"):
        return None
    try:
        import simplejpeg
    except ImportError:
        return None
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
    except Exception:  # noqa: BLE001 - CMYK, arithmetic coding, 12-bit, truncated data: Pillow decides
        return None
    out = Image.fromarray(arr, "RGB")
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: keep the pixels as stored
        orientation = None
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return out.transpose(method) if method is not None else out


def decode_rgb(data: bytes, min_side: int) -> Image.Image:
    """Decode image bytes to an 8-bit RGB Pillow image by steps 1-3 of the pixel rule (no final resize).

    The first frame is used, EXIF orientation is applied and the colour rule (alpha over white) is followed. JPEGs
    (and MPO) larger than ``min_side`` are decoded at a reduced DCT scale that keeps at least ``min_side`` pixels on
    each side (libjpeg-turbo's M/8 scales; Pillow's 1/2, 1/4, 1/8 ``draft`` where the fast path does not apply), so
    ``resize_region(decode_rgb(data, size), size, rule)`` is ``decode(data, size, rule)``.

    Raises
    ------
    ImageDecodeError
        With a short reason, when the bytes are not a decodable image.
    """
    if not data:
        raise ImageDecodeError("empty file")
    opened_as = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/palette chatter; real failures raise below
            with Image.open(io.BytesIO(data)) as im:
                opened_as = (im.format or "").lower()
                if im.format in ("JPEG", "MPO"):  # MPO: phone JPEGs with extra pictures appended
                    fast = _jpeg_scaled(data, im, min_side)
                    if fast is not None:
                        return fast
                    im.draft("RGB", (min_side, min_side))
                im.seek(0)
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)  # a loaded copy, independent of the file
                except Exception:  # noqa: BLE001 - an unreadable EXIF block: keep the pixels as stored
                    im = im.copy()
                rgb = _to_rgb(im)
                rgb.load()
                return rgb
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too large to decode safely ({exc})") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...) for bad files
        fmt = sniff(data[:SNIFF_BYTES])
        what = f"{fmt or opened_as} data" if fmt or opened_as else "not a recognised image format"
        if isinstance(exc, UnidentifiedImageError):
            msg = _open_failure(data, fmt) if fmt else "no image reader accepts it"
        else:
            msg = _reason(exc)
        raise ImageDecodeError(f"cannot decode ({what}): {msg}"[:300]) from None


def resize_region(im: Image.Image, size: int, rule: str,
                  box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Step 4 of the pixel rule applied to a region ``box`` (left, top, right, bottom; default the whole image).

    The region is treated as the whole image would be: ``squash`` stretches it to ``size x size``, ``crop`` takes
    its centre square, ``pad`` letterboxes it with :data:`PAD_COLOUR`, always with antialiased bilinear filtering.
    With ``box=None`` the result equals the final resize of :func:`decode` pixel for pixel.
    """
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; known: {', '.join(RESIZE_RULES)}")
    if box is None:
        return _resize(im, size, rule)
    left, top, right, bottom = (float(v) for v in box)
    w, h = right - left, bottom - top
    if rule == "squash":
        return im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, right, bottom))
    if rule == "crop":
        side = min(w, h)
        x0, y0 = left + (w - side) / 2, top + (h - side) / 2
        return im.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), PAD_COLOUR)
    canvas.paste(im.resize((nw, nh), Image.Resampling.BILINEAR, box=(left, top, right, bottom)),
                 ((size - nw) // 2, (size - nh) // 2))
    return canvas


def decode(data: bytes, size: int, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """Decode image bytes to ``(size, size, 3)`` uint8 RGB by the module's pixel rule.

    Steps 1-3 are :func:`decode_rgb`, step 4 :func:`resize_region` (the augmented views of
    :mod:`pipeline.views` share both, so a centre view is these very pixels).

    Raises
    ------
    ImageDecodeError
        With a short reason, when the bytes are not a decodable image.
    """
    if resize not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {resize!r}; known: {', '.join(RESIZE_RULES)}")
    return np.asarray(resize_region(decode_rgb(data, size), size, resize), dtype=np.uint8).copy()


def _reason(exc: BaseException) -> str:
    """First line of an exception's message, without object reprs such as ``<_io.BytesIO object at 0x..>``."""
    text = str(exc).splitlines()[0].strip() if str(exc).strip() else ""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text).strip()
    return text or type(exc).__name__


def _open_failure(data: bytes, fmt: str) -> str:
    """Why the reader for a sniffed format rejected the bytes (``Image.open`` only says "cannot identify")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.init()
            factory = Image.OPEN[_PIL_FORMATS[fmt]][0]
            factory(io.BytesIO(data)).close()
    except Exception as exc:  # noqa: BLE001 - only its message is wanted
        return f"corrupt or unsupported {fmt} variant ({_reason(exc)})"
    return f"corrupt or unsupported {fmt} variant"


def read_file(path: str | os.PathLike) -> tuple[bytes, str]:
    """A file's bytes and their hex SHA-256.

    Raises
    ------
    ImageDecodeError
        When the file cannot be read (``cannot read file: <reason>``).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    return data, hashlib.sha256(data).hexdigest()


def read_image(path: str | os.PathLike, size: int, resize: str = DEFAULT_RESIZE) -> tuple[np.ndarray, str]:
    """Read a file, hash its bytes and decode it.

    Returns
    -------
    pixels : np.ndarray
        ``(size, size, 3)`` uint8 RGB.
    sha256 : str
        Hex digest of the file's bytes.

    Raises
    ------
    ImageDecodeError
        When the file cannot be read or decoded (the message carries its SHA-256 when it was read).
    """
    data, digest = read_file(path)
    try:
        return decode(data, size, resize), digest
    except ImageDecodeError as exc:
        exc.sha256 = digest  # type: ignore[attr-defined]
        raise


def load_image(path: str | os.PathLike, size: int, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """Load one image file as ``(size, size, 3)`` uint8 RGB by the module's pixel rule."""
    return read_image(path, size, resize)[0]

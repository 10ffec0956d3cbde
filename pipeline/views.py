"""Augmented views of each image as pixels, made the same way by ``extract --views K``, ``predict`` and ``finetune``.

Besides the *centre view* (view 0: the image decoded and resized by the pixel rule of :mod:`pipeline.data`, what
every cache holds), ``--views K`` stores the features of K augmented views of every image, so that heads can train
on augmented copies and average their predictions over an image's views without running the backbone again.

A :class:`ViewSpec` says how many views each image gets (``n``), of which kinds (``kinds``), and the seed that makes
them deterministic (``seed``). It is part of the cache signature: rows extracted with another spec are never mixed
with these (changing ``--views``, ``--view-kinds`` or ``--view-seed`` re-extracts every row), and so is
:data:`VIEW_RULE`, the version of the rules below.

Source pixels
-------------
:func:`read_views` is the one way a file becomes its centre view and views, for ``extract``, ``predict`` and
``finetune`` alike. Views are made from the decoded image before its final resize: first frame, EXIF orientation
applied, colour rule (alpha over white) followed (:func:`pipeline.data.decode_rgb`). Large JPEGs are decoded at the
same reduced DCT scale as the centre view (at least ``input_size`` pixels on each side), so the centre view of a
cache with views is pixel for pixel the centre view of a cache without them; a crop of such a JPEG may therefore be
upsampled by up to ``1 / sqrt(0.5)`` = 1.41x.

Kinds and rules (``VIEW_RULE = "headbench-views-1"``)
----------------------------------------------------
``flip``
    View 1 is the **mirror image** of the centre view (its pixels reversed left-right, exactly). Every other view is
    mirrored with probability 1/2 (last, after everything below).
``crop``
    Random resized crop. The *base region* is what the resize rule maps to the input square for the centre view:
    the centred square of side ``min(W, H)`` for ``crop``, the whole ``W x H`` image for ``squash`` and ``pad``. A
    view's *window* has the base region's shape scaled by ``sqrt(a)`` on each side, ``a`` (the area fraction)
    uniform in [0.5, 1] (:data:`CROP_AREA`), at a uniformly random position inside the whole image (so with the
    ``crop`` rule a window may also slide along the long side of the image, which the centre view never sees). The
    aspect ratio is never changed: objects keep the proportions of the centre view. Without ``crop`` the window is
    the base region, centred.
``rotate``
    The window is rotated by an angle uniform in [-10, 10] degrees (:data:`ROTATE_DEGREES`) about its own centre,
    bilinear, at the decoded resolution. The window is first shrunk, if needed, until its rotated footprint (its
    bounding box) fits inside the image with a one-pixel margin, so a rotated view never shows fill colour; the
    random position is drawn for that bounding box.
``color``
    Colour jitter of the resized view: brightness, then contrast, then saturation, each by a factor uniform in
    [0.8, 1.2] (:data:`JITTER`). Brightness multiplies every channel; contrast blends each pixel with the mean
    luma of the view (``(x - m) * c + m``); saturation blends each pixel with its own luma
    (``(x - g) * s + g``; luma ``0.299 R + 0.587 G + 0.114 B``); then rounding to the nearest integer and
    clipping to [0, 255]. With the ``pad`` rule only the picture is jittered: the letterbox keeps its colour.

Order of operations for a view: window (crop) -> rotation about the window centre -> the final resize of the
window by the cache's resize rule (:func:`pipeline.data.resize_region`: ``squash`` stretches the window, ``crop``
takes its centre square (the window already is one), ``pad`` letterboxes it), with the same antialiased bilinear
filter as the centre view -> colour jitter -> mirror.

Determinism
-----------
Each random view's parameters come from a counter-based generator keyed by (seed, view index, image content):
``numpy.random.default_rng([seed, view, int(sha256[:16], 16)])``, drawn in a fixed order (mirror, area, x, y,
angle, brightness, contrast, saturation) whatever the kinds, so a kind turned on or off never changes the others'
values. Keying by the SHA-256 of the file's bytes rather than its path means a moved, renamed or copied file keeps
its views (a cache row is reused by path, but its features depend on its content only, and so do its views); two
copies of one image get the same views, which is what identical inputs should get.

Defaults and cost
-----------------
:data:`DEFAULT_VIEW_KINDS` is ``flip, crop, color``: view 1 the mirror image, views 2..K random resized crops (area
0.5-1) with mild colour jitter, half of them mirrored. Mirror images, shifts and changes of scale, and changes of
lighting and white balance are the nuisances found in almost every photo collection; rotation is rarer (the
horizon and gravity fix the orientation of most photos, and a rotated window must zoom in to avoid fill), so it is
offered, not default. Measured with a logistic-regression probe (standardised, C in {0.01, 0.03, 0.1}) on the shared
ImageNet MobileNetV2 features at 224 (crop), training on the centre view, the mirror image and 3 random views of
each training image, and averaging the predicted probabilities over the same 5 views of each test image, accuracy
gained over the centre-view probe (mean over the 3 C values, in points; one image is 0.65 point on hymenoptera,
0.34 on flowers5; flowers5: a seeded 200-image sample of each class, hash split 70/30 with seed 0; measured
2026-11-25):

=======================  ========================  ====================================
random views             hymenoptera (245 / 153)   flowers5 (200 per class, 707 / 293)
=======================  ========================  ====================================
crop                     +0.7                      +0.1
crop + color (default)   +0.9                      +2.6
crop + rotate            +2.2                      +1.1
crop + rotate + color    +1.5                      +0.5
=======================  ========================  ====================================

``crop`` and ``crop + color`` gained on both sets whichever way the views were used (training views only,
training views with mirror test-time views, or both), ``crop + color`` by more (+0.9 to +2.6 points against +0.1
to +1.7); mirror test-time views alone moved hymenoptera by +0.2 and flowers5 by -0.7. These are differences of
one to eight images: which views help a head on a given dataset is for the fit protocol to decide on the selection
split, never assumed.

Every view is one more forward pass: K views multiply the model's work by K + 1 (decoding is shared; views add
their crop, rotation and resize at the decoded resolution, small next to the model). The cache grows by
``K x D`` floats per row and kind (``features/views/avg``, ``features/views/max``); spatial maps of views are never
stored (an InceptionV3 map is 8x8x2048 values per view, 64 times a pooled vector).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image

from pipeline.data import decode_rgb, read_file, resize_region
from pipeline.errors import BackboneError, ImageDecodeError

VIEW_RULE = "headbench-views-1"
"""Version of the augmentation rule; bump it when the pixels of a view change (old views are then rebuilt)."""

VIEW_KINDS = ("flip", "crop", "rotate", "color")
DEFAULT_VIEW_KINDS = ("flip", "crop", "color")
"""Kinds used when ``--views`` is given without ``--view-kinds`` (reasons in the module docstring)."""

CROP_AREA = (0.5, 1.0)
"""Area fraction of the base region kept by a random resized crop."""
ROTATE_DEGREES = 10.0
"""Largest rotation, in degrees, either way."""
JITTER = 0.2
"""Brightness, contrast and saturation factors are drawn in [1 - JITTER, 1 + JITTER]."""
MAX_VIEWS = 64
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class ViewSpec:
    """How many augmented views each image gets, of which kinds, from which seed.

    Attributes
    ----------
    n : int
        Views per image besides the centre view (0: none).
    kinds : tuple of str
        Augmentation kinds among :data:`VIEW_KINDS`.
    seed : int
        Seed of the per-(image, view) random parameters.
    """

    n: int = 0
    kinds: tuple[str, ...] = ()
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``views`` attribute of a cache (``{"n": 0}`` when there are none)."""
        if not self.n:
            return {"n": 0}
        return {"n": int(self.n), "kinds": list(self.kinds), "seed": int(self.seed), "rule": VIEW_RULE}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> "ViewSpec":
        """Inverse of :meth:`to_json` (``None`` or ``{"n": 0}``: no views)."""
        if not obj or not obj.get("n"):
            return NO_VIEWS
        return cls(int(obj["n"]), tuple(obj.get("kinds", ())), int(obj.get("seed", 0)))

    def cli_options(self) -> list[str]:
        """The ``extract`` options that ask for this spec (``--views 0`` for none; defaults left out).

        Returns
        -------
        list of str
            e.g. ``["--views", "4"]`` or ``["--views", "2", "--view-kinds", "flip,rotate", "--view-seed", "3"]``.
        """
        out = ["--views", str(int(self.n))]
        if self.n and tuple(self.kinds) != DEFAULT_VIEW_KINDS:
            out += ["--view-kinds", ",".join(self.kinds)]
        if self.n and self.seed:
            out += ["--view-seed", str(int(self.seed))]
        return out

    def describe(self) -> str:
        """One line for logs, e.g. ``4 views per image (flip, crop; seed 0): model work x5``."""
        if not self.n:
            return "no augmented views (centre view only)"
        return (f"{self.n} view{'s' if self.n > 1 else ''} per image ({', '.join(self.kinds)}; seed {self.seed}): "
                f"model work x{self.n + 1}")


NO_VIEWS = ViewSpec()


def make_view_spec(n: int, kinds: Iterable[str] | str | None = None, seed: int = 0) -> ViewSpec:
    """Check and normalise view options into a :class:`ViewSpec` (kinds in :data:`VIEW_KINDS` order).

    Parameters
    ----------
    n : int
        Views per image (0 to :data:`MAX_VIEWS`).
    kinds : str or iterable of str, optional
        Comma-separated or a sequence; default :data:`DEFAULT_VIEW_KINDS`.
    seed : int
        Non-negative seed.

    Raises
    ------
    BackboneError
        A bad count, an unknown kind, a negative seed, or ``flip`` alone with more than one view (there is only
        one mirror image).
    """
    if isinstance(kinds, str):
        kinds = [k for k in kinds.split(",")]
    names = [k.strip().lower() for k in (kinds if kinds is not None else DEFAULT_VIEW_KINDS) if k.strip()]
    unknown = [k for k in names if k not in VIEW_KINDS]
    if unknown:
        raise BackboneError(f"unknown view kind {unknown[0]!r}; choose among {', '.join(VIEW_KINDS)} "
                            f"(comma-separated)")
    if not 0 <= int(n) <= MAX_VIEWS:
        raise BackboneError(f"--views must be between 0 and {MAX_VIEWS}, got {n}")
    if int(seed) < 0:
        raise BackboneError(f"--view-seed must be a non-negative integer, got {seed}")
    if not n:
        return NO_VIEWS
    ordered = tuple(k for k in VIEW_KINDS if k in names)
    if not ordered:
        raise BackboneError(f"--view-kinds is empty; choose among {', '.join(VIEW_KINDS)}")
    if ordered == ("flip",) and n > 1:
        raise BackboneError(f"--view-kinds flip gives one view (the mirror image), not {n}; use --views 1 or add "
                            f"crop, rotate or color")
    return ViewSpec(int(n), ordered, int(seed))


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view (all drawn, used according to the spec's kinds)."""

    mirror: bool
    area: float
    x: float
    y: float
    angle: float
    brightness: float
    contrast: float
    saturation: float


def view_params(spec: ViewSpec, sha256: str, view: int) -> ViewParams:
    """Parameters of view ``view`` (1-based) of the image whose bytes have SHA-256 ``sha256``.

    Mirror-only view 1 (``flip`` in the kinds) is exact and random-free; its parameters are reported as a mirror of
    the centred base region.
    """
    kinds = set(spec.kinds)
    if "flip" in kinds and view == 1:
        return ViewParams(True, 1.0, 0.5, 0.5, 0.0, 1.0, 1.0, 1.0)
    key = int(sha256[:16], 16) if sha256 else 0
    rng = np.random.default_rng([int(spec.seed), int(view), key])
    u_mirror, area, x, y, angle = rng.random(), rng.uniform(*CROP_AREA), rng.random(), rng.random(), \
        rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES)
    b, c, s = rng.uniform(1.0 - JITTER, 1.0 + JITTER, 3)
    crop = "crop" in kinds
    color = "color" in kinds
    return ViewParams(
        mirror="flip" in kinds and u_mirror < 0.5,
        area=float(area) if crop else 1.0,
        x=float(x) if crop else 0.5,
        y=float(y) if crop else 0.5,
        angle=float(angle) if "rotate" in kinds else 0.0,
        brightness=float(b) if color else 1.0,
        contrast=float(c) if color else 1.0,
        saturation=float(s) if color else 1.0,
    )


def _window(width: int, height: int, resize: str, p: ViewParams) -> tuple[float, float, float, float]:
    """Window (centre x, centre y, width, height) of a view, in image coordinates (see the ``crop`` rule)."""
    if resize == "crop":
        bw = bh = float(min(width, height))
    else:
        bw, bh = float(width), float(height)
    k = math.sqrt(p.area)
    ww, wh = bw * k, bh * k
    if p.angle:
        c, s = abs(math.cos(math.radians(p.angle))), abs(math.sin(math.radians(p.angle)))
        fw, fh = ww * c + wh * s, ww * s + wh * c  # bounding box of the rotated window
        shrink = min(1.0, max(width - 2, 1) / fw, max(height - 2, 1) / fh)
        ww, wh, fw, fh = ww * shrink, wh * shrink, fw * shrink, fh * shrink
    else:
        fw, fh = ww, wh
    cx = fw / 2 + p.x * (width - fw)
    cy = fh / 2 + p.y * (height - fh)
    return cx, cy, ww, wh


def _jitter(px: np.ndarray, p: ViewParams) -> np.ndarray:
    """Brightness, contrast, saturation (in that order) of ``(h, w, 3)`` uint8 pixels; rounded and clipped."""
    x = px.astype(np.float32) * np.float32(p.brightness)
    m = float((x @ _LUMA).mean())
    x = (x - m) * np.float32(p.contrast) + np.float32(m)
    g = (x @ _LUMA)[..., None]
    x = (x - g) * np.float32(p.saturation) + g
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def render_view(image: Any, size: int, resize: str, p: ViewParams) -> np.ndarray:
    """Pixels ``(size, size, 3)`` uint8 of one random view of a decoded RGB Pillow image.

    Parameters
    ----------
    image : PIL.Image.Image
        From :func:`pipeline.data.decode_rgb` (EXIF-oriented 8-bit RGB, before the final resize).
    size : int
        Input side.
    resize : {"crop", "squash", "pad"}
        The cache's resize rule.
    p : ViewParams
    """
    width, height = image.size
    cx, cy, ww, wh = _window(width, height, resize, p)
    src = image
    ox = oy = 0.0
    if p.angle:
        # Rotate only the part of the image around the window (plus a margin for the bilinear taps).
        half = math.hypot(ww, wh) / 2 + 2
        x0, y0 = max(0, math.floor(cx - half)), max(0, math.floor(cy - half))
        x1, y1 = min(width, math.ceil(cx + half)), min(height, math.ceil(cy + half))
        src = image.crop((x0, y0, x1, y1)).rotate(p.angle, resample=Image.Resampling.BILINEAR,
                                                   center=(cx - x0, cy - y0))
        ox, oy = float(x0), float(y0)
    box = (cx - ww / 2 - ox, cy - wh / 2 - oy, cx + ww / 2 - ox, cy + wh / 2 - oy)
    out = np.asarray(resize_region(src, size, resize, box=box), dtype=np.uint8).copy()
    if (p.brightness, p.contrast, p.saturation) != (1.0, 1.0, 1.0):
        if resize == "pad":  # jitter the picture only; the letterbox keeps the pad colour
            bw, bh = box[2] - box[0], box[3] - box[1]  # as resize_region computes them
            scale = size / max(bw, bh)
            nw, nh = max(1, round(bw * scale)), max(1, round(bh * scale))
            left, top = (size - nw) // 2, (size - nh) // 2
            out[top:top + nh, left:left + nw] = _jitter(out[top:top + nh, left:left + nw], p)
        else:
            out = _jitter(out, p)
    if p.mirror:
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def render_views(image: Any, centre: np.ndarray, sha256: str, spec: ViewSpec, resize: str) -> np.ndarray:
    """The ``spec.n`` augmented views of one image, ``(n, s, s, 3)`` uint8, in view order 1..n.

    Parameters
    ----------
    image : PIL.Image.Image
        The decoded image (:func:`pipeline.data.decode_rgb`).
    centre : np.ndarray
        Its centre view ``(s, s, 3)`` (view 1 of a ``flip`` spec is its mirror image).
    sha256 : str
        Hex digest of the file's bytes (the key of the views' random parameters).
    spec : ViewSpec
    resize : {"crop", "squash", "pad"}
    """
    size = int(centre.shape[0])
    out = np.empty((spec.n, size, size, 3), np.uint8)
    for v in range(1, spec.n + 1):
        if v == 1 and "flip" in spec.kinds:
            out[0] = centre[:, ::-1]
        else:
            out[v - 1] = render_view(image, size, resize, view_params(spec, sha256, v))
    return out


def read_views(path: str | os.PathLike, size: int, resize: str,
               spec: ViewSpec | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Read an image file and decode it into its centre view and (when ``spec`` asks for some) its augmented views.

    The one way a file becomes pixels for a model: extraction's reader, ``predict`` and fine-tuning all call it, so
    a centre view is the same pixels everywhere (:func:`pipeline.data.decode`'s, bit for bit) and views are rendered
    from the same decoded image, keyed by the file's SHA-256.

    Parameters
    ----------
    path : path
        The image file.
    size : int
        Input side.
    resize : {"crop", "squash", "pad"}
        The resize rule.
    spec : ViewSpec, optional
        Augmented views to render (None or no views: the centre view only).

    Returns
    -------
    centre : np.ndarray
        ``(size, size, 3)`` uint8.
    views : np.ndarray or None
        ``(spec.n, size, size, 3)`` uint8 in view order 1..n; None when ``spec`` asks for none.
    sha256 : str
        Hex digest of the file's bytes.

    Raises
    ------
    ImageDecodeError
        When the file cannot be read, or cannot be decoded (then the error's ``sha256`` is the file's digest).
    """
    data, digest = read_file(path)
    try:
        image = decode_rgb(data, size)
        centre = np.asarray(resize_region(image, size, resize), dtype=np.uint8).copy()
        views = render_views(image, centre, digest, spec, resize) if spec is not None and spec.n else None
    except ImageDecodeError as exc:
        exc.sha256 = digest  # type: ignore[attr-defined]
        raise
    return centre, views, digest

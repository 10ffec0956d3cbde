"""Augmented views at extraction: deterministic pixels, the documented rules, and views in the cache."""

from __future__ import annotations

import io
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, reused_runtime, run_extract, write_image
from pipeline import cache
from pipeline.data import PAD_COLOUR, decode, decode_rgb, resize_region
from pipeline.errors import BackboneError
from pipeline.views import ViewSpec, make_view_spec, render_views, view_params

FAST = dict(backbone="mobilenet_v2", weights="none", input_size=32, alpha=0.35, batch_size=4)
D = 1280


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric test picture (gradients and a blob), so crops, rotations and mirrors all differ."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.2, 0.4) * w, rng.uniform(0.3, 0.7) * h
    blob = 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 * w * h))
    rgb = np.stack([255 * xx / w, 255 * yy / h, 80 + blob], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _views(data: bytes, spec: ViewSpec, size: int = 32, rule: str = "crop") -> tuple[np.ndarray, np.ndarray]:
    import hashlib

    im = decode_rgb(data, size)
    centre = np.asarray(resize_region(im, size, rule))
    return centre, render_views(im, centre, hashlib.sha256(data).hexdigest(), spec, rule)


@pytest.mark.parametrize("rule", ["crop", "squash", "pad"])
def test_centre_view_is_what_decode_gives(rule):
    # a large JPEG (DCT-scaled decoding kicks in), an EXIF-rotated one and a transparent PNG
    big = _jpeg(_photo(300, 420))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rotated = _jpeg(_photo(60, 90, seed=1), exif=exif.tobytes())
    buf = io.BytesIO()
    rgba = np.dstack([_photo(40, 50), np.linspace(0, 255, 50, dtype=np.uint8)[None, :].repeat(40, 0)])
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    for data in (big, rotated, buf.getvalue()):
        got = np.asarray(resize_region(decode_rgb(data, 32), 32, rule))
        assert np.array_equal(got, decode(data, 32, rule))


def test_views_are_deterministic_per_image_view_and_seed():
    data = _jpeg(_photo(80, 120))
    spec = make_view_spec(4, "flip,crop,rotate,color", seed=0)
    centre, a = _views(data, spec)
    _, b = _views(data, spec)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.array_equal(a[0], centre[:, ::-1])  # view 1: the mirror image, exactly
    assert all(not np.array_equal(a[i], a[j]) for i in range(4) for j in range(i + 1, 4))
    _, other_seed = _views(data, make_view_spec(4, "flip,crop,rotate,color", seed=1))
    assert np.array_equal(other_seed[0], a[0])  # the mirror image has no random parameter
    assert not any(np.array_equal(other_seed[i], a[i]) for i in range(1, 4))
    # another image gets other parameters; the parameters of one kind do not depend on which others are on
    p = view_params(spec, "ab" * 32, 2)
    assert p != view_params(spec, "cd" * 32, 2)
    q = view_params(make_view_spec(4, "crop", seed=0), "ab" * 32, 2)
    assert (q.area, q.x, q.y) == (p.area, p.x, p.y) and q.angle == 0 and not q.mirror


def test_mirror_view_mirrors_an_arrangement():
    left_right = np.zeros((40, 40, 3), np.uint8)
    left_right[:, :20] = (220, 20, 20)
    left_right[:, 20:] = (20, 20, 220)
    centre, v = _views(_jpeg(left_right), make_view_spec(1, "flip"))
    assert v[0][:, :12, 2].mean() > 180 and v[0][:, -12:, 0].mean() > 180  # blue now on the left, red on the right
    symmetric = np.zeros((40, 40, 3), np.uint8)
    symmetric[:, 10:30] = (30, 200, 30)
    buf = io.BytesIO()
    Image.fromarray(symmetric).save(buf, "PNG")
    centre, v = _views(buf.getvalue(), make_view_spec(1, "flip"))
    assert np.array_equal(v[0], centre)  # a left-right symmetric picture is its own mirror image


@pytest.mark.parametrize("rule", ["crop", "squash", "pad"])
def test_rotated_and_cropped_views_never_show_fill(rule):
    flat = np.full((50, 90, 3), (200, 60, 40), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(flat).save(buf, "PNG")
    _, v = _views(buf.getvalue(), make_view_spec(6, "crop,rotate", seed=3), rule=rule)
    if rule == "pad":  # the picture keeps its colour; the letterbox (top and bottom here) is the pad colour
        assert np.array_equal(v[:, 0, 0], np.tile(PAD_COLOUR, (6, 1)))
        v = v[:, 14:18]
    assert np.abs(v.astype(int) - (200, 60, 40)).max() <= 1
    _, j = _views(buf.getvalue(), make_view_spec(3, "color", seed=3), rule=rule)
    if rule == "pad":
        assert np.array_equal(j[:, 0, 0], np.tile(PAD_COLOUR, (3, 1)))  # jitter leaves the letterbox alone
    assert len({tuple(x[16, 16]) for x in j}) == 3  # three different colours


def test_view_options_are_checked():
    assert make_view_spec(3).kinds == ("flip", "crop", "color")
    assert make_view_spec(2, "color, crop").kinds == ("crop", "color")
    assert make_view_spec(0, "flip") == ViewSpec()
    for n, kinds, seed, msg in ((2, "blur", 0, "unknown view kind 'blur'"), (3, "flip", 0, "one view"),
                                (2, "crop", -1, "non-negative"), (99, "crop", 0, "between 0 and 64"),
                                (2, ",", 0, "empty")):
        with pytest.raises(BackboneError, match=msg):
            make_view_spec(n, kinds, seed)


# ---- views in the cache --------------------------------------------------------------------------------------------




def _dataset(root, n=5):
    for c, seed0 in (("a", 0), ("b", 50)):
        for i in range(n):
            write_image(root / c / f"{i}.jpg", _photo(40 + 6 * i, 70 - 5 * i, seed=seed0 + i))
    return root


def _extract(root, cache_dir, **kw):
    msgs: list[str] = []
    res = run_extract(root, cache_dir, log=msgs.append, **(FAST | kw))
    return res, msgs


def _cached(path):
    """Centre and view features by path, as stored (failed rows included)."""
    with h5py.File(path) as f:
        paths = [p.decode() for p in f["rows/path"][()]]
        out = {"avg": dict(zip(paths, f["features/avg"][()])), "ok": dict(zip(paths, f["rows/ok"][()]))}
        if "views" in f:
            out["views"] = dict(zip(paths, f["views/avg"][()]))
            out["views_max"] = dict(zip(paths, f["views/max"][()])) if "max" in f["views"] else None
            out["maps"] = "maps" in f["views"]
    return out


def test_views_are_cached_with_their_spec(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    spec = make_view_spec(3, seed=7)
    res, msgs = _extract(root, tmp_path / "c1", views=spec, max_pool=True, maps=True)
    assert any("views: 3 views per image (flip, crop, color; seed 7): model work x4" in m for m in msgs)
    assert res.n_failed == 1
    meta = cache.read_meta(res.path)
    assert meta["views"] == {"n": 3, "kinds": ["flip", "crop", "color"], "seed": 7, "rule": "headbench-views-1"}
    with cache.open_features(res.path) as fr:  # what the fit stage reads
        assert fr.n_views == 3 and fr.read_views().shape == (fr.n, 3, D) and fr.n == 10
    got = _cached(res.path)
    assert got["maps"] is False  # maps of views are never stored
    assert got["views"]["a/0.jpg"].shape == (3, D) and got["views_max"]["a/0.jpg"].shape == (3, D)
    assert np.isnan(got["views"]["a/broken.jpg"]).all() and not got["ok"]["a/broken.jpg"]
    ok = [p for p in got["ok"] if got["ok"][p]]
    assert all(np.isfinite(got["views"][p]).all() for p in ok)
    # views differ from each other and from the centre view
    v = got["views"]["a/0.jpg"]
    assert not np.array_equal(v[0], v[1]) and not np.array_equal(v[0], got["avg"]["a/0.jpg"])

    # the same spec elsewhere gives bit-identical features; the centre view is the one a cache without views holds
    again, _ = _extract(root, tmp_path / "c2", views=spec, max_pool=True, maps=True)
    plain, msgs = _extract(root, tmp_path / "c3", max_pool=True, maps=True)
    assert not any(m.startswith("views:") for m in msgs)
    other, plain_got = _cached(again.path), _cached(plain.path)
    for p in ok:
        assert np.array_equal(other["views"][p], got["views"][p])
        assert np.array_equal(plain_got["avg"][p], got["avg"][p])
    assert "views" not in plain_got


def test_rerun_resume_and_changed_spec_with_views(tmp_path, monkeypatch):
    root = _dataset(tmp_path / "ds", n=4)
    spec = make_view_spec(2, seed=0)
    calls = {"n": 0}

    class Flaky:
        """The real runtime, interrupted (as by Ctrl-C) on its fifth call: 1 warm-up + 3 per batch of 4 images."""

        def __init__(self, rt):
            self.rt = rt

        def __getattr__(self, name):
            return getattr(self.rt, name)

        def __call__(self, px):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return self.rt(px)

    with pytest.raises(KeyboardInterrupt):
        _extract(root, tmp_path / "c", views=spec, checkpoint_rows=4,
                 runtime_factory=lambda *a, **k: Flaky(reused_runtime(*a, **k)))
    # rerun without --views: the interrupted run's spec is kept and its finished rows are not computed again
    res, msgs = _extract(root, tmp_path / "c")
    assert (res.n_reused, res.n_extracted) == (4, 4)
    assert cache.read_meta(res.path)["views"]["n"] == 2
    clean, _ = _extract(root, tmp_path / "clean", views=spec)
    a, b = _cached(res.path), _cached(clean.path)
    assert all(np.array_equal(a["views"][p], b["views"][p]) for p in b["views"])

    # incremental: up to date, then only a new file is extracted and old rows keep their views
    again, msgs = _extract(root, tmp_path / "c", views=spec)
    assert again.up_to_date
    write_image(root / "b" / "new.jpg", _photo(50, 50, seed=99))
    res, _ = _extract(root, tmp_path / "c")
    assert (res.n_extracted, res.n_reused) == (1, 8)
    after = _cached(res.path)
    assert all(np.array_equal(after["views"][p], a["views"][p]) for p in a["views"])

    # another seed re-extracts every row, with other views; --views 0 drops them
    res, msgs = _extract(root, tmp_path / "c", views=make_view_spec(2, seed=1))
    assert res.n_extracted == 9 and res.n_reused == 0
    seeded = _cached(res.path)
    assert not np.array_equal(seeded["views"]["a/0.jpg"][1], after["views"]["a/0.jpg"][1])
    assert np.array_equal(seeded["views"]["a/0.jpg"][0], after["views"]["a/0.jpg"][0])  # the mirror image
    res, _ = _extract(root, tmp_path / "c", views=make_view_spec(0))
    assert res.n_extracted == 9 and "views" not in _cached(res.path)


def test_cli_view_options_are_usage_errors_in_one_line(tmp_path):
    for args, expect in ((["--view-kinds", "crop"], "need --views K"),):
        proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "extract", str(tmp_path), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and expect in errors[0], proc.stderr


def test_parts_of_an_interrupted_views_run_are_kept_by_a_run_without_views(tmp_path, monkeypatch):
    """A run without --views keeps the cache's views and the other run's parts, saying so; one that asks for other
    views discards them, saying whose they were."""
    root = _dataset(tmp_path / "ds", n=4)
    plain, _ = _extract(root, tmp_path / "c")  # a complete cache without views

    def interrupted(views):
        calls = {"n": 0}

        class Flaky:
            """The real runtime, interrupted on its fifth call: 1 warm-up + 3 per batch of 4 images."""

            def __init__(self, rt):
                self.rt = rt

            def __getattr__(self, name):
                return getattr(self.rt, name)

            def __call__(self, px):
                calls["n"] += 1
                if calls["n"] == 5:
                    raise KeyboardInterrupt
                return self.rt(px)

        with pytest.raises(KeyboardInterrupt):
            _extract(root, tmp_path / "c", views=views, checkpoint_rows=4,
                     runtime_factory=lambda *a, **k: Flaky(reused_runtime(*a, **k)))

    interrupted(make_view_spec(2))  # one part of 4 rows with 2 views each
    write_image(root / "b" / "new.jpg", _photo(50, 50, seed=99))  # work for the next run, and an assembly
    res, msgs = _extract(root, tmp_path / "c")
    parts = cache.parts_dir(plain.path)
    assert f"kept 1 part(s) (4 rows) of an interrupted run with --views 2 in {parts.name}/: this run has no views, " \
           f"as the cache has (no --views given); rerun with --views 2 to resume it, or delete those parts" in msgs, msgs
    assert res.n_extracted == 1 and "views" not in _cached(res.path) and len(list(parts.glob("part-*.h5"))) == 1
    res, msgs = _extract(root, tmp_path / "c", views=make_view_spec(2))  # as the line says: it resumes
    assert (res.n_reused, res.n_extracted) == (4, 5) and any("4 from an interrupted run" in m for m in msgs), msgs
    assert not parts.exists() and cache.read_meta(res.path)["views"]["n"] == 2

    interrupted(make_view_spec(2, seed=3))
    res, msgs = _extract(root, tmp_path / "c", views=make_view_spec(1))
    assert "discarded 1 part(s) (4 rows) of an interrupted run with --views 2 --view-seed 3: this run asks for " \
           "--views 1" in msgs, msgs
    assert res.n_extracted == 9 and not parts.exists()

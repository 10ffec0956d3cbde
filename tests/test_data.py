"""Dataset discovery and image loading (pipeline/data.py) on generated files, plus the real odd files in ../shared.

Every image here is written by Pillow into ``tmp_path``; no TensorFlow is imported.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from pipeline.data import PAD_COLOUR, decode, decode_rgb, discover, load_image, read_image, resize_region, sniff
from pipeline.errors import DatasetError, HeadbenchError, ImageDecodeError

from conftest import write_image

RED, GREEN, BLUE, GREY = (220, 20, 20), (20, 200, 20), (20, 20, 220), (128, 128, 128)


# ---- helpers ---------------------------------------------------------------------------------------------------


def solid(h: int, w: int, colour=GREY) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_bytes(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    return encode(Image.fromarray(arr), fmt, **kw)


def noisy(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with mild noise: compresses like a photo, survives JPEG round trips."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 23.0 + y / 31.0)], axis=-1)
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def close(px, colour, tol: int = 12) -> bool:
    return bool(np.all(np.abs(np.asarray(px, int) - np.asarray(colour, int)) <= tol))


def make_dataset(root: Path, spec: dict[str, int], ext: str = ".png") -> Path:
    """``spec`` maps "class" or "split/class" to a number of small images."""
    for i, (cls, n) in enumerate(sorted(spec.items())):
        for k in range(n):
            write_image(root / cls / f"img_{k:02d}{ext}", solid(6, 8, (10 * i, 20 + k, 50)))
    return root


def decode_error(fn, *a, **kw) -> ImageDecodeError:
    """Run ``fn`` and return the ImageDecodeError it raised, failing on any other outcome."""
    try:
        fn(*a, **kw)
    except ImageDecodeError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) <= 300, msg
        assert "object at 0x" not in msg, f"reason leaks an object repr: {msg}"
        return exc
    except Exception as exc:  # pragma: no cover - the failure we guard against
        pytest.fail(f"raised {type(exc).__name__} instead of ImageDecodeError: {exc}")
    pytest.fail("decoded without error")


def dataset_error(root) -> str:
    with pytest.raises(DatasetError) as info:
        discover(root)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    assert isinstance(info.value, HeadbenchError)
    return msg


# ---- discovery -------------------------------------------------------------------------------------------------


def test_class_per_folder(tmp_path):
    root = make_dataset(tmp_path / "pets", {"dog": 3, "cat": 2, "bird": 1})
    ds = discover(root)
    assert ds.root == root.resolve() and ds.name == "pets" and not ds.has_splits
    assert ds.classes == ["bird", "cat", "dog"]
    assert [it.relpath for it in ds.items] == sorted(it.relpath for it in ds.items)
    assert [(it.relpath, it.label, it.split) for it in ds.items][:3] == [
        ("bird/img_00.png", 0, ""), ("cat/img_00.png", 1, ""), ("cat/img_01.png", 1, "")]
    for it in ds.items:
        assert ds.classes[it.label] == it.relpath.split("/")[0]
        st = (root / it.relpath).stat()
        assert it.size == st.st_size > 0 and it.mtime_ns == st.st_mtime_ns
    assert ds.counts() == {"": {"bird": 1, "cat": 2, "dog": 3}}
    assert sum(ds.ignored.values()) == 0


@pytest.mark.parametrize("split_names, expect", [
    (("train", "val"), ("train", "val")),
    (("train", "val", "test"), ("train", "val", "test")),
    (("train", "validation"), ("train", "val")),
    (("Train", "valid", "test"), ("train", "val", "test")),
    (("val", "test"), ("val", "test")),
])
def test_split_folders(tmp_path, split_names, expect):
    spec = {}
    for j, s in enumerate(split_names):
        spec[f"{s}/b"] = 1 + j
        spec[f"{s}/a"] = 2
    ds = discover(make_dataset(tmp_path / "d", spec))
    assert ds.has_splits and ds.classes == ["a", "b"]
    assert [it.relpath for it in ds.items] == sorted(it.relpath for it in ds.items)
    alias = dict(zip(split_names, expect))
    for it in ds.items:
        folder, cls = it.relpath.split("/")[:2]
        assert it.split == alias[folder] and ds.classes[it.label] == cls
    counts = ds.counts()
    assert set(counts) == set(expect)
    for j, (s, e) in enumerate(zip(split_names, expect)):
        assert counts[e] == {"a": 2, "b": 1 + j}


def test_recursive_subfolders_inside_a_class(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a" / "x.png", solid(5, 5))
    write_image(root / "a" / "sub" / "deeper" / "y.jpg", solid(5, 5))
    write_image(root / "b" / "2024" / "z.png", solid(5, 5))
    ds = discover(root)
    assert [(it.relpath, it.label) for it in ds.items] == [
        ("a/sub/deeper/y.jpg", 0), ("a/x.png", 0), ("b/2024/z.png", 1)]
    split_root = tmp_path / "s"
    write_image(split_root / "train" / "a" / "n" / "1.png", solid(5, 5))
    write_image(split_root / "train" / "b" / "2.png", solid(5, 5))
    write_image(split_root / "val" / "a" / "3.png", solid(5, 5))
    write_image(split_root / "val" / "b" / "m" / "k" / "4.png", solid(5, 5))
    ds = discover(split_root)
    assert [(it.relpath, it.label, it.split) for it in ds.items] == [
        ("train/a/n/1.png", 0, "train"), ("train/b/2.png", 1, "train"),
        ("val/a/3.png", 0, "val"), ("val/b/m/k/4.png", 1, "val")]


def test_hidden_files_and_folders_are_ignored_and_counted(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": 2, "b": 2})
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "a" / "._img_00.png").write_bytes(b"\x00\x05\x16\x07AppleDouble junk")  # macOS resource fork
    write_image(root / "b" / ".hidden" / "secret.png", solid(4, 4))
    write_image(root / "b" / ".hidden" / "secret2.png", solid(4, 4))
    write_image(root / ".trash" / "c" / "x.png", solid(4, 4))  # a hidden top-level folder is not a class
    write_image(root / "a" / ".thumb.jpg", solid(4, 4))
    ds = discover(root)
    assert ds.classes == ["a", "b"]
    assert [it.relpath for it in ds.items] == ["a/img_00.png", "a/img_01.png", "b/img_00.png", "b/img_01.png"]
    # root/.DS_Store, root/.trash, a/.DS_Store, a/._img_00.png, a/.thumb.jpg, b/.hidden (one folder)
    assert ds.ignored["hidden"] == 6
    assert not any("secret" in e or ".DS_Store" in e for e in ds.ignored_examples)


def test_non_image_files_are_ignored_and_counted(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": 2, "b": 1})
    (root / "a" / "README.txt").write_text("about these pictures\n")
    (root / "a" / "notes.csv").write_text("file,label\nimg_00.png,a\n")
    (root / "b" / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + b"\x00" * 100)
    (root / "b" / "BMW_notes.txt").write_text("BMW and BMX photos come next week\n")  # starts with 'BM'
    (root / "b" / "tiny").write_bytes(b"B")
    (root / "LICENSE").write_text("CC-BY\n")  # a loose file next to the class folders
    ds = discover(root)
    assert [it.relpath for it in ds.items] == ["a/img_00.png", "a/img_01.png", "b/img_00.png"]
    assert ds.ignored["not an image"] == 5
    assert ds.ignored["loose file"] == 1
    assert "a/README.txt" in ds.ignored_examples


def test_unreadable_entries_are_named_in_the_summary(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": 2, "b": 1})
    (root / "a" / "ghost.jpg").symlink_to(tmp_path / "moved_away.jpg")  # a dangling link
    ds = discover(root)
    assert ds.ignored["unreadable"] == 1 and len(ds.items) == 3
    assert ds.ignored_summary() == "1 unreadable (a/ghost.jpg: dangling symbolic link)"
    for i in range(4):
        (root / "b" / f"gone_{i}.png").symlink_to(tmp_path / f"nowhere_{i}.png")
    summary = discover(root).ignored_summary(names=3)
    assert summary == ("5 unreadable (a/ghost.jpg: dangling symbolic link, b/gone_0.png: dangling symbolic link, "
                       "b/gone_1.png: dangling symbolic link and 2 more)")


def test_content_sniffing_finds_images_without_an_image_extension(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": 1, "b": 1})
    png = rgb_bytes(solid(10, 12, RED))
    (root / "a" / "scan_0001").write_bytes(png)
    (root / "a" / "export.dat").write_bytes(png)
    (root / "b" / "photo.bin").write_bytes(rgb_bytes(noisy(16, 16), "JPEG"))
    (root / "b" / "anim.data").write_bytes(rgb_bytes(solid(8, 8, BLUE), "GIF"))
    (root / "b" / "pic.raw").write_bytes(rgb_bytes(solid(8, 8, BLUE), "BMP"))
    (root / "b" / "page.x").write_bytes(rgb_bytes(solid(8, 8, BLUE), "TIFF"))
    if features.check("webp"):
        (root / "b" / "web.blob").write_bytes(rgb_bytes(solid(8, 8, BLUE), "WEBP"))
    ds = discover(root)
    rels = {it.relpath for it in ds.items}
    assert {"a/scan_0001", "a/export.dat", "b/photo.bin", "b/anim.data", "b/pic.raw", "b/page.x"} <= rels
    assert ds.ignored["not an image"] == 0
    assert close(load_image(root / "a" / "export.dat", 8)[4, 4], RED)
    assert close(load_image(root / "a" / "scan_0001", 8)[4, 4], RED)


def test_sniff_signatures():
    assert sniff(rgb_bytes(solid(4, 4), "PNG")[:32]) == "png"
    assert sniff(rgb_bytes(solid(4, 4), "JPEG")[:32]) == "jpeg"
    assert sniff(rgb_bytes(solid(4, 4), "GIF")[:32]) == "gif"
    assert sniff(rgb_bytes(solid(4, 4), "BMP")[:32]) == "bmp"
    assert sniff(rgb_bytes(solid(4, 4), "TIFF")[:32]) == "tiff"
    if features.check("webp"):
        assert sniff(rgb_bytes(solid(4, 4), "WEBP")[:32]) == "webp"
    for junk in (b"", b"hello", b"BMW photos\n", b"%PDF-1.7", b"RIFF\x00\x00\x00\x00WAVEfmt "):
        assert sniff(junk) is None, junk


def test_extensions_in_any_case(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a" / "one.JPG", noisy(8, 8), "JPEG")
    write_image(root / "a" / "two.PnG", solid(8, 8), "PNG")
    write_image(root / "b" / "three.JPEG", noisy(8, 8), "JPEG")
    write_image(root / "b" / "four.Tiff", solid(8, 8), "TIFF")
    write_image(root / "b" / "five.BMP", solid(8, 8), "BMP")
    write_image(root / "b" / "six.GIF", solid(8, 8), "GIF")
    ds = discover(root)
    assert sorted(it.relpath for it in ds.items) == [
        "a/one.JPG", "a/two.PnG", "b/five.BMP", "b/four.Tiff", "b/six.GIF", "b/three.JPEG"]
    for it in ds.items:
        assert load_image(root / it.relpath, 8).shape == (8, 8, 3)


def test_undecodable_candidate_is_listed_not_dropped(tmp_path):
    """A file named like an image is a candidate even when its bytes are bad: extraction records the failure."""
    root = make_dataset(tmp_path / "d", {"a": 1, "b": 1})
    (root / "b" / "broken.jpg").write_text("not really a jpeg")
    ds = discover(root)
    assert "b/broken.jpg" in {it.relpath for it in ds.items}
    decode_error(load_image, root / "b" / "broken.jpg", 8)


def test_symlink_loop_does_not_repeat_images(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": 2, "b": 1})
    try:
        os.symlink(root / "a", root / "a" / "again")
        os.symlink(root, root / "b" / "up")
    except OSError:
        pytest.skip("symlinks are not available here")
    ds = discover(root)
    rels = [it.relpath for it in ds.items]
    assert len(rels) <= 3 + 2 + 3, rels  # each real file at most once more through a link, never endlessly
    assert len({(root / r).resolve() for r in rels}) == 3


def test_class_folder_linking_to_another_class(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": 2, "b": 1})
    try:
        os.symlink(root / "a", root / "c")
    except OSError:
        pytest.skip("symlinks are not available here")
    msg = dataset_error(root)
    assert "c" in msg and "already used" in msg


def test_hymenoptera_layout(shared_dir):
    ds = discover(shared_dir / "data/hymenoptera")
    assert ds.has_splits and ds.classes == ["ants", "bees"]
    counts = ds.counts()
    assert sum(counts["train"].values()) == 245 and sum(counts["val"].values()) == 153
    assert "train/ants/imageNotFound.gif" in {it.relpath for it in ds.items}


# ---- discovery errors ------------------------------------------------------------------------------------------


def test_error_missing_folder(tmp_path):
    msg = dataset_error(tmp_path / "nope")
    assert "nope" in msg and "does not exist" in msg


def test_error_file_instead_of_folder(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK\x03\x04")
    msg = dataset_error(f)
    assert "data.zip" in msg and "file" in msg and "folder" in msg


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no class folders" in dataset_error(tmp_path / "empty")
    (tmp_path / "only_files").mkdir()
    write_image(tmp_path / "only_files" / "x.png", solid(4, 4))
    (tmp_path / "only_files" / ".DS_Store").write_bytes(b"x")
    assert "no class folders" in dataset_error(tmp_path / "only_files")


def test_error_single_class(tmp_path):
    msg = dataset_error(make_dataset(tmp_path / "d", {"cats": 3}))
    assert "one class" in msg and "cats" in msg
    msg = dataset_error(make_dataset(tmp_path / "s", {"train/cats": 2, "val/cats": 1}))
    assert "one class" in msg and "cats" in msg


def test_error_class_without_images(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": 2, "b": 2})
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("todo: collect pictures")
    (root / "c" / ".DS_Store").write_bytes(b"x")
    msg = dataset_error(root)
    assert "no images" in msg and "c" in msg.split("no images")[0]
    root2 = make_dataset(tmp_path / "s", {"train/a": 1, "train/b": 1, "val/a": 1})
    (root2 / "val" / "b").mkdir()
    msg = dataset_error(root2)
    assert "no images" in msg and "val" in msg


def test_error_split_class_sets_differ(tmp_path):
    msg = dataset_error(make_dataset(tmp_path / "m", {"train/a": 1, "train/b": 1, "train/c": 1,
                                                      "val/a": 1, "val/b": 1}))
    assert "'val'" in msg and "'train'" in msg and "missing c" in msg
    msg = dataset_error(make_dataset(tmp_path / "x", {"train/a": 1, "train/b": 1,
                                                      "val/a": 1, "val/b": 1, "test/a": 1, "test/b": 1,
                                                      "test/zebra": 1}))
    assert "'test'" in msg and "extra zebra" in msg
    msg = dataset_error(make_dataset(tmp_path / "y", {"train/a": 1, "train/b": 1, "val/a": 1, "val/q": 1}))
    assert "missing b" in msg and "extra q" in msg


def test_error_split_folders_mixed_with_class_folders(tmp_path):
    msg = dataset_error(make_dataset(tmp_path / "d", {"train/a": 1, "train/b": 1, "dogs": 2}))
    assert "mixes split folders" in msg and "train" in msg and "dogs" in msg


def test_error_two_folders_for_one_split(tmp_path):
    msg = dataset_error(make_dataset(tmp_path / "d", {"train/a": 1, "train/b": 1, "val/a": 1, "val/b": 1,
                                                      "validation/a": 1, "validation/b": 1}))
    assert "same split" in msg


def test_error_empty_split_folder(tmp_path):
    root = make_dataset(tmp_path / "d", {"train/a": 1, "train/b": 1})
    (root / "val").mkdir()
    assert "no class folders" in dataset_error(root)


# ---- decoding: geometry ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["squash", "crop", "pad"])
@pytest.mark.parametrize("hw", [(30, 70), (70, 30), (40, 40), (1, 50), (3, 2)])
@pytest.mark.parametrize("size", [17, 32])
def test_output_shape_and_dtype(rule, hw, size):
    out = decode(rgb_bytes(noisy(*hw)), size, rule)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_unknown_resize_rule_is_a_value_error():
    with pytest.raises(ValueError, match="resize rule"):
        decode(rgb_bytes(solid(4, 4)), 8, "stretch")


def three_bands(h: int, w: int) -> np.ndarray:
    """Red | green | blue thirds along the long side."""
    a = solid(h, w, GREEN)
    if w >= h:
        a[:, : w // 3], a[:, w - w // 3:] = RED, BLUE
    else:
        a[: h // 3], a[h - h // 3:] = RED, BLUE
    return a


@pytest.mark.parametrize("hw", [(40, 120), (120, 40)])
def test_crop_keeps_the_centre(hw):
    h, w = hw
    a = solid(h, w, GREEN)  # green centre square, a bit wider than the crop; red and blue ends outside it
    if w > h:
        a[:, : w // 3 - 4], a[:, w - w // 3 + 4:] = RED, BLUE
    else:
        a[: h // 3 - 4], a[h - h // 3 + 4:] = RED, BLUE
    out = decode(rgb_bytes(a), 24, "crop")
    assert close(out.reshape(-1, 3).min(0), GREEN, 0) and close(out.reshape(-1, 3).max(0), GREEN, 0)
    edges = decode(rgb_bytes(three_bands(h, w)), 24, "crop")  # bands meet exactly at the crop's edges
    assert close(edges[12, 12], GREEN, 0) and not close(edges[0, 0], RED, 60) and not close(edges[-1, -1], BLUE, 60)


@pytest.mark.parametrize("hw", [(40, 120), (120, 40)])
def test_squash_keeps_everything(hw):
    out = decode(rgb_bytes(three_bands(*hw)), 24, "squash")
    first, last = (out[12, 0], out[12, -1]) if hw[1] > hw[0] else (out[0, 12], out[-1, 12])
    assert close(first, RED, 2) and close(last, BLUE, 2) and close(out[12, 12], GREEN, 2)


def test_pad_letterboxes_with_the_documented_colour():
    assert PAD_COLOUR == (124, 116, 104)
    wide = decode(rgb_bytes(solid(50, 100, RED)), 32, "pad")  # content rows 8..23
    assert close(wide[0, 16], PAD_COLOUR, 0) and close(wide[-1, 16], PAD_COLOUR, 0)
    assert close(wide[16, 0], RED, 0) and close(wide[16, -1], RED, 0)
    assert (np.abs(wide.astype(int) - PAD_COLOUR).sum(-1) == 0).sum() == 32 * 16
    tall = decode(rgb_bytes(solid(100, 50, BLUE)), 32, "pad")
    assert close(tall[16, 0], PAD_COLOUR, 0) and close(tall[16, -1], PAD_COLOUR, 0)
    assert close(tall[0, 16], BLUE, 0) and close(tall[-1, 16], BLUE, 0)
    square = decode(rgb_bytes(solid(40, 40, GREEN)), 32, "pad")
    assert close(square.reshape(-1, 3).min(0), GREEN, 0)


# ---- decoding: colour modes ------------------------------------------------------------------------------------


def dec_img(im: Image.Image, fmt: str = "PNG", size: int = 8, rule: str = "squash", **kw) -> np.ndarray:
    out = decode(encode(im, fmt, **kw), size, rule)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    return out


def test_greyscale_L_and_bilevel():
    out = dec_img(Image.new("L", (10, 10), 77))
    assert (out == 77).all()
    bw = Image.new("1", (10, 10), 0)
    bw.paste(1, (0, 0, 10, 5))
    out = dec_img(bw, size=10)
    assert (out[0] == 255).all() and (out[-1] == 0).all()


def i16(values: np.ndarray) -> Image.Image:
    im = Image.fromarray(values.astype(np.uint16))
    assert im.mode.startswith("I;16")
    return im


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_greyscale_scaled_by_1_over_257(fmt):
    arr = np.zeros((8, 8), np.uint16)
    arr[:, 2:4], arr[:, 4:6], arr[:, 6:] = 257 * 100, 32768, 65535
    out = decode(encode(i16(arr), fmt), 8, "squash")
    assert (out[:, 0] == 0).all() and (out[:, 3] == 100).all() and (out[:, 5] == 128).all()
    assert (out[:, 7] == 255).all()
    assert (out[..., 0] == out[..., 2]).all()


def test_dark_16bit_image_is_not_mistaken_for_8bit():
    """A 16-bit file whose values all happen to be <= 255 is still 16-bit: 200/65535 is nearly black."""
    out = decode(encode(i16(np.full((6, 6), 200)), "PNG"), 6, "squash")
    assert (out == 1).all()
    out = decode(encode(i16(np.full((6, 6), 0)), "PNG"), 6, "squash")
    assert (out == 0).all()


def test_float_tiff():
    arr = np.zeros((8, 8), np.float32)
    arr[:, 4:] = 0.5
    out = decode(encode(Image.fromarray(arr, "F"), "TIFF"), 8, "squash")
    assert (out[:, 0] == 0).all() and (out[:, 7] == 128).all()
    arr = np.zeros((8, 8), np.float32)
    arr[:, 2:4], arr[:, 4:6], arr[:, 6:] = 100.0, 300.0, -5.0
    out = decode(encode(Image.fromarray(arr, "F"), "TIFF"), 8, "squash")
    assert (out[:, 3] == 100).all() and (out[:, 5] == 255).all() and (out[:, 7] == 0).all()


def test_cmyk_jpeg_and_tiff():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    assert close(dec_img(cmyk, "JPEG", quality=95)[4, 4], (255, 0, 0), 10)
    assert close(dec_img(cmyk, "TIFF")[4, 4], (255, 0, 0), 0)
    grey = Image.new("CMYK", (16, 16), (0, 0, 0, 128))
    assert close(dec_img(grey, "JPEG", quality=95)[4, 4], (127, 127, 127), 6)


def test_palette_png():
    src = three_bands(12, 12)
    out = dec_img(Image.fromarray(src).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), size=12)
    assert close(out[6, 0], RED, 2) and close(out[6, 6], GREEN, 2) and close(out[6, -1], BLUE, 2)


def test_palette_png_with_transparency_goes_over_white():
    p = Image.new("P", (12, 12), 1)
    p.putpalette([0, 0, 0] + list(RED) + [0, 0, 0] * 254)
    p.paste(0, (0, 0, 12, 6))  # index 0 (black in the palette) is transparent
    out = dec_img(p, size=12, transparency=0)
    assert close(out[1, 6], (255, 255, 255), 0) and close(out[-2, 6], RED, 0)


def test_rgba_png_alpha_over_white():
    arr = np.zeros((12, 12, 4), np.uint8)  # fully transparent black
    arr[6:, :] = (*RED, 255)  # opaque red bottom half
    arr[6:, 9:] = (0, 0, 0, 128)  # half-transparent black corner
    out = dec_img(Image.fromarray(arr, "RGBA"), size=12)
    assert (out[:5] == 255).all()
    assert close(out[8, 3], RED, 0)
    assert close(out[-1, -1], (127, 127, 127), 1)


def test_la_png_alpha_over_white():
    arr = np.zeros((10, 10, 2), np.uint8)
    arr[5:] = (50, 255)
    out = dec_img(Image.fromarray(arr, "LA"), size=10)
    assert (out[:4] == 255).all() and (out[6:] == 50).all()


def test_greyscale_and_rgb_png_with_transparent_colour_go_over_white():
    """tRNS in a non-palette PNG marks one colour value as transparent."""
    l_img = Image.new("L", (10, 10), 50)
    l_img.paste(90, (0, 5, 10, 10))
    out = dec_img(l_img, size=10, transparency=50)
    assert (out[:4] == 255).all() and (out[6:] == 90).all()
    rgb = Image.fromarray(solid(10, 10, (1, 2, 3)))
    rgb.paste(RED, (0, 5, 10, 10))
    out = dec_img(rgb, size=10, transparency=(1, 2, 3))
    assert (out[:4] == 255).all(), out[0, 0]
    assert close(out[7, 5], RED, 0)


def test_premultiplied_modes_convert():
    from pipeline.data import _to_rgb  # Pillow can create these in memory; files never carry them

    la = Image.new("LA", (4, 4), (50, 255)).convert("La")
    assert close(np.asarray(_to_rgb(la))[0, 0], (50, 50, 50), 1)
    rgba = Image.new("RGBA", (4, 4), (*RED, 255)).convert("RGBa")
    assert close(np.asarray(_to_rgb(rgba))[0, 0], RED, 1)


def test_other_modes_convert():
    from pipeline.data import _to_rgb

    for mode in ("YCbCr", "HSV", "RGBX", "I", "PA", "I;16B"):
        out = np.asarray(_to_rgb(Image.new(mode, (3, 3))))
        assert out.shape == (3, 3, 3) and out.dtype == np.uint8, mode


# ---- decoding: containers --------------------------------------------------------------------------------------


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.fromarray(solid(10, 10, c)) for c in (RED, BLUE, GREEN)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    out = load_image(path, 8)
    assert close(out.reshape(-1, 3).min(0), RED, 6) and close(out.reshape(-1, 3).max(0), RED, 6)


def test_animated_gif_first_frame_smaller_than_canvas(tmp_path):
    """Later frames covering more of the canvas must not leak into frame 0."""
    f0 = Image.fromarray(solid(10, 10, RED))
    f1 = Image.fromarray(solid(10, 10, BLUE))
    path = tmp_path / "a.gif"
    f0.save(path, save_all=True, append_images=[f1], duration=50, disposal=2)
    assert close(load_image(path, 4)[2, 2], RED, 6)


def test_animated_png_and_webp_use_first_frame(tmp_path):
    frames = [Image.fromarray(solid(10, 10, c)) for c in (GREEN, RED)]
    frames[0].save(tmp_path / "a.png", save_all=True, append_images=frames[1:], duration=100)
    assert close(load_image(tmp_path / "a.png", 6)[3, 3], GREEN, 0)
    if features.check("webp"):
        frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=100,
                       lossless=True)
        assert Image.open(tmp_path / "a.webp").n_frames == 2
        assert close(load_image(tmp_path / "a.webp", 6)[3, 3], GREEN, 2)


def test_gif_named_jpg(tmp_path):
    path = write_image(tmp_path / "photo.jpg", solid(10, 14, BLUE), "GIF")
    assert close(load_image(path, 8)[4, 4], BLUE, 6)
    path = write_image(tmp_path / "picture.png", noisy(10, 14), "JPEG")
    assert load_image(path, 8).shape == (8, 8, 3)


@pytest.mark.parametrize("fmt, kw", [("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
                                     ("WEBP", {"lossless": True}), ("WEBP", {"quality": 90}),
                                     ("JPEG", {"quality": 95}), ("PNG", {}), ("GIF", {})])
def test_formats(tmp_path, fmt, kw):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    src = three_bands(20, 60)
    path = write_image(tmp_path / f"img.{fmt.lower()}", src, fmt, **kw)
    out = load_image(path, 30, "squash")
    assert close(out[15, 2], RED, 14) and close(out[15, 15], GREEN, 14) and close(out[15, -3], BLUE, 14)


def test_bmp_with_alpha_and_webp_with_alpha_go_over_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[4:] = (*BLUE, 255)
    path = write_image(tmp_path / "a.bmp", arr, "BMP")
    if Image.open(path).mode == "RGBA":
        out = load_image(path, 8)
        assert (out[:3] == 255).all() and close(out[6, 4], BLUE, 0)
    if features.check("webp"):
        out = load_image(write_image(tmp_path / "a.webp", arr, "WEBP", lossless=True), 8)
        assert (out[:3] == 255).all() and close(out[6, 4], BLUE, 0)


def test_multipage_tiff_uses_first_page(tmp_path):
    pages = [Image.fromarray(solid(12, 12, c)) for c in (GREEN, RED, BLUE)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert Image.open(path).n_frames == 3
    assert close(load_image(path, 6)[3, 3], GREEN, 0)


# ---- decoding: EXIF orientation and draft ----------------------------------------------------------------------


def oriented_jpeg(arr: np.ndarray, orientation: int, **kw) -> bytes:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif, quality=95, **kw)


def marked(h: int, w: int) -> np.ndarray:
    """Grey picture with a red block in the stored top-left corner."""
    a = solid(h, w, GREY)
    a[: h // 4, : w // 4] = RED
    return a


@pytest.mark.parametrize("orientation, k, corner", [
    (6, -1, (0, -1)),   # rotate 90 degrees clockwise to display: top-left goes to top-right
    (8, 1, (-1, 0)),    # rotate 90 degrees counter-clockwise: top-left goes to bottom-left
    (3, 2, (-1, -1)),   # rotate 180 degrees
    (1, 0, (0, 0)),
])
def test_exif_orientation(orientation, k, corner):
    src = marked(40, 80)  # wide as stored
    data = oriented_jpeg(src, orientation)
    shown = np.rot90(src, k)
    out = decode(data, 32, "squash")
    assert close(out[corner], RED, 16)
    expect = np.asarray(Image.fromarray(shown).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - expect).mean() < 3
    pad = decode(data, 32, "pad")
    tall = k in (1, -1)
    bar = (pad[16, 0], pad[16, -1]) if tall else (pad[0, 16], pad[-1, 16])
    assert close(bar[0], PAD_COLOUR, 0) and close(bar[1], PAD_COLOUR, 0), "letterbox on the wrong sides"


def test_exif_orientation_with_draft_on_a_large_jpeg():
    src = marked(900, 1800)
    data = oriented_jpeg(src, 6)
    out = decode(data, 64, "pad")  # tall after rotation: 32 wide content in the middle
    assert close(out[32, 0], PAD_COLOUR, 0) and close(out[32, 15], PAD_COLOUR, 0)
    assert close(out[2, 16 + 30], RED, 16) and close(out[-2, 16 + 1], GREY, 8)


def test_broken_exif_does_not_lose_the_picture():
    jpg = rgb_bytes(solid(16, 16, RED), "JPEG", quality=95)
    for payload in (b"Exif\x00\x00" + b"garbage!" * 4,
                    b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 20,
                    b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x63\x00"):
        seg = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
        out = decode(jpg[:2] + seg + jpg[2:], 8, "crop")
        assert close(out[4, 4], RED, 10)


@pytest.mark.parametrize("rule", ["squash", "crop", "pad"])
def test_large_jpeg_draft_matches_full_decode(rule):
    src = noisy(1500, 2100, seed=3)
    data = rgb_bytes(src, "JPEG", quality=90)
    out = decode(data, 224, rule)
    full = Image.open(io.BytesIO(data)).convert("RGB")  # full-size decode, no draft
    w, h = full.size
    if rule == "squash":
        ref = full.resize((224, 224), Image.Resampling.BILINEAR)
    elif rule == "crop":
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        ref = full.resize((224, 224), Image.Resampling.BILINEAR, box=box)
    else:
        nw, nh = 224, round(h * 224 / w)
        ref = Image.new("RGB", (224, 224), PAD_COLOUR)
        ref.paste(full.resize((nw, nh), Image.Resampling.BILINEAR), (0, (224 - nh) // 2))
    diff = np.abs(out.astype(int) - np.asarray(ref, int)).mean()
    assert diff < 3, diff


def _decoded_size(data: bytes, size: int, rule: str = "crop") -> tuple[int, int]:
    """The size (w, h) of the picture ``decode(data, size, rule)`` resizes last: what the JPEG decoder produced.

    That picture is :func:`decode_rgb`'s: its final resize is ``decode``'s output, pixel for pixel (checked here).
    """
    im = decode_rgb(data, size)
    assert np.array_equal(decode(data, size, rule), np.asarray(resize_region(im, size, rule)))
    return im.size


@pytest.mark.parametrize("h, w, size, scaled", [
    (300, 400, 64, (100, 75)),    # 2/8: the smallest M/8 leaving both sides >= 64 (1/8 would give 50 x 38)
    (300, 400, 224, (300, 225)),  # 6/8: a scale between 1/2 and 1, which Pillow's draft cannot do
    (300, 400, 256, (350, 263)),  # 7/8
    (300, 400, 299, (400, 300)),  # no smaller scale keeps 299 px: decoded at full size
    (200, 150, 224, (150, 200)),  # smaller than the input size: full size, then upscaled
])
def test_jpeg_is_decoded_at_the_smallest_dct_scale_that_keeps_the_input_size(h, w, size, scaled):
    """The pixel rule (headbench-pixels-3): JPEGs are decoded by libjpeg-turbo at the smallest scale M/8 (M = 1..8)
    that leaves both sides >= size, then resized; before, only Pillow's 1/2, 1/4, 1/8 ``draft`` scales were used."""
    pytest.importorskip("simplejpeg")
    data = encode(Image.fromarray(noisy(h, w)), "JPEG", quality=90)
    assert _decoded_size(data, size) == scaled
    assert decode(data, size, "crop").shape == (size, size, 3)


def test_mpo_is_decoded_at_a_reduced_scale_too():
    pytest.importorskip("simplejpeg")
    big = Image.fromarray(noisy(300, 400))
    try:
        mpo = encode(big, "MPO", save_all=True, append_images=[Image.fromarray(solid(300, 400))])
    except (KeyError, ValueError, OSError):
        pytest.skip("this Pillow cannot write MPO")
    assert _decoded_size(mpo, 64) == (100, 75)


@pytest.mark.parametrize("rule", ["squash", "crop", "pad"])
def test_without_the_libjpeg_turbo_binding_pillow_gives_close_pixels(monkeypatch, rule):
    """Without simplejpeg, JPEGs go through Pillow (power-of-two ``draft`` scaling only): the same picture."""
    import sys

    pytest.importorskip("simplejpeg")
    data = rgb_bytes(noisy(600, 800, seed=5), "JPEG", quality=90)
    fast = decode(data, 224, rule)
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import simplejpeg now raises ImportError
    slow = decode(data, 224, rule)
    assert _decoded_size(data, 224, rule) == (400, 300)  # Pillow's draft: 1/2
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 3


def test_cmyk_jpeg_goes_through_pillow():
    cmyk = Image.fromarray(noisy(300, 400)).convert("CMYK")
    assert _decoded_size(encode(cmyk, "JPEG"), 64) == (100, 75)  # Pillow's draft scale, and Pillow's CMYK conversion


def test_mpo_jpeg_uses_first_image():
    a, b = Image.fromarray(solid(40, 40, RED)), Image.fromarray(solid(40, 40, BLUE))
    try:
        data = encode(a, "MPO", save_all=True, append_images=[b])
    except (KeyError, ValueError, OSError):
        pytest.skip("this Pillow cannot write MPO")
    assert close(decode(data, 8)[4, 4], RED, 10)


# ---- decode failures -------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_empty_file(tmp_path):
    assert "empty" in str(decode_error(decode, b"", 8))
    (tmp_path / "e.jpg").write_bytes(b"")
    exc = decode_error(read_image, tmp_path / "e.jpg", 8)
    assert "empty" in str(exc) and exc.sha256 == hashlib.sha256(b"").hexdigest()


def test_truncated_jpeg(tmp_path):
    data = rgb_bytes(noisy(120, 160), "JPEG", quality=90)
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    exc = decode_error(load_image, path, 32)
    assert "truncated" in str(exc) and "jpeg" in str(exc)
    exc = decode_error(read_image, path, 32)
    assert exc.sha256 == hashlib.sha256(data[: len(data) // 2]).hexdigest()
    big = rgb_bytes(noisy(900, 1200), "JPEG", quality=90)  # draft path
    assert "truncated" in str(decode_error(decode, big[: len(big) // 2], 64))
    assert decode_error(decode, data[:200], 32)  # header only


def test_random_bytes_named_jpg(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    exc = decode_error(load_image, path, 16)
    assert "not a recognised image format" in str(exc)


def test_text_named_png(tmp_path):
    path = tmp_path / "readme.png"
    path.write_text("This is not a picture.\n" * 10)
    assert "not a recognised image format" in str(decode_error(load_image, path, 16))


def test_corrupted_png_chunks():
    png = rgb_bytes(noisy(30, 40), "PNG")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    assert "png" in str(decode_error(decode, bytes(bad_crc), 8))
    idat = png.index(b"IDAT")
    bad_data = bytearray(png)
    for i in range(idat + 20, idat + 60):
        bad_data[i] ^= 0x5A
    decode_error(decode, bytes(bad_data), 8)
    decode_error(decode, png[: len(png) // 2], 8)  # truncated PNG
    header = png[:33]  # signature + IHDR, nothing else
    decode_error(decode, header + png_chunk(b"IEND", b""), 8)


@pytest.mark.parametrize("data", [
    b"GIF89a" + b"\x01" * 40,
    b"BM" + b"\x01" * 40,
    b"II*\x00" + b"\x00" * 40,
    b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x01" * 40,
    b"\xff\xd8\xff\xe0" + b"\x00" * 10,
    b"\x89PNG\r\n\x1a\n",
])
def test_broken_headers_of_each_format(data):
    decode_error(decode, data, 8)


def test_decompression_bomb_header():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    assert "too large" in str(decode_error(decode, data, 8))


def test_read_image_missing_file_and_folder(tmp_path):
    exc = decode_error(read_image, tmp_path / "gone.jpg", 8)
    assert "cannot read" in str(exc)
    assert getattr(exc, "sha256", None) in (None, "")
    decode_error(load_image, tmp_path, 8)  # a folder


def test_read_image_returns_pixels_and_hash(tmp_path):
    path = write_image(tmp_path / "x.png", solid(5, 7, GREEN))
    px, digest = read_image(path, 4, "crop")
    assert px.shape == (4, 4, 3) and close(px[2, 2], GREEN, 0)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (load_image(path, 4, "crop") == px).all()


def test_corrupt_file_error_carries_sha256(tmp_path):
    path = tmp_path / "bad.png"
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50
    path.write_bytes(data)
    exc = decode_error(read_image, path, 8)
    assert exc.sha256 == hashlib.sha256(data).hexdigest()


# ---- real odd files --------------------------------------------------------------------------------------------


def test_shared_odd_images(shared_dir):
    folder = shared_dir / "data/odd_images"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert files
    decoded, failed = [], []
    for p in files:
        try:
            out = load_image(p, 224)
        except ImageDecodeError as exc:
            assert str(exc) and "\n" not in str(exc) and "object at 0x" not in str(exc), (p.name, str(exc))
            failed.append(p.name)
        else:
            assert out.shape == (224, 224, 3) and out.dtype == np.uint8, p.name
            decoded.append(p.name)
    tiffs = [p for p in files if p.suffix.lower() in (".tif", ".tiff")]
    for p in tiffs:
        try:
            Image.open(p).load()
        except Exception:
            assert p.name in failed, f"{p.name}: Pillow cannot open it, so it must be an ImageDecodeError"
    assert "multipage_rgb_skimage.tif" in failed or not (folder / "multipage_rgb_skimage.tif").exists()
    assert len(decoded) >= len(files) - 1, failed


def test_shared_odd_images_colours(shared_dir):
    folder = shared_dir / "data/odd_images"
    logo = folder / "rgba_logo_skimage.png"
    if not logo.exists():
        pytest.skip(f"{logo} is absent")
    im = Image.open(logo)
    assert im.mode == "RGBA"
    alpha = np.asarray(im.getchannel("A").resize((224, 224), Image.Resampling.BILINEAR))
    out = load_image(logo, 224)
    assert (out[alpha == 0] == 255).all()  # transparent background is white, never the stored (black) colour
    cam = load_image(folder / "gray_camera_skimage.png", 224)
    assert (cam[..., 0] == cam[..., 1]).all() and (cam[..., 1] == cam[..., 2]).all()


def test_hymenoptera_placeholder_gif(shared_dir):
    path = shared_dir / "data/hymenoptera/train/ants/imageNotFound.gif"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    out = load_image(path, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    for rule in ("crop", "pad"):
        assert load_image(path, 224, rule).shape == (224, 224, 3)

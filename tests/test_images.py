"""Tests of the image input layer (cnnlens.data): conversions, errors, directory expansion, samples."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from cnnlens.data import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SAMPLE_NAMES,
    ImageFailure,
    expand_paths,
    iter_images,
    load_image,
    load_image_bytes,
    sample_image,
    sample_images,
    write_sample_images,
)
from cnnlens.data import images as images_module
from cnnlens.errors import CnnlensError, ImageReadError

RED = (255, 0, 0)
BLUE = (0, 0, 255)


@pytest.fixture(autouse=True)
def _pil_globals_untouched() -> Iterator[None]:
    """Every test must leave PIL's process-wide settings exactly as it found them."""
    max_pixels = Image.MAX_IMAGE_PIXELS
    load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    assert max_pixels == Image.MAX_IMAGE_PIXELS
    assert load_truncated == ImageFile.LOAD_TRUNCATED_IMAGES


def save(im: Image.Image, path: Path, **kwargs: Any) -> Path:
    im.save(path, **kwargs)
    return path


def random_rgb(h: int = 16, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR declaring width x height, then IEND: no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_rgb_array(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (*shape, 3)
    assert arr.flags.c_contiguous
    assert arr.flags.writeable


# --------------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------------


def test_constants() -> None:
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"):
        assert ext in IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert ".eps" not in IMAGE_EXTENSIONS
    assert ".pdf" not in IMAGE_EXTENSIONS
    registered = Image.registered_extensions()
    assert all(ext in registered for ext in IMAGE_EXTENSIONS)
    assert DEFAULT_MAX_PIXELS == 100_000_000


# --------------------------------------------------------------------------------------------------
# modes and pixel values
# --------------------------------------------------------------------------------------------------


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    arr = random_rgb()
    out = load_image(save(Image.fromarray(arr), tmp_path / "rgb.png"))
    assert_rgb_array(out, (16, 24))
    np.testing.assert_array_equal(out, arr)


def test_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (3, 2), (1, 2, 3)), tmp_path / "x.png")
    np.testing.assert_array_equal(load_image(str(path)), load_image(path))


def test_gray_l(tmp_path: Path) -> None:
    out = load_image(save(Image.new("L", (5, 4), 77), tmp_path / "gray.png"))
    assert_rgb_array(out, (4, 5))
    assert (out == 77).all()


def test_bilevel_1(tmp_path: Path) -> None:
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)
    out = load_image(save(im, tmp_path / "bw.png"))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_la_alpha_composited(tmp_path: Path) -> None:
    im = Image.new("LA", (3, 1))
    im.putdata([(77, 255), (0, 0), (0, 128)])
    out = load_image(save(im, tmp_path / "la.png"))
    assert out[0, 0].tolist() == [77, 77, 77]  # opaque: unchanged
    assert out[0, 1].tolist() == [255, 255, 255]  # transparent: background
    assert out[0, 2].tolist() == [127, 127, 127]  # half: round((0*128 + 255*127) / 255)


def test_rgba_alpha_zero_gives_background(tmp_path: Path) -> None:
    path = save(Image.new("RGBA", (4, 3), (10, 200, 30, 0)), tmp_path / "clear.png")
    assert (load_image(path) == 255).all()
    out = load_image(path, background=(1, 2, 3))
    assert out[0, 0].tolist() == [1, 2, 3]


def test_rgba_opaque_and_partial(tmp_path: Path) -> None:
    im = Image.new("RGBA", (2, 1))
    im.putdata([(10, 200, 30, 255), (200, 100, 0, 51)])
    out = load_image(save(im, tmp_path / "rgba.png"), background=(0, 0, 0))
    assert out[0, 0].tolist() == [10, 200, 30]
    assert out[0, 1].tolist() == [40, 20, 0]  # 20% of the colour over black


def test_palette_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    out = load_image(save(im, tmp_path / "pal.png"))
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    path = save(im, tmp_path / "pal_t.png", transparency=1)  # index 1 (green) fully transparent
    out = load_image(path, background=(9, 9, 9))
    assert out[0].tolist() == [[255, 0, 0], [9, 9, 9], [0, 0, 255]]


def test_palette_with_partial_alpha_table(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putdata([0, 1])
    path = save(im, tmp_path / "pal_trns.png", transparency=bytes([0, 255]))
    out = load_image(path)
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_gif_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putdata([0, 1])
    out = load_image(save(im, tmp_path / "t.gif", transparency=0), background=(0, 0, 0))
    assert out[0].tolist() == [[0, 0, 0], [0, 0, 255]]


def test_cmyk_pure_cyan(tmp_path: Path) -> None:
    out = load_image(save(Image.new("CMYK", (3, 2), (255, 0, 0, 0)), tmp_path / "cyan.tif"))
    assert_rgb_array(out, (2, 3))
    np.testing.assert_allclose(out[0, 0].astype(int), [0, 255, 255], atol=2)


def test_ycbcr(tmp_path: Path) -> None:
    out = load_image(save(Image.new("YCbCr", (2, 2), (100, 90, 200)), tmp_path / "ycc.tif"))
    # Y=100, Cb=90, Cr=200 -> R = 100 + 1.402*72, G = 100 + 0.344*38 - 0.714*72, B = 100 - 1.772*38
    np.testing.assert_allclose(out[0, 0].astype(int), [201, 62, 33], atol=1)


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("I;16", "pgm")])
def test_sixteen_bit_uses_full_range(tmp_path: Path, mode: str, suffix: str) -> None:
    values = [0, 257, 32896, 65535]
    im = Image.new(mode, (4, 1))
    im.putdata(values)
    path = save(im, tmp_path / f"deep.{suffix}")
    with Image.open(path) as reread:  # PGM comes back as mode "I": both paths must agree
        assert reread.mode in ("I;16", "I;16B", "I;16L", "I")
    out = load_image(path)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all()
    assert (out[..., 0] == out[..., 2]).all()


def test_int32_mode_i_rules(tmp_path: Path) -> None:
    in_range = Image.new("I", (2, 1))
    in_range.putdata([65535, 32896])
    out = load_image(save(in_range, tmp_path / "i16range.tif"))
    assert out[0, :, 0].tolist() == [255, 128]  # treated as 16-bit

    wide = Image.new("I", (3, 1))
    wide.putdata([-1000, 0, 1000])
    out = load_image(save(wide, tmp_path / "wide.tif"))
    assert out[0, :, 0].tolist() == [0, 128, 255]  # min-max stretched


def test_float_mode_f_rules(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = load_image(save(Image.fromarray(unit), tmp_path / "unit.tif"))
    assert out[0, :, 0].tolist() == [0, 128, 255]

    byte_range = np.array([[0.0, 77.4, 200.0]], dtype=np.float32)
    out = load_image(save(Image.fromarray(byte_range), tmp_path / "bytes.tif"))
    assert out[0, :, 0].tolist() == [0, 77, 200]

    wide = np.array([[-2.0, 0.0, 2.0, np.nan, np.inf]], dtype=np.float32)
    out = load_image(save(Image.fromarray(wide), tmp_path / "wide.tif"))
    assert out[0, :, 0].tolist() == [0, 128, 255, 0, 255]


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, BLUE, (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    out = load_image(path)
    assert (out == np.array(RED, dtype=np.uint8)).all()


def test_multipage_tiff_gives_first_page(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (3, 2), BLUE), Image.new("RGB", (3, 2), RED)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    out = load_image(path)
    assert (out == np.array(BLUE, dtype=np.uint8)).all()


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_6_rotates(tmp_path: Path, suffix: str) -> None:
    # Stored 40 wide x 20 high, red block in the stored top-left corner, blue elsewhere.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:] = BLUE
    arr[:10, :10] = RED
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(im, tmp_path / f"rot.{suffix}", exif=exif.tobytes(), **({"quality": 95} if suffix == "jpg" else {}))
    out = load_image(path)
    assert out.shape == (40, 20, 3)  # dimensions swapped
    top_right = out[2, -3].astype(int)
    bottom_left = out[-3, 2].astype(int)
    np.testing.assert_allclose(top_right, RED, atol=40)  # stored top-left goes to displayed top-right
    np.testing.assert_allclose(bottom_left, BLUE, atol=40)
    assert out.flags.c_contiguous


def test_no_exif_keeps_orientation(tmp_path: Path) -> None:
    out = load_image(save(Image.new("RGB", (40, 20), RED), tmp_path / "plain.png"))
    assert out.shape == (20, 40, 3)


def test_other_formats(tmp_path: Path) -> None:
    arr = random_rgb(8, 6, seed=3)
    for suffix in ("bmp", "ppm", "tga", "webp"):
        kwargs = {"lossless": True} if suffix == "webp" else {}
        out = load_image(save(Image.fromarray(arr), tmp_path / f"x.{suffix}", **kwargs))
        np.testing.assert_array_equal(out, arr, err_msg=suffix)


def test_content_decides_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(png_bytes(random_rgb(4, 4)))
    assert load_image(path).shape == (4, 4, 3)


def test_load_image_bytes(tmp_path: Path) -> None:
    arr = random_rgb(5, 7)
    out = load_image_bytes(png_bytes(arr))
    assert_rgb_array(out, (5, 7))
    np.testing.assert_array_equal(out, arr)
    rgba = io.BytesIO()
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(rgba, format="PNG")
    assert load_image_bytes(rgba.getvalue(), background=(5, 6, 7))[0, 0].tolist() == [5, 6, 7]


def test_result_is_owned_and_writable(tmp_path: Path) -> None:
    out = load_image(save(Image.new("RGB", (2, 2), RED), tmp_path / "w.png"))
    out[0, 0] = 0  # must not raise (np.asarray(PIL image) is read-only)
    assert out.base is None or out.flags.owndata or out.base.flags.writeable


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def assert_read_error(exc_info: pytest.ExceptionInfo[ImageReadError], name: str, *words: str) -> None:
    message = str(exc_info.value)
    assert name in message
    for word in words:
        assert word in message.lower(), message
    assert isinstance(exc_info.value, CnnlensError)
    assert isinstance(exc_info.value, OSError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as exc_info:
        load_image(tmp_path / "nope.png")
    assert_read_error(exc_info, "nope.png", "no such file")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageReadError) as exc_info:
        load_image(folder)
    assert_read_error(exc_info, "folder.png", "directory")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path)
    assert_read_error(exc_info, "empty.jpg", "empty")


def test_text_renamed_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a picture\n" * 10)
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path)
    assert_read_error(exc_info, "notes.jpg", "not an image")


def test_unknown_extension_message(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path)
    assert_read_error(exc_info, "data.csv", "not an image", ".csv")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(random_rgb(64, 64)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path)
    assert_read_error(exc_info, path.name, "truncated")


@pytest.mark.parametrize(("cut", "words"), [(12, ("png", "truncated or corrupt")), (20, ("truncated",))])
def test_truncated_header(tmp_path: Path, cut: int, words: tuple[str, ...]) -> None:
    path = tmp_path / "stub.png"
    path.write_bytes(png_bytes(random_rgb())[:cut])
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path)
    assert_read_error(exc_info, "stub.png", *words)


def test_corrupt_data(tmp_path: Path) -> None:
    data = bytearray(png_bytes(random_rgb(32, 32)))
    data[200:260] = b"\x00" * 60  # clobber the middle of the compressed stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path)
    assert_read_error(exc_info, "corrupt.png", "corrupt")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_real(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (2, 2)), tmp_path / "secret.png")
    path.chmod(0)
    try:
        with pytest.raises(ImageReadError) as exc_info:
            load_image(path)
    finally:
        path.chmod(0o644)
    assert_read_error(exc_info, "secret.png", "permission denied")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(Image.new("RGB", (2, 2)), tmp_path / "locked.png")

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_module, "open", deny, raising=False)
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path)
    assert_read_error(exc_info, "locked.png", "permission denied")


def test_max_pixels_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(Image.new("RGB", (100, 50), RED), tmp_path / "big.png")
    decoded: list[object] = []
    original_load = ImageFile.ImageFile.load

    def spy_load(self: ImageFile.ImageFile) -> object:
        decoded.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path, max_pixels=4999)
    assert_read_error(exc_info, "big.png", "max_pixels", "100x50")
    assert decoded == []  # refused from the header alone
    assert load_image(path, max_pixels=5000).shape == (50, 100, 3)  # the limit is inclusive
    assert decoded


def test_max_pixels_header_only_file(tmp_path: Path) -> None:
    # The header claims 12000 x 10000 (over the default max_pixels, under PIL's own error limit) but
    # there is no pixel data at all: the size check must come first. PIL's warning must not leak.
    path = tmp_path / "claims_huge.png"
    path.write_bytes(png_header_only(12_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError) as exc_info:
            load_image(path)
    assert_read_error(exc_info, "claims_huge.png", "max_pixels", "12000x10000")


def test_pil_decompression_bomb_error_is_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))  # over 2 x PIL's default MAX_IMAGE_PIXELS
    with pytest.raises(ImageReadError) as exc_info:
        load_image(path, max_pixels=10**12)
    assert_read_error(exc_info, "bomb.png", "refusing", "max_image_pixels")
    with pytest.raises(ImageReadError):
        load_image_bytes(path.read_bytes(), name="bomb-bytes", max_pixels=10**12)


def test_pil_bomb_warning_not_leaked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # restored by monkeypatch
    path = save(Image.new("RGB", (15, 10), RED), tmp_path / "warn.png")  # 150: PIL warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).shape == (10, 15, 3)
    huge = save(Image.new("RGB", (20, 20), RED), tmp_path / "err.png")  # 400 > 2 x 100: PIL raises
    with pytest.raises(ImageReadError) as exc_info:
        load_image(huge)
    assert_read_error(exc_info, "err.png")


def test_pil_globals_unchanged_after_all_failures(tmp_path: Path) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    cut = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    Image.fromarray(random_rgb(64, 64)).save(buf, format="JPEG")
    cut.write_bytes(buf.getvalue()[:500])
    big = save(Image.new("RGB", (10, 10)), tmp_path / "big.png")
    for path, kwargs in ((cut, {}), (big, {"max_pixels": 10})):
        with pytest.raises(ImageReadError):
            load_image(path, **kwargs)  # type: ignore[arg-type]
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_image_bytes_errors() -> None:
    with pytest.raises(ImageReadError, match=r"upload\.png"):
        load_image_bytes(b"", name="upload.png")
    with pytest.raises(ImageReadError, match=r"upload\.png"):
        load_image_bytes(b"plain text, no picture here", name="upload.png")
    with pytest.raises(ImageReadError, match="<bytes>"):
        load_image_bytes(png_bytes(random_rgb())[:-40])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pixels": 0},
        {"max_pixels": -5},
        {"background": (0, 0)},
        {"background": (0, 0, 256)},
        {"background": [0, 0, 0]},
    ],
)
def test_invalid_options(tmp_path: Path, kwargs: dict[str, object]) -> None:
    path = save(Image.new("RGB", (2, 2)), tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"max_pixels|background"):
        load_image(path, **kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_no_file_handle_leak(tmp_path: Path) -> None:
    good = save(Image.fromarray(random_rgb()), tmp_path / "good.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:100])
    text = tmp_path / "text.png"
    text.write_text("hello")
    big = save(Image.new("RGB", (10, 10)), tmp_path / "big.png")

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    load_image(good)  # warm up lazy imports
    before = open_fds()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        for _ in range(20):
            load_image(good)
            for bad, kwargs in ((cut, {}), (text, {}), (big, {"max_pixels": 10})):
                with pytest.raises(ImageReadError):
                    load_image(bad, **kwargs)  # type: ignore[arg-type]
    assert open_fds() == before


# --------------------------------------------------------------------------------------------------
# expand_paths and iter_images
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    tiny = Image.new("RGB", (2, 2), RED)
    for name in ("b.png", "A.JPG", "c.Jpeg", ".hidden.png"):
        tiny.save(root / name, format="JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG")
    (root / "notes.txt").write_text("not an image")
    (root / "archive.zip").write_bytes(b"PK\x03\x04")
    (root / "sub").mkdir()
    tiny.save(root / "sub" / "d.png")
    (root / "sub" / "deeper").mkdir()
    tiny.save(root / "sub" / "deeper" / "e.bmp")
    (root / ".cache").mkdir()
    tiny.save(root / ".cache" / "f.png")
    (root / "dir.png").mkdir()  # a directory with an image-like name is not a file
    return root


def names(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_expand_directory(image_tree: Path) -> None:
    paths, failures = expand_paths([image_tree])
    assert failures == []
    assert names(paths, image_tree) == ["A.JPG", "b.png", "c.Jpeg"]
    assert all(p.parent == image_tree for p in paths)


def test_expand_directory_recursive(image_tree: Path) -> None:
    paths, failures = expand_paths([image_tree], recursive=True)
    assert failures == []
    assert names(paths, image_tree) == ["A.JPG", "b.png", "c.Jpeg", "sub/d.png", "sub/deeper/e.bmp"]


def test_expand_files_kept_as_given(image_tree: Path) -> None:
    given = [image_tree / "notes.txt", image_tree / ".hidden.png", image_tree / "b.png"]
    paths, failures = expand_paths(given)
    assert failures == []
    assert paths == given  # unknown extension and hidden files are kept when named explicitly


def test_expand_missing_and_empty(tmp_path: Path, image_tree: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    only_sub = tmp_path / "only_sub"
    (only_sub / "inner").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(only_sub / "inner" / "x.png")
    missing = tmp_path / "missing.png"
    paths, failures = expand_paths([missing, empty, image_tree / "b.png", only_sub])
    assert paths == [image_tree / "b.png"]
    assert [f.path for f in failures] == [str(missing), str(empty), str(only_sub)]
    assert all(isinstance(f, ImageFailure) for f in failures)
    assert "no such file" in failures[0].reason
    assert "no image files" in failures[1].reason
    assert "recursive" in failures[2].reason
    assert str(missing) in str(failures[0])
    paths, failures = expand_paths([only_sub], recursive=True)
    assert names(paths, only_sub) == ["inner/x.png"]
    assert failures == []


def test_expand_removes_duplicates(image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image_tree)
    paths, failures = expand_paths(["b.png", image_tree, "./b.png", image_tree / "sub" / ".." / "A.JPG"])
    assert failures == []
    assert paths == [Path("b.png"), image_tree / "A.JPG", image_tree / "c.Jpeg"]


def test_expand_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    try:
        link.symlink_to(tmp_path / "gone.png")
    except OSError:
        pytest.skip("symlinks not supported here")
    paths, failures = expand_paths([link])
    assert paths == []
    assert failures[0].path == str(link)
    assert "symbolic link" in failures[0].reason


def test_image_failure_is_frozen() -> None:
    failure = ImageFailure("a.png", "bad")
    with pytest.raises(AttributeError):
        failure.path = "b.png"  # type: ignore[misc]
    assert str(failure) == "a.png: bad"


def test_iter_images_continues_past_bad_files(tmp_path: Path) -> None:
    first = save(Image.new("RGB", (3, 2), RED), tmp_path / "1.png")
    bad = tmp_path / "2.jpg"
    bad.write_text("not a jpeg")
    missing = tmp_path / "3.png"
    last = save(Image.new("L", (2, 2), 9), tmp_path / "4.png")
    results = list(iter_images([first, bad, missing, last]))
    assert [r[0] for r in results] == [first, bad, missing, last]
    (_, img1, fail1), (_, img2, fail2), (_, img3, fail3), (_, img4, fail4) = results
    assert img1 is not None
    assert fail1 is None
    assert img1.shape == (2, 3, 3)
    assert img2 is None
    assert fail2 is not None
    assert "2.jpg" in fail2.reason
    assert fail2.path == str(bad)
    assert img3 is None
    assert fail3 is not None
    assert "no such file" in fail3.reason
    assert img4 is not None
    assert fail4 is None
    assert (img4 == 9).all()


def test_iter_images_passes_options(tmp_path: Path) -> None:
    path = save(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "a.png")
    ((_, img, fail),) = iter_images([path], background=(1, 2, 3))
    assert fail is None
    assert img is not None
    assert img[0, 0].tolist() == [1, 2, 3]
    ((_, img, fail),) = iter_images([path], max_pixels=15)
    assert img is None
    assert fail is not None
    assert "max_pixels" in fail.reason


def test_iter_images_is_lazy(tmp_path: Path) -> None:
    paths = [save(Image.new("RGB", (2, 2)), tmp_path / f"{i}.png") for i in range(3)]
    iterator = iter_images(paths)
    first = next(iterator)
    assert first[0] == paths[0]
    paths[2].unlink()  # deleted after the iteration started: reported when reached
    rest = list(iterator)
    assert rest[0][2] is None
    assert rest[1][2] is not None


def test_expand_then_iterate(image_tree: Path) -> None:
    paths, failures = expand_paths([image_tree], recursive=True)
    assert not failures
    loaded = [(p, img) for p, img, fail in iter_images(paths) if fail is None]
    assert len(loaded) == 5
    assert all(img is not None and img.shape == (2, 2, 3) for _, img in loaded)


# --------------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------------


def test_sample_names() -> None:
    assert {"chelsea", "coffee", "astronaut", "rocket", "motorcycle_left"} <= set(SAMPLE_NAMES)
    assert len(set(SAMPLE_NAMES)) == len(SAMPLE_NAMES)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_image_loads_offline(name: str) -> None:
    image = sample_image(name)
    assert image.ndim == 3
    assert image.shape[2] == 3
    assert image.shape[0] >= 100
    assert image.shape[1] >= 100
    assert image.dtype == np.uint8
    assert image.flags.c_contiguous
    assert image.flags.writeable
    assert image.std() > 10  # a real picture, not a blank


def test_sample_image_unknown_name() -> None:
    with pytest.raises(ImageReadError) as exc_info:
        sample_image("kitten")
    message = str(exc_info.value)
    assert "kitten" in message
    assert all(name in message for name in SAMPLE_NAMES)


def test_sample_images() -> None:
    images = sample_images(["coffee", "chelsea"])
    assert list(images) == ["coffee", "chelsea"]
    assert images["chelsea"].shape == (300, 451, 3)
    with pytest.raises(ImageReadError):
        sample_images(["coffee", "nope"])


def test_write_sample_images(tmp_path: Path) -> None:
    out_dir = tmp_path / "new" / "samples"
    written = write_sample_images(out_dir, names=["chelsea", "rocket"])
    assert written == [out_dir / "chelsea.png", out_dir / "rocket.png"]
    for path, name in zip(written, ["chelsea", "rocket"], strict=True):
        np.testing.assert_array_equal(load_image(path), sample_image(name))
    paths, failures = expand_paths([out_dir])
    assert paths == written
    assert not failures
    with pytest.raises(ImageReadError):
        write_sample_images(tmp_path / "other", names=["nope"])
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("cmap", ["jet", "viridis", "gray", "RdBu_r", "inferno", "tab10"])
def test_colorize_lookup_equals_matplotlib_colours(cmap: str) -> None:
    from matplotlib import colormaps

    from cnnlens.imaging import colorize, to_uint8

    rng = np.random.default_rng(1)
    values = np.concatenate(
        [rng.random(4000), [0.0, 1.0, np.nextafter(1.0, 0.0), 0.5, 1 / 256, np.nextafter(1 / 256, 0.0), -0.2, 1.3]]
    ).reshape(-1, 8)
    expected = to_uint8(np.asarray(colormaps[cmap](np.clip(values, 0.0, 1.0)))[..., :3])
    np.testing.assert_array_equal(colorize(values, cmap), expected)

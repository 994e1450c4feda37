"""engine/images.py: loading rules (modes, EXIF, limits, bad files), tensors, the size policy, PNG output."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit_engine.engine.files import atomic, images
from diffedit_engine.engine.files.images import ImageError


def save(tmp_path, im, name="x.png", **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def px(im, xy=(0, 0)):
    return im.getpixel(xy)


# ---- modes ------------------------------------------------------------------------------------------------

def test_rgb_is_unchanged(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = images.load_image(save(tmp_path, Image.fromarray(a)))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), a)


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((2, 3, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white (not red, not black)
    a[0, 1] = (255, 0, 0, 255)    # opaque red stays red
    a[0, 2] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    out = images.load_image(save(tmp_path, Image.fromarray(a, "RGBA")))
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == (255, 255, 255)
    assert px(out, (1, 0)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in px(out, (2, 0)))


def test_la_composited_on_white(tmp_path):
    im = Image.new("LA", (2, 1), (0, 0))
    im.putpixel((1, 0), (50, 255))
    out = images.load_image(save(tmp_path, im))
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (50, 50, 50)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1), 0)
    im.putpalette([10, 20, 30, 200, 0, 0] + [0] * (256 * 3 - 6))
    im.putpixel((1, 0), 1)
    p = save(tmp_path, im, transparency=0)  # palette entry 0 transparent
    out = images.load_image(p)
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (200, 0, 0)
    p2 = save(tmp_path, im, "opaque.png")
    assert px(images.load_image(p2), (0, 0)) == (10, 20, 30)


def test_cmyk(tmp_path):
    im = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure cyan-free magenta+yellow = red
    out = images.load_image(save(tmp_path, im, "c.jpg", quality=100))
    r, g, b = px(out)
    assert r > 240 and g < 20 and b < 20


def test_sixteen_bit_scaled(tmp_path):
    a = np.array([[0, 257 * 100, 65535, 128]], dtype=np.uint16)
    p = save(tmp_path, Image.fromarray(a))
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(images.load_image(p))
    assert out[0, :, 0].tolist() == [0, 100, 255, 0] and (out[..., 0] == out[..., 2]).all()


def test_int32_and_float_modes():
    i32 = Image.fromarray(np.array([[-5, 65535, 70000, 257 * 3]], dtype=np.int32), "I")
    assert np.asarray(images.to_rgb(i32))[0, :, 0].tolist() == [0, 255, 255, 3]
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(images.to_rgb(f01))[0, :, 1].tolist() == [0, 128, 255]
    f255 = Image.fromarray(np.array([[0.0, 100.4, 300.0, np.nan]], dtype=np.float32), "F")
    assert np.asarray(images.to_rgb(f255))[0, :, 1].tolist() == [0, 100, 255, 0]


def test_grayscale_and_bilevel(tmp_path):
    out = images.load_image(save(tmp_path, Image.new("L", (2, 2), 77)))
    assert px(out) == (77, 77, 77)
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    out = images.load_image(save(tmp_path, one, "b.png"))
    assert px(out, (0, 0)) == (0, 0, 0) and px(out, (1, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # left half red, right half blue (stored pixels)
    a[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    p = save(tmp_path, Image.fromarray(a), exif=exif.tobytes())
    out = images.load_image(p)
    assert out.size == (10, 20)  # displayed portrait
    assert px(out, (5, 2)) == (255, 0, 0) and px(out, (5, 17)) == (0, 0, 255)  # left -> top after CW rotation


# ---- limits and bad files ---------------------------------------------------------------------------------

def _png_header_only(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def assert_one_line(err, *words):
    msg = str(err)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_pixel_limit(tmp_path):
    p = save(tmp_path, Image.new("RGB", (100, 60)))
    with pytest.raises(ImageError) as e:
        images.load_image(p, max_pixels=5000)
    assert_one_line(e.value, str(p), "6000 pixels", "limit of 5000")
    assert images.load_image(p, max_pixels=6000).size == (100, 60)


def test_decompression_bomb_error(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(40000, 40000))  # 1.6 G pixels declared in a 60-byte file
    with pytest.raises(ImageError) as e:
        images.load_image(p, max_pixels=None)
    assert_one_line(e.value, str(p), "decompression bomb")


def test_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    p = save(tmp_path, Image.new("RGB", (40, 40)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: Pillow only warns (< 2× the limit)
    with pytest.raises(ImageError) as e:
        images.load_image(p, max_pixels=None)
    assert_one_line(e.value, "decompression bomb")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated(tmp_path, fmt):
    a = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    p = save(tmp_path, Image.fromarray(a), f"t.{fmt}")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ImageError) as e:
        images.load_image(p)
    assert_one_line(e.value, str(p), "truncated")


def test_non_image_missing_empty_dir(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("hello, not a picture")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, words in [(txt, ["not an image"]), (tmp_path / "nope.png", ["no such file"]),
                        (empty, ["empty file"]), (tmp_path, ["directory"])]:
        with pytest.raises(ImageError) as e:
            images.load_image(path)
        assert_one_line(e.value, str(path), *words)
        assert isinstance(e.value, ValueError)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable(tmp_path):
    p = save(tmp_path, Image.new("RGB", (4, 4)))
    p.chmod(0)
    with pytest.raises(ImageError, match="cannot read"):
        images.load_image(p)


def test_bundled_sample_loads():
    from diffedit_engine.cli import sample_image

    im = images.load_image(sample_image())
    assert im.size == (451, 300) and im.mode == "RGB"
    assert (sample_image().parent / "PROVENANCE.md").is_file()


# ---- tensors and the size policy --------------------------------------------------------------------------

def test_tensor_round_trip():
    a = np.random.default_rng(2).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    t = images.to_tensor(Image.fromarray(a))
    assert t.shape == (3, 9, 13) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert np.array_equal(np.asarray(images.to_pil(t)), a)
    assert images.to_pil(t[None]).size == (13, 9)
    m = images.to_pil(torch.tensor([[0.0, 1.0, 2.0, float("nan")]]))
    assert m.mode == "L" and np.asarray(m).ravel().tolist() == [0, 255, 255, 0]


@pytest.mark.parametrize("h,w", [(13, 21), (16, 24), (1, 9), (300, 451)])
def test_pad_crop_round_trip(h, w):
    x = torch.rand(2, 3, h, w)
    xp, size = images.pad_to_multiple(x, 8)
    assert size == (h, w) and xp.shape[-2] % 8 == 0 and xp.shape[-1] % 8 == 0
    assert xp.shape[-2] - h < 8 and xp.shape[-1] - w < 8
    assert torch.equal(images.crop_to(xp, size), x)
    assert torch.equal(xp[..., h:, :w], x[..., h - 1:h, :].expand(2, 3, xp.shape[-2] - h, w))   # bottom rows repeat
    assert torch.equal(xp[..., :, w:], xp[..., :, w - 1:w].expand(2, 3, xp.shape[-2], xp.shape[-1] - w))
    if (h, w) == (16, 24):
        assert xp is x


def test_pad_any_dtype_and_rank():
    b = torch.zeros(5, 7, dtype=torch.bool)
    b[-1, -1] = True
    bp, _ = images.pad_to_multiple(b, 4)
    assert bp.shape == (8, 8) and bp[7, 7] and bp.dtype == torch.bool


# ---- PNG output -------------------------------------------------------------------------------------------

def test_save_png_with_parameters(tmp_path):
    text = images.format_parameters("a dog", "blurry", {"Steps": 5, "Seed": 1, "DiffEdit": "cat -> dog, x: y",
                                                        "Skip": None})
    assert text == 'a dog\nNegative prompt: blurry\nSteps: 5, Seed: 1, DiffEdit: "cat -> dog, x: y"'
    p = images.save_png(torch.rand(3, 8, 8), tmp_path / "o.png", text, {"note": "∅ → ünïcode"})
    meta = images.read_png_text(p)
    assert meta["parameters"] == text and meta["note"] == "∅ → ünïcode"
    assert sorted(os.listdir(tmp_path)) == ["o.png"]  # no temp file left behind
    assert (p.stat().st_mode & 0o777) != 0o600       # normal permissions, not mkstemp's


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["x.json"]

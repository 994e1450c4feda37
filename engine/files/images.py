"""Image I/O for the engine: loading with stated conversion rules, tensors, the size policy, PNG output.

Loading rules (load_image):
- EXIF orientation is applied (the pixels are rotated/flipped as a viewer shows them); the tag is dropped.
- Animated / multi-page files: the first frame.
- RGBA, LA, PA, RGBa, La: composited over opaque white (out = a·c + (1 − a)·255), so a transparent
  background becomes white, not black or the hidden colour under alpha 0.
- P (palette): expanded to RGBA (honours a transparency entry), then composited over white as above.
- CMYK: Pillow's conversion (R = 255 − min(255, C + K), …); no colour management of embedded ICC profiles.
- I;16 (any byte order): 16-bit → 8-bit as round(v / 257), i.e. 0 → 0 and 65535 → 255, linear.
- I (32-bit integers; older Pillow opens 16-bit PNGs as I): values are taken as 16-bit, clipped to
  [0, 65535], then as I;16.
- F (32-bit float): if the maximum is ≤ 1 the data is read as [0, 1] (×255), otherwise as 0–255; clipped,
  rounded. NaN → 0.
- L, 1 (grayscale, bilevel) and every other mode Pillow can convert (YCbCr, LAB, HSV): converted to RGB,
  gray replicated to the three channels.
- Only regular files are opened (a FIFO, device, socket or directory is refused from os.stat, before
  anything is read); a file-size limit (default MAX_BYTES, 256 MiB) is checked from stat; only the formats
  in FORMATS are tried; a pixel limit (default MAX_PIXELS) is checked from the header before any decoding.
  These, Pillow's decompression-bomb warning/error, truncated or corrupt data, and non-image files all
  raise ImageError, one line naming the file and the problem.

Size policy (pad_to_multiple / crop_to): SD works on latents 1/8 of the image size, so an image whose height
or width is not a multiple of 8 is padded on the right and bottom by edge replication (the last row/column
repeated) up to the next multiple of 8, edited, and the result cropped back to the input's exact size.
Replication (not zeros or reflection) keeps the padded strip close to its neighbours, so the VAE and the
mask pass see no artificial edge; the strip is < 8 px and never reaches the output.
"""
import io
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from . import atomic

MAX_PIXELS = 2048 * 2048  # default limit: 4.2 MP (a 2048² SD edit is already far beyond its training size)
MAX_BYTES = 256 << 20  # default file-size limit: 256 MiB (a 4.2 MP image is ≤ 17 MB even as raw 16-bit RGB TIFF)
# The raster formats read. Pillow's other plugins are not even tried: some decode through external programs
# (EPS runs Ghostscript) or parse rarely-used container formats, none of which a photo edit needs.
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF", "PPM", "TGA", "ICO", "AVIF", "HEIF")


class ImageError(ValueError):
    """An input image that cannot be used; the message is one line naming the file and the problem."""


def _fail(path, problem: str) -> ImageError:
    return ImageError(f"{path}: {problem}")


def _formats() -> list[str]:
    Image.init()  # registers every plugin; the formats this Pillow build lacks (AVIF, HEIF) are left out
    return [f for f in FORMATS if f in Image.OPEN]


def open_regular(path, max_bytes: int | None = MAX_BYTES, what: str = "file"):
    """Open `path` for binary reading only if it is a regular file of at most max_bytes; raise ImageError
    (one line) otherwise. Returns (file object, size).

    The type and size come from os.stat before anything is opened, so /dev/zero, a FIFO, a socket or a
    directory fails at once instead of hanging or filling memory. The open itself is O_NONBLOCK (a FIFO
    swapped in between stat and open cannot block it) and is checked again with fstat."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except OSError as e:
        raise _fail(path, f"cannot read the file ({e.strerror or e})") from None
    _check_stat(path, st, max_bytes, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _fail(path, f"cannot read the file ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        _check_stat(path, st, max_bytes, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _check_stat(path: Path, st: os.stat_result, max_bytes: int | None, what: str) -> None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise _fail(path, f"is a directory, not {_article(what)}")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise _fail(path, f"is {kind}, not {_article(what)}; only regular files are read")
    if max_bytes is not None and st.st_size > max_bytes:
        raise _fail(path, f"file size {st.st_size} bytes exceeds the limit of {max_bytes} bytes "
                          f"({max_bytes / 2**20:g} MiB)")


def _article(what: str) -> str:
    return f"an {what}" if what[:1] in "aeiou" else f"a {what}"


def load_image(path, max_pixels: int | None = MAX_PIXELS, max_bytes: int | None = MAX_BYTES) -> Image.Image:
    """Read `path` as an RGB PIL image by the rules in the module docstring; raise ImageError otherwise.

    Order of checks, each before any more work: a regular file (open_regular: no FIFO, device, socket or
    directory), at most max_bytes bytes (from stat), a format in FORMATS and at most max_pixels pixels (from
    Pillow's lazy header parse), then the pixel data is decoded. None disables a limit."""
    path = Path(path)
    f, size = open_regular(path, max_bytes, "image file")
    with f:
        if size == 0:
            raise _fail(path, "empty file, not an image")
        with warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; treat the warning as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(f, formats=_formats())
            except UnidentifiedImageError:
                raise _fail(path, f"not an image (or not one of the formats read: {', '.join(FORMATS)})") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise _fail(path, f"refused as a possible decompression bomb ({e})") from None
            except OSError as e:
                raise _fail(path, f"cannot read the file ({e.strerror or e})") from None
            except Exception as e:  # corrupt headers raise SyntaxError/ValueError/OSError depending on the format
                raise _fail(path, f"corrupt image header ({type(e).__name__}: {e})") from None
            w, h = im.size
            if w <= 0 or h <= 0:
                raise _fail(path, f"image has an empty size {w}x{h}")
            if max_pixels is not None and w * h > max_pixels:
                raise _fail(path, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels "
                                  f"(raise it with --max-pixels, or resize the image)")
            try:
                im.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise _fail(path, f"refused as a possible decompression bomb ({e})") from None
            except Exception as e:
                raise _fail(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not make an otherwise good image unusable
        pass
    return to_rgb(im, path)


def to_rgb(im: Image.Image, path="<image>") -> Image.Image:
    """Convert any Pillow mode to RGB by the rules in the module docstring."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")  # un-premultiplies RGBa/La, replicates gray for LA
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im)
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            if a.size and a.max() <= 1.0:
                a = a * 255.0
            a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:  # I;16, I;16B, I;16L, I;16N, I: 16-bit range
            a = np.clip(a.astype(np.int64), 0, 65535)
            a8 = ((a * 2 + 257) // (2 * 257)).astype(np.uint8)  # round(v / 257) in integers
        if a8.ndim == 3:  # e.g. 16-bit RGB decoded by a plugin as an array with channels
            a8 = a8[..., :3]
            return Image.fromarray(np.ascontiguousarray(a8), "RGB")
        return Image.fromarray(a8, "L").convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    except Exception as e:
        raise _fail(path, f"unsupported image mode {mode!r} ({e})") from None


def to_tensor(pil: Image.Image) -> torch.Tensor:
    """PIL RGB (or L) image -> (3, H, W) float32 in [0, 1]."""
    if pil.mode != "RGB":
        pil = to_rgb(pil)
    a = np.asarray(pil, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0).contiguous()


def to_pil(t: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) -> RGB image; (H, W) or (1, H, W) -> L image. Values in [0, 1], clipped."""
    t = t.detach().to("cpu", torch.float32)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    a = torch.nan_to_num(t, nan=0.0).clamp(0, 1).mul(255).round().to(torch.uint8)
    if a.ndim == 2:
        return Image.fromarray(a.numpy(), "L")
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"to_pil expects (3,H,W) or (H,W), got {tuple(t.shape)}")
    return Image.fromarray(a.permute(1, 2, 0).contiguous().numpy(), "RGB")


def as_tensor(image) -> torch.Tensor:
    """A PIL image or a (3, H, W) tensor in [0, 1] -> (3, H, W) float tensor."""
    return to_tensor(image) if isinstance(image, Image.Image) else image


def pad_to_multiple(x: torch.Tensor, m: int = 8):
    """Replicate-pad the right and bottom of a (..., H, W) tensor up to multiples of m.

    Returns (x_padded, (H, W)) with the original size, for crop_to. x itself is returned when no padding
    is needed. Works for any dtype and any number of leading dims."""
    h, w = x.shape[-2:]
    ph, pw = math.ceil(h / m) * m, math.ceil(w / m) * m
    if (ph, pw) == (h, w):
        return x, (h, w)
    rows = torch.arange(ph, device=x.device).clamp_(max=h - 1)  # indices past the edge repeat the last row
    cols = torch.arange(pw, device=x.device).clamp_(max=w - 1)
    return x.index_select(-2, rows).index_select(-1, cols), (h, w)


def crop_to(x: torch.Tensor, size) -> torch.Tensor:
    """Crop a (..., H', W') tensor to its top-left (..., H, W): undoes pad_to_multiple."""
    h, w = size
    return x[..., :h, :w]


# ---- PNG output -------------------------------------------------------------------------------------------

def format_parameters(prompt: str, negative_prompt: str = "", settings: dict | None = None) -> str:
    """The A1111 `parameters` text: prompt line, optional 'Negative prompt:' line, then 'Key: value, ...'.

    Values containing ',' ':' or newlines are JSON-quoted, as A1111 does, so readers can split the line."""
    import json

    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    if settings:
        items = []
        for k, v in settings.items():
            if v is None:
                continue
            s = str(v)
            if any(c in s for c in ",:\n"):
                s = json.dumps(s, ensure_ascii=False)
            items.append(f"{k}: {s}")
        lines.append(", ".join(items))
    return "\n".join(lines)


SOFTWARE = "diffedit-engine"


def png_bytes(image, parameters: str | None = None, text: dict | None = None) -> bytes:
    """A PIL image or (3,H,W)/(H,W) tensor encoded as PNG, with a `parameters` tEXt/iTXt chunk.

    `text` adds more text chunks (key -> str)."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    info = PngImagePlugin.PngInfo()
    chunks = {"Software": SOFTWARE, **(text or {})}  # marks the file as the engine's (outputs.foreign_files)
    if parameters is not None:
        chunks = {"parameters": parameters, **chunks}
    for k, v in chunks.items():
        v = str(v)
        try:
            v.encode("latin-1")
            info.add_text(k, v)
        except UnicodeEncodeError:  # tEXt is latin-1 only; iTXt carries UTF-8 (A1111 does the same)
            info.add_itxt(k, v)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image, path, parameters: str | None = None, text: dict | None = None) -> Path:
    """Write png_bytes(image, parameters, text) to `path` atomically."""
    atomic.write_bytes(path, png_bytes(image, parameters, text))
    return Path(path)


def read_png_text(path) -> dict:
    """The text chunks of a PNG (e.g. ['parameters'])."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})

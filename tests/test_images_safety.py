"""Bounded, typed reading of input images (issue 10, item 2): only regular files, a size limit from stat,
the format and pixel count from Pillow's header, all before any pixel is decoded; each failure fast."""
import os
import socket
import threading
import time

import pytest
from PIL import Image

from diffedit_engine.engine.files import images
from diffedit_engine.engine.files.images import ImageError


def fails_fast(path, *words, **kw):
    """load_image(path) raises a one-line ImageError naming the path and `words`, in well under a second."""
    result = {}

    def target():
        try:
            images.load_image(path, **kw)
            result["err"] = None
        except Exception as e:  # noqa: BLE001 - the test checks the type below
            result["err"] = e

    t0 = time.monotonic()
    th = threading.Thread(target=target, daemon=True)  # a hang must fail the test, not the whole run
    th.start()
    th.join(5)
    assert not th.is_alive(), f"load_image({path}) hung"
    assert time.monotonic() - t0 < 2
    err = result["err"]
    assert isinstance(err, ImageError), err
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this OS")
def test_fifo_fails_at_once(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading without O_NONBLOCK would block forever
    fails_fast(fifo, "FIFO")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_fails_at_once():
    fails_fast("/dev/zero", "character device")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_symlink_to_device_fails(tmp_path):
    link = tmp_path / "z.png"
    link.symlink_to("/dev/zero")
    fails_fast(link, "character device")


def test_directory_and_socket(tmp_path):
    fails_fast(tmp_path, "directory")
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no unix sockets")
    path = tmp_path / "s.png"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        fails_fast(path, "socket")
    finally:
        s.close()


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk space, no time; reading it would still cost `size` bytes
    return path


def test_large_sparse_file_refused_from_stat(tmp_path):
    p = sparse(tmp_path / "big.png", 2 << 30)
    msg = fails_fast(p, "exceeds the limit", str(images.MAX_BYTES))
    assert "2147483648" in msg


def test_size_limit_is_configurable(tmp_path):
    im = tmp_path / "ok.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(im)
    n = im.stat().st_size
    fails_fast(im, "exceeds the limit of 10 bytes", max_bytes=10)
    assert images.load_image(im, max_bytes=n).size == (16, 16)
    assert images.load_image(im, max_bytes=None).size == (16, 16)


def test_large_sparse_non_image_under_the_limit_is_not_read(tmp_path):
    # With the size limit off, Pillow's header check still refuses it after reading a few bytes.
    p = sparse(tmp_path / "big.bin", 1 << 30)
    fails_fast(p, "not an image", max_bytes=None)


def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "wide.png"
    Image.new("L", (4000, 10)).save(p)
    called = []
    monkeypatch.setattr(Image.Image, "load", lambda self: called.append(1))
    fails_fast(p, "40000 pixels exceeds the limit of 1000", max_pixels=1000)
    assert not called


def test_formats_outside_the_list_are_not_tried(tmp_path):
    # An EPS header: Pillow's EPS plugin would run Ghostscript to decode it; it is never even identified.
    p = tmp_path / "x.png"
    p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    fails_fast(p, "not an image")
    assert "EPS" not in images.FORMATS


def test_open_regular_returns_a_bounded_reader(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"hello")
    f, size = images.open_regular(p, max_bytes=5)
    with f:
        assert size == 5 and f.read() == b"hello"
    with pytest.raises(ImageError, match="no such file"):
        images.open_regular(tmp_path / "missing")

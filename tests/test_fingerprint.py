"""Resume fingerprints (issue 10, item 5): content, settings and model."""
import os
import time

import pytest

from diffedit_engine.engine.jobs import fingerprint as fp
from diffedit_engine.engine.files.images import ImageError


def test_fingerprint_and_changes(tmp_path):
    p = tmp_path / "in.png"
    p.write_bytes(b"photo one")
    rec = fp.fingerprint(p)
    assert rec["size"] == 9 and rec["mtime_ns"] == os.stat(p).st_mtime_ns and len(rec["sha256"]) == 64
    assert fp.unchanged(p, rec)
    st = os.stat(p)
    p.write_bytes(b"photo two")  # same size, replaced in place, mtime put back (cp -p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_mtime_ns == rec["mtime_ns"] and os.stat(p).st_size == rec["size"]
    assert not fp.unchanged(p, rec)
    p.write_bytes(b"photo one, longer")
    assert not fp.unchanged(p, rec)
    p.write_bytes(b"photo one")  # the same bytes again, a new mtime: unchanged content
    assert fp.unchanged(p, rec)


def test_missing_and_malformed_are_changed(tmp_path):
    p = tmp_path / "in.png"
    p.write_bytes(b"x")
    rec = fp.fingerprint(p)
    for bad in (None, {}, {"size": 1}, "abc", {"size": 1, "sha256": 3}):
        assert not fp.unchanged(p, bad)
    p.unlink()
    assert not fp.unchanged(p, rec)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_never_reads_a_fifo_or_device(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="FIFO"):
        fp.fingerprint(fifo)
    assert not fp.unchanged(fifo, {"size": 0, "sha256": "0" * 64})
    if os.path.exists("/dev/zero"):
        with pytest.raises(ImageError, match="device"):
            fp.fingerprint("/dev/zero")
    assert time.monotonic() - t0 < 2


def test_streamed_hash_equals_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 * fp.CHUNK + 17)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert fp.sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_digest_and_job_key(tmp_path):
    assert fp.digest({"a": 1, "b": [1, 2]}) == fp.digest({"b": [1, 2], "a": 1})
    assert fp.digest({"a": 1}) != fp.digest({"a": 2})
    with pytest.raises(ValueError):
        fp.digest({"g": float("nan")})
    p = tmp_path / "in.png"
    p.write_bytes(b"photo")
    settings, model = {"steps": 50, "guidance": 7.5}, {"name": "sd15", "sha256": "ab"}
    key = fp.job_key(p, settings, model)
    assert fp.same_job(p, key, settings, model)
    assert not fp.same_job(p, key, {**settings, "steps": 49}, model)
    assert not fp.same_job(p, key, settings, {**model, "sha256": "cd"})
    p.write_bytes(b"other")
    assert not fp.same_job(p, key, settings, model)
    assert not fp.same_job(p, None, settings, model)


def test_hash_cache_is_not_fooled_by_fast_rewrites(tmp_path):
    p = tmp_path / "in.png"
    for i in range(20):  # same size, same inode, within one tick of the file-system clock
        p.write_bytes(b"v%02d" % i)
        assert fp.sha256_file(p) == __import__("hashlib").sha256(b"v%02d" % i).hexdigest()

"""Output sets replaced as a unit, temp-file cleanup, and the pre-flight checks of engine/atomic.py
(issue 10, items 1, 3 and 6)."""
import errno
import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit_engine.engine.files import atomic, images
from diffedit_engine.engine.files.atomic import OutputError


def write_set(folder: Path, tag: str, n_masks: int, extras: bool = True):
    """One output OUT.png in the engine's naming, written through replace_set; returns {path: bytes}."""
    out = folder / "out.png"
    files = {out: f"image {tag}".encode()}
    for i in range(n_masks):
        files[folder / f"out.mask{i}.png"] = f"mask{i} {tag}".encode()
    if extras:
        files[folder / "out.overlay.png"] = f"overlay {tag}".encode()
    sidecar = folder / "out.json"
    with atomic.replace_set(sidecar) as s:
        for p, data in files.items():
            s.write_bytes(p, data)
        s.write_json(sidecar, {"status": "ok", "tag": tag, "files": {"image": out.name,
                     "masks": [p.name for p in files if ".mask" in p.name],
                     **({"overlay": "out.overlay.png"} if extras else {})}})
    return {p: p.read_bytes() for p in [*files, sidecar]}


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if atomic.TEMP_PATTERN.match(p.name)]


def test_new_set_lands_and_stale_files_go(tmp_path):
    write_set(tmp_path, "old", 3)
    assert (tmp_path / "out.mask2.png").exists()
    write_set(tmp_path, "new", 1, extras=False)  # fewer masks, no overlay: the older run's extras are stale
    assert sorted(snapshot(tmp_path)) == ["out.json", "out.mask0.png", "out.png"]
    assert (tmp_path / "out.mask0.png").read_bytes() == b"mask0 new"
    assert json.loads((tmp_path / "out.json").read_text())["tag"] == "new"


def test_explicit_stale_paths_removed(tmp_path):
    (tmp_path / "out.mask7.png").write_bytes(b"from a run whose sidecar was lost")
    with atomic.replace_set(tmp_path / "out.json", stale=[tmp_path / "out.mask7.png"]) as s:
        s.write_bytes(tmp_path / "out.png", b"x")
        s.write_json(tmp_path / "out.json", {"files": {"image": "out.png"}})
    assert sorted(snapshot(tmp_path)) == ["out.json", "out.png"]


def test_disk_full_mid_write_keeps_the_old_set(tmp_path):
    write_set(tmp_path, "old", 3)
    before = snapshot(tmp_path)
    with pytest.raises(OSError) as e:
        with atomic.replace_set(tmp_path / "out.json") as s:
            s.write_bytes(tmp_path / "out.png", b"image new")
            s.write_bytes(tmp_path / "out.mask0.png", b"mask0 new")
            with s.open(tmp_path / "out.mask1.png") as f:
                f.write(b"half a ma")
                raise OSError(errno.ENOSPC, "No space left on device")
    assert atomic.is_disk_full(e.value)
    assert snapshot(tmp_path) == before  # every old file and its sidecar, byte for byte; no temp files


def test_exception_before_the_sidecar_keeps_the_old_set(tmp_path):
    write_set(tmp_path, "old", 2)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic.replace_set(tmp_path / "out.json") as s:
            s.write_bytes(tmp_path / "out.png", b"image new")
            raise RuntimeError("the encoder failed")
    assert snapshot(tmp_path) == before


def test_a_set_without_its_sidecar_is_not_committed(tmp_path):
    write_set(tmp_path, "old", 1)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="commit marker"):
        with atomic.replace_set(tmp_path / "out.json") as s:
            s.write_bytes(tmp_path / "out.png", b"image new")
    assert snapshot(tmp_path) == before


def test_non_finite_sidecar_refused_old_set_kept(tmp_path):
    write_set(tmp_path, "old", 1)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError):
        with atomic.replace_set(tmp_path / "out.json") as s:
            s.write_bytes(tmp_path / "out.png", b"image new")
            s.write_json(tmp_path / "out.json", {"threshold": float("nan")})
    assert snapshot(tmp_path) == before


def test_failure_during_the_swap_leaves_no_sidecar(tmp_path, monkeypatch):
    # A rename failing mid-swap: the old sidecar was withdrawn first, so nothing claims a mixed set complete.
    write_set(tmp_path, "old", 2)
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(a, b)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError):
        write_set(tmp_path, "new", 2)
    assert not (tmp_path / "out.json").exists() and temps(tmp_path) == []


def test_files_outside_the_folder_and_duplicates_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    with atomic.replace_set(tmp_path / "out.json") as s:
        with pytest.raises(OutputError, match="not in the output set's folder"):
            s.write_bytes(tmp_path / "sub" / "x.png", b"x")
        s.write_bytes(tmp_path / "out.png", b"x")
        with pytest.raises(OutputError, match="written twice"):
            s.write_bytes(tmp_path / "out.png", b"y")
        s.write_json(tmp_path / "out.json", {})


def test_listed_files_ignores_paths_elsewhere(tmp_path):
    (tmp_path / "out.json").write_text(json.dumps({"files": {"image": "out.png", "masks": ["a.png", "../x.png"],
                                                             "grid": "/etc/passwd", "n": 3}}))
    assert atomic.listed_files(tmp_path / "out.json") == {tmp_path / "out.png", tmp_path / "a.png"}
    (tmp_path / "bad.json").write_text("[1, 2")
    assert atomic.listed_files(tmp_path / "bad.json") == set()
    assert atomic.listed_files(tmp_path / "missing.json") == set()


KILLED = """
import os, signal, sys
from diffedit_engine.engine.files import atomic
folder = sys.argv[1]
with atomic.replace_set(folder + "/out.json") as s:
    s.write_bytes(folder + "/out.png", b"image new")
    s.write_bytes(folder + "/out.mask0.png", b"mask0 new")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_mid_set_then_the_next_run_cleans_up(tmp_path):
    write_set(tmp_path, "old", 2)
    before = snapshot(tmp_path)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == -9
    left = temps(tmp_path)
    assert len(left) == 2  # the killed run's staged files, under temp names only
    assert {k: v for k, v in snapshot(tmp_path).items() if k not in left} == before
    write_set(tmp_path, "new", 1)  # the next run: its commit cleans the temps of its own names
    assert temps(tmp_path) == []


def test_clean_temps(tmp_path):
    names = [".out.png.abcd1234.tmp", ".other.png.zz_z9999.tmp", ".hidden", "a.tmp", ".x.png.toolongname.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert atomic.clean_temps(tmp_path, names={"out.png"}) == [tmp_path / ".out.png.abcd1234.tmp"]
    assert atomic.clean_temps(tmp_path, min_age_s=3600) == []  # young: maybe another process's live write
    old = time.time() - 7200
    os.utime(tmp_path / ".other.png.zz_z9999.tmp", (old, old))
    assert atomic.clean_temps(tmp_path, min_age_s=3600) == [tmp_path / ".other.png.zz_z9999.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", ".x.png.toolongname.tmp", "a.tmp"]


def test_temp_names_match_the_pattern(tmp_path):
    seen = []
    real = atomic._mkstemp
    atomic_mk = lambda p: seen.append(real(p)) or seen[-1]  # noqa: E731
    try:
        atomic._mkstemp = atomic_mk
        atomic.write_bytes(tmp_path / "a.png", b"x")
    finally:
        atomic._mkstemp = real
    name = seen[0][1].name
    assert atomic.TEMP_PATTERN.match(name)["name"] == "a.png"
    assert len(name) <= len(atomic.temp_name("a.png")) == len("a.png") + atomic.TEMP_OVERHEAD


def test_same_file(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    a.write_bytes(b"same")
    c.write_bytes(b"same")  # equal content is not the same file
    os.link(a, b)
    (tmp_path / "s.png").symlink_to(a)
    (tmp_path / "sub").mkdir()
    assert atomic.same_file(a, a) and atomic.same_file(a, b) and atomic.same_file(tmp_path / "s.png", a)
    assert atomic.same_file(tmp_path / "sub" / ".." / "a.png", a)
    assert not atomic.same_file(a, c)
    assert not atomic.same_file(a, tmp_path / "missing.png") and not atomic.same_file(tmp_path / "missing.png", a)
    assert not atomic.same_file("a\0b", a)


def test_find_overwrites(tmp_path):
    inp, other = tmp_path / "in.png", tmp_path / "other.png"
    inp.write_bytes(b"photo")
    other.write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(inp)
    outs = [tmp_path / "new.png", tmp_path / "link.png", inp, other]
    assert atomic.find_overwrites(outs, [inp]) == [(tmp_path / "link.png", inp), (inp, inp)]
    assert atomic.find_overwrites([tmp_path / "new.png"], [inp, tmp_path / "gone.png"]) == []


def test_check_name_counts_the_temp_suffix_in_bytes(tmp_path):
    limit = atomic.NAME_MAX - atomic.TEMP_OVERHEAD  # 241
    atomic.check_name(tmp_path / ("a" * (limit - 4) + ".png"))
    with pytest.raises(OutputError) as e:
        atomic.check_name(tmp_path / ("a" * (limit - 3) + ".png"))  # 242 bytes: legal alone, its temp is not
    assert "too long" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(OutputError, match="too long"):
        atomic.check_name(tmp_path / ("é" * 120 + ".png"))  # 124 characters, 244 bytes
    with pytest.raises(OutputError, match="NUL"):
        atomic.check_name(tmp_path / "a\0.png")


def test_free_space(tmp_path, monkeypatch):
    atomic.check_free_space(tmp_path / "not" / "yet", 1024)  # the nearest existing ancestor is measured
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: Usage(10 << 30, 10 << 30, 5 << 20))
    with pytest.raises(OutputError) as e:
        atomic.check_free_space(tmp_path, 1 << 20)
    msg = str(e.value)
    assert "not enough free disk space" in msg and "5.0 MiB free" in msg and "\n" not in msg
    atomic.check_free_space(tmp_path, 1 << 20, margin_bytes=0)


def test_png_bound_holds_for_incompressible_images(tmp_path):
    rng = np.random.default_rng(0)
    for (h, w, c) in [(1, 1, 3), (77, 123, 3), (300, 200, 1), (512, 512, 3)]:
        a = rng.integers(0, 256, (h, w, c) if c == 3 else (h, w), dtype=np.uint8)
        data = images.png_bytes(Image.fromarray(a), parameters="x" * 500)
        assert len(data) <= atomic.png_bound(w, h, c, text_bytes=600)

"""Value checks before any work (issue 10, items 3 and 4): one ValidationError, one line naming the value."""
import os
import re
from pathlib import Path

import pytest
import torch

from diffedit_engine.engine.edit.settings import EditSettings, check_threshold
from diffedit_engine.engine.files import atomic
from diffedit_engine.engine.jobs import validate
from diffedit_engine.engine.jobs.validate import ValidationError


def err(fn, *a, **kw) -> str:
    with pytest.raises(ValidationError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", float("nan"), float("inf"), "1e400", "NaN", "Infinity"])
def test_non_finite_numbers_refused(bad):
    msg = err(validate.number, "--guidance", bad, 0, 100)
    assert msg.startswith("--guidance ") and "finite" in msg


@pytest.mark.parametrize("bad", ["abc", "", None, True, [1], "1,5"])
def test_non_numbers_refused(bad):
    assert err(validate.number, "--guidance", bad).startswith("--guidance")


def test_number_ranges():
    assert validate.number("--guidance", "7.5", 0, 100) == 7.5
    assert validate.number("--guidance", 0, 0, 100) == 0.0
    assert "must be in [0, 100]" in err(validate.number, "--guidance", 1e30, 0, 100)
    assert "1e+30" in err(validate.number, "--guidance", 1e30, 0, 100)
    assert "must be in (0, 1]" in err(validate.number, "--strength", 0, 0, 1, lo_open=True)
    assert validate.number("--strength", 1, 0, 1, lo_open=True) == 1.0
    assert "must be >= 0" in err(validate.number, "--x", -1, 0)
    assert "must be < 1" in err(validate.number, "--x", 1, None, 1, hi_open=True)


def test_integers():
    assert validate.integer("--maps", "12", 1) == 12
    assert validate.integer("--maps", 12.0, 1) == 12
    for bad in ("1.5", 1.5, "x", True, None, "", "١٢", float("inf")):  # "١٢": Arabic-Indic digits
        assert "integer" in err(validate.integer, "--maps", bad, 1)
    assert "must be >= 1" in err(validate.integer, "--maps", 0, 1)


def test_steps_bounded_by_the_schedule():
    assert validate.steps(1000) == 1000 and validate.steps("1") == 1
    assert "[1, 1000]" in err(validate.steps, 100000)
    assert "[1, 1000]" in err(validate.steps, 0)
    assert "[1, 500]" in err(validate.steps, 501, num_train_timesteps=500)


def test_seed_range_is_what_torch_accepts_and_documented():
    g = torch.Generator()
    for s in (validate.SEED_MIN, validate.SEED_MAX):
        assert validate.seed(s) == s
        g.manual_seed(s)  # the whole documented range is valid for torch
        assert g.initial_seed() == s
    g.manual_seed(validate.SEED_MAX + 1000)  # headroom: seed + job index stays inside torch's range
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        g.manual_seed(2**64)  # torch's own limit (the "Overflow when unpacking long long")
    for bad in (2**64, 2**63, -1, "18446744073709551616"):
        msg = err(validate.seed, bad)
        assert msg.startswith("--seed ") and f"[0, {2**63 - 1}]" in msg
    assert validate.seed(" 42 ") == 42


@pytest.mark.parametrize("good", ["clamp:3", "fixed:0.5", "fixed:0", "fixed:1", "mean", "mean:1.5", "median",
                                  "otsu", "quantile:0.9", " otsu "])
def test_threshold_rules_accepted(good):
    assert check_threshold(good) == good.strip()


@pytest.mark.parametrize("bad", ["fixed:nan", "fixed:inf", "clamp:inf", "mean:nan", "mean:-1", "fixed:1.5",
                                 "fixed:-0.1", "clamp:0", "clamp:nan", "quantile:nan", "quantile:2", "bogus",
                                 "fixed", "fixed:x", 3])
def test_threshold_rules_refused(bad):
    """Refused by the settings' own check (EditSettings.checked: the one place an edit's limits live), named
    as the field; the CLI and manifests rename it (--threshold), see test_cli_hostile."""
    with pytest.raises(ValueError) as e:
        check_threshold(bad)
    assert str(e.value).startswith(f"threshold {bad}")
    with pytest.raises(ValueError, match="^" + re.escape(f"threshold {bad}")):
        EditSettings(threshold=bad).checked()


def test_choice_dtype_device():
    assert validate.dtype("float16") == "float16"
    assert "use one of auto, float32" in err(validate.dtype, "fp8")
    assert validate.device("cpu") == "cpu" and validate.device("auto") == "auto"
    assert "not a device" in err(validate.device, "gpu0")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in err(validate.device, "cuda:0")
    else:
        assert "CUDA device(s)" in err(validate.device, f"cuda:{torch.cuda.device_count()}")


def test_output_path_ok_and_creatable(tmp_path):
    assert validate.output_path(tmp_path / "new" / "deeper" / "out.png") == tmp_path / "new" / "deeper" / "out.png"
    (tmp_path / "old.png").write_bytes(b"an older output")
    validate.output_path(tmp_path / "old.png")
    assert not (tmp_path / "new").exists()  # nothing is created


def test_output_path_refusals(tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert "existing directory" in err(validate.output_path, tmp_path / "dir.png")
    assert "must end in .png" in err(validate.output_path, tmp_path / "out.jpg")
    assert "NUL" in err(validate.output_path, str(tmp_path / "a\0b.png"))
    assert "file path" in err(validate.output_path, "")
    (tmp_path / "file").write_bytes(b"")
    assert "is not a directory" in err(validate.output_path, tmp_path / "file" / "sub" / "out.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.png")
        assert "not a regular file" in err(validate.output_path, tmp_path / "fifo.png")
    # A directory where a derived file of the set goes (the sidecar) is caught too.
    (tmp_path / "x.json").mkdir()
    assert "x.json is an existing directory" in err(validate.output_path, tmp_path / "x.png", also=[tmp_path / "x.json"])


def test_output_name_length_includes_the_temp_suffix(tmp_path):
    ok = "a" * (atomic.NAME_MAX - atomic.TEMP_OVERHEAD - 4) + ".png"  # 241 bytes
    validate.output_path(tmp_path / ok)
    long = "a" * 246 + ".png"  # 250 bytes: a legal name, but its temp name is not
    msg = err(validate.output_path, tmp_path / long)
    assert "too long" in msg and "temp name" in msg and len(msg) < 400
    # The longest name of the set decides: OUT.overlay.png is 8 bytes longer than OUT.png.
    stem = "a" * 234
    msg = err(validate.output_path, tmp_path / f"{stem}.png", also=[tmp_path / f"{stem}.overlay.png"])
    assert "too long" in msg


def test_read_only_file_system(tmp_path, monkeypatch):
    # Root ignores permission bits but not a read-only mount; statvfs's flag is what is checked.
    real = os.statvfs

    class RO:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, k):
            return os.ST_RDONLY if k == "f_flag" else getattr(self.st, k)

    monkeypatch.setattr(os, "statvfs", lambda p: RO(real(p)))
    assert "read-only file system" in err(validate.output_path, tmp_path / "out.png")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root bypasses permission bits (the read-only file system test covers root)")
def test_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "no permission to write" in err(validate.output_path, ro / "out.png")
    finally:
        ro.chmod(0o700)


def test_unwritable_folder_as_seen_by_access(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    assert "no permission to write" in err(validate.output_path, tmp_path / "out.png")


def test_free_space(tmp_path, monkeypatch):
    validate.free_space(tmp_path, 1024)
    from collections import namedtuple

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(1, 1, 1 << 20))
    msg = err(validate.free_space, tmp_path, 50 << 20)
    assert msg.startswith(f"--out {tmp_path}") and "not enough free disk space" in msg


def test_collisions(tmp_path):
    def files(stem, masks=2):
        return [tmp_path / f"{stem}.png", tmp_path / f"{stem}.json",
                *(tmp_path / f"{stem}.mask{i}.png" for i in range(masks)),
                tmp_path / f"{stem}.overlay.png", tmp_path / f"{stem}.grid.png"]

    jobs = {0: files("x"), 1: files("x.mask0"), 2: files("report"), 3: files("y"), 4: files("Y"), 5: files("z")}
    bad = validate.collisions(jobs, reserved=[tmp_path / "report.json"])
    assert set(bad) == {1, 2, 4}
    assert "x.mask0.png" in bad[1] and "job 0's" in bad[1]
    assert "report.json" in bad[2] and "the run's own" in bad[2]
    assert "job 3's" in bad[4]  # case-folded: y.png and Y.png are one file on macOS
    assert validate.collisions({0: files("a"), 1: files("b")}) == {}


def test_batch_outputs_are_checked_as_edit_outputs(tmp_path):
    """A batch job's output gets the single edit's output_path check before any work (manifest.check_outputs
    skipped it: the loop over the output's parent folders always ended in a break, so its else never ran):
    a name too long with the temp suffix, a folder that is a file, a folder without write permission."""
    from diffedit_engine.engine.jobs import manifest

    out = tmp_path / "out"
    (out / "ro").mkdir(parents=True)
    (out / "afile").write_text("x")
    names = ["ro/x.png", "afile/x.png", "y" * 250 + ".png", "ok.png", "sub/ok.png"]
    jobs = [manifest.Job(index=i, image=tmp_path / "in.png", pairs=[("a", "b")], seed=0, out=name)
            for i, name in enumerate(names)]
    os.chmod(out / "ro", 0o555)
    try:
        bad = manifest.check_outputs(jobs, out)
    finally:
        os.chmod(out / "ro", 0o755)
    expected = {2: "too long"} if os.geteuid() == 0 else {0: "no permission to write", 2: "too long"}
    expected[1] = "is not a directory"
    assert sorted(bad) == sorted(expected), bad
    for i, words in expected.items():
        assert bad[i].startswith("out ") and words in bad[i] and jobs[i].error == bad[i]
    assert jobs[3].error is None and jobs[4].error is None

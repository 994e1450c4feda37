"""Hostile and careless input through the CLI (issue 10): every case asserts the exit status, the one-line
message naming the value, and that no file the user had changed. The value checks run before any model
is loaded, so most cases cost no engine time; the batch and resume cases use the tiny model."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffedit_engine import cli
from diffedit_engine.engine.files import atomic, images
from diffedit_engine.engine.jobs import batch, manifest, outputs

FAST = ["--steps", "2", "--maps", "1"]


pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: never the user's ~/.cache


@pytest.fixture(scope="module")
def model(tiny_folder):
    return str(tiny_folder("sd1"))


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((20, 12)).save(p)
    return p


def snapshot(folder) -> dict:
    """Every entry under folder: content hash, inode and mtime of files, targets of links."""
    snap = {}
    for p in sorted(Path(folder).rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            snap[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            snap[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
        else:
            snap[str(p)] = ("other", st.st_mode)
    return snap


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    errors = [ln for ln in lines if ln.startswith("diffedit: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


def refused(capsys, tmp_path, args, *words, rc=2):
    """Run, then: exit status rc, one error line holding every word, no user file changed, nothing new."""
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    code, _, err = run(capsys, *args)
    line = one_error(err)
    assert code == rc, err
    for w in words:
        assert w in line, line
    assert snapshot(tmp_path) == before
    return line, time.perf_counter() - t0


# ---- 1. outputs never overwrite an input --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["same path", "hard link", "symlink", "mask is the input"])
def test_edit_out_resolving_to_the_input_is_refused(capsys, tmp_path, model, photo, how):
    out, extra = tmp_path / "out.png", []
    if how == "same path":
        out = photo
    elif how == "hard link":
        os.link(photo, out)
    elif how == "symlink":
        out.symlink_to(photo)
    else:  # the input is named like a mask of the output
        out = tmp_path / "cat2.png"
        shutil.copy(photo, tmp_path / "in.png")
        os.replace(photo, tmp_path / "cat2.mask0.png")
        photo, extra = tmp_path / "cat2.mask0.png", ["--save-masks"]
    refused(capsys, tmp_path, ["edit", "--model", model, "--image", photo, "--edit", "cat -> dog", "--out", out,
                               *extra, *FAST], "refusing to overwrite an input")


@pytest.mark.parametrize("name", ["out.png", "out.json", "out.overlay.png"])
def test_a_users_file_under_an_output_name_is_never_overwritten(capsys, tmp_path, model, photo, name):
    """An existing file the engine did not write (a photo, notes, an unrelated JSON) is refused before any
    work; a second run over the engine's own outputs replaces them."""
    (tmp_path / name).write_bytes(photo.read_bytes() if name.endswith(".png") else b'{"my": "notes"}')
    refused(capsys, tmp_path, ["edit", "--model", model, "--image", photo, "--edit", "cat -> dog",
                               "--out", tmp_path / "out.png", "--save-masks", *FAST], "not written by diffedit")
    (tmp_path / name).unlink()
    for _ in range(2):  # the engine's own set is replaced on a re-run
        rc, _, err = run(capsys, "edit", "--model", model, "--image", photo, "--edit", "cat -> dog",
                         "--out", tmp_path / "out.png", "--save-masks", *FAST)
        assert rc == 0, err


def test_batch_job_over_a_users_file_fails_alone(capsys, tmp_path, model, photo):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "a.png").write_bytes(photo.read_bytes())  # the user's, not an output of ours
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(photo), "edits": ["cat -> dog"], "out": o}) + "\n"
                                for o in ("a.png", "b.png")))
    before = (out_dir / "a.png").read_bytes()
    rc, _, err = run(capsys, "batch", "--model", model, "--manifest", manifest, "--out-dir", out_dir, *FAST)
    assert rc == 1, err
    report = json.loads((out_dir / "report.json").read_text())
    status = {r["out"]: r for r in report["jobs"]}
    assert status["a.png"]["status"] == "failed" and "not written by diffedit" in status["a.png"]["error"]
    assert status["b.png"]["status"] == "done"
    assert (out_dir / "a.png").read_bytes() == before


# ---- 2. bounded, typed reading ------------------------------------------------------------------------------

def test_image_size_limit_is_configurable(capsys, tmp_path, model, photo):
    size = photo.stat().st_size
    line, _ = refused(capsys, tmp_path, ["edit", "--model", model, "--image", photo, "--edit", "a -> b",
                                         "--out", tmp_path / "o.png", "--max-bytes", size - 1],
                      f"exceeds the limit of {size - 1} bytes")
    refused(capsys, tmp_path, ["edit", "--model", model, "--image", photo, "--edit", "a -> b",
                               "--out", tmp_path / "o.png", "--max-pixels", 10], "exceeds the limit of 10 pixels")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_only_regular_files_are_read(capsys, tmp_path, model, kind):
    src = {"fifo": tmp_path / "pipe.png", "device": Path("/dev/zero"), "directory": tmp_path / "d.png"}[kind]
    if kind == "fifo":
        os.mkfifo(src)
    elif kind == "directory":
        src.mkdir()
    elif not src.exists():
        pytest.skip("no /dev/zero")
    _, seconds = refused(capsys, tmp_path, ["edit", "--model", model, "--image", src, "--edit", "a -> b",
                                            "--out", tmp_path / "o.png"],
                         {"fifo": "FIFO", "device": "character device", "directory": "directory"}[kind])
    assert seconds < 30  # no hang, nothing read


# ---- 3. every value before any work -------------------------------------------------------------------------

VALUE_CASES = {
    "guidance nan": (["--guidance", "nan"], "--guidance nan: not a finite number"),
    "guidance inf": (["--guidance", "inf"], "--guidance inf: not a finite number"),
    "guidance 1e30": (["--guidance", "1e30"], "--guidance 1e+30: must be in [0, 100]"),
    "guidance negative": (["--guidance", "-1"], "--guidance -1.0: must be in [0, 100]"),
    "strength nan": (["--strength", "nan"], "--strength nan: not a finite number"),
    "mask strength 2": (["--mask-strength", "2"], "--mask-strength 2.0: must be in (0, 1]"),
    "threshold fixed:nan": (["--threshold", "fixed:nan"], "--threshold fixed:nan:"),
    "threshold fixed:2": (["--threshold", "fixed:2"], "--threshold fixed:2: fixed:v needs v in [0, 1]"),
    "threshold clamp:inf": (["--threshold", "clamp:inf"], "--threshold clamp:inf:"),
    "steps 100000": (["--steps", "100000"], "--steps 100000: must be in [1, 1000]"),
    "maps 0": (["--maps", "0"], "--maps 0: must be in [1, 1000]"),
    "seed 2**64": (["--seed", str(2**64)], f"--seed {2**64}: must be in [0, {2**63 - 1}]"),
    "seed -1": (["--seed", "-1"], f"--seed -1: must be in [0, {2**63 - 1}]"),
    "device": (["--device", "tpu"], "--device tpu:"),
    "cuda index": (["--device", "cuda:99"], "--device cuda:99:"),
    "dtype": (["--dtype", "int8"], "--dtype int8: use auto, float32, float16 or bfloat16"),
    "vae dtype": (["--vae-dtype", "float64"], "--vae-dtype float64:"),
    "max pixels": (["--max-pixels", "0"], "--max-pixels 0: must be >= 1"),
    "max bytes": (["--max-bytes", "-5"], "--max-bytes -5: must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_values_are_usage_errors_before_any_work(capsys, tmp_path, photo, case, monkeypatch):
    args, words = VALUE_CASES[case]
    loaded = []
    monkeypatch.setattr(cli, "load", lambda *a, **k: loaded.append(1))  # the model must not even be loaded
    refused(capsys, tmp_path, ["edit", "--image", photo, "--edit", "cat -> dog", "--out", tmp_path / "o.png", *args],
            words)
    assert loaded == []


def test_out_paths_that_cannot_be_created(capsys, tmp_path, photo):
    (tmp_path / "dir.png").mkdir()
    base = ["edit", "--image", photo, "--edit", "cat -> dog", "--out"]
    refused(capsys, tmp_path, [*base, tmp_path / "dir.png"], "is an existing directory")
    long = "x" * 250 + ".png"  # a legal 254-byte name; the temp name staging adds 14 more
    refused(capsys, tmp_path, [*base, tmp_path / long], "file name too long", "temp name")
    refused(capsys, tmp_path, [*base, tmp_path / "o.jpg"], "must end in .png")
    (tmp_path / "o.mask0.png").mkdir()  # a file of the output set in the way
    refused(capsys, tmp_path, [*base, tmp_path / "o.png", "--save-masks"], "o.mask0.png is an existing directory")


def test_free_disk_space_is_checked_before_the_model(capsys, tmp_path, model, photo, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("model loaded"))
    refused(capsys, tmp_path, ["edit", "--model", model, "--image", photo, "--edit", "a -> b",
                               "--out", tmp_path / "o.png"], "not enough free disk space")


def test_read_only_file_system(capsys, tmp_path, photo):
    """root passes every permission check, so a read-only mount (tmpfs -o ro) is what proves the check;
    without root a chmod'ed folder does."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"root without a read-only mount (mount failed: {r.stderr.decode().strip()}): "
                        "root bypasses permission checks")
        mounted = True
    else:
        ro.chmod(0o500)
    try:
        line, _ = refused(capsys, tmp_path, ["edit", "--image", photo, "--edit", "cat -> dog", "--out", ro / "o.png"])
        assert "read-only file system" in line or "no permission" in line, line
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o700)


# ---- 7. hub ids: one line, fast ---------------------------------------------------------------------------

def test_hub_id_not_cached_offline_is_one_line_fast(capsys, tmp_path, photo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _, seconds = refused(capsys, tmp_path, ["edit", "--model", "nobody/no-such-model", "--image", photo,
                                            "--edit", "a -> b", "--out", tmp_path / "o.png"],
                         "--model nobody/no-such-model", "HF_HUB_OFFLINE")
    assert seconds < 10


# ---- 6. output sets replaced as a unit ----------------------------------------------------------------------

def fake_outcome(h=12, w=20, n=2):
    g = torch.Generator().manual_seed(0)
    return outputs.Outcome(torch.rand(3, h, w, generator=g), (torch.rand(n, h, w, generator=g) > 0.5).float(),
                           [0.5] * n, 0.1)


def test_failed_write_keeps_the_old_set_then_stale_masks_go(tmp_path, monkeypatch):
    out = tmp_path / "o.png"
    x = torch.rand(3, 12, 20)
    outputs.write_outputs(out, x, fake_outcome(), {"status": "ok"}, "p", extras=True)
    before = snapshot(tmp_path)
    assert manifest.is_complete(out) and (tmp_path / "o.mask1.png").exists()
    calls = []
    real = images.png_bytes

    def full(*a, **k):  # the third file of the new set hits a full disk
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(images, "png_bytes", full)
    with pytest.raises(OSError) as e:
        outputs.write_outputs(out, x, fake_outcome(n=1), {"status": "ok"}, "p2", extras=True)
    assert atomic.is_disk_full(e.value)
    assert snapshot(tmp_path) == before  # old set intact, no temp file left
    monkeypatch.setattr(images, "png_bytes", real)
    outputs.write_outputs(out, x, fake_outcome(n=1), {"status": "ok"}, "p3", extras=False)  # no --save-masks now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json", "o.png"]  # stale masks/overlay/grid removed
    assert json.loads((tmp_path / "o.json").read_text())["files"] == {"image": "o.png", "sidecar": "o.json"}


def test_sidecar_never_holds_nan(tmp_path):
    o = fake_outcome(n=1)
    o.thresholds = [float("nan")]
    rec = outputs.Record("edit", "in.png", [("a", "b")], 0, cli.DEFAULT, (12, 20))
    meta = outputs.sidecar(rec, {"random_weights": True, "short_hash": "x", "name": "m"}, o, {"t": 1.0}, {})
    outputs.write_outputs(tmp_path / "o.png", torch.rand(3, 12, 20), o, meta, "p", extras=False)
    assert json.loads((tmp_path / "o.json").read_text())["thresholds"] == [None]  # strict JSON parses it


def test_parameters_text_names_the_sampler_that_ran():
    model = {"random_weights": True, "short_hash": "x", "name": "m"}
    for scheduler, name in (("ddim", "Sampler: DDIM,"), ("dpm++2m", "Sampler: DPM++ 2M,")):
        rec = outputs.Record("edit", "in.png", [("a", "b")], 0, cli.DEFAULT.updated(scheduler=scheduler), (12, 20))
        assert name in outputs.parameters_text(rec, model)


# ---- 4-6 in a batch -----------------------------------------------------------------------------------------

def test_bad_manifest_lines_fail_their_jobs_only(capsys, tmp_path, model, photo):
    d = tmp_path / "work"
    out = d / "out"
    out.mkdir(parents=True)
    inside = out / "inside.png"  # an input inside the output folder under its own out name
    shutil.copy(photo, inside)
    ok = {"image": str(photo), "edits": ["cat -> dog"]}
    lines = [
        json.dumps({**ok, "out": "nul\u0000.png"}),                     # 0 NUL byte in out
        json.dumps({**ok, "seed": 2**64, "out": "s.png"}),              # 1 seed out of range
        json.dumps({**ok, "seed": "abc", "out": "s2.png"}),             # 2 not an integer
        '{"image": "%s", "edits": ["a -> b"], "guidance_scale": NaN, "out": "g.png"}' % photo,  # 3 NaN literal
        json.dumps({**ok, "steps": 100000, "out": "st.png"}),           # 4 steps > schedule
        json.dumps({**ok, "out": "report.png"}),                        # 5 sidecar would be report.json
        json.dumps({**ok, "out": "x.png"}),                             # 6 fine; owns x.mask0.png
        json.dumps({**ok, "out": "x.mask0.png"}),                       # 7 collides with job 6's mask
        json.dumps({"image": str(inside), "edits": ["a -> b"], "out": "inside.png"}),  # 8 overwrites its input
        json.dumps({**ok, "out": "y" * 250 + ".png"}),                  # 9 name + temp suffix too long
        json.dumps({**ok, "threshold": "fixed:nan", "out": "t.png"}),   # 10 non-finite rule
        json.dumps({**ok, "out": "X.PNG"}),                             # 11 case-folded clash with job 6
        json.dumps({**ok, "out": "report.0-of-3.png"}),                 # 12 a shard report of another run
        json.dumps({**ok, "out": "good.png", "seed": 3}),               # 13 runs
    ]
    man = d / "jobs.jsonl"
    man.write_bytes("\n".join(lines).encode() + b"\n" + b'{"image": "\xff\xfe", "edits": ["a -> b"]}\n')  # 14 not UTF-8
    before = {k: v for k, v in snapshot(tmp_path).items()}
    rc, _, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", out, *FAST)
    assert rc == 1 and "Traceback" not in err, err
    rep = json.loads((out / "report.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    st = {j["index"]: j for j in rep["jobs"]}
    expect = {0: "NUL", 1: "seed", 2: "seed", 3: "guidance_scale", 4: "steps", 5: "report", 7: "job 6",
              8: "refusing to overwrite", 9: "too long", 10: "threshold", 11: "already used by job 6", 12: "report",
              14: "UTF-8"}
    for i, word in expect.items():
        assert st[i]["status"] == "failed" and word in st[i]["error"], (i, st[i])
        assert "\n" not in st[i]["error"]
    assert st[6]["status"] == "done" and st[13]["status"] == "done"
    assert (rep["done"], rep["failed"]) == (2, len(expect))
    for p, v in before.items():  # every file the user had is unchanged (the manifest, photo, inside.png)
        if Path(p).is_relative_to(d) or Path(p) == photo:
            assert snapshot(tmp_path).get(p) == v, p
    assert not (out / "report.png").exists() and not (out / "x.mask0.json").exists()


def test_resume_fingerprints_the_input_content(capsys, tmp_path, model, photo):
    """A BMP keeps its size when its pixels change; with its mtime put back, only the hash tells."""
    img = tmp_path / "in.bmp"
    Image.open(photo).save(img)
    man = tmp_path / "jobs.jsonl"
    man.write_text(json.dumps({"image": str(img), "edits": ["cat -> dog"], "out": "a.png"}) + "\n")
    out = tmp_path / "out"
    args = ["batch", "--model", model, "--manifest", man, "--out-dir", out, *FAST]
    assert run(capsys, *args)[0] == 0
    key = json.loads((out / "a.json").read_text())["job_key"]
    assert key["input"]["size"] == img.stat().st_size and len(key["input"]["sha256"]) == 64
    rc, _, _ = run(capsys, *args)
    assert rc == 0 and json.loads((out / "report.json").read_text())["skipped"] == 1
    st = img.stat()
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size == st.st_size and img.stat().st_mtime_ns == st.st_mtime_ns
    rc, _, _ = run(capsys, *args)
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and (rep["done"], rep["skipped"]) == (1, 0)  # changed input: redone


def test_batch_cleans_old_temps_and_keeps_young_ones(capsys, tmp_path, model, photo):
    man = tmp_path / "jobs.jsonl"
    man.write_text(json.dumps({"image": str(photo), "edits": ["cat -> dog"], "out": "a.png"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    old, young = out / ".a.png.abcd1234.tmp", out / ".b.png.efgh5678.tmp"
    for p in (old, young):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * batch.TEMP_MIN_AGE_S,) * 2)
    rc, _, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", out, *FAST)
    assert rc == 0, err
    assert not old.exists() and young.exists()  # a live writer's temp is left alone


# ---- 8. long prompts ----------------------------------------------------------------------------------------

def test_long_prompt_is_a_one_line_warning(capsys, tmp_path, model, photo):
    rc, _, err = run(capsys, "edit", "--model", model, "--image", photo, "--edit", "cat -> " + "dog " * 90,
                     "--out", tmp_path / "o.png", *FAST)
    assert rc == 0, err
    warns = [ln for ln in err.splitlines() if "tokens were dropped" in ln]
    assert len(warns) == 1 and warns[0].startswith("diffedit: warning: prompt "), err
    assert "warnings.warn" not in err and "Traceback" not in err


# ---- issue 20 item 10: the smaller ones ---------------------------------------------------------------------

def test_two_arrows_are_refused(capsys, tmp_path, model, photo):
    rc, _, err = run(capsys, "edit", "--model", model, "--image", photo, "--edit", "a -> b -> c", "--out",
                     tmp_path / "x.png", *FAST)
    assert rc == 2 and "more than one '->'" in one_error(err) and not list(tmp_path.glob("x*"))


def test_a_corrupt_sidecar_beside_our_png_is_redone_not_blocking(capsys, tmp_path, model, photo):
    """A sidecar cut short (a crash of the disk, a scribble) beside a PNG the engine wrote: the job is not
    complete and is redone, instead of failing as 'not written by diffedit' until deleted by hand. A user's
    well-formed JSON under that name is still theirs."""
    man = tmp_path / "jobs.jsonl"
    man.write_text(json.dumps({"image": str(photo), "edits": ["cat -> dog"], "out": "a.png"}) + "\n")
    out = tmp_path / "out"
    args = ("batch", "--model", model, "--manifest", man, "--out-dir", out, *FAST)
    assert run(capsys, *args)[0] == 0
    side = out / "a.json"
    side.write_bytes(side.read_bytes()[:40])
    rc, _, err = run(capsys, *args)
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and rep["done"] == 1, err
    assert manifest.is_complete(out / "a.png") and json.loads(side.read_text())["status"] == "ok"
    side.write_text('{"my": "notes"}')
    rc, _, err = run(capsys, *args)
    rep = json.loads((out / "report.json").read_text())
    assert rc == 1 and "not written by diffedit" in rep["jobs"][0]["error"] and "move or delete" in rep["jobs"][0]["error"]
    assert side.read_text() == '{"my": "notes"}'


def test_scheduler_without_timesteps_is_one_line_naming_the_file(capsys, tmp_path, tiny_folder, photo):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder("sd1"), folder)
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "num_train_timesteps": 0}))
    rc, _, err = run(capsys, "edit", "--model", folder, "--image", photo, "--edit", "cat -> dog", "--out",
                     tmp_path / "x.png", *FAST)
    line = one_error(err)
    assert rc == 2 and str(cfg) in line and "num_train_timesteps 0" in line and "AssertionError" not in line


def test_a_folder_with_a_text_pth_is_not_called_a_pickle(capsys, tmp_path, photo):
    """`--model .` in an editable install's checkout: a site-packages style .pth path file is text, not a
    pickle checkpoint; the folder is refused for what it is (no model_index.json)."""
    folder = tmp_path / "checkout"
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "__editable__.diffedit_engine-0.1.0.pth").write_text("/some/path\n")
    rc, _, err = run(capsys, "edit", "--model", folder, "--image", photo, "--edit", "cat -> dog", "--out",
                     tmp_path / "x.png", *FAST)
    line = one_error(err)
    assert rc == 2 and "no model_index.json" in line and "pickle" not in line
    (folder / "real.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a real pickle is still named as one
    rc, _, err = run(capsys, "edit", "--model", folder, "--image", photo, "--edit", "cat -> dog", "--out",
                     tmp_path / "x.png", *FAST)
    assert rc == 2 and "real.ckpt" in one_error(err) and "pickle" in one_error(err)


def test_compat_on_sdxl_is_refused_before_loading(capsys, tmp_path, tiny_folder, photo, monkeypatch):
    from diffedit_engine.engine.jobs import session

    folder = tmp_path / "xl"
    shutil.copytree(tiny_folder("sd1"), folder)
    (folder / "text_encoder_2").mkdir()  # what makes a folder SD-XL
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    rc, _, err = run(capsys, "edit", "--model", folder, "--image", photo, "--edit", "cat -> dog", "--out",
                     tmp_path / "x.png", "--compat", "diffusers", *FAST)
    assert rc == 2 and "--compat diffusers" in one_error(err) and "SD-XL" in one_error(err)


def test_bench_writes_results_only_with_write(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert run(capsys, "bench", "--steps", "2")[0] == 0
    assert run(capsys, "bench", "--write", "--steps", "2")[0] == 0
    assert calls[0][-3:] == ["--steps", "2", "--no-write"]
    assert calls[1][-2:] == ["--steps", "2"] and "--write" not in calls[1] and "--no-write" not in calls[1]


def test_other_packages_deprecations_are_not_diffedit_warnings(capsys, monkeypatch, model):
    """torch's `torch.jit.script_method` deprecation (a CPU --compile run) is not printed as `diffedit:
    warning`; another package's real warning is printed in that package's name; ours stay ours."""
    import warnings

    def noisy(o, log):
        warnings.warn_explicit("`torch.jit.script_method` is deprecated", DeprecationWarning,
                               torch.__file__, 1, module="torch.jit")
        warnings.warn_explicit("something torch wants users to know", UserWarning, torch.__file__, 2,
                               module="torch")
        warnings.warn_explicit("ours", UserWarning, str(Path(cli.__file__)), 3, module="diffedit_engine.cli")
        return 0

    monkeypatch.setattr(cli, "cmd_info", noisy)
    rc, _, err = run(capsys, "info", "--model", model)
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert rc == 0 and lines == ["torch: warning: something torch wants users to know", "diffedit: warning: ours"]

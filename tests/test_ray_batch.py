"""batch --ray on a local Ray cluster on the CPU (2 workers, a tiny model): the same pixels as the local
batch, bad jobs as failed rows, a worker SIGKILLed mid-run, the driver SIGKILLed then re-run, the tries bound,
and `--ray` without Ray. One Ray for the module, sized for a 2-core machine: 4 logical CPUs, so that two
1-CPU actors leave room for the classify/decode tasks (with num_cpus=2 the pool starves its own reads)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit_engine import cli
from diffedit_engine.engine.jobs import batch, claims, manifest, ray_batch
from diffedit_engine.engine.jobs.console import Log

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "4", "--maps", "1"]
WORKER = "MapWorker(MapBatches(EditWorker))"


pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: never the user's ~/.cache


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ray_batch.worker_path()}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_folder):
    return str(tiny_folder("sd1"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    a = d / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((36, 28)).save(a)
    b = d / "flip.png"
    Image.open(a).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(b)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return a, b, d / "broken.png"


def write_manifest(folder, photos, n, bad=False):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"image": str(photos[i % 2]), "edits": ["cat -> dog"], "seed": i, "out": f"j{i}.png"} for i in range(n)]
    if bad:
        rows += [{"image": str(photos[2]), "edits": ["cat -> dog"], "out": "broken.png"},  # fails in decode
                 {"image": str(photos[0]), "edits": ["cat dog"], "out": "noarrow.png"}]    # fails in the manifest
    (folder / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "jobs.jsonl"


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def report(out):
    return json.loads((Path(out) / "report.json").read_text())


def pixels(p):
    return np.asarray(Image.open(p))


def stamps(out, n):
    return {i: ((out / f"j{i}.png").stat().st_ino, (out / f"j{i}.json").stat().st_mtime_ns)
            for i in range(n) if manifest.is_complete(out / f"j{i}.png")}


def test_ray_equals_local_batch_bad_jobs_fail_and_rerun_skips(capsys, tmp_path, model, photos, ray_local):
    """Same files, pixels, PNG metadata and fingerprints as the local batch (the actor runs 1 torch thread,
    so the local batch does too, and both run one image per engine call: thread counts and batch sizes change
    the last bits of a float sum, which can move a pixel by one 8-bit level); a broken image and a bad manifest
    line are failed rows, the rest go on, exit 1; a re-run skips every complete output."""
    man = write_manifest(tmp_path, photos, 5, bad=True)
    local, remote = tmp_path / "local", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, _, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", local, "--save-masks",
                         "--batch-size", "1", *FAST)
    finally:
        torch.set_num_threads(threads)
    assert rc == 1, err
    rc, out, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", remote, "--save-masks",
                       "--batch-size", "1", "--ray", "--workers", "2", "--json", *FAST)
    assert rc == 1, err
    a, b = report(local), report(remote)
    assert (b["done"], b["skipped"], b["failed"]) == (a["done"], a["skipped"], a["failed"]) == (5, 0, 2)
    assert [(j["index"], j["status"], j.get("error")) for j in a["jobs"]] == \
           [(j["index"], j["status"], j.get("error")) for j in b["jobs"]]
    assert "not an image" in b["jobs"][5]["error"] and "no '->'" in b["jobs"][6]["error"]
    names = sorted(p.name for p in local.iterdir() if p.name != "report.json")
    assert names == sorted(p.name for p in remote.iterdir() if p.name != "report.json")
    for name in names:
        if name.endswith(".png"):
            assert np.array_equal(pixels(local / name), pixels(remote / name)), name
            assert Image.open(local / name).text == Image.open(remote / name).text, name
    for i in range(5):
        sa, sb = (json.loads((d / f"j{i}.json").read_text()) for d in (local, remote))
        assert (sa["fingerprint"], sa["thresholds"], sa["files"]) == (sb["fingerprint"], sb["thresholds"], sb["files"])
    events = [json.loads(line) for line in out.splitlines()]  # --json: nothing but JSON lines on stdout
    assert sum(e["event"] == "job" for e in events) == 7 and events[-1]["event"] == "report"

    before = stamps(remote, 5)
    rc, _, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", remote, "--save-masks",
                     "--ray", "--workers", "2", "--quiet", *FAST)
    assert rc == 1, err
    r = report(remote)
    assert (r["done"], r["skipped"], r["failed"]) == (0, 5, 2) and stamps(remote, 5) == before


def descendants_named(name):
    import psutil

    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if name in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_ray_worker_killed_mid_run(capsys, tmp_path, model, photos, ray_local):
    """SIGKILL a worker as soon as the first output is complete: the actor restarts, its jobs are retried,
    every output ends complete, each job is one report row, and nothing complete is rewritten."""
    n = 6
    man = write_manifest(tmp_path, photos, n)
    out = tmp_path / "out"
    killed, at_kill = [], {}

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            done = stamps(out, n) if out.exists() else {}
            if done:
                at_kill.update(done)
                for p in descendants_named(WORKER)[:1]:
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rc, _, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", out, "--batch-size", "1",
                     "--ray", "--workers", "2", "--quiet", *FAST)
    t.join(timeout=5)
    assert killed, "no worker process found to kill"
    assert len(at_kill) < n, f"kill came too late ({len(at_kill)} of {n} done)"
    assert rc == 0, err
    r = report(out)
    assert (r["done"], r["failed"]) == (n, 0) and sorted(j["index"] for j in r["jobs"]) == list(range(n))
    for i in range(n):
        assert manifest.is_complete(out / f"j{i}.png")
    final = stamps(out, n)
    assert all(final[i] == s for i, s in at_kill.items())  # written once
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_ray_driver_killed_then_resumed(capsys, tmp_path, model, photos, request):
    """SIGKILL the driver (and the local Ray it started: its process group) after the first output: the
    re-run skips what is complete and does the rest, each job once."""
    n = 4
    man = write_manifest(tmp_path, photos, n)
    out = tmp_path / "out"
    args = ["batch", "--model", model, "--manifest", str(man), "--out-dir", str(out), "--batch-size", "1",
            "--ray", "--workers", "1", "--quiet", *FAST]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ})
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None and not (out.exists() and stamps(out, n)):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = stamps(out, n)
    assert 1 <= len(before) < n, f"kill came too late to test resuming ({len(before)} of {n} done)"
    request.getfixturevalue("ray_local")
    rc, _, err = run(capsys, *args)
    assert rc == 0, err
    r = report(out)
    # a Ray worker outside the killed process group may still finish the job it held after the snapshot:
    # that output is then skipped too; what must hold is that nothing complete is redone and none is lost
    assert r["skipped"] >= len(before) and r["skipped"] + r["done"] == n and r["failed"] == 0, r
    assert sorted(j["index"] for j in r["jobs"]) == list(range(n))
    final = stamps(out, n)
    assert len(final) == n and all(final[i] == s for i, s in before.items())  # every output, none redone


def test_ray_driver_sigterm_is_130_with_the_report(tmp_path, model, photos):
    """issue 20 item 4: SIGTERM to the driver under --ray is what it is for the local batch (the README's
    contract): the run stops, report.json is written (the outputs already written counted as done), exit 130,
    one error line and no native signal dump (Ray's core worker installs one that exits 15)."""
    n = 6
    man = write_manifest(tmp_path, photos, n)
    out = tmp_path / "out"
    args = ["batch", "--model", model, "--manifest", str(man), "--out-dir", str(out), "--batch-size", "1",
            "--ray", "--workers", "1", "--quiet", *FAST]
    err = tmp_path / "err.txt"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"), start_new_session=True, env={**os.environ})
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None and not (out.exists() and stamps(out, n)):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the local Ray is left
        except ProcessLookupError:
            pass
    log = err.read_text()
    assert rc == 130, log[-3000:]
    assert "SIGTERM received" not in log and "Traceback" not in log and "diffedit: error: interrupted" in log
    r = report(out)
    assert r["interrupted"] and r["done"] >= 1 and r["done"] == len(stamps(out, n)) and r["done"] + r["not_run"] == n


def test_every_worker_gets_jobs():
    """issue 20 item 3: jobs per actor call are at most an equal share of the pending jobs (6 jobs in calls of
    the default 16 all went to one of two workers: slower than two --shard processes)."""
    assert ray_batch.rows_per_call(6, 2, None) == 3 and ray_batch.rows_per_call(6, 2, 16) == 3
    assert ray_batch.rows_per_call(100, 2, None) == ray_batch.ROWS and ray_batch.rows_per_call(5, 2, 1) == 1
    assert ray_batch.rows_per_call(1, 4, None) == 1


def test_a_clean_ray_run_logs_only_its_own_lines(tmp_path, model, photos):
    """issue 20 item 3, through the real process (Ray's core logs straight to the file descriptor): the log says
    the start-up time and the split; no error-level core_worker.cc line, none of Ray's INFO chatter, and no
    Ray notice dressed as `diffedit: warning` (--verbose shows Ray's own logs)."""
    n = 4
    man = write_manifest(tmp_path, photos, n)
    env = {k: v for k, v in os.environ.items() if k != "RAY_BACKEND_LOG_LEVEL"}
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "batch", "--model", model, "--manifest", str(man),
                        "--out-dir", str(tmp_path / "out"), "--ray", "--workers", "2", *FAST],
                       capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert "core_worker.cc" not in err and " INFO " not in err and "Traceback" not in err
    # nor the info line of Ray's C++ logger that setting RAY_BACKEND_LOG_LEVEL itself prints (logging.cc)
    assert "logging.cc" not in err and not [line for line in err.splitlines()
                                            if ray_batch.NATIVE_LINE.match(line.encode())], err
    assert not [line for line in err.splitlines() if line.startswith("diffedit: warning:") and "job " not in line]
    assert "started in" in err and f"{n} jobs in calls of 2 across 2 worker(s)" in err and "first job done" in err
    assert report(tmp_path / "out")["done"] == n


def test_tries_bound_a_job_that_kills_its_worker(tmp_path, model, photos, ray_local):
    """A job whose worker died MAX_TRIES times is a failed row, not started again; after a first death the
    batch's jobs run one by one (so the job that kills its worker cannot take the others with it)."""
    o = cli.options_from_args(cli.build_parser().parse_args(
        ["batch", "--model", model, "--manifest", "m.jsonl", "--out-dir", str(tmp_path), *FAST]))
    path, ipath, is_random, hashes, model_id = batch.batch_models(o, Log(quiet=True))
    tries = ray_local.remote(num_cpus=0)(ray_batch.Tries).remote()
    worker = ray_batch.EditWorker(o, path, ipath, is_random, hashes, model_id, tries)
    todo = [manifest.Job(index=i, image=photos[0], pairs=[("cat", "dog")], seed=i, out=f"j{i}.png") for i in range(3)]
    rows = [ray_batch.decode(ray_batch.classify({"index": job.index, "job": ray_batch.pack(job)}, o, model_id, 1000),
                             o, model_id) for job in todo]
    assert [r["status"] for r in rows] == ["pending"] * 3
    keys = [f"{i}:{ray_batch.unpack(r['item'])[1][0]}" for i, r in enumerate(rows)]
    ray_local.get(tries.start.remote(keys[:1] * ray_batch.MAX_TRIES + keys[1:2]))  # job 0 died 3 times, job 1 once
    rows_in = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    got = {r["index"]: r for r in map(ray_batch.unpack, worker(rows_in)["result"])}
    assert got[0]["status"] == "failed" and "died 3 times" in got[0]["error"]
    assert got[1]["status"] == got[2]["status"] == "done"
    assert not (tmp_path / "j0.png").exists()
    assert json.loads((tmp_path / "j1.json").read_text())["batch"] is None  # run alone after a death
    fresh = [ray_batch.decode(ray_batch.classify({"index": i, "job": ray_batch.pack(
        manifest.Job(index=i, image=photos[i % 2], pairs=[("cat", "dog")], seed=i, out=f"j{i}.png"))}, o, model_id, 1000),
        o, model_id) for i in (3, 4)]
    worker({k: np.array([r[k] for r in fresh], dtype=object) for k in fresh[0]})
    assert [json.loads((tmp_path / f"j{i}.json").read_text())["batch"] for i in (3, 4)] == [{"size": 2}] * 2


@pytest.mark.parametrize("other_finishes", [False, True])
def test_a_ray_worker_waits_for_jobs_another_run_claimed(tmp_path, model, photos, ray_local, monkeypatch,
                                                        other_finishes):
    """issue 20 item 8 under --ray: an actor takes the per-output claims as the local batch does. Another run
    holds job 1's claim: the actor does jobs 0 and 2, then waits; job 1 is skipped if the other run completed
    it meanwhile, run here if that run ended without it; no lock file is left."""
    o = cli.options_from_args(cli.build_parser().parse_args(
        ["batch", "--model", model, "--manifest", "m.jsonl", "--out-dir", str(tmp_path), *FAST]))
    path, ipath, is_random, hashes, model_id = batch.batch_models(o, Log(quiet=True))
    tries = ray_local.remote(num_cpus=0)(ray_batch.Tries).remote()
    worker = ray_batch.EditWorker(o, path, ipath, is_random, hashes, model_id, tries)
    seeds = [0, 0, 2]  # jobs 0 and 1 are the same job under two names
    todo = [manifest.Job(index=i, image=photos[0], pairs=[("cat", "dog")], seed=seeds[i], out=f"j{i}.png")
            for i in range(3)]
    rows = [ray_batch.decode(ray_batch.classify({"index": job.index, "job": ray_batch.pack(job)}, o, model_id, 1000),
                             o, model_id) for job in todo]
    other = claims.Claims()
    assert other.take(tmp_path / "j1.png")
    waits = []

    def other_run_goes_on():  # the poll: the other run either writes job 1 or ends without it
        waits.append(sorted(p.name for p in tmp_path.glob("j*.png")))
        if other_finishes:
            for ext in (".png", ".json"):
                (tmp_path / f"j1{ext}").write_bytes((tmp_path / f"j0{ext}").read_bytes())
        other.release(tmp_path / "j1.png")

    monkeypatch.setattr(batch, "wait_for_claims", other_run_goes_on)
    got = [ray_batch.unpack(r) for r in worker({k: np.array([r[k] for r in rows], dtype=object)
                                                for k in rows[0]})["result"]]
    assert waits == [["j0.png", "j2.png"]]  # jobs 0 and 2 first; job 1 not started while claimed
    assert [(r["index"], r["status"]) for r in got] == [(0, "done"), (2, "done"),
                                                         (1, "skipped" if other_finishes else "done")]
    assert all(manifest.is_complete(tmp_path / f"j{i}.png") for i in range(3))
    assert not list(tmp_path.glob(".*.lock"))


def test_two_ray_runs_on_one_out_dir_share_the_work(tmp_path, model, photos):
    """issue 20 item 8: two `batch --ray` runs started together on one --out-dir do each job once between
    them (their actors share the per-output claims), and every output ends complete."""
    n = 8
    man = write_manifest(tmp_path, photos, n)
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "cli.py"), "batch", "--model", model, "--manifest", str(man), "--out-dir",
            str(out), "--batch-size", "1", "--ray", "--workers", "1", "--json", "--steps", "8", "--maps", "2"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever of its local Ray is left
            except ProcessLookupError:
                pass
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in results]
    done = [e["index"] for stdout, _ in results for e in map(json.loads, stdout.splitlines())
            if e["event"] == "job" and e["status"] == "done"]
    assert sorted(done) == list(range(n)), done  # each job done by one run only
    assert all(manifest.is_complete(out / f"j{i}.png") for i in range(n))
    assert not list(out.glob(".*.lock"))


def test_ray_not_installed_is_one_line(capsys, tmp_path, model, photos, monkeypatch):
    man = write_manifest(tmp_path, photos, 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    rc, out, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", tmp_path / "o", "--ray")
    # the package is not on PyPI (issue 20 item 5): the hint names what installs, Ray itself or the checkout's extra
    assert rc == 2 and err.count("\n") == 1 and "pip install 'ray[data]'" in err and "pip install -e '.[ray]'" in err
    assert "diffedit-engine[ray]" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [(["--workers", "2"], "--workers is used only with --ray"),
                                            (["--ray", "--shard", "0/2"], "--shard and --ray do not mix"),
                                            (["--ray", "--workers", "0"], "--workers must be >= 1"),
                                            (["--ray", "--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
                                            (["--verbose"], "--verbose is used only with --ray")])
def test_ray_flags_checked(capsys, tmp_path, model, photos, flags, message):
    man = write_manifest(tmp_path, photos, 1)
    rc, _, err = run(capsys, "batch", "--model", model, "--manifest", man, "--out-dir", tmp_path / "o", *flags)
    assert rc == 2 and message in err


def test_ray_refuses_a_device_index():
    """An actor sees only its own GPU(s) (CUDA_VISIBLE_DEVICES): cuda:1 would not exist there. (The CLI checks
    CUDA's presence first, so on this CPU machine the flag parser is called directly.)"""
    flags = dict(ray=True, shard=None, ray_address=None, workers=None, gpus_per_worker=None, cpus_per_worker=None)
    with pytest.raises(ValueError, match="a worker's device is cuda"):
        cli.ray_options(SimpleNamespace(**flags, device="cuda:1"))
    assert cli.ray_options(SimpleNamespace(**flags, device="cuda")).cpus_per_worker == 1.0

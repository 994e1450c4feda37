"""The same 16-job manifest through the local batch and through `batch --ray` with 1 and 2 workers, on
this machine's CPU with the tiny random model of tests/tiny.py (the rate of a real model on a GPU comes
from the GPU suite; what this measures is what Ray adds per job).

Each run is a fresh `cli.py batch` process into an empty output folder, as a user runs it. Reported per
run: wall time from spawn to exit (with --ray: starting a local Ray, its workers and their model loads),
images/min over that wall time, and the steady rate: the span between the first and the last job's
sidecar (mtime), over 15 intervals, which leaves out start-up. Ray's overhead per job: the steady seconds a
worker spends per job beyond its engine time (the sidecars' engine_s), minus the same for the local batch
with one torch thread (what a CPU worker runs); extra_wall_s: Ray's start-up (local Ray, worker processes,
a model load per worker). Rounds run interleaved and the fastest run of each configuration is kept.

    python benchmarks/ray_bench.py                 # writes benchmarks/results/ray_bench.json
    python benchmarks/ray_bench.py --jobs 16 --steps 10 --maps 2 --size 64

--shipped (issue 20, item 3): the case a new user timed, with the CLI's defaults throughout: 6 jobs on the
shipped shapes-world model (no --model; its example scene, README command 2's two edits, seeds 0..5) through
the local batch, two `--shard K/2` processes started together (wall: until both exit) and `batch --ray
--workers 2`; the Ray rows also give Ray's start-up and its first job's time from the run's own log (--json
events `ray` and `ray_first_job`). Writes benchmarks/results/ray_bench_shipped.json.

    python benchmarks/ray_bench.py --shipped --jobs 6 --rounds 1
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup(folder: Path, jobs: int, size: int):
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    from PIL import Image

    from diffedit_engine import cli

    model = tiny.make_folder(folder / "model", "sd1")
    base = Image.open(cli.sample_image()).convert("RGB").resize((size, size))
    photos = [folder / "a.png", folder / "b.png"]
    base.save(photos[0])
    base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos[1])
    man = folder / "jobs.jsonl"
    man.write_text("".join(json.dumps({"image": str(photos[i % 2]), "edits": ["cat -> dog"], "seed": i,
                                       "out": f"j{i:02d}.png"}) + "\n" for i in range(jobs)))
    return model, man


def timed(args: list, out: Path, jobs: int) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--out-dir", str(out), "--quiet"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: exit {p.returncode}: {p.stderr[-2000:]}")
    sides = sorted(out.glob("j*.json"))
    assert len(sides) == jobs, f"{len(sides)} outputs of {jobs}"
    stamps = sorted(f.stat().st_mtime for f in sides)
    engine = sum(json.loads(f.read_text())["timings"]["engine_s"] for f in sides) / jobs
    steady = (stamps[-1] - stamps[0]) / (jobs - 1)
    return {"wall_s": round(wall, 2), "images_per_min": round(60 * jobs / wall, 2),
            "steady_s_per_job": round(steady, 3), "steady_images_per_min": round(60 / steady, 2) if steady else None,
            "engine_s_per_job": round(engine, 3)}


def shipped(tmp: Path, jobs: int) -> Path:
    """A manifest of `jobs` edits of the shapes world's example scene (the shipped model's), seeds 0..jobs-1."""
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    from diffedit_engine.engine.jobs import session

    image = session.shapes_example()
    edits = ["a red circle -> a blue circle", "a yellow triangle -> a blue triangle"]  # README command 2
    man = tmp / "jobs.jsonl"
    man.write_text("".join(json.dumps({"image": str(image), "edits": edits, "seed": i, "out": f"j{i:02d}.png"}) + "\n"
                           for i in range(jobs)))
    return man


def timed_shipped(name: str, man: Path, out: Path, jobs: int) -> dict:
    """One configuration of --shipped: wall from spawn to the last process's exit, and the Ray events."""
    base = [sys.executable, str(ROOT / "cli.py"), "batch", "--manifest", str(man), "--out-dir", str(out), "--json"]
    extra = {"local": [[]], "two_shards": [["--shard", "0/2"], ["--shard", "1/2"]],
             "ray_2_workers": [["--ray", "--workers", "2"]]}[name]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(base + e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in extra]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{name}: exit {p.returncode}: {err[-2000:]}")
    events = [json.loads(line) for stdout, _ in outs for line in stdout.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "job" and e["status"] == "done"]
    assert len(done) == jobs, f"{name}: {len(done)} jobs done of {jobs}"
    r = {"wall_s": round(wall, 2), "images_per_min": round(60 * jobs / wall, 2),
         "engine_s_per_job": round(sum(e["seconds"] for e in done) / jobs, 3)}
    ray = next((e for e in events if e["event"] == "ray"), None)
    if ray:
        first = next(e for e in events if e["event"] == "ray_first_job")
        split = next(e for e in events if e["event"] == "ray_split")
        r.update(ray_startup_s=ray["startup_s"], ray_first_job_s=first["seconds"], rows_per_call=split["rows_per_call"])
    return r


def main_shipped(a) -> None:
    import platform

    import ray
    import torch

    configs = ("local", "two_shards", "ray_2_workers")
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["DIFFEDIT_CACHE_DIR"] = str(tmp / "cache")  # a first use, as on a fresh clone
        man = shipped(tmp, a.jobs)
        rounds = []
        for r in range(a.rounds):
            rounds.append({})
            for name in configs:
                load = os.getloadavg()[0]
                rounds[-1][name] = {**timed_shipped(name, man, tmp / f"{name}-{r}", a.jobs), "load_at_start": round(load, 1)}
                print(r, name, rounds[-1][name], flush=True)
    runs = {name: min((rd[name] for rd in rounds), key=lambda x: x["wall_s"]) for name in configs}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/ray_bench.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "ray": ray.__version__, "torch": torch.__version__,
              "work": {"jobs": a.jobs, "model": "the shipped shapes-world model (weights/data/shapes)",
                       "image": "its example scene", "edits": 2, "settings": "the CLI's defaults"},
              "runs": runs, "rounds": rounds}
    out = Path(a.out or ROOT / "benchmarks" / "results" / "ray_bench_shipped.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--maps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest run of each is kept")
    ap.add_argument("--out", help="the JSON file (default: benchmarks/results/ray_bench[_shipped].json)")
    ap.add_argument("--shipped", action="store_true", help="issue 20's case: the shipped model, the CLI's defaults, "
                    "local vs two --shard processes vs --ray --workers 2 (see the docstring)")
    a = ap.parse_args()
    if a.shipped:
        return main_shipped(a)
    a.out = a.out or str(ROOT / "benchmarks" / "results" / "ray_bench.json")
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["DIFFEDIT_CACHE_DIR"] = str(tmp / "cache")
        model, man = setup(tmp, a.jobs, a.size)
        common = ["batch", "--model", str(model), "--manifest", str(man), "--steps", str(a.steps),
                  "--maps", str(a.maps), "--batch-size", "1"]
        configs = (("local_1thread", [], {"OMP_NUM_THREADS": "1"}),  # a Ray CPU worker runs one torch thread
                   ("ray_1_worker", ["--ray", "--workers", "1"], {}),
                   ("ray_2_workers", ["--ray", "--workers", "2"], {}))
        rounds = []
        for r in range(a.rounds):  # interleaved: the shared machine's load drifts between runs
            rounds.append({})
            for name, extra, env in configs:
                old = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    rounds[-1][name] = timed(common + extra, tmp / f"{name}-{r}", a.jobs)
                finally:
                    for k, v in old.items():
                        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                print(r, name, rounds[-1][name], flush=True)
    runs = {name: min((rd[name] for rd in rounds), key=lambda x: x["wall_s"]) for name, _, _ in configs}
    # per job, what is not the engine: dataset plumbing, queues, object store (and the write, in both)
    base = runs["local_1thread"]["steady_s_per_job"] - runs["local_1thread"]["engine_s_per_job"]
    for name, workers in (("ray_1_worker", 1), ("ray_2_workers", 2)):
        r = runs[name]
        r["overhead_s_per_job"] = round(workers * r["steady_s_per_job"] - r["engine_s_per_job"] - base, 3)
        r["extra_wall_s"] = round(r["wall_s"] - runs["local_1thread"]["wall_s"], 2)
    import platform

    import ray
    import torch

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/ray_bench.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "ray": ray.__version__, "torch": torch.__version__,
              "work": {"jobs": a.jobs, "size": a.size, "steps": a.steps, "maps": a.maps, "model": "tests/tiny.py sd1",
                       "batch_size": 1}, "runs": runs, "rounds": rounds}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

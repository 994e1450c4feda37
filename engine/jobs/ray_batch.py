"""`diffedit batch --ray`: a manifest through Ray Data, across processes, GPUs and nodes.

Two streaming Ray Data runs (classify, then decode and edit); every step calls the local batch's own
function (engine/jobs/batch.py), so the two runners cannot drift:

  manifest ──(driver: manifest.read_manifest, the same validation)──▶ Dataset of job rows
  ──classify (Ray tasks): batch.job_status, the one completeness rule ─▶ failed / skipped rows leave here
  ──decode (Ray tasks): batch.load_job_images ─▶ an unreadable image is a failed row
  ──EditWorker pool (ActorPoolStrategy): each actor loads the engine once (session.load_editor: the CLI's Editor
    with its optimisations, compile and CUDA graphs on CUDA as the CLI defaults) and runs its batch through
    batch.run_jobs, the local batch's engine call (same-size jobs batched, one generator per job) and writer
  ──▶ the driver streams the rows back, logs them and writes report.json (batch.report_batch)

Rows carry pickled job tuples (the local batch's own items), so nothing here restates a job's fields.
Outputs are written by the actor (the local batch's writer: atomic, sidecar last), so `out_dir` must be a
filesystem every worker sees.

Faults. Actors restart and their tasks are retried without limit (max_restarts / max_task_retries = -1): a
SIGKILLed worker loses nothing. Nothing is duplicated: before running a job the actor applies the
completeness rule again, so a job a killed attempt had already written is reported done, not rewritten. A
job that keeps killing its worker (out of memory, a crash in a native library) is bounded by a tries counter
that lives in its own actor: after a first death a batch's jobs run one by one, and a job started MAX_TRIES
times is reported failed instead of being started again. The driver killed: the re-run's classify step
skips every complete output.
"""
import hashlib
import logging
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic
from ...weights import random_model
from . import batch, claims, manifest, session
from .console import Log, UsageError

# Fault tolerance, explicit. These are Ray Data 2.60's own defaults too, so the behaviour stays when Ray
# drops the ray_remote_args keywords (deprecated in 2.60, removal announced for 2.64; the extra pins Ray).
RESTARTS = {"max_restarts": -1, "max_task_retries": -1}  # a dead actor restarts; its tasks are retried on it
RETRIES = {"max_retries": 3}  # classify / decode tasks whose process died: the task again, 3 times at most
ROWS = 16  # jobs per actor call without --batch-size: the Editor batches same-size jobs within it
MAX_TRIES = 3  # engine runs of one job whose worker died before it finished; then it is a failed row
# the package is not on PyPI: the extra is installed from a checkout (or a built wheel), or Ray directly
INSTALL_HINT = "--ray needs Ray: pip install 'ray[data]' (or, in a checkout: pip install -e '.[ray]')"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None          # None: RAY_ADDRESS, else a local Ray started for this run
    workers: int | None = None          # None: one per GPU (/ gpus_per_worker), or 1 on CPU
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU actors)
    cpus_per_worker: float = 1.0        # also the actor's torch thread count on CPU
    verbose: bool = False               # Ray's own logs as Ray prints them; default: only the run's own lines


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pyarrow/pandas)
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


# ---- rows: pickled items of the local batch (Job, fingerprint, EditSettings, image), so no Arrow schema has to
# fit None, tuples, Paths or dataclasses; the report records travel the same way ---------------------------

def pack(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(b: bytes):
    return pickle.loads(b)


def classify(row: dict, o, model_id: dict, num_train_timesteps: int) -> dict:
    """Ray task: the local batch's status of one job (batch.job_status): a failed or skipped record, or the
    pending item (job, fingerprint, settings)."""
    status, item = batch.job_status(o, unpack(row["job"]), model_id, num_train_timesteps)
    return {"index": row["index"], "status": status, "item": pack(item)}


def decode(row: dict, o, model_id: dict) -> dict:
    """Ray task: read and validate a pending job's image with the local batch's loader and limits."""
    failed = []
    loaded = batch.load_job_images(o, [unpack(row["item"])], model_id,
                                 lambda job, status, **kw: failed.append({**job.record(), "status": status, **kw}))
    if failed:
        return {"index": row["index"], "status": "failed", "item": pack(failed[0])}
    return {"index": row["index"], "status": "pending", "item": pack(loaded[0])}


class Tries:
    """How many times each job was started on an engine: kept in its own actor, outside the workers it
    counts, so a worker's death does not reset it."""

    def __init__(self):
        self.n = {}

    def start(self, keys: list) -> list:
        for k in keys:
            self.n[k] = self.n.get(k, 0) + 1
        return [self.n[k] for k in keys]

    def started(self, keys: list) -> list:
        return [self.n.get(k, 0) for k in keys]


class EditWorker:
    """A Ray actor holding one engine (the CLI's Editor, loaded once); called with a batch of decoded job
    rows, it runs them through batch.run_jobs (the local batch's engine call and writer) and returns their
    report records."""

    def __init__(self, o, path, ipath, is_random: bool, hashes: dict, model_id: str, tries,
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.o, self.model_id, self.tries = o, model_id, tries
        self.held = claims.Claims()  # the outputs this actor is computing: other runs on out_dir wait for them
        log = Log(quiet=True)
        self.ed, _ = session.load_editor(path, ipath, o.settings, o.common, log, o.batch_size)
        self.model = session.models_record(self.ed, path, ipath, is_random, hashes)

    def __call__(self, rows_in: dict) -> dict:
        ray = import_ray()
        rows, todo = [], []

        def finish(job, status, **kw):
            self.held.release(self.o.out_dir / job.out)
            rows.append({**job.record(), "status": status, **kw})

        for status, item in zip(rows_in["status"], rows_in["item"]):
            item = unpack(item)
            if status != "pending":  # failed at decoding: passed through
                rows.append(item)
            else:
                todo.append(item)
        if todo:  # complete, and started before: an attempt of this run that died after writing it
            earlier = ray.get(self.tries.started.remote([key(it) for it in todo]))
            for it, n in zip(list(todo), earlier):
                if n and batch.job_status(self.o, it[0], self.model_id)[0] == "skipped":
                    todo.remove(it)
                    finish(it[0], "done", note="written by an earlier attempt")
        try:  # the local batch's claims: a job another run is computing waits for it, then is skipped or run
            while todo:
                claimed, todo = batch.claim_jobs(self.held, self.o, todo, self.model_id, finish)
                self.run(ray, claimed, finish)
                if todo:
                    batch.wait_for_claims()
        finally:
            self.held.release_all()
        return {"index": np.array([r["index"] for r in rows], dtype=np.int64),
                "result": np.array([pack(r) for r in rows], dtype=object),
                "model": np.array([pack(self.model)] * len(rows), dtype=object)}

    def run(self, ray, todo: list, finish) -> None:
        """Run claimed items through the engine, counting each job's starts (Tries)."""
        if not todo:
            return
        tries = ray.get(self.tries.start.remote([key(it) for it in todo]))
        runnable = []
        for it, n in zip(todo, tries):
            if n > MAX_TRIES:
                finish(it[0], "failed", error=f"its worker died {MAX_TRIES} times while running it "
                                              f"(out of memory, or a crash in native code?)")
            else:
                runnable.append(it)
        if runnable and max(tries) > 1:  # a worker died on this batch before: isolate the job that kills it
            for it in runnable:
                batch.run_jobs(self.ed, self.model, self.o, [it], finish)
        elif runnable:
            batch.run_jobs(self.ed, self.model, self.o, runnable, finish)


def key(item) -> str:
    """A decoded item's key in Tries: its index and fingerprint."""
    return f"{item[0].index}:{item[1][0]}"


# ---- the driver ------------------------------------------------------------------------------------------

def worker_path() -> str:
    """A folder whose one entry, diffedit_engine, links to this package: on the workers' PYTHONPATH it makes them
    import the driver's copy (a checkout run without pip install too) without putting the checkout's own
    folders (kernels, weights, engine) on sys.path as top-level names, where `kernels` would hide Hugging
    Face's package of that name."""
    root = Path(__file__).resolve().parents[2]
    folder = random_model.cache_root() / "ray-path" / hashlib.sha1(str(root).encode()).hexdigest()[:16]
    link = folder / "diffedit_engine"
    if not (link.is_symlink() and link.resolve() == root):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".diffedit_engine.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(root, tmp)
        os.replace(tmp, link)  # atomic: concurrent drivers agree on the link
    return str(folder)


def init(ray, ro: RayOptions, quiet: bool) -> bool:
    """Join RAY_ADDRESS / --ray-address, or start a local Ray sized so that reads, decodes and the actors
    all get a CPU (a pool of two 1-CPU actors on num_cpus=2 stalls for good: the read tasks get none).
    True when this call started or joined Ray (and the run must shut it down)."""
    if ray.is_initialized():  # e.g. a caller (tests, a notebook) that sized its own Ray
        return False
    if not ro.verbose:  # Ray's C++ core logs to stderr at its own levels; on a clean run it printed an
        # error-level core_worker.cc line (actor constructor arguments in the object store): only fatal ones
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kw = {"log_to_driver": ro.verbose and not quiet, "runtime_env": {"env_vars": {"PYTHONPATH": worker_path()}},
          # Ray's Python loggers: its own INFO and WARNING chatter (start-up, token auth) only with --verbose
          "logging_level": logging.INFO if ro.verbose else logging.ERROR}
    address = ro.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kw)
    else:
        gpus = torch.cuda.device_count()
        per_gpu = ro.gpus_per_worker if ro.gpus_per_worker is not None else 1.0
        workers = ro.workers or (max(1, int(gpus / per_gpu)) if gpus and per_gpu else 1)
        cpus = max(os.cpu_count() or 1, int(workers * ro.cpus_per_worker + 0.999) + 2)
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, **kw)
    return True


# a line of Ray's C++ logger: "[2026-12-07 19:48:15,654 I 5083 5083] logging.cc:303: ..." (level D/I/W/E/F)
NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([DIWEF]) \d+ \d+\] \S+:\d+: ")


def quiet_native_info(start, verbose: bool):
    """start() (ray.init) with what it writes to file descriptor 2 held back, then passed on without the C++
    core's debug, info and warning lines unless verbose. Setting RAY_BACKEND_LOG_LEVEL (below) makes the
    driver's core print one info line saying so (logging.cc, "Set ray log level from environment variable"),
    past the level it sets: the notice of our own setting, not news for the user. Error and fatal lines, and
    everything that is not a C++ log line, pass through unchanged, as Ray wrote them."""
    if verbose:
        return start()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            return start()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().splitlines(keepends=True):
                level = NATIVE_LINE.match(line)
                if level is None or level.group(1) in b"EF":
                    try:
                        os.write(2, line)
                    except OSError:  # stderr's reader is gone (console.write's rule: the work goes on)
                        break


def keep_signal_handlers(start):
    """start() (ray.init) with the driver's SIGTERM and SIGINT handlers kept: Ray's core worker installs a native
    handler that dumps the stack and dies with status 15, so a SIGTERM would leave no report. With the CLI's
    handler back, SIGTERM unwinds as ^C does: the run stops, Ray is shut down, report.json is written, exit 130,
    exactly as the local batch."""
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's only
        return start()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return start()
    finally:
        for s, handler in saved.items():
            if handler is not None:  # None: set from C, not Python; nothing of ours to restore
                signal.signal(s, handler)


def rows_per_call(pending: int, workers: int, batch_size: int | None) -> int:
    """Jobs per actor call: --batch-size (ROWS without it), but never more than an equal share of the pending
    jobs, so every worker gets work (6 jobs in calls of 16 went to one of two actors: slower than sharding)."""
    return max(1, min(batch_size or ROWS, -(-pending // max(1, workers))))


def pool_shape(ray, ro: RayOptions) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) from the flags and the cluster: one actor per GPU on GPU
    clusters (fractional --gpus-per-worker packs several on one GPU), one CPU actor otherwise."""
    total_gpus = ray.cluster_resources().get("GPU", 0)
    g = ro.gpus_per_worker if ro.gpus_per_worker is not None else (1.0 if total_gpus else 0.0)
    if g > 0 and g > total_gpus:
        raise UsageError(f"--gpus-per-worker {g}: the Ray cluster has {total_gpus:g} GPUs")
    n = ro.workers or (max(1, int(total_gpus / g)) if g else 1)
    return n, g, ro.cpus_per_worker


def run(o, ro: RayOptions, log) -> int:
    """`diffedit batch --ray`: plan, run and report as the local batch does, on Ray Data."""
    ray = import_ray()
    c = o.common
    all_jobs = batch.read_jobs(o, log)
    session.check_writable(o.out_dir, "--out-dir")
    path, ipath, is_random, hashes, model_id = batch.batch_models(o, log)
    # the local batch's checks across jobs: output names against each other, the run's own files and the
    # inputs (a colliding job fails in classify), and leftover temp files of killed runs removed
    model_files = [Path(m) for m in (c.model, o.inpaint_model) if m and Path(m).is_file()]
    manifest.check_outputs(all_jobs, o.out_dir, 1, [o.manifest, *model_files])
    atomic.clean_temps(o.out_dir, min_age_s=batch.TEMP_MIN_AGE_S)
    num_train_timesteps = session.schedule_length(path)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    quiet = c.quiet or c.json
    t_start = time.perf_counter()
    owned = keep_signal_handlers(lambda: quiet_native_info(lambda: init(ray, ro, quiet), ro.verbose))
    records, model, interrupted, crashed = {}, None, False, None

    def record(rec):
        if not any(r.get("status") == "done" for r in records.values()) and rec.get("status") == "done":
            log.event("ray_first_job", f"Ray: first job done {time.perf_counter() - t_start:.1f} s after the start "
                      f"(Ray's start-up, the workers' model loads)", seconds=round(time.perf_counter() - t_start, 3))
        records[rec["index"]] = rec
        kw = {k: rec[k] for k in ("error", "seconds", "note", "warnings") if k in rec}
        log.event("job", "" if rec["status"] != "failed" else f"job {rec['index']} ({rec['image']}): failed: "
                  f"{rec.get('error', '')}", index=rec["index"], status=rec["status"], out=rec["out"], **kw)
        for warning in rec.get("warnings", ()):
            log.warning(f"job {rec['index']} ({rec['image']}): {warning}", "empty_mask")

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")  # small manifests
            n, g, cpus = pool_shape(ray, ro)
            ctx = ray.data.DataContext.get_current()
            ray_logs = ro.verbose and not quiet  # Ray's progress lines and INFO logs: as Ray prints them, on request
            if not ray_logs:  # first: switching the progress bars off is itself a logged warning
                logging.getLogger("ray.data").setLevel(logging.ERROR)
            ctx.enable_progress_bars = ray_logs
            ctx.print_on_execution_start = ray_logs
            startup = time.perf_counter() - t_start
            log.event("ray", f"Ray {ray.__version__}: {n} worker(s) × ({cpus:g} CPU, {g:g} GPU) on "
                      f"{ray.cluster_resources().get('CPU', 0):g} CPUs / {ray.cluster_resources().get('GPU', 0):g} GPUs; "
                      f"started in {startup:.1f} s", workers=n, gpus_per_worker=g, cpus_per_worker=cpus,
                      startup_s=round(startup, 3))
            o.out_dir.mkdir(parents=True, exist_ok=True)
            blocks = lambda rows: max(1, min(rows, 4 * n))  # noqa: E731  (several blocks per worker: balance)
            # one process each for the light steps: a task process imports torch once and is reused
            light = {"num_cpus": 0.25, "compute": ray.data.TaskPoolStrategy(size=1), **RETRIES}
            pending_rows = []
            ds = ray.data.from_items([{"index": j.index, "job": pack(j)} for j in all_jobs],
                                     override_num_blocks=blocks(len(all_jobs)))
            for r in ds.map(classify, fn_kwargs={"o": o, "model_id": model_id,
                                                        "num_train_timesteps": num_train_timesteps}, **light).iter_rows():
                if r["status"] == "pending":
                    pending_rows.append({"index": r["index"], "item": r["item"]})
                else:
                    rec = unpack(r["item"])
                    records[rec["index"]] = rec
                    if rec["status"] == "failed":
                        record(rec)
            pending = len(all_jobs) - len(records)
            log.event("plan", f"manifest {o.manifest}: {len(all_jobs)} jobs, "
                      f"{sum(r['status'] == 'skipped' for r in records.values())} already complete, {pending} to run",
                      jobs=len(all_jobs), shard=[0, 1], in_shard=len(all_jobs), pending=pending)
            if pending:
                rows = rows_per_call(pending, n, o.batch_size)
                log.event("ray_split", f"Ray: {pending} jobs in calls of {rows} across {n} worker(s)",
                          rows_per_call=rows)
                tries = ray.remote(num_cpus=0)(Tries).remote()
                todo = (ray.data.from_items(pending_rows, override_num_blocks=blocks(pending))
                        .map(decode, fn_kwargs={"o": o, "model_id": model_id}, **light)
                        .map_batches(EditWorker, batch_size=rows, batch_format="numpy",
                                     compute=ray.data.ActorPoolStrategy(size=n), num_cpus=cpus, num_gpus=g or None,
                                     fn_constructor_kwargs={"o": o, "path": path, "ipath": ipath, "is_random": is_random,
                                                            "hashes": hashes, "model_id": model_id, "tries": tries,
                                                            "threads": None if g else max(1, int(cpus))},
                                     **RESTARTS))
                for r in todo.iter_rows():
                    model = model or unpack(r["model"])
                    record(unpack(r["result"]))
    except KeyboardInterrupt:
        interrupted = True
    except UsageError:
        raise
    except Exception as e:  # Ray itself failed (a lost node, tasks out of retries): report what got done
        crashed = f"Ray: {type(e).__name__}: {' '.join(str(e).split())[:500]}"
    finally:
        if owned:
            ray.shutdown()
    if interrupted or crashed:  # outputs a worker wrote whose rows had not streamed back yet: done, not lost
        for job in all_jobs:
            if job.index not in records and job.error is None and manifest.is_complete(o.out_dir / job.out):
                records[job.index] = {**job.record(), "status": "done", "note": "written before the run stopped"}
    plan = batch.BatchPlan(all_jobs, all_jobs, (0, 1), [], records, path, ipath, is_random, hashes, model_id)
    rc = batch.report_batch(o, plan, model, interrupted, started, log)
    if crashed:
        log.error(f"{crashed}; {len(all_jobs) - len(records)} jobs not run (re-run to resume)")
    return max(rc, 1) if crashed else rc

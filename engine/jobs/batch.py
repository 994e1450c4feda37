"""The batch runner (`diffedit batch`, one process or one shard): plan every job before any work, run the
pending ones through one Editor window by window, write each job's outputs as its engine call completes, and
report. engine/jobs/ray_batch.py runs the same steps (job_status, load_job_images, run_jobs, report_batch) on
Ray Data, so the two runners cannot drift.
"""
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..edit.settings import EditSettings
from ..files import atomic, images
from .. import runtime
from ...weights.hashing import model_hash
from . import claims, manifest, outputs, validate
from .console import Log, UsageError
from .session import (Common, check_compat, check_steps, check_writable, engine_record, hashing_note, load_editor, models_record,
                      resolve_model, schedule_length, write_error)


@dataclass(frozen=True)
class BatchOptions:
    manifest: Path
    out_dir: Path
    shard: tuple | None = None      # (K, N); None: RANK/WORLD_SIZE from the environment, else (0, 1)
    batch_size: int | None = None   # images per engine call; None: from free memory
    seed: int = 0
    settings: EditSettings = EditSettings()
    save_masks: bool = False
    inpaint_model: str | None = None
    common: Common = field(default_factory=Common)
    ray: object = None              # ray_batch.RayOptions with --ray




@dataclass
class BatchPlan:
    jobs: list                      # every job of the manifest
    mine: list                      # this shard's
    shard: tuple                    # (K, N)
    pending: list                   # [(job, fingerprint, settings)] to run
    records: dict                   # job index -> report record (failed / skipped so far)
    model_path: Path
    inpaint_path: Path | None
    is_random: bool
    hashes: dict
    model_id: dict | None = None    # what identifies the model in a job's job_key


TEMP_MIN_AGE_S = 600  # leftover temp files older than this are a killed run's (a live writer's are seconds old)


def image_size(path, c: Common):
    """(H, W) from the image's header, or None when it cannot be read (loading it reports why)."""


    try:
        f, _ = images.open_regular(path, c.max_bytes)
        with f, Image.open(f, formats=images._formats()) as im:
            return im.size[1], im.size[0]
    except Exception:
        return None


def plan_jobs(all_jobs: list, mine: list, out_dir: Path, base: EditSettings, save_masks: bool, model_id: dict,
              n_shards: int = 1, inputs=(), num_train_timesteps: int = 1000):
    """The local batch's and the Ray batch's planner, before any work: each job's settings checked, output
    names checked against each other, the run's own files and the inputs (manifest.check_outputs: every job of
    the manifest, so all shards agree), leftover temp files of killed runs removed, complete outputs of the
    same input content, settings and model skipped. Returns (pending [(job, fingerprint, settings)],
    records {index: failed/skipped record})."""
    settings = {}
    for job in all_jobs:
        if job.error is None:
            try:
                settings[job.index] = manifest.check_settings(base.updated(**job.settings), len(job.pairs),
                                                          num_train_timesteps=num_train_timesteps)
            except ValueError as e:
                job.error = str(e)
    manifest.check_outputs(all_jobs, out_dir, n_shards, inputs)
    for folder in sorted({(out_dir / j.out).parent for j in mine if j.error is None} | {out_dir}):
        atomic.clean_temps(folder, min_age_s=TEMP_MIN_AGE_S)
    records, pending = {}, []
    for job in mine:
        status, item = _job_status(job, settings.get(job.index), out_dir, save_masks, model_id)
        if status == "pending":
            pending.append(item)
        else:
            records[job.index] = item
    return pending, records


def _job_status(job, s, out_dir: Path, save_masks: bool, model_id: dict):
    if job.error:
        return "failed", {**job.record(), "status": "failed", "error": job.error}

    if manifest.is_complete_job(out_dir / job.out, job, s, save_masks, model_id):
        return "skipped", {**job.record(), "status": "skipped", "reason": "complete output exists"}
    fp = manifest.fingerprint(job.record(), {**s.identity(), "save_masks": save_masks}, model_id["sha256"])
    return "pending", (job, fp, s)


def batch_models(o: BatchOptions, log: Log):
    """(model path, inpainting model path or None, random?, hashes, model id for the job keys); the steps are
    checked against the model's schedule here, before any work."""
    path, is_random = resolve_model(o.common.model, log)
    ipath = resolve_model(o.inpaint_model, log, "--inpaint-model")[0] if o.inpaint_model else None
    check_steps(o.settings, path)
    check_compat(o.settings, path)
    hashes = model_hash(path, on_miss=lambda p: hashing_note(p, log))
    model_id = {"sha256": hashes["sha256"], **({"inpaint_sha256": model_hash(ipath)["sha256"]} if ipath else {})}
    return path, ipath, is_random, hashes, model_id


def job_status(o: BatchOptions, job, model_id: dict, num_train_timesteps: int = 1000):
    """("failed" | "skipped", report record) or ("pending", (job, fingerprint, settings)): a bad job, a
    complete output of the same input content, settings and model (resume), or work. The one completeness
    rule of every batch runner (local, shard, Ray); plan_jobs applies it after the checks across jobs."""
    s = None
    if job.error is None:
        try:
            s = manifest.check_settings(o.settings.updated(**job.settings), len(job.pairs),
                                    num_train_timesteps=num_train_timesteps)
        except ValueError as e:
            job.error = str(e)
    return _job_status(job, s, o.out_dir, o.save_masks, model_id)


def read_jobs(o: BatchOptions, log: Log) -> list:
    """The manifest's jobs (a usage error when the file as a whole is unusable); a manifest with no job is a
    warning, not silence (the run then writes an empty report and exits 0)."""
    try:
        jobs = manifest.read_manifest(o.manifest, o.seed)
    except manifest.ManifestError as e:
        raise UsageError(str(e)) from None
    if not jobs:
        log.warning(f"manifest {o.manifest}: no jobs in it (empty, or only blank and '#' lines): nothing to do",
                    "empty_manifest")
    return jobs


def env_shard_note(k: int, n: int, log: Log) -> None:
    """Say that the shard came from RANK/WORLD_SIZE: under torchrun (LOCAL_RANK set too) as a note, otherwise as
    a warning, since a leftover RANK/WORLD_SIZE in a shell would silently run 1/N of the batch."""
    text = f"shard {k}/{n} from RANK={k} WORLD_SIZE={n} in the environment: this run does every {n}th job only"
    if "LOCAL_RANK" in os.environ:
        log.event("shard", text, shard=[k, n])
    else:
        log.warning(f"{text} (no torchrun here: unset RANK and WORLD_SIZE, or pass --shard 0/1 to run them all)",
                    "env_shard")


def plan_batch(o: BatchOptions, log: Log) -> BatchPlan:
    """Read the manifest, take this shard, check every job and value (plan_jobs), the free disk space; no
    model yet."""
    all_jobs = read_jobs(o, log)
    try:
        k, n = o.shard or manifest.shard_from_env()
    except ValueError as e:
        raise UsageError(f"RANK/WORLD_SIZE: {e}") from None
    if o.shard is None and n > 1:
        env_shard_note(k, n, log)
    mine = manifest.select_shard(all_jobs, k, n)
    check_writable(o.out_dir, "--out-dir")
    path, ipath, is_random, hashes, model_id = batch_models(o, log)
    c = o.common
    model_files = [Path(m) for m in (c.model, o.inpaint_model) if m and Path(m).is_file()]
    pending, records = plan_jobs(all_jobs, mine, o.out_dir, o.settings, o.save_masks, model_id, n,
                                 [o.manifest, *model_files], schedule_length(path))
    needs = []
    for job, _, s in pending:
        size = image_size(job.image, c)
        if size is not None:
            needs.append(outputs.need_bytes(outputs.output_paths(o.out_dir / job.out, len(job.pairs), o.save_masks),
                                            size))
    try:  # staging needs one whole set beside the old one: refuse when not even the largest fits
        validate.free_space(o.out_dir, max(needs, default=0), "--out-dir")
    except validate.ValidationError as e:
        raise UsageError(str(e)) from None
    try:
        validate.free_space(o.out_dir, sum(needs), "--out-dir")
    except validate.ValidationError as e:
        log.event("warning", f"warning: {e} (upper bound; the jobs that do not fit fail with 'disk full')")
    log.event("plan", f"manifest {o.manifest}: {len(all_jobs)} jobs; shard {k}/{n}: {len(mine)}, "
              f"{sum(r['status'] == 'skipped' for r in records.values())} already complete, "
              f"{sum(r['status'] == 'failed' for r in records.values())} refused, {len(pending)} to run",
              jobs=len(all_jobs), shard=[k, n], in_shard=len(mine), pending=len(pending))
    return BatchPlan(all_jobs, mine, (k, n), pending, records, path, ipath, is_random, hashes, model_id)


WINDOW = 64  # jobs whose images are loaded at once; the engine batches within it


def load_job_images(o: BatchOptions, items, model_id: dict, finish) -> list:
    """items [(job, fingerprint, settings)] -> [(job, (fingerprint, job key), settings, image (3, H, W), load
    seconds)]: each image read within the run's limits and its content keyed for resume; an unreadable or
    invalid image is finish(job, "failed", error=...) and left out."""
    c, loaded = o.common, []
    for job, fp, s in items:
        t0 = time.perf_counter()
        try:
            x = images.to_tensor(images.load_image(job.image, c.max_pixels, c.max_bytes))
            key = manifest.job_key(job, s, o.save_masks, model_id, c.max_bytes)
        except (images.ImageError, OSError) as e:
            finish(job, "failed", error=str(e))
            continue
        loaded.append((job, (fp, key), s, x, time.perf_counter() - t0))
    return loaded


def run_jobs(ed, model: dict, o: BatchOptions, loaded: list, finish, on_disk_full=None) -> None:
    """Run loaded jobs (load_job_images' items) through the Editor, which batches same-size jobs with the same
    edits and settings (each job with its own seed's generator), and write each job's output set as its engine
    call completes; finish(job, "done" | "failed", **fields) once per job. model: models_record's.
    Jobs with their own `threads` run in groups under that many torch threads (process-wide, so one count per
    engine call), the sidecar recording the count each job ran with.
    on_disk_full(): called when a write fails for lack of space (the caller stops starting jobs)."""
    groups = {}
    for item in loaded:
        groups.setdefault(item[0].threads, []).append(item)
    for threads, part in groups.items():
        with torch_threads(threads):
            engine = {**engine_record(ed), "threads": torch.get_num_threads()}
            engine_jobs = [runtime.Job(x, job.pairs, {"seed": job.seed, **job.settings}) for job, _, _, x, _ in part]
            for i, r in ed.run_batch(engine_jobs, o.settings):
                write_job(model, o, part[i], r, engine, finish, on_disk_full)


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to n inside (None: left as they are), restored after."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_job(model: dict, o: BatchOptions, item, r, engine: dict, finish, on_disk_full) -> None:
    """One job's engine result (or exception) written as its output set, and finish() called."""
    job, (fp, key), s, x, t_img = item
    if isinstance(r, Exception):
        finish(job, "failed", error=f"engine: {type(r).__name__}: {r}")
        return
    size = tuple(x.shape[-2:])
    out = outputs.outcome(r, size)
    rec = outputs.Record("batch", job.image, job.pairs, job.seed, s, size)
    meta = outputs.sidecar(rec, model, out, {"load_image_s": t_img, "engine_s": out.seconds}, engine,
                           fp=fp, job_key=key)
    try:
        outputs.write_outputs(o.out_dir / job.out, x, out, meta,
                              outputs.parameters_text(rec, model), extras=o.save_masks)
    except (OSError, ValueError) as e:
        if atomic.is_disk_full(e) and on_disk_full:
            on_disk_full()
        finish(job, "failed", error=write_error(o.out_dir / job.out, e) if isinstance(e, OSError)
               else f"writing {job.out}: {e}")
        return
    empty = outputs.empty_masks(job.pairs, meta["mask_coverage"])
    finish(job, "done", seconds=round(out.seconds, 3), **({"warnings": empty} if empty else {}))


def run_batch(o: BatchOptions, plan: BatchPlan, log: Log):
    """Run the pending jobs through one Editor (loaded on first need), writing each job's outputs as its engine
    call completes. Returns (model record or None, interrupted)."""
    c = o.common
    state = {"ed": None, "model": None, "disk_full": None}
    model_id = plan.model_id or {"sha256": plan.hashes["sha256"]}
    held = claims.Claims()
    bar = tqdm(total=len(plan.pending), unit="job", desc="batch", disable=c.quiet or c.json or not plan.pending,
               dynamic_ncols=True, mininterval=1.0)

    def finish(job, status, **kw):
        held.release(o.out_dir / job.out)
        plan.records[job.index] = {**job.record(), "status": status, **kw}
        log.event("job", "" if status == "done" else f"job {job.index} ({job.image}): {status}: {kw.get('error', '')}",
                  index=job.index, status=status, out=job.out, **kw)
        for warning in kw.get("warnings", ()):
            log.warning(f"job {job.index} ({job.image}): {warning}", "empty_mask")
        bar.update(1)

    def window(items) -> list:
        """Run the items this run can claim; returns those another live run holds (to try again later)."""
        if state["disk_full"]:
            for job, _, _ in items:
                finish(job, "failed", error=f"not run: the disk is full ({state['disk_full']})")
            return []
        claimed, others = claim_jobs(held, o, items, model_id, finish)
        loaded = load_job_images(o, claimed, model_id, finish)
        if not loaded:
            return others
        if state["ed"] is None:  # loaded on first use: a re-run with nothing left to compute never loads it
            state["ed"], _ = load_editor(plan.model_path, plan.inpaint_path, o.settings, c, log, o.batch_size)
            state["model"] = models_record(state["ed"], plan.model_path, plan.inpaint_path, plan.is_random,
                                           plan.hashes)
        run_jobs(state["ed"], state["model"], o, loaded, finish,
                 on_disk_full=lambda: state.update(disk_full=o.out_dir))
        return others

    interrupted, deferred = False, []
    try:
        for w in range(0, len(plan.pending), WINDOW):
            deferred += window(plan.pending[w:w + WINDOW])
        if deferred:
            log.event("claimed", f"{len(deferred)} job(s) are being run by another process on {o.out_dir} (e.g. "
                      f"{claims.holder(o.out_dir / deferred[0][0].out)}): waiting to skip them when done, or to "
                      f"run them if that process ends first", claimed_by_others=len(deferred))
        while deferred:
            wait_for_claims()
            deferred = window(deferred)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        held.release_all()
        bar.close()
    return state["model"], interrupted


def claim_jobs(held: claims.Claims, o: BatchOptions, items: list, model_id: dict, finish) -> tuple[list, list]:
    """(claimed, others): the items (job, _, settings, ...) whose outputs this process now holds the claim of
    and still has to compute, and those another live process holds (to try again after wait_for_claims); a
    job completed by another run since the plan is finish(job, "skipped"). Every runner claims here (local,
    shard, Ray actor), so runs on one --out-dir share the work whichever runner each is."""
    claimed, others = [], []
    for item in items:
        job, s = item[0], item[2]
        try:
            mine = held.take(o.out_dir / job.out)
        except OSError:  # no lock file possible there (read-only, ...): the job's own write reports why
            mine = True
        if not mine:
            others.append(item)
        elif manifest.is_complete_job(o.out_dir / job.out, job, s, o.save_masks, model_id):
            held.release(o.out_dir / job.out)
            finish(job, "skipped", reason="completed by another run")  # since this run's plan
        else:
            claimed.append(item)
    return claimed, others


CLAIM_POLL_S = 2.0  # how often a run checks the jobs another run holds


def wait_for_claims() -> None:
    time.sleep(CLAIM_POLL_S)


def report_batch(o: BatchOptions, plan: BatchPlan, model, interrupted: bool, started: str, log: Log) -> int:
    """Write report.json (report.K-of-N.json for a shard); the exit status."""
    k, n = plan.shard
    records, mine = plan.records, plan.mine
    report_path = o.out_dir / ("report.json" if n == 1 else f"report.{k}-of-{n}.json")
    failed = sorted(i for i, r in records.items() if r["status"] == "failed")
    counts = {s: sum(r["status"] == s for r in records.values()) for s in ("done", "skipped", "failed")}
    report = {"manifest": str(o.manifest), "out_dir": str(o.out_dir), "shard": [k, n],
              "jobs_in_manifest": len(plan.jobs), "jobs_in_shard": len(mine), **counts,
              "not_run": len(mine) - len(records), "interrupted": interrupted,
              "model": model or {"source": str(plan.model_path), "sha256": plan.hashes["sha256"],
                                 "random_weights": plan.is_random},
              "settings": {**o.settings.to_dict(), "save_masks": o.save_masks}, "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "jobs": [records[i] for i in sorted(records)]}
    o.out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(report_path, outputs.finite(report), strict=True)  # a bad line's NaN is reported as null
    log.event("report", f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
              + (f" (jobs {failed[:20]})" if failed else "") + f"; report: {report_path}", report=str(report_path), **counts)
    if interrupted:
        log.error(f"interrupted; {len(mine) - len(records)} jobs not run (re-run to resume)")
        return 130
    return 1 if failed else 0


def run(o: BatchOptions, log: Log) -> int:
    """`diffedit batch` without --ray: plan, run, report; the exit status."""
    plan = plan_batch(o, log)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    model, interrupted = run_batch(o, plan, log)
    return report_batch(o, plan, model, interrupted, started, log)



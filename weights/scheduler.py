"""A checkpoint's schedulers: scheduler/scheduler_config.json and, when present, inverse_scheduler/, read the way
diffusers builds them, into the config dataclasses of the engine's two sampler families.

diffusers' rule, kept here: a scheduler built from a config takes the keys the file sets and its own class
defaults for the rest (from_config drops the defaults another class filled in: _use_default_values). So
DDIMScheduler.from_config(a PNDM config) is "DDIM defaults + the PNDM file's keys", which is exactly how the
DiffEdit pipeline's users turn an SD folder's PNDM scheduler into DDIM. The engine does the same:

  DDIMScheduler, DDIMInverseScheduler                     -> family "ddim" (engine.ddim.SchedulerConfig)
  DPMSolverMultistepScheduler, ...InverseScheduler        -> family "dpm++2m" (engine.dpm.DPMSolverConfig)
  PNDM, LMS, Euler, DDPM, ... (discrete-time, same betas) -> "ddim", logged (DiffEdit's inversion is DDIM)
  anything else (flow matching, LCM, TCD, ...)            -> ValueError

Without inverse_scheduler/ the inversion config is the sampling file read for the inverse class, as
DDIMInverseScheduler.from_config(pipe.scheduler.config). A single file carries no scheduler: Stable
Diffusion's DDIM schedule is used (SD_SCHEDULE).
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..engine.samplers import ddim, dpm
from .files import CheckpointError

log = logging.getLogger(__name__)

FAMILIES = ("ddim", "dpm++2m")
CLASSES = {"ddim": ("DDIMScheduler", "DDIMInverseScheduler"),
           "dpm++2m": ("DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler")}
# discrete-time schedulers over the same β schedule whose configs DiffEdit users convert to DDIM
AS_DDIM = ("PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "DDPMScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
           "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSinglestepScheduler")
# DDIMScheduler's (and DDIMInverseScheduler's) defaults: what a DDIM-family file leaves out
DDIM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                     prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                     clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                     rescale_betas_zero_snr=False)
# Stable Diffusion's schedule (the CompVis configs), for checkpoints that carry no scheduler config
SD_SCHEDULE = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclass(frozen=True)
class Schedulers:
    """What a pipeline's scheduler and inverse_scheduler would be. json / inverse_json are the files' own keys
    (what from_config carries over to another class, see select)."""
    family: str  # "ddim" | "dpm++2m"
    scheduler: object  # engine.ddim.SchedulerConfig | engine.dpm.DPMSolverConfig: sampling and the mask's noising
    inverse_scheduler: object  # the same family's config for the inversion
    json: dict
    inverse_json: dict | None = None


def family_of(class_name: str, where: str = "scheduler") -> str:
    """The engine family that runs a diffusers scheduler class (mapped classes logged, others refused)."""
    for fam, names in CLASSES.items():
        if class_name in names:
            return fam
    if class_name in AS_DDIM:
        log.info("%s: %s runs as DDIMScheduler.from_config(its config) (DiffEdit inverts with DDIM; pass "
                 "scheduler='dpm++2m' for DPM-Solver++)", where, class_name)
        return "ddim"
    raise ValueError(f"{where}: scheduler class {class_name!r} is not supported: the engine runs DDIM "
                     f"({', '.join(CLASSES['ddim'])}) and DPM-Solver++ ({', '.join(CLASSES['dpm++2m'])}), and maps "
                     f"the discrete-time classes {', '.join(AS_DDIM)} to DDIM")


def config(d: dict, family: str, where: str = "scheduler"):
    """The family's config from a file's keys, filled with that diffusers class's defaults (from_config)."""
    n = d.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # a schedule of no steps: every run would fail
        raise ValueError(f"{where}: num_train_timesteps {n!r}: must be a whole number >= 1")
    if family == "ddim":
        return ddim.SchedulerConfig.from_json({**DDIM_DEFAULTS, **d})
    if family == "dpm++2m":
        return dpm.DPMSolverConfig.from_json(d)
    raise ValueError(f"scheduler must be one of {FAMILIES}, got {family!r}")


def from_json(sched: dict | None, inverse: dict | None = None, prediction_type: str | None = None) -> Schedulers:
    """Schedulers from the scheduler_config.json dict (None or {}: SD_SCHEDULE) and the inverse_scheduler/
    one (None: derived from the first). prediction_type overrides both files' (e.g. a single SD2 file)."""
    if not sched:
        log.info("no scheduler config: Stable Diffusion's DDIM schedule (%s)", SD_SCHEDULE)
        sched = SD_SCHEDULE
    if "_class_name" not in sched:
        raise ValueError(f"scheduler config without _class_name: {sorted(sched)}")
    over = {"prediction_type": prediction_type} if prediction_type else {}
    sched = {**sched, **over}
    fam = family_of(sched["_class_name"])
    inv = None
    if inverse is not None:
        inv = {**inverse, **over}
        inv_fam = family_of(inv.get("_class_name", "?"), "inverse_scheduler")
        if inv_fam != fam:
            raise ValueError(f"inverse_scheduler {inv.get('_class_name')!r} is not of the sampling scheduler's "
                             f"family ({sched['_class_name']!r}); mixed DDIM/DPM-Solver pairs are not supported")
    return Schedulers(fam, config(sched, fam), config(inv if inv is not None else sched, fam, "inverse_scheduler"),
                      sched, inv)


def read(root, prediction_type: str | None = None) -> Schedulers:
    """Schedulers of a diffusers folder: scheduler/scheduler_config.json and inverse_scheduler/ when present."""
    root = Path(root)
    path, inv_path = (root / sub / "scheduler_config.json" for sub in ("scheduler", "inverse_scheduler"))
    sched, inv = (_read_json(p) if p.is_file() else None for p in (path, inv_path))
    try:
        return from_json(sched, inv, prediction_type)
    except (ValueError, AssertionError, TypeError) as e:  # the config dataclasses assert their options
        raise CheckpointError(f"{path if inv is None else root}: {' '.join(str(e).split())}") from None


def _read_json(path: Path) -> dict:
    """A scheduler config file's object; CheckpointError naming the file when it is not one."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON scheduler config ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a scheduler config (a JSON object)")
    return d


def select(s: Schedulers, family: str | None = None) -> Schedulers:
    """The checkpoint's schedulers run as `family` ("ddim" | "dpm++2m"; None: the checkpoint's own). Another
    family is built from the sampling file's keys for both directions, as
    DPMSolverMultistepScheduler.from_config(pipe.scheduler.config) and
    DPMSolverMultistepInverseScheduler.from_config(pipe.scheduler.config) (an inverse_scheduler/ file belongs
    to the other family's class and is not used)."""
    if family is None or family == s.family:
        return s
    if family not in FAMILIES:
        raise ValueError(f"scheduler must be one of {FAMILIES}, got {family!r}")
    log.info("scheduler=%r on a %s checkpoint: built from its scheduler_config.json keys%s", family,
             s.json.get("_class_name"), " (inverse_scheduler/ not used)" if s.inverse_json is not None else "")
    return Schedulers(family, config(s.json, family), config(s.json, family, "inverse_scheduler"), s.json, None)


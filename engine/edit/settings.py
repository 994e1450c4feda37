"""The settings of an edit: one frozen dataclass, one set of names and defaults, used by the engine
(engine.runtime.Editor), the command line (cli.py builds its flags from it), batch manifests (a job may
override any field by name) and the output sidecar (which records `to_dict()`).

MaskSpec is the mask half of it (EditSettings.mask()), the spec the mask functions take
(diffedit.generate_mask, regions.masks, compat.generate_mask).

The algorithms take these objects instead of long keyword lists: `f(inputs, settings=None, *, per-call
arguments, **options)`, where `options` are field names of the spec (`steps=20`, `threshold="otsu"`), applied
over the given or default spec by `with_options`, checked, and an unknown name is a TypeError as for any
keyword argument. So `regions.edit_many(m, img, pairs, threshold="otsu", steps=20)` and
`regions.edit_many(m, img, pairs, EditSettings(steps=20, threshold="otsu"))` are the same call.
"""
import math
from dataclasses import asdict, dataclass, fields, replace

from ...kernels import noise_diff

EDITORS = ("fused", "inpaint", "flowedit")  # flowedit: rectified-flow models only (engine/edit/flowedit.py)
COMPATS = (None, "diffusers")
BACKGROUNDS = ("pixels", "latent", None)  # None: the mode's own (pixels for the engine, latent under compat)
SCHEDULERS = ("ddim", "dpm++2m", None)  # None: the checkpoint's own family (engine.toolkit.schedulers)
GUIDANCE_MAX = 100.0  # SD is used at 1-20; far beyond this the guided noise overflows to black images
MAPS_MAX = 1000
STEPS_MAX = 1000  # SD's num_train_timesteps; checked() takes the model's own when it is known
CROP_MARGIN_MAX = 1024  # latent cells (8 px each): beyond any image the engine takes
CACHE_INTERVAL_MAX = 1000
LATER_FIELDS = ("crop_margin", "cache_interval")  # EditSettings.identity


@dataclass(frozen=True)
class MaskSpec:
    num_maps: int = 10              # noise draws per mask
    encode_strength: float = 0.5    # noise level of the mask pass, in (0, 1]
    threshold: str = "clamp:3"      # kernels.noise_diff rule (diffedit.generate_mask also takes "soft")
    overlap: str = "argmax"         # kernels.noise_diff overlap policy (between the masks of several pairs)
    reduction: str = "l1"           # channel reduction of the noise difference: l1 | l2
    smooth: object = None           # Gaussian σ or (σ, size) on the maps before the threshold
    close: object = None            # closing kernel size or (size, iterations) of the binary masks
    extremes: float = 0.0           # maps clipped to their [q, 1 − q] quantiles first (the paper's 0.01)
    # CFG of the mask pass. With the engine's shared ∅ sample it scales every map uniformly, which every
    # threshold rule divides out; it changes the masks only under compat="diffusers" (negative prompts).
    guidance_scale: float = 7.5

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    def checked(self) -> "MaskSpec":
        """self, or a ValueError naming the first bad field."""
        _integer(self, "num_maps", 1, MAPS_MAX)
        _number(self, "encode_strength", 0, 1, lo_open=True)
        _number(self, "guidance_scale", 0, GUIDANCE_MAX)
        _number(self, "extremes", 0, 0.5, hi_open=True)
        if self.threshold != "soft":
            check_threshold(self.threshold)
        if self.overlap not in noise_diff.OVERLAPS:
            raise ValueError(f"overlap {self.overlap!r}: use one of {', '.join(noise_diff.OVERLAPS)}")
        if self.reduction not in ("l1", "l2"):
            raise ValueError(f"reduction must be 'l1' or 'l2', got {self.reduction!r}")
        return self


def _fail(name: str, value, problem: str) -> ValueError:
    """`name value: problem`, one line: the form every value check of the engine reports (the CLI and the
    manifests replace the field name by their own, --guidance for guidance_scale)."""
    shown = value if isinstance(value, str) else repr(value)
    shown = " ".join(str(shown).split()) or repr(shown)
    return ValueError(f"{name} {shown[:77] + '...' if len(shown) > 80 else shown}: {problem}")


def _number(spec, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """A ValueError unless spec.name is a finite number in the interval."""
    v = getattr(spec, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(name, v, "must be a number")
    if not math.isfinite(v):
        raise _fail(name, v, "not a finite number")
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        if hi is None:
            raise _fail(name, v, f"must be {'>' if lo_open else '>='} {lo:g}")
        raise _fail(name, v, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def _integer(spec, name, lo, hi):
    v = getattr(spec, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(name, v, "must be an integer")
    if not lo <= v <= hi:
        raise _fail(name, v, f"must be in [{lo}, {hi}]")


def check_threshold(spec) -> str:
    """A mask threshold rule in kernels.noise_diff.parse_rule's grammar with finite, in-range parameters:
    fixed:v with v in [0, 1] (the map is min-max normalised first), clamp:r with r > 0, mean:k with k >= 0,
    quantile:q with q in [0, 1]. Returns it stripped."""
    if not isinstance(spec, str):
        raise _fail("threshold", spec, "must be a rule such as clamp:3, fixed:0.5, mean, median, otsu or quantile:0.9")
    try:
        rule = noise_diff.parse_rule(spec)
    except ValueError as e:
        raise _fail("threshold", spec, str(e).partition(": ")[2] or str(e)) from None
    _, _, arg = spec.strip().partition(":")
    if arg and not math.isfinite(float(arg)):
        raise _fail("threshold", spec, "the rule's parameter must be a finite number")
    if rule.stat == "fixed" and rule.norm != "clamp" and not 0.0 <= rule.stat_param <= 1.0:
        raise _fail("threshold", spec, "fixed:v needs v in [0, 1] (the map is normalised to [0, 1] first)")
    if rule.stat == "mean" and rule.stat_param < 0:
        raise _fail("threshold", spec, "mean:k needs k >= 0")
    return spec.strip()


def with_options(spec, options: dict, names=None):
    """spec (a frozen dataclass with checked()) with the entries of `options` that name its fields — all of
    them, or only `names` — popped from `options` and applied, then checked. What stays in `options` is for
    the caller, who reports any left over with unexpected()."""
    take = {k: options.pop(k) for k in list(options) if k in (names or spec.names())}
    return replace(spec, **take).checked() if take else spec.checked()


def unexpected(fn: str, options: dict) -> None:
    """The TypeError Python raises for unknown keyword arguments, for the names left in `options`."""
    if options:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {', '.join(sorted(options))}")


@dataclass(frozen=True)
class EditSettings:
    steps: int = 50                 # sampler steps
    strength: float = 0.8           # encoding strength in (0, 1]
    guidance_scale: float = 7.5     # classifier-free guidance scale
    num_maps: int = 10              # noise draws per mask
    encode_strength: float = 0.5    # noise level of the mask pass in (0, 1]
    threshold: str = "clamp:3"      # mask threshold rule
    overlap: str = "argmax"         # overlapping masks
    editor: str = "fused"           # fused | inpaint
    compat: str | None = None       # None | "diffusers"
    negative_prompt: str = ""
    scheduler: str | None = "ddim"  # ddim | dpm++2m (DPM-Solver++(2M)); None: the checkpoint's own
    background: str | None = None   # pixels | latent; None: pixels, or latent with compat (toolkit.keep_pixels)
    # Less work per edit (issue 23; the presets in engine/edit/presets.py name sets of these). The defaults are
    # the exact computation.
    crop_margin: int | None = None  # inversion + decoding on a crop: the masks' bounding box + this many latent
                                    # cells of context (None: the full frame)
    cache_interval: int = 1         # DeepCache: the UNet's deep blocks run every k-th step, reused between (1: off)

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """to_dict() without the fields added after the first release while they hold their defaults: what a
        resumed batch's job key digests, so outputs made before a field existed still count as done."""
        d = self.to_dict()
        for name in LATER_FIELDS:
            if d[name] == getattr(EditSettings, name):
                del d[name]
        return d

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    def updated(self, **changes) -> "EditSettings":
        """A copy with `changes` (names as the fields; an unknown name is a ValueError), checked."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} (known: {', '.join(self.names())})")
        return replace(self, **changes).checked() if changes else self

    def mask(self) -> MaskSpec:
        """The mask half: the mask fields, and the edit's guidance_scale for the mask pass."""
        return MaskSpec(num_maps=self.num_maps, encode_strength=self.encode_strength, threshold=self.threshold,
                        overlap=self.overlap, guidance_scale=self.guidance_scale)

    def checked(self, n_pairs: int | None = None, num_train_timesteps: int = STEPS_MAX) -> "EditSettings":
        """self, or a ValueError `field value: problem` naming the first bad field: every limit of an edit's
        settings lives here (the CLI, manifests and the Python API all check through it). steps is at most the
        schedule's num_train_timesteps (DDIM takes every T // steps-th training timestep: more would repeat
        timesteps); n_pairs: what compat="diffusers" cannot honour."""
        _integer(self, "steps", 1, num_train_timesteps)
        _number(self, "strength", 0, 1, lo_open=True)
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"steps {self.steps} × strength {self.strength} leaves no denoising step")
        if self.threshold == "soft":
            raise ValueError("threshold 'soft' is diffedit.generate_mask's alone; an edit needs a threshold rule")
        self.mask().checked()  # num_maps, encode_strength, guidance_scale, threshold, overlap
        if self.editor not in EDITORS:
            raise ValueError(f"editor {self.editor!r}: use one of {', '.join(EDITORS)}")
        if self.editor == "inpaint" and self.scheduler == "dpm++2m":
            raise ValueError("scheduler 'dpm++2m' works with the fused editor; the inpaint editor samples with DDIM")
        if self.compat not in COMPATS:
            raise ValueError(f"compat must be None or 'diffusers', got {self.compat!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be 'ddim' or 'dpm++2m' (or None: the checkpoint's own), got "
                             f"{self.scheduler!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r}: use pixels or latent (or None: the mode's own)")
        if self.crop_margin is not None:
            _integer(self, "crop_margin", 0, CROP_MARGIN_MAX)
        _integer(self, "cache_interval", 1, CACHE_INTERVAL_MAX)
        lever = ("crop_margin", self.crop_margin) if self.crop_margin is not None else ("cache_interval", self.cache_interval)
        if self.editor != "fused" and (self.crop_margin is not None or self.cache_interval != 1):
            raise ValueError(f"{lever[0]} {lever[1]}: applies to the fused editor's inversion and decoding (got editor "
                             f"{self.editor!r})")
        if self.compat == "diffusers":
            why = "reproduces StableDiffusionDiffEditPipeline, which"
            if self.crop_margin is not None or self.cache_interval != 1:
                raise ValueError(f"{lever[0]} {lever[1]}: changes the computation; compat 'diffusers' {why} runs the "
                                 "full UNet on the full frame at every step (leave it unset)")
            if self.background == "pixels":
                raise ValueError(f"compat 'diffusers' {why} decodes the whole latent: background 'pixels' does "
                                 "not apply (use latent or leave it unset)")
            if not self.threshold.startswith("clamp:"):
                raise ValueError(f"compat 'diffusers' {why} thresholds with clamp:k only (got threshold "
                                 f"{self.threshold!r})")
            if self.overlap != "argmax":
                raise ValueError(f"compat 'diffusers' {why} edits one region: overlap {self.overlap!r} does not apply")
            if self.editor != "fused":
                raise ValueError(f"compat 'diffusers' {why} has no inpainting editor (got editor {self.editor!r})")
            if n_pairs is not None and n_pairs != 1:
                raise ValueError(f"compat 'diffusers' {why} takes one edit (got {n_pairs}); give one pair")
        return self

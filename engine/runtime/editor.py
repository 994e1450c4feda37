"""Editor: load once, optimise once (runtime.optimize), edit many images — the command line (edit, mask,
batch), the Python API and the benchmarks all come through here.

Batching across jobs (`run_batch` / `edit_batch`): jobs with the same image size, pairs and settings are
stacked into one image batch (one UNet call per step for all of them, split by the runner as needed).

Flow models (SD 3.x, FLUX.1: weights.flow_model.FlowModel) take the same path: `runner` is their transformer
(runtime.runners.TransformerRunner) where SD's is the UNet, and engine.edit dispatches the algorithms.
"""
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..edit import compat, regions, toolkit
from ..edit.settings import EditSettings
from ..files.images import as_tensor, crop_to
from ..models import sdxl
from ...weights import load_model
from . import family, presets
from .optimize import EditorOptions, optimize


@dataclass
class EditResult:
    image: torch.Tensor | None          # (3, H, W) in [0, 1] ((B, 3, H, W) for a batch); None for masks only
    masks: torch.Tensor                 # (N, h, w) at latent resolution ((B, N, h, w))
    thresholds: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    seconds: float = 0.0
    vae_fallbacks: int = 0              # encodes/decodes of this call redone in fp32 (a low-precision VAE overflowed)
    batch: int = 1                      # images in the engine call this result came from


@dataclass
class Job:
    image: object                       # PIL image or (3, H, W) float tensor in [0, 1]
    pairs: list                         # [(source, target), ...]
    options: dict = field(default_factory=dict)  # seed and EditSettings overrides by name


EDIT_DEFAULTS = {**EditSettings().to_dict(), "seed": 0}


class Editor:
    """The engine: loads once, optimises from outside the model code, and runs every edit — the command line
    (edit, mask, batch), the Python API and the benchmarks all come through here. edit / masks / edit_batch
    take EditSettings (or its fields as keywords); N pairs go through engine.regions, compat="diffusers"
    through engine.edit.compat. Memory is the runners' business (runtime.runners). preset: the speed preset
    (runtime.presets: exact, fast, fastest) the defaults start from; a call's preset= overrides it."""

    def __init__(self, model, options: EditorOptions = EditorOptions(), inpaint_model=None, preset: str = "exact"):
        presets.settings(preset, family.of_model(model))  # an unknown name, or a speed preset on a flow model
        self.base = model
        self.options = options
        self.preset = preset
        self.model, self.info = optimize(model, options)
        self.inpaint_model = inpaint_model
        self.timings: dict = {}

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, vae_dtype=None, prediction_type=None,
                        text_encoders=None, preset: str = "exact", **options) -> "Editor":
        """dtype None: float32 on a CPU; on CUDA bfloat16 for SD 3.x / FLUX.1, float16 for SD (family.default_dtype);
        preset fast / fastest: bfloat16 on a CPU with native bf16 (runtime.presets.dtype).
        text_encoders: for an SD 3.x / FLUX single file without its encoders (weights.load_model)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        fam = family.family(path)
        presets.settings(preset, fam)  # refused before the load
        dtype = dtype or presets.dtype(preset, fam, device, path)
        t0 = time.perf_counter()
        extra = {} if text_encoders is None else {"text_encoders": text_encoders}
        m = load_model(path, device=device, dtype=dtype, vae_dtype=vae_dtype, prediction_type=prediction_type,
                       **extra)
        ed = cls(m, EditorOptions(**options), preset=preset)
        ed.timings["load_s"] = time.perf_counter() - t0
        return ed

    @property
    def defaults(self) -> EditSettings:
        """The settings a call without `settings` starts from: EditSettings() with the model family's own steps and
        guidance (runtime.family.EDIT_DEFAULTS: SD 3.x 28 / 7.0, FLUX.1-dev 28 / 3.5, schnell 4 steps from 0.75),
        and flow-matching Euler (scheduler None) on a flow model, then the Editor's preset's values."""
        return self.preset_settings(self.preset)

    def preset_settings(self, preset: str) -> EditSettings:
        """EditSettings() with the model family's own values, then the preset's (runtime.presets)."""
        fam = family.of_model(self.base)
        own = {**family.EDIT_DEFAULTS.get(fam, {}), **({"scheduler": None} if family.is_flow(fam) else {})}
        return EditSettings().updated(**{**own, **presets.settings(preset, fam)})

    @property
    def runner(self):
        """The denoiser's runner: m.unet (UNetRunner), or a flow model's m.transformer (TransformerRunner)."""
        return self.model.transformer if getattr(self.model, "transformer", None) is not None else self.model.unet

    @property
    def max_batch(self):
        """Denoiser samples per call at the sizes seen so far ({(h, w): n}), or the fixed option."""
        fixed = self.runner.max_batch
        return fixed if isinstance(fixed, int) else dict(self.runner.limits)

    def _begin(self, image, pairs, settings, opts, seed, generator, preset=None):
        """What edit and masks start with: the pairs as tuples, the settings (given, or the defaults; a preset's
        values over them) with opts applied and checked, the
        generator (seed → a CPU torch.Generator unless one is given), the image as a batch with its size and
        whether it was one image, the resolution note, and the clock and VAE-fallback count _finish reads."""
        pairs = [tuple(p) for p in pairs]
        if preset is None:
            s = settings or self.defaults
        elif settings is None:  # the family's defaults with this preset's values, whatever the Editor's preset is
            s = self.preset_settings(preset)
        else:
            s = settings.updated(**presets.settings(preset, family.of_model(self.base)))
        s = s.updated(**opts).checked(len(pairs))
        gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        x, size, batched = toolkit.prepare_image(image)
        self._check_latent_size(size)
        self._resolution_note(size)
        return pairs, s, gen, x, size, batched, (time.perf_counter(), self.model.vae.fallbacks)

    def _check_latent_size(self, size) -> None:
        """A transformer that can refuse a latent size (SD 3's position table) says so before any work: the
        image's latent as the flow path pads it (sides to multiples of 8 · patch, 16 px)."""
        check = getattr(getattr(self.base, "transformer", None), "check_size", None)
        if check is not None:
            f = 8 * getattr(self.base.transformer.config, "patch_size", 2)
            check(-(-size[0] // f) * f // 8, -(-size[1] // f) * f // 8)

    @torch.inference_mode()
    def edit(self, image, pairs, settings: EditSettings | None = None, *, seed: int = 0, generator=None,
             output: str = "image", preset: str | None = None, **opts) -> EditResult:
        """Edit a PIL image, a (3, H, W) or a (B, 3, H, W) tensor in [0, 1] by every (source, target) pair.
        settings: EditSettings, or its fields as keywords (opts); preset: a runtime.presets name whose values
        go over settings (the keywords over both; the precision stays the loaded model's); seed → a CPU
        torch.Generator (generator= one, or a list with one per image, overrides it); output="latent" also
        returns the final latents."""
        pairs, s, gen, x, size, batched, start = self._begin(image, pairs, settings, opts, seed, generator, preset)
        if s.compat == "diffusers":
            r = self._compat(x, size, pairs[0], s, gen, output)
        else:
            rr = regions.edit_many(self.model, x, pairs, s, generator=gen, output=output,
                                   inpaint_model=self.inpaint_model)
            img = rr.image if rr.image is None else crop_to(rr.image, size)
            r = EditResult(img, rr.masks, rr.thresholds, rr.latents)
        return self._finish(r, start, batched)

    @torch.inference_mode()
    def masks(self, image, pairs, settings: EditSettings | None = None, *, seed: int = 0, generator=None,
              preset: str | None = None, **opts) -> EditResult:
        """Only the masks of edit(...) with the same settings, preset and seed (the same masks): no inversion, no
        decoding. EditResult with image None."""
        pairs, s, gen, x, size, batched, start = self._begin(image, pairs, settings, opts, seed, generator, preset)
        if s.compat == "diffusers":
            (src, tgt), B = pairs[0], x.shape[0]
            mk = compat.generate_mask(self.model, x, [src] * B, [tgt] * B, s.mask(), steps=s.steps, generator=gen)
            r = EditResult(None, mk[:, None])
        else:
            mr = regions.masks(self.model, x, pairs, s.mask(), steps=s.steps, generator=gen, scheduler=s.scheduler)
            r = EditResult(None, mr.weights, mr.thresholds)
        return self._finish(r, start, batched)

    def _resolution_note(self, size) -> None:
        """SD-XL below its training size is allowed and stated: a sdxl.ResolutionWarning."""
        note = sdxl.resolution_note(self.base, size)
        if note:
            warnings.warn(note, sdxl.ResolutionWarning, stacklevel=5)  # past _begin, edit/masks and inference_mode: the caller

    def _finish(self, r: EditResult, start: tuple, batched: bool) -> EditResult:
        t0, fell = start
        if torch.device(self.base.device).type == "cuda":
            torch.cuda.synchronize(self.base.device)
        r.seconds = time.perf_counter() - t0
        r.vae_fallbacks = self.model.vae.fallbacks - fell
        if not batched:
            r.image, r.masks, r.thresholds, r.latents = (v[0] if torch.is_tensor(v) else v for v in
                                                         (r.image, r.masks, r.thresholds, r.latents))
        return r

    def _compat(self, x, size, pair, s: EditSettings, gen, output) -> EditResult:
        """StableDiffusionDiffEditPipeline's three calls (engine.compat; the mask pass is DDIM, as there)."""
        B, (src, tgt), m = x.shape[0], pair, self.model
        mask = compat.generate_mask(m, x, [src] * B, [tgt] * B, s.mask(), steps=s.steps, generator=gen)
        inv = compat.invert(m, x, [src] * B, steps=s.steps, strength=s.strength, generator=gen,
                            scheduler=s.scheduler)
        out = compat.edit(m, inv, mask, [tgt] * B, s, generator=gen, size=size, output=output)
        return EditResult(out if output == "image" else None, mask[:, None], None,
                          out if output == "latent" else None)

    def run_batch(self, jobs: list, settings: EditSettings | None = None, masks_only: bool = False):
        """Yield (job index, EditResult or the exception that failed it) as engine calls complete. Jobs (or dicts
        with image/pairs/options) that share the image size, the pairs and the settings (the seed aside) are
        stacked into one image batch of at most max_images images (default: the UNet batch at that size over
        the 1 + N samples of a decoding step). Each job draws its noise from its own generator, seeded by its
        seed, so a batched job gets the numbers of the same job run alone. A failed batch is retried job by
        job, so that one bad job cannot fail the others."""
        jobs = [j if isinstance(j, Job) else Job(**j) for j in jobs]
        base = settings or self.defaults
        prepared, groups = {}, {}
        for i, j in enumerate(jobs):
            try:
                opts = {k: v for k, v in j.options.items() if k != "seed"}
                s = base.updated(**opts).checked(len(j.pairs))
                x = toolkit.prepare_image(j.image)[0][0]  # padded (3, H8, W8)
            except Exception as e:  # a bad job is reported, the others go on
                yield i, e
                continue
            prepared[i] = (x, tuple(as_tensor(j.image).shape[-2:]), s)
            groups.setdefault((tuple(x.shape), tuple(map(tuple, j.pairs)), s), []).append(i)
        for (shape, pairs, s), idx in groups.items():
            per = self.options.max_images or max(1, (self.runner.limit(shape[-2] // 8, shape[-1] // 8) or 8)
                                                 // (1 + len(pairs)))
            for c in range(0, len(idx), per):
                yield from self._run_group(jobs, prepared, idx[c:c + per], list(pairs), s, masks_only)

    def _run_group(self, jobs, prepared, chunk, pairs, s, masks_only):
        gens = [torch.Generator().manual_seed(int(jobs[i].options.get("seed", 0))) for i in chunk]
        x = torch.stack([prepared[i][0] for i in chunk])
        try:
            r = (self.masks if masks_only else self.edit)(x, pairs, settings=s, generator=gens)
        except Exception as e:
            if len(chunk) == 1:
                yield chunk[0], e
                return
            for i in chunk:
                yield from self._run_group(jobs, prepared, [i], pairs, s, masks_only)
            return
        for b, i in enumerate(chunk):
            img = None if r.image is None else crop_to(r.image[b], prepared[i][1])
            yield i, EditResult(img, r.masks[b], None if r.thresholds is None else r.thresholds[b],
                                None if r.latents is None else r.latents[b], r.seconds / len(chunk),
                                r.vae_fallbacks, len(chunk))

    def edit_batch(self, jobs: list, settings: EditSettings | None = None) -> list[EditResult]:
        """run_batch's results in the jobs' order; the first failure is raised."""
        results: list = [None] * len(jobs)
        for i, r in self.run_batch(jobs, settings):
            if isinstance(r, Exception):
                raise r
            results[i] = r
        return results

    def warmup(self, size=(512, 512), n_pairs: int = 1, batch: int = 1, **opts) -> float:
        """Compile every graph a job of this shape needs (mask pass, inversion, decoding, VAE) with a 2-step
        edit; returns its seconds. Same shapes as the real job: steps only changes the loop length."""
        t0 = time.perf_counter()
        img = torch.full((batch, 3, *size), 0.5)
        pairs = [(f"a photo of thing {i}", f"a photo of other thing {i}") for i in range(n_pairs)]
        self.edit(img, pairs, **{**opts, "steps": 2, "strength": 1.0, "encode_strength": 0.5})
        dt = time.perf_counter() - t0
        self.timings.setdefault("warmup_s", []).append(dt)
        return dt

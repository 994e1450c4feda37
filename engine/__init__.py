"""The engine's public face: `from diffedit_engine.engine import diffedit, regions, compat` works whatever the
sub-layout. The modules live in layers (models ← samplers ← edit ← runtime ← jobs; files and shapes below all);
names resolve lazily so that importing one layer never drags in the ones above it (weights imports
engine.models, and engine.runtime imports weights: an eager import here would be a cycle).
"""
import importlib

_MODULES = {
    "clip": "models.clip", "unet": "models.unet", "unet_config": "models.unet_config", "vae": "models.vae",
    "sdxl": "models.sdxl",
    "ddim": "samplers.ddim", "dpm": "samplers.dpm",
    "settings": "edit.settings", "toolkit": "edit.toolkit", "diffedit": "edit.diffedit", "compat": "edit.compat",
    "paper": "edit.paper", "regions": "edit.regions", "inpaint": "edit.inpaint", "multidiffusion": "edit.multidiffusion",
    "runtime": "runtime",
    "atomic": "files.atomic", "images": "files.images",
    "manifest": "jobs.manifest", "fingerprint": "jobs.fingerprint", "validate": "jobs.validate",
    "outputs": "jobs.outputs", "ray_batch": "jobs.ray_batch",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

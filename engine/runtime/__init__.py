"""The runtime's public face: `from diffedit_engine.engine.runtime import Editor, EditorOptions, Job`.

    fuse.py      fused q/k/v attention projections (a model transform, applied from outside)
    runners.py   UNetRunner, TransformerRunner (SD 3.x / FLUX.1), VAERunner: the one place a batch is split,
                 padded to buckets or tiled
    family.py    a checkpoint's family (sd, sd3, flux-dev, flux-schnell) from its header, before loading:
                 the default dtype and the per-family edit defaults
    memory.py    batch sizes from free memory; glibc heap buffers on CPU
    optimize.py  EditorOptions and optimize (compile, its on-disk cache, freezing, memory format)
    editor.py    Editor: load once, edit many, batching across jobs
"""
from .editor import EditResult, Editor, Job
from .optimize import EditorOptions
from .runners import TransformerRunner, UNetRunner, VAERunner, pow2_buckets

# optimize (the function) stays at runtime.optimize.optimize: exported here it would hide the module of that name
__all__ = ["EditResult", "Editor", "EditorOptions", "Job", "TransformerRunner", "UNetRunner", "VAERunner", "pow2_buckets"]

"""The runtime's names at their path before the split into fuse / runners / memory / optimize / editor
(issue 19): kept only while engine/jobs (session.py, batch.py), benchmarks (compare, gpu_suite, sdxl_bench,
test_compare) and tests (test_diffedit, test_regions, test_end_to_end, test_sdxl_edit) still import it; they
move to `from diffedit_engine.engine.runtime import ...`, and then this file goes.
"""
from .editor import Editor, Job
from .optimize import EditorOptions
from .runners import UNetRunner, pow2_buckets

__all__ = ["Editor", "EditorOptions", "Job", "UNetRunner", "pow2_buckets"]

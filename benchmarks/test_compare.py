"""benchmarks/compare.py's settings: its GPU mode pads no batch needlessly (batch 1 is a bucket, and every
bucket is at most the memory limit), and the engine's own default buckets do the same."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
from diffedit_engine.engine.runtime import UNetRunner, pow2_buckets  # noqa: E402


def padded_sizes(buckets, max_batch, sizes):
    """The batch sizes the compiled UNet sees for calls of `sizes` samples under the runner's bucketing."""
    seen = []

    def fn(x, t, ctx):
        seen.append(x.shape[0])
        return x

    runner = UNetRunner(torch.nn.Identity(), fn, buckets=buckets, max_batch=max_batch)
    for b in sizes:
        out = runner(torch.zeros(b, 4, 2, 2), torch.tensor(1), torch.zeros(b, 77, 8))
        assert out.shape[0] == b
    return seen


def test_gpu_mode_pads_no_batch_needlessly():
    m = compare.GPU
    assert m.buckets[0] == 1 and max(m.buckets) <= m.max_batch
    # a job's calls: decoding of one image at batch 1 (no CFG), CFG at 2, 3-pair decoding at 4, batch 8 at 16
    assert padded_sizes(m.buckets, m.max_batch, [1, 2, 4, 8, 16]) == [1, 2, 4, 8, 16]
    assert padded_sizes(m.buckets, m.max_batch, [3, 20]) == [4, 16, 4]   # 20 = 16 + 4 (the limit splits first)


def test_engine_default_buckets_include_one():
    assert pow2_buckets(64) == (1, 2, 4, 8, 16, 32, 64) and pow2_buckets(12)[0] == 1


def test_cli_rows_are_systems():
    assert {"cli-eager", "cli-compiled"} <= set(compare.SYSTEMS)
    assert dict(compare.CPU.timeouts).keys() >= {"cli-eager", "cli-compiled"}
    assert dict(compare.GPU.timeouts).keys() >= {"cli-eager", "cli-compiled"}

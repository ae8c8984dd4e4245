"""benchmarks/bench_scheduler.py's inputs, on the CPU (the timing itself needs a Hopper GPU)."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_scheduler  # noqa: E402


def test_uniform_seqlens():
    lens = bench_scheduler.seqlens(torch, 5, 4096, False, torch.Generator().manual_seed(0))
    assert lens.dtype == torch.int32 and lens.tolist() == [4096] * 5


def test_varlen_seqlens_follow_bench_decode_rule():
    lens = bench_scheduler.seqlens(torch, 4096, 8192, True, torch.Generator().manual_seed(0))
    assert lens.dtype == torch.int32 and int(lens.min()) >= 1 and int(lens.max()) <= 2 * 8192
    assert abs(float(lens.float().mean()) - 8192) < 400 and len(set(lens.tolist())) > 1000


def test_needs_a_gpu_without_one():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_scheduler.main([]) == 2

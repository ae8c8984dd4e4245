"""benchmarks/bench_scheduler.py on the CPU (the timing itself needs a Hopper GPU)."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_decode  # noqa: E402
import bench_scheduler  # noqa: E402


@pytest.mark.parametrize("varlen", [False, True])
def test_seqlens_are_bench_decodes(varlen):
    shape = bench_decode.Shape(4, 1024, 16, 1, varlen)
    inp = bench_decode.make_inputs(shape, 0, "cpu")
    assert np.array_equal(bench_scheduler.case_seqlens(shape, 0), inp.seqlens_cpu)


def test_needs_a_gpu_without_one(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_scheduler.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err

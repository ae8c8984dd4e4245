"""bench_decode.py's correctness gate on the CPU: every checked request is held to its own scale, and a
wrong LSE fails the row."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402

S_Q, H_Q, D_V = 1, 4, 512


def baseline() -> bench_decode.Baseline:
    # A varlen pair as the grid has it: request 0 is short (its output is a few V rows, up to ~3 in
    # magnitude), request 1 long (outputs averaged over thousands of keys, ~0.1).
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, S_Q, H_Q, D_V, generator=gen)
    out[1] *= 0.05
    lse = torch.randn(2, H_Q, S_Q, generator=gen) + 8.0
    return bench_decode.Baseline("reference", [0, 1], out, lse)


def test_exact_output_passes_and_reports_its_errors():
    base = baseline()
    fields = bench_decode.compare(base.out.clone(), base.lse.clone(), base)
    assert "error" not in fields and fields["err"] == 0.0 and fields["lse_err"] == 0.0


def test_a_long_request_off_by_half_fails_though_a_short_one_sets_the_scale():
    base = baseline()
    out = base.out.clone()
    out[1] *= 0.5  # within 5% of the batch's largest |ref|, but half of request 1's own values
    assert (out - base.out).abs().max() < bench_decode.REL_TOL * base.out.abs().max()
    fields = bench_decode.compare(out, base.lse.clone(), base)
    assert "in request 1" in fields["error"]


def test_rounding_to_bf16_passes():
    base = baseline()
    fields = bench_decode.compare(base.out.bfloat16(), base.lse.clone(), base)
    assert "error" not in fields and 0 < fields["err"] < 0.02


def test_a_wrong_lse_fails():
    base = baseline()
    lse = base.lse.clone()
    lse[1, 2, 0] += 0.1
    fields = bench_decode.compare(base.out.clone(), lse, base)
    assert fields["error"].startswith("lse mismatch vs reference") and abs(fields["lse_err"] - 0.1) < 1e-5


def test_an_lse_of_another_layout_is_only_noted():
    base = baseline()
    fields = bench_decode.compare(base.out.clone(), base.lse.transpose(1, 2).clone().repeat(1, 1, 2), base)
    assert "error" not in fields and fields["note"].startswith("lse shape")

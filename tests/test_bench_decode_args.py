"""bench_decode.py's command line (no GPU needed): which implementations run, and in which order."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402


def test_default_runs_every_impl_ours_first():
    assert bench_decode.parse_args([]).impl_names == ["ours", "flashmla", "fa3mla"]


@pytest.mark.parametrize("impls", ["flashmla,fa3mla,ours", "fa3mla,ours", "ours"])
def test_impls_run_in_the_given_order(impls):
    assert bench_decode.parse_args(["--impls", impls]).impl_names == impls.split(",")


@pytest.mark.parametrize("impls", ["ours,flashinfer", "ours,ours", ",", ""])
def test_bad_impls_are_refused_with_the_choices(impls, capsys):
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--impls", impls])
    assert "expected distinct names from ours,flashmla,fa3mla" in capsys.readouterr().err

"""bench_decode.py's command line (no GPU needed): which implementations run, and in which order."""

import sys
from pathlib import Path

import numpy as np
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


def test_both_orders_mirror_every_position():
    assert bench_decode.impl_orders(["ours", "flashmla", "fa3mla"], both_orders=False) == [["ours", "flashmla", "fa3mla"]]
    assert bench_decode.impl_orders(["ours", "flashmla", "fa3mla"], both_orders=True) == [
        ["ours", "flashmla", "fa3mla"],
        ["fa3mla", "flashmla", "ours"],
    ]
    assert bench_decode.parse_args([]).both_orders  # the default: a record without the order's bias
    assert bench_decode.parse_args(["--both-orders"]).both_orders
    assert not bench_decode.parse_args(["--no-both-orders"]).both_orders


def timed_row(us, err=1e-3, note=None, **extra):
    row = bench_decode.empty_row(bench_decode.Shape(128, 4096, 16, 1, False), "ours")
    row.update(us=us, meta_us=us / 10, err=err, lse_err=err / 100, note=note, **extra)
    return row


def test_one_pass_is_kept_as_it_is():
    row = timed_row(150.0)
    assert bench_decode.merge_passes([row]) is row
    assert "us_passes" not in row


def test_two_passes_average_the_times_and_keep_the_worse_check():
    merged = bench_decode.merge_passes(
        [timed_row(150.0, err=1e-3, note="a", watts=690.0), timed_row(154.0, err=2e-3, note="a", watts=700.0)]
    )
    assert merged["us"] == 152.0 and merged["us_passes"] == [150.0, 154.0]
    assert merged["meta_us"] == pytest.approx(15.2)
    assert merged["watts"] == 695.0
    assert merged["err"] == 2e-3 and merged["lse_err"] == 2e-5
    assert merged["note"] == "a"


def test_a_field_one_pass_lacks_is_not_averaged_from_the_other():
    merged = bench_decode.merge_passes([timed_row(150.0), {**timed_row(154.0), "meta_us": None}])
    assert merged["us"] == 152.0 and merged["meta_us"] is None


@pytest.mark.parametrize("bad", [0, 1])
def test_a_failed_pass_makes_the_row_failed(bad):
    passes = [timed_row(150.0), timed_row(154.0)]
    passes[bad] = {**passes[bad], "us": None, "error": "check failed: max|err| 1.0"}
    merged = bench_decode.merge_passes(passes)
    assert merged["error"] == "check failed: max|err| 1.0" and merged["us"] is None


def run_shape_stubbed(monkeypatch, argv):
    """run_shape with the GPU parts stubbed: returns the implementations in the order they were timed
    (the n-th timing takes 100 + 10 n us) and the rows."""
    shape = bench_decode.Shape(128, 4096, 16, 1, False)
    calls = []

    class FakeInputs:
        seqlens_cpu = np.full(shape.b, shape.s_k)

    def fake_bench_impl(impl, inp, kv_copies, n_calls, base, args):
        calls.append(impl)
        return {"us": 100.0 + 10 * len(calls), "meta_us": 1.0, "err": 0.0, "lse_err": 0.0}, None

    monkeypatch.setattr(bench_decode, "make_inputs", lambda s, seed, device: FakeInputs())
    monkeypatch.setattr(bench_decode, "kv_rotation", lambda inp, l2: ([None], 8))
    monkeypatch.setattr(bench_decode, "reference_baseline", lambda inp: object())
    monkeypatch.setattr(bench_decode, "bench_impl", fake_bench_impl)
    monkeypatch.setattr(bench_decode.torch.cuda, "empty_cache", lambda: None)
    args = bench_decode.parse_args(argv)
    impls = {n: n for n in args.impl_names}
    rows = bench_decode.run_shape(shape, impls, {}, args.impl_names, args, 50 * 2**20)
    nbytes, _ = bench_decode.work(shape, FakeInputs.seqlens_cpu)
    return calls, {r["impl"]: r for r in rows}, [r["impl"] for r in rows], nbytes


@pytest.mark.parametrize("argv", [["--impls", "ours,flashmla,fa3mla"], ["--both-orders"]])
def test_run_shape_times_each_impl_in_both_positions(monkeypatch, argv):
    """By default (and with --both-orders) every implementation is timed in both positions and each row
    is the mean of its two timings, with bandwidth from the mean."""
    calls, by_impl, order, nbytes = run_shape_stubbed(monkeypatch, argv)
    assert calls == ["ours", "flashmla", "fa3mla", "fa3mla", "flashmla", "ours"]
    assert order == ["ours", "flashmla", "fa3mla"]
    assert by_impl["ours"]["us_passes"] == [110.0, 160.0] and by_impl["ours"]["us"] == 135.0
    assert by_impl["flashmla"]["us"] == 135.0 and by_impl["fa3mla"]["us"] == 135.0
    assert by_impl["ours"]["gbps"] == round(nbytes / 135e-6 / 1e9, 2)


def test_run_shape_with_no_both_orders_times_each_impl_once(monkeypatch):
    calls, by_impl, order, nbytes = run_shape_stubbed(monkeypatch, ["--impls", "flashmla,ours", "--no-both-orders"])
    assert calls == order == ["flashmla", "ours"]
    assert by_impl["flashmla"]["us"] == 110.0 and by_impl["ours"]["us"] == 120.0
    assert by_impl["ours"]["gbps"] == round(nbytes / 120e-6 / 1e9, 2)
